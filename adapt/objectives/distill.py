"""The distillation term's recipe keys (`diffusion.distill.*`; adapt.objectives.diffusion.distill_kl): a training term
only, every bound stays the exact ELBO. Both objectives take it (`sections`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from adapt.recipe.limits import SIZE_MAX, ranged


@dataclass
class DistillConfig:
    weight: float = ranged(0.0, 0.0)
    """Adds this weight x tau^2 KL(teacher || model) summed over the `positions`, per loss-normalised token like the
    diffusion loss; 0 = off (the other keys are then ignored)."""
    positions: Literal["frontier", "masked", "context"] = "frontier"
    """Where the term applies: frontier (masked positions whose block shows every earlier token and hides every later
    one: there the teacher's next-token distribution is the exact target), masked (every masked position: a biased
    target) or context (every masked position, its term times the share of the tokens before it that the model sees:
    the teacher's bias grows with the hidden context it reads and the model cannot)."""
    teacher: Literal["clean", "parent"] = "clean"
    """The teacher: clean = the same forward's causal clean stream, without gradient (block diffusion with
    diffusion.block.clean_attention=causal; no extra forward); parent = the parent's causal forward of the clean
    sequence (under LoRA the model with its adapters disabled, else a frozen copy; one extra forward without
    gradient)."""
    top_k: int = ranged(0, 0, SIZE_MAX)
    """Keep the teacher's k most likely ids, renormalised (for 128k vocabularies); 0 = the full vocabulary."""
    temperature: float = ranged(1.0, 0.0, 100.0, open_below=True)
    """Softmax temperature tau of teacher and model in the distillation term."""
    onpolicy: float = ranged(0.0, 0.0, 1.0)
    """On-policy share (OPDLM): this share of each micro-batch's rows is taught on the model's own drafts: its masked
    positions filled with the model's most likely ids, the teacher's causal distribution given those drafts (and
    the clean blocks before) as the target; one more teacher forward. 0 = the teacher reads the data alone."""
    schedule: Literal["constant", "linear"] = "constant"
    """The weight over training: constant, or linear (weight x (1 - step / train.max_steps): the full weight at the
    first step, falling to zero at the end, so the run ends on the diffusion loss alone)."""


Distill = DistillConfig
"""The name objectives' constructors take the term's options by (None there = no term)."""
