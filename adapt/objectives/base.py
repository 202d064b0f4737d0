"""What every objective shares: the noised batch, the attention a forward asks for, the model call."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

Forward = Callable[..., torch.Tensor]
"""forward(input_ids (B, L'), attention_mask or None) -> raw logits (B, L', V); the model call."""


@dataclass
class Noised:
    """A draw of q(x_t | x_0) for a batch."""

    xt: torch.Tensor
    """(B, L) long: x0 with the masked positions replaced by [MASK]."""
    masked: torch.Tensor
    """(B, L) bool."""
    t: torch.Tensor | None
    """(B,) float32 diffusion times, or (B, L) one per token (one t per block); None for the bound's draws,
    which carry their own weights."""

    def rows(self, sl: slice) -> "Noised":
        """The draw of rows `sl` of the batch."""
        return Noised(self.xt[sl], self.masked[sl], None if self.t is None else self.t[sl])


@dataclass
class Attention:
    """The attention the loop asks a forward to use: the annealing state and document boundaries."""

    visible: torch.Tensor | None = None
    """(L, L) bool pattern of this step (True = query may attend key); None = fully bidirectional."""
    ratio: float = 1.0
    """Anneal ratio r of the step (the window schedule's width)."""
    schedule: str = "random"
    """attention.anneal_schedule."""
    docs: torch.Tensor | None = None
    """(B, L) document index per token when packed documents must not see each other."""
    block: int = 0
    """Block length of this step under the `blocks` schedule (block diffusion's curriculum); 0 = the target."""

    def rows(self, sl: slice) -> "Attention":
        """The same attention for rows `sl` of the batch."""
        return replace(self, docs=None if self.docs is None else self.docs[sl])


class ModelForward:
    """The model call an objective makes: forward(ids, mask) -> raw logits, ids moved to the model's device.

    `model` is an HF causal LM or a DeepSpeed engine wrapping one; `calls` counts forwards (NFE).
    """

    def __init__(self, model, device: torch.device | str):
        self.model, self.device, self.calls = model, torch.device(device), 0

    def __call__(self, input_ids: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        self.calls += 1
        return self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask, use_cache=False,
                          **kwargs).logits
