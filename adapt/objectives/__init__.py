"""Training objectives: each owns how a batch is corrupted, the attention it needs, its loss sum and
normaliser, its joint causal term, its held-out bound, and what recipe checks, memory estimates, model cards
and decoders need to know about it (the `Objective` protocol of adapt.objectives.base). The training loop, the
evaluation scripts, the harness adapter, the samplers and the benchmarks call an objective and never branch on
which one it is.

An objective is chosen by name (`diffusion.objective`) and the name is recorded in an export's diffusion.json.
Adding one means a class and an entry in `OBJECTIVES`: nothing else changes.
"""
from __future__ import annotations

import torch

from adapt.objectives.base import Attention, CardNotes, Forward, JointCausal, ModelForward, Noised, Objective
from adapt.objectives.block import BlockDiffusion
from adapt.objectives.mdlm import MaskedDiffusion
from adapt.objectives.spec import Decoding, meta_get
from adapt.model import DiffusionMeta

OBJECTIVES: dict[str, type] = {"mdlm": MaskedDiffusion, "block": BlockDiffusion}
"""name -> objective class (each implements `Objective`); `diffusion.objective` picks one."""
AUTO = "auto"
"""`diffusion.objective` of recipes written before objectives had names: chosen by the block length."""

__all__ = ["AUTO", "OBJECTIVES", "Attention", "BlockDiffusion", "CardNotes", "Decoding", "Forward", "JointCausal",
           "MaskedDiffusion", "ModelForward", "Noised", "Objective", "decoding", "for_meta", "from_config", "make",
           "meta_class", "objective_name", "selected"]


class UnknownObjective(ValueError):
    """An objective name that no registered class answers to; the message lists the names."""


def objective_name(block_length: int, name: str = AUTO) -> str:
    """The objective's name: `name` when given, else by the block length (0 = the whole sequence, b > 0 = blocks)."""
    if name and name != AUTO:
        return name
    return "block" if block_length > 0 else "mdlm"


def _lookup(name: str, where: str) -> type:
    if name not in OBJECTIVES:
        raise UnknownObjective(f"{where} names the objective {name!r}, which is not one of: "
                               f"{', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def selected(cfg) -> type:
    """The class of a recipe's objective (`diffusion.objective`, or `auto`: by `diffusion.block.length`)."""
    return _lookup(objective_name(cfg.diffusion.block.length, cfg.diffusion.objective), "diffusion.objective")


def meta_class(meta: DiffusionMeta | dict) -> type:
    """The class of the objective an export was trained with (its diffusion.json; exports written before
    objectives had names are chosen by their block length)."""
    name = objective_name(meta_get(meta, "block_length", 0) or 0, meta_get(meta, "objective", "") or AUTO)
    return _lookup(name, "the export's diffusion metadata")


def decoding(meta: DiffusionMeta | dict) -> Decoding:
    """How an export must be decoded, as its objective answers from its metadata (a DiffusionMeta or a
    diffusion.json dict): the block length it needs and whether its clean stream is a causal LM."""
    return meta_class(meta).decoding(meta)


def from_config(cfg, meta: DiffusionMeta, blocked: torch.Tensor):
    """The recipe's objective for training and its evaluation."""
    return selected(cfg).from_config(cfg, meta, blocked)


def for_meta(meta: DiffusionMeta, blocked: torch.Tensor, backend: str = "sdpa", dtype: str = "fp32"):
    """The objective an export was trained with, from its metadata (for evaluation)."""
    return meta_class(meta).from_meta(meta, blocked, backend, dtype)


def make(block_length: int, *args, clean_attention: str = "block", noised_attention: str = "bidirectional", **kwargs):
    """An objective by block length from constructor arguments (the benchmarks' sweeps over b): masked diffusion
    over the whole sequence at 0, block diffusion otherwise (`clean_attention` is its clean stream,
    `noised_attention` its noised block)."""
    extra = {"block_length": block_length, "clean_causal": clean_attention == "causal",
             "noised_causal": noised_attention == "causal"} if block_length > 0 else {}
    return OBJECTIVES[objective_name(block_length)](*args, **extra, **kwargs)
