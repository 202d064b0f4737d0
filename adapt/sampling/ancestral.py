"""MDLM ancestral sampling: from t to s < t each masked position is revealed with probability (t-s)/t.

When no position changed in a step the denoiser output is reused (the model sees the same input),
so the number of model calls (NFE) can be lower than the number of steps.
"""
from __future__ import annotations

import torch


def draw(logp: torch.Tensor, generator: torch.Generator | None, temperature: float = 1.0) -> torch.Tensor:
    """Sample ids from (..., V) log-probabilities (Gumbel-max, driven by a CPU generator)."""
    if temperature <= 0:
        return logp.argmax(-1)
    u = torch.rand(logp.shape, generator=generator, dtype=torch.float32).to(logp.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)).clamp_min(1e-20))
    return (logp / temperature + gumbel).argmax(-1)


@torch.no_grad()
def ancestral_sample(denoiser, x: torch.Tensor, steps: int, generator: torch.Generator | None = None,
                     temperature: float = 1.0) -> torch.Tensor:
    """Fill every mask position of x (B, L) in `steps` steps; other positions are never changed."""
    mask_id = denoiser.mask_id
    x = x.clone()
    times = torch.linspace(1.0, 0.0, steps + 1)
    logp = None
    for t, s in zip(times[:-1], times[1:]):
        masked = x == mask_id
        if not masked.any():
            break
        if logp is None:
            logp = denoiser(x).to(x.device)
        reveal = (torch.rand(x.shape, generator=generator) < (t - s) / t).to(x.device) & masked
        if reveal.any():
            x = torch.where(reveal, draw(logp, generator, temperature), x)
            logp = None  # the input changed: the next step needs a fresh model call
    return x
