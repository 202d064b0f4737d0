"""The parent as distillation teacher (`diffusion.distill.teacher=parent`): its causal logits of the clean sequence,
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
    """The parent's forward (`forward(engine)`, a context) for the distillation teacher (`teacher_logits`)."""

    def __init__(self, frozen: torch.nn.Module | None, device: torch.device):
        self.frozen, self.device = frozen, device
        """The frozen copy (full fine-tuning), or None: the LoRA model with its adapters disabled."""

    @classmethod
    def build(cls, cfg, model: torch.nn.Module, device: torch.device) -> "ParentTeacher | None":
        """The run's teacher, or None when the term is off or its teacher is the clean stream. Call it before LoRA
        wraps `model` and before any update (the copy is the parent as loaded, with the mask token added)."""
        d = cfg.diffusion
        if not d.distill.weight or d.distill.teacher != "parent":
            return None
        if cfg.lora.enabled:
            return cls(None, device)
        frozen = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        return cls(frozen, device)

    @contextlib.contextmanager
    def forward(self, engine):
        """The parent's forward while the context lasts: the frozen copy's, or the engine's with adapters off."""
        if self.frozen is not None:
            yield ModelForward(self.frozen, self.device)
            return
        peft_model = getattr(engine, "module", engine)
        off = peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else contextlib.nullcontext()
        with off:
            yield ModelForward(engine, self.device)


@torch.no_grad()
def teacher_logits(parent: ParentTeacher | None, engine, device, objective, x0: torch.Tensor, noised, logits,
                   clean: torch.Tensor | None, attention) -> torch.Tensor | None:
    """One micro-batch's distillation teacher (B, L, V), row i-1 predicting token i, or None when the term is off.

    The first round(distill_onpolicy x B) rows are taught on the model's own drafts (`objective.onpolicy_teacher`,
    one more forward of the parent, or of the model itself without gradient when the teacher is its clean stream);
    the others read the data: the parent's causal forward of x0, or `clean`, the step's own clean-stream rows."""
    d = objective.distill
    if d is None:
        return None
    n = round(d.onpolicy * len(x0))
    parts = []
    with parent.forward(engine) if parent is not None else contextlib.nullcontext(ModelForward(engine, device)) as fw:
        if n:
            head = slice(0, n)
            parts.append(objective.onpolicy_teacher(fw, x0[head], noised.rows(head), logits[head],
                                                    attention.rows(head)))
        if n < len(x0):
            rest = slice(n, len(x0))
            parts.append(clean[rest] if parent is None else
                         objective.causal_logits(fw, x0[rest], attention.rows(rest).docs))
    return parts[0] if len(parts) == 1 else torch.cat([t.to(device) for t in parts])
