"""The one `main` of every eval script: common arguments, the models loaded once, results, user errors.

A script is a `Script`: its name (it writes <out-dir>/<name>.json), its own arguments and
`run(ctx, args) -> dict`. `run_script` builds the parser (the common arguments of eval.options, then the
script's), parses, checks the inputs, loads the models into an `EvalContext`, runs, writes the results
with their provenance (eval.results) and prints a summary; the scripts show their own progress bars.
eval.suite runs the same scripts through `parse` and `execute` with one shared context.

A user error (a missing folder or one that is not an export, a model that does not load, unusable data,
an option out of range, an unknown sampler or device) prints one message that names the input and the
fix, exits with code 2 and writes nothing; only a bug shows a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from eval.models import EvalContext, context_from_args
from eval.options import EvalError, add_common_args, export_check, writable_dir
from eval.results import provenance, write_results


def _no_files(result: dict, ctx: EvalContext | None, args: argparse.Namespace) -> dict:
    return result


def _no_check(args: argparse.Namespace) -> None:
    return None


def _no_sequences(args: argparse.Namespace) -> dict[str, int]:
    return {}


@dataclass(frozen=True)
class Script:
    name: str
    """The results file is <out-dir>/<name>.json."""
    module: str
    """How it is run: `python -m <module>`."""
    doc: str
    """The module docstring (its first line is the parser's description)."""
    add_args: Callable[[argparse.ArgumentParser], None]
    """The script's own arguments (each with its default; eval.suite's budgets override them by name)."""
    run: Callable[[EvalContext | None, argparse.Namespace], dict]
    """The measurement: the loaded models and the parsed arguments -> the results."""
    summary: Callable[[dict], list[str]] = lambda result: []
    """Lines printed after the results are written."""
    files: Callable[[dict, EvalContext | None, argparse.Namespace], dict] = _no_files
    """Writes the script's other files (plots, samples) into args.out_dir; returns the results to save."""
    check: Callable[[argparse.Namespace], None] = _no_check
    """Checks (and resolves) the arguments before any model loads; raises EvalError."""
    model: bool = True
    """Takes MODEL_DIR and loads it (False: eval.mauve_score reads text samples only)."""
    sequences: Callable[[argparse.Namespace], dict[str, int]] = _no_sequences
    """The longest sequence the model is given, by the options that set it: {"--length": tokens}."""


@contextlib.contextmanager
def user_errors():
    """adapt.cli.errors.friendly() (the project's own errors: one message, exit 2), and the eval scripts' EvalError."""
    from adapt.cli.errors import friendly

    with friendly(EvalError):
        yield


def build_parser(script: Script) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {script.module}", description=script.doc.split("\n")[0])
    add_common_args(parser, model=script.model)
    script.add_args(parser)
    return parser


def parse(script: Script, argv: list[str] | None) -> argparse.Namespace:
    """The parsed and checked arguments; argparse reports a bad value (exit 2), `check` raises EvalError."""
    args = build_parser(script).parse_args(argv)
    script.check(args)
    out_dir_check(args)
    if script.model:
        positions_check(args.model_dir, script.sequences(args))
    return args


def out_dir_check(args: argparse.Namespace) -> None:
    """EvalError when --out-dir, as `check` resolved it, cannot be written: found before any model loads,
    not after the whole evaluation ran (argparse's type checks only a folder given on the command line)."""
    if getattr(args, "out_dir", None) is None:
        return
    try:
        writable_dir(str(args.out_dir))
    except argparse.ArgumentTypeError as err:
        raise EvalError(f"--out-dir: {err}") from None


def max_positions(model_dir: Path) -> int | None:
    """The export's position limit from its config.json (None when unreadable: export_check says why)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    limit = config.get("max_position_embeddings", config.get("n_positions")) if isinstance(config, dict) else None
    return limit if isinstance(limit, int) and limit > 0 else None


def positions_check(model_dir: Path, sequences: dict[str, int]) -> None:
    """EvalError when an option asks for a sequence longer than the model's positions (it would fail, or
    silently extrapolate, only after the models loaded)."""
    limit = max_positions(model_dir) if sequences else None
    over = {opts: n for opts, n in sequences.items() if limit is not None and n > limit}
    if over:
        said = "; ".join(f"a sequence of {n} tokens ({opts})" for opts, n in over.items())
        raise EvalError(f"{said}: longer than the {limit} positions of {model_dir} (max_position_embeddings in "
                        f"its config.json); choose shorter lengths")


def execute(script: Script, ctx: EvalContext | None, args: argparse.Namespace) -> dict:
    """Run the script on loaded models, write its files and results; returns the results."""
    result = script.files(script.run(ctx, args), ctx, args)
    result["provenance"] = provenance(ctx, vars(args))
    path = write_results(args.out_dir, script.name, result)
    print("\n".join(script.summary(result) + [f"wrote {path}"]), flush=True)
    return result


def run_script(script: Script, argv: list[str] | None = None) -> dict:
    """The command line of one script: parse, check, load the models once, run, write."""
    with user_errors():
        args = parse(script, argv)
        ctx = None
        if script.model:
            export_check(args.model_dir)
            print(f"loading {args.model_dir}", file=sys.stderr, flush=True)
            ctx = context_from_args(args)
        return execute(script, ctx, args)
