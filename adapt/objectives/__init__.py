"""Training objectives, each in two halves.

The run-time `Objective` (adapt.objectives.base) is what a training step and the held-out bound call on an
instance: how a batch is corrupted, the attention a forward needs, the loss sum and its normaliser, the joint
causal and distillation terms, the bound's attention and sums. The training step (adapt.train.loop), the bound
(adapt.train.likelihood), the evaluation scripts and the harness adapter (eval/) and the benchmarks build one
(`from_config`, `for_meta`, `make`) and call it without branching on which it is.

Its `Spec` (adapt.objectives.spec) answers what is asked before any model exists: the config schema (its
`sections`, adapt.recipe.config), the recipe and export checks (adapt.recipe.load), the metadata fields training
records and its attention curriculum's target (adapt.train.loop's set-up), the memory estimate (adapt.estimate), the
export contract and model card (adapt.export.contract, adapt.export.card), and how an export decodes (`decoding(meta)`,
asked by the samplers, the block cache and the speculative decoder, which branch on its answer: the block
length and whether the clean stream is a causal LM).

An objective is chosen by name (`diffusion.objective`) and the name is recorded in an export's diffusion.json.
Adding one means a run-time class (with its `spec_class`, a spec subclass when its answers differ) and an entry
in `OBJECTIVES`: nothing else changes.
"""
from __future__ import annotations

import torch

from adapt.objectives.base import Attention, Forward, JointCausal, ModelForward, Noised, Objective
from adapt.objectives.block import BlockDiffusion, BlockDiffusionSpec
from adapt.objectives.mdlm import MaskedDiffusion, MaskedDiffusionSpec
from adapt.objectives.spec import CardNotes, Decoding, Spec, meta_get
from adapt.model.causal import DiffusionMeta

OBJECTIVES: dict[str, type] = {"mdlm": MaskedDiffusion, "block": BlockDiffusion}
"""name -> objective class (each implements `Objective`); `diffusion.objective` picks one."""
AUTO = "auto"
"""`diffusion.objective` of recipes written before objectives had names: chosen by the block length."""

__all__ = ["AUTO", "OBJECTIVES", "Attention", "BlockDiffusion", "BlockDiffusionSpec", "CardNotes", "Decoding",
           "Forward", "JointCausal", "MaskedDiffusion", "MaskedDiffusionSpec", "ModelForward", "Noised", "Objective",
           "Spec", "decoding", "for_meta", "from_config", "make", "meta_class", "objective_name", "selected",
           "spec_for", "spec_for_meta", "spec_of"]


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
    """The run-time class of a recipe's objective (`diffusion.objective`, or `auto`: by `diffusion.block.length`)."""
    return _lookup(objective_name(cfg.diffusion.block.length, cfg.diffusion.objective), "diffusion.objective")


def meta_class(meta: DiffusionMeta | dict) -> type:
    """The run-time class of the objective an export was trained with (its diffusion.json; exports written before
    objectives had names are chosen by their block length)."""
    name = objective_name(meta_get(meta, "block_length", 0) or 0, meta_get(meta, "objective", "") or AUTO)
    return _lookup(name, "the export's diffusion metadata")


def spec_of(objective: type) -> Spec:
    """The spec of a registered run-time class: its `spec_class` built around it."""
    return objective.spec_class(objective)


def spec_for(cfg) -> Spec:
    """The spec of a recipe's objective; raises UnknownObjective for a name no class is registered under."""
    return spec_of(selected(cfg))


def spec_for_meta(meta: DiffusionMeta | dict) -> Spec:
    """The spec of the objective an export was trained with (a DiffusionMeta or a diffusion.json dict)."""
    return spec_of(meta_class(meta))


def decoding(meta: DiffusionMeta | dict) -> Decoding:
    """How an export must be decoded, as its objective's spec answers from its metadata (a DiffusionMeta or a
    diffusion.json dict): the block length it needs and whether its clean stream is a causal LM."""
    return spec_for_meta(meta).decoding(meta)


def from_config(cfg, meta: DiffusionMeta, blocked: torch.Tensor) -> Objective:
    """The recipe's objective for training and its evaluation."""
    return spec_for(cfg).build(cfg, meta, blocked)


def for_meta(meta: DiffusionMeta, blocked: torch.Tensor, backend: str = "sdpa", dtype: str = "fp32") -> Objective:
    """The objective an export was trained with, from its metadata (for evaluation)."""
    return spec_for_meta(meta).rebuild(meta, blocked, backend, dtype)


def make(block_length: int, *args, clean_attention: str = "block", noised_attention: str = "bidirectional", **kwargs):
    """An objective by block length from constructor arguments (the benchmarks' sweeps over b): masked diffusion
    over the whole sequence at 0, block diffusion otherwise (`clean_attention` is its clean stream,
    `noised_attention` its noised block)."""
    extra = {"block_length": block_length, "clean_causal": clean_attention == "causal",
             "noised_causal": noised_attention == "causal"} if block_length > 0 else {}
    return OBJECTIVES[objective_name(block_length)](*args, **extra, **kwargs)
