"""Training objectives: each owns how a batch is corrupted, the attention it needs, its loss sum and
normaliser, and its held-out bound. The training loop, the evaluation scripts, the harness adapter and
the benchmarks call an objective and never its internals.

An objective is chosen by the recipe (`objective_name`); adding one means a module here and an entry
in `OBJECTIVES`.
"""
from __future__ import annotations

import torch

from adapt.config import Config
from adapt.model import DiffusionMeta
from adapt.objectives.base import Attention, Forward, ModelForward, Noised
from adapt.objectives.block import BlockDiffusion
from adapt.objectives.mdlm import MaskedDiffusion

OBJECTIVES = {"mdlm": MaskedDiffusion, "block": BlockDiffusion}
"""name -> objective class."""

__all__ = ["OBJECTIVES", "Attention", "BlockDiffusion", "Forward", "MaskedDiffusion", "ModelForward", "Noised", "for_meta", "from_config", "make",
           "objective_name"]


def objective_name(block_length: int) -> str:
    """The objective of a block length: 0 = masked diffusion over the whole block, b > 0 = block diffusion."""
    return "block" if block_length > 0 else "mdlm"


def make(block_length: int, *args, clean_attention: str = "block", **kwargs):
    """The objective of a block length (0 = masked diffusion over the whole block), built from the objective's own
    arguments; `clean_attention` is block diffusion's clean stream and is ignored for the whole block."""
    extra = {"block_length": block_length, "clean_causal": clean_attention == "causal"} if block_length > 0 else {}
    return OBJECTIVES[objective_name(block_length)](*args, **extra, **kwargs)


def from_config(cfg: Config, meta: DiffusionMeta, blocked: torch.Tensor):
    """The recipe's objective (`diffusion.block_length`) for training and its evaluation."""
    return make(cfg.diffusion.block_length, meta.mask_token_id, cfg.diffusion.shift, blocked, cfg.diffusion.eps,
                 cfg.diffusion.t_sampling, cfg.diffusion.loss_norm, cfg.model.attn_implementation, cfg.model.dtype,
                 ar_weight=cfg.diffusion.ar_loss_weight, position_masking=cfg.diffusion.position_masking,
                 clean_attention=cfg.diffusion.clean_attention, t_range=(cfg.diffusion.t_min, cfg.diffusion.t_max),
                 t_per_block=cfg.diffusion.t_per_block, complementary=cfg.diffusion.complementary_masks)


def for_meta(meta: DiffusionMeta, blocked: torch.Tensor, backend: str = "sdpa", dtype: str = "fp32"):
    """The objective an export was trained with, from its metadata (for evaluation)."""
    return make(meta.block_length, meta.mask_token_id, meta.shift, blocked, meta.eps, "stratified", "token",
                 backend, dtype, clean_attention=meta.clean_attention)
