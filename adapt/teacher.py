"""The parent as distillation teacher (`diffusion.distill_teacher=parent`): its causal logits of the clean sequence,
row i-1 predicting token i, computed without gradient in one extra forward per micro-batch.

Under LoRA the parent is the model itself with its adapters disabled (peft's `disable_adapter`: no second copy;
the trained mask-token row is never read, as x_0 holds no mask token). Without LoRA the weights being trained are
no longer the parent's, so a frozen copy is made before training starts (one more model's weights per rank).
"""
from __future__ import annotations

import contextlib
import copy

import torch

from adapt.objectives import ModelForward


class ParentTeacher:
    """forward of the parent on a clean micro-batch: `logits(engine, objective, x0, docs)`."""

    def __init__(self, frozen: torch.nn.Module | None, device: torch.device):
        self.frozen, self.device = frozen, device
        """The frozen copy (full fine-tuning), or None: the LoRA model with its adapters disabled."""

    @classmethod
    def build(cls, cfg, model: torch.nn.Module, device: torch.device) -> "ParentTeacher | None":
        """The run's teacher, or None when the term is off or its teacher is the clean stream. Call it before LoRA
        wraps `model` and before any update (the copy is the parent as loaded, with the mask token added)."""
        d = cfg.diffusion
        if not d.distill_weight or d.distill_teacher != "parent":
            return None
        if cfg.lora.enabled:
            return cls(None, device)
        frozen = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        return cls(frozen, device)

    @torch.no_grad()
    def logits(self, engine, objective, x0: torch.Tensor, docs: torch.Tensor | None) -> torch.Tensor:
        """(B, L, V) the parent's causal logits of x0 (within documents when `docs` is given), no gradient."""
        if self.frozen is not None:
            return objective.causal_logits(ModelForward(self.frozen, self.device), x0, docs)
        peft_model = engine.module
        off = peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else contextlib.nullcontext()
        with off:
            return objective.causal_logits(ModelForward(engine, self.device), x0, docs)
