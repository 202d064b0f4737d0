"""Threshold parallel decoding (Fast-dLLM, Wu et al. 2025): at each step commit every masked
position whose confidence is >= tau, and always at least one (the most confident).

`steps` is a budget: each step also commits at least LLaDA's share of the positions
(`transfer_counts`), so sampling ends within `steps` model calls. With steps >= the number of
positions to fill that floor is one position per step, as in Fast-dLLM.
"""
from __future__ import annotations

import torch

from adapt.decode.categorical import TokenFilter
from adapt.decode.confidence import check_confidence, position_confidence
from adapt.decode.loop import Step, Trace, denoise_loop, top_ranked, transfer_counts


@torch.no_grad()
def threshold_sample(denoiser, x: torch.Tensor, steps: int, generator: torch.Generator | None = None,
                     tau: float = 0.9, confidence: str = "prob", temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, active: torch.Tensor | None = None,
                     trace: Trace | None = None) -> torch.Tensor:
    """Fill the mask positions of x (B, L) long, committing all positions with confidence >= tau -> (B, L) long."""
    check_confidence(confidence)

    def propose(step: Step) -> torch.Tensor:
        score = position_confidence(step, confidence)
        floor = transfer_counts(step.initial, step.steps)[:, step.index].clamp_min(1)
        return ((score >= tau) & step.masked) | top_ranked(score, step.masked, floor)

    filt = TokenFilter(temperature, top_k, top_p)
    return denoise_loop(denoiser, x, steps, propose, generator, filt, active, trace)
