"""MDLM ancestral sampling (Sahoo et al. 2024): from t to s < t each masked position is revealed
with probability (t - s) / t and its token drawn from p_theta(x0_i | x_t).

Time runs on the uniform grid t_k = 1 - k / steps. The last step (s = 0) reveals every position
left. When a step reveals nothing the model sees the same input, so the previous output is reused
(caching): the number of model calls (NFE) can be lower than `steps`.
"""
from __future__ import annotations

import torch

from adapt.decode.categorical import TokenFilter
from adapt.decode.loop import Step, Trace, bernoulli, denoise_loop


def reveal_prob(t: float, s: float) -> float:
    """q(x_s revealed | x_t masked) under the linear schedule: (t - s) / t."""
    return (t - s) / t


def _propose(step: Step) -> torch.Tensor:
    t = 1.0 - step.index / step.steps
    s = 1.0 - (step.index + 1) / step.steps
    return bernoulli(reveal_prob(t, s), step.masked, step.generator)


@torch.no_grad()
def ancestral_sample(denoiser, x: torch.Tensor, steps: int, generator: torch.Generator | None = None,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cache: bool = True,
                     active: torch.Tensor | None = None, trace: Trace | None = None) -> torch.Tensor:
    """Fill the mask positions of x (B, L) long in `steps` steps -> (B, L) long; given positions never change.

    `cache=False` calls the model at every step (for measuring what caching saves).
    """
    filt = TokenFilter(temperature, top_k, top_p)
    return denoise_loop(denoiser, x, steps, _propose, generator, filt, active, trace, cache)
