"""What every objective shares: the noised batch, the attention a forward asks for, the model call."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Protocol, runtime_checkable

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


class JointCausal:
    """The joint causal term of one training step (Nemotron-Labs-Diffusion, I-DLM): alpha x the clean sequences'
    next-token CE over their scored positions, divided by the global count of those positions (its own token mean,
    whatever diffusion.loss_norm is). Built by `Objective.joint_term`; the loop adds `term` to each micro-batch's
    loss and logs `mean`."""

    def __init__(self, objective: "Objective", forward: Forward, scored_all: torch.Tensor, mine: slice,
                 all_sum: Callable[[list[float]], list[float]]):
        self.objective, self.forward, self.scored = objective, forward, scored_all[mine]
        self.count = max(1.0, float(scored_all.sum()))  # every rank's sequences: the global batch's count
        self.total, self.all_sum = 0.0, all_sum

    def loss_sum(self, x0: torch.Tensor, rows: slice, docs: torch.Tensor | None,
                 logits: torch.Tensor | None = None) -> torch.Tensor:
        """The summed causal NLL of these rows of this rank's sequences: from the step's own causal `logits`
        when its forward gave them (a causal clean stream), else one forward of its own."""
        if logits is not None:
            out = self.objective.causal_nll_sum(logits, x0, self.scored[rows])
        else:
            out = self.objective.causal_loss_sum(self.forward, x0, self.scored[rows], docs)
        self.total += out.item() if torch.isfinite(out) else 0.0
        return out

    def term(self, ar_sum: torch.Tensor) -> torch.Tensor:
        """What the summed NLL adds to the micro-batch's loss."""
        return self.objective.ar_weight * ar_sum / self.count

    def mean(self, bad: bool) -> float:
        """The step's causal NLL per scored token over every rank (NaN for a skipped step)."""
        (total,) = self.all_sum([self.total])
        return float("nan") if bad else total / self.count


@runtime_checkable
class Objective(Protocol):
    """The run-time half of an objective: what a training step and the held-out bound call on an instance.

    Registered by name in `adapt.objectives.OBJECTIVES` and chosen by `diffusion.objective`; the name is recorded
    in an export's diffusion.json, and evaluation rebuilds the objective from that metadata. What is asked before
    a model exists is its `Spec` (adapt.objectives.spec), an instance of its class's `spec_class` built around the
    class. That spec reads the class's constructor-side members, which change with `__init__`: `sections` (the
    recipe sections it reads), `from_config(cfg, meta, blocked)`, `from_meta(meta, blocked, backend, dtype)` and
    `meta_fields(cfg)` (the diffusion.json fields `from_meta` reads back).
    """

    name: ClassVar[str]
    spec_class: ClassVar[type]
    mask_id: int
    shift: bool
    eps: float
    blocked: torch.Tensor
    ar_weight: float

    # --- a training step --------------------------------------------------------------------------
    def batch_rows(self, idx: torch.Tensor) -> torch.Tensor: ...
    def maskable(self, x0: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor: ...
    def scored(self, x0: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor: ...
    def corrupt(self, x0: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator) -> Noised: ...
    def normaliser(self, maskable: torch.Tensor, masked: torch.Tensor) -> float: ...
    def predict_joint(self, forward: Forward, x0: torch.Tensor, noised: Noised, attention: Attention): ...
    def loss_sum(self, logits: torch.Tensor, x0: torch.Tensor, noised: Noised) -> torch.Tensor: ...
    def distill_sum(self, logits: torch.Tensor, teacher: torch.Tensor | None,
                    noised: Noised) -> torch.Tensor | None: ...
    def joint_term(self, forward: Forward, scored_all: torch.Tensor, mine: slice,
                   all_sum: Callable[[list[float]], list[float]]) -> JointCausal | None: ...
    def causal_logits(self, forward: Forward, x0: torch.Tensor, docs: torch.Tensor | None = None) -> torch.Tensor: ...
    def onpolicy_teacher(self, forward: Forward, x0: torch.Tensor, noised: Noised, logits: torch.Tensor,
                         attention: Attention) -> torch.Tensor: ...

    # --- the bound --------------------------------------------------------------------------------
    def eval_attention(self, causal: bool, length: int, docs: torch.Tensor | None) -> Attention: ...
    def bound_group(self, length: int) -> int: ...
    def nll_sums(self, forward: Forward, x0: torch.Tensor, masked: torch.Tensor, attention: Attention,
                 parts: tuple[torch.Tensor, ...] = (), weight: torch.Tensor | None = None) -> torch.Tensor: ...
