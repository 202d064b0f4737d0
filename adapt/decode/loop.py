"""The denoising loop every sampler shares: ask the denoiser, decide which masked positions to
reveal, draw their tokens, repeat.

A sampler family only supplies `propose`: given the step and the denoiser output, which masked
positions to reveal now. The loop guarantees the rest for every family:
- only positions that are masked and `active` (the current block) ever change, so given tokens
  are never touched (SEDD Algorithm 3: infilling keeps the given indices fixed);
- revealed tokens are drawn from the filtered p_theta(x0_i | x_t) (`TokenFilter`);
- caching: the denoiser output is reused while the input is unchanged (MDLM), so steps that
  reveal nothing cost no model call; our denoisers do not take t, so this is exact;
- the trace records at which step each position was revealed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from adapt.export.hf_generate.primitives import top_ranked, transfer_counts
from adapt.decode.categorical import TokenFilter, draw

__all__ = ["Propose", "Step", "Trace", "bernoulli", "denoise_loop", "top_ranked", "transfer_counts"]


@dataclass
class Trace:
    """What happened during sampling, filled in by `denoise_loop`."""

    reveal_step: torch.Tensor | None = None
    """(B, L) long: global step at which each position was revealed; -1 for never (given) positions."""
    steps_run: int = 0
    """Loop iterations so far, over all blocks (the next global step index)."""
    calls_at_step: list[int] = field(default_factory=list)
    """Denoiser calls (1 or 0, cached) made at each global step."""

    def start(self, x: torch.Tensor) -> None:
        if self.reveal_step is None:
            self.reveal_step = torch.full(x.shape, -1, dtype=torch.long, device=x.device)

    def record(self, reveal: torch.Tensor, called: bool) -> None:
        if reveal.any():
            self.reveal_step[reveal] = self.steps_run
        self.calls_at_step.append(int(called))
        self.steps_run += 1


@dataclass
class Step:
    """What `propose` sees at one step."""

    index: int
    """0-based step within this loop (block)."""
    steps: int
    """Number of steps of this loop (block)."""
    logp: torch.Tensor
    """(B, L, V) log p_theta(x0_i | x_t), rows aligned so row i predicts token i."""
    masked: torch.Tensor
    """(B, L) bool: masked positions this loop may reveal."""
    initial: torch.Tensor
    """(B,) long: number of such positions when the loop started."""
    generator: torch.Generator | None
    filt: TokenFilter


Propose = Callable[[Step], torch.Tensor]
"""Step -> (B, L) bool positions to reveal now (a subset of step.masked)."""


@torch.no_grad()
def denoise_loop(denoiser, x: torch.Tensor, steps: int, propose: Propose, generator: torch.Generator | None = None,
                 filt: TokenFilter = TokenFilter(), active: torch.Tensor | None = None,
                 trace: Trace | None = None, cache: bool = True) -> torch.Tensor:
    """Run `steps` steps on x (B, L) long; returns the new (B, L) ids (x itself is not modified).

    `active` (B, L) bool limits which masked positions may be revealed (None = all masked).
    Stops early once no active position is masked.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    trace = trace if trace is not None else Trace()
    trace.start(x)
    x = x.clone()
    fill = x == denoiser.mask_id
    if active is not None:
        fill &= active.to(x.device)
    initial = fill.sum(1)
    logp = None
    for k in range(steps):
        masked = fill & (x == denoiser.mask_id)
        if not masked.any():
            break
        called = logp is None or not cache
        if called:
            logp = denoiser(x).to(x.device)
        reveal = propose(Step(k, steps, logp, masked, initial, generator, filt)) & masked
        if reveal.any():
            x[reveal] = draw(logp[reveal], generator, filt)
            logp = None  # the input changed: the next step needs a fresh model call
        trace.record(reveal, called)
    return x


def bernoulli(prob: torch.Tensor | float, masked: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, L) bool: each masked position independently True with probability `prob` (scalar or (B, L))."""
    u = torch.rand(masked.shape, generator=generator, dtype=torch.float64).to(masked.device)
    return (u < prob) & masked
