"""Command-line options of the eval scripts: the common arguments, value types that refuse bad input at
parse time (argparse then names the flag and exits 2), and `EvalError`, what a bad input raises later."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch

from adapt.export import export_problem
from adapt.cli.types import (at_least, device, fraction, non_negative, seed, text,  # noqa: F401 (the eval
                             writable_dir)  # scripts' option types)

MAX_TOKENS = 1 << 16
"""The most tokens a length option may ask for before the model is read (a sequence of 65,536 tokens
already needs tens of GB for attention under full bidirectional masks); eval.cli.positions_check then
holds the sequence to the export's max_position_embeddings."""

MAX_COUNT = 10_000_000
"""The most samples, blocks, documents, draws or rows an option may ask for: the scripts keep every one in
memory (generation holds samples x length token ids), so a mistyped count fails here, not after hours."""


def tokens(low: int = 1) -> Callable[[str], int]:
    """A length option in tokens: an int in [low, MAX_TOKENS]."""
    return at_least(low, MAX_TOKENS, "the eval scripts' bound on a sequence; the model's own limit is checked "
                    "once its folder is read")


def count(low: int = 1) -> Callable[[str], int]:
    """A count option (samples, blocks, draws, rows per batch): an int in [low, MAX_COUNT]."""
    return at_least(low, MAX_COUNT, "the eval scripts' bound on a count; each item is held in memory")


class EvalError(RuntimeError):
    """A user error of an eval script (an input it cannot use); the message names it and says what to do."""


def export_check(model_dir: Path) -> None:
    """EvalError when `model_dir` is not a loadable export (adapt.export.export_problem says why)."""
    problem = export_problem(model_dir)
    if problem:
        raise EvalError(problem)


def add_common_args(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """MODEL_DIR and the options every eval script shares (`model=False`: only where results go and
    what runs them, for scripts that load no diffusion model)."""
    if model:
        parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR",
                            help="exported diffusion model folder (e.g. checkpoints/<run>/final)")
    parser.add_argument("--out-dir", type=writable_dir, default="eval_out",
                        help="folder for results JSON and plots (checked writable before any work)")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--seed", type=seed, default=0, help="seed of every random stream (adapt.train.rng)")
    parser.add_argument("--threads", type=at_least(0, 4096), default=0, help="torch CPU threads (0 = torch's default)")
    if model:
        parser.add_argument("--parent", type=text, default="",
                            help="parent causal LM (default: the one the export names)")
        parser.add_argument("--judge", type=text, default="",
                            help="judge causal LM for generative perplexity (default: the parent)")
        parser.add_argument("--data-files", nargs="*", default=None, help="text/jsonl files to hold out from "
                            "(default: the training recipe's data, else the embedded corpus)")
        parser.add_argument("--cache-dir", default=None, help="cache of tokenised blocks (default: the recipe's)")


ESTIMATOR = "count"
"""The Monte Carlo estimator of the bound (adapt.train.likelihood.METHODS) the eval scripts and the harness use
unless told otherwise: masked-count draws, 0.174 nats^2 per token vs 0.654 for stratified t at equal cost
on the 135M model (docs/decisions.md)."""


def add_samplers(parser: argparse.ArgumentParser, default: list[str]) -> None:
    """--samplers: names of adapt.decode.SAMPLER_NAMES (an unknown one is refused at parse time)."""
    from adapt.decode import SAMPLER_NAMES

    parser.add_argument("--samplers", nargs="+", default=default, choices=list(SAMPLER_NAMES), metavar="SAMPLER",
                        help=f"samplers to run, of {', '.join(SAMPLER_NAMES)}")
