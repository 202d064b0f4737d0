"""Confidence-based remasking (LLaDA, Nie et al. 2025; Dream, Ye et al. 2025): at each step draw a
token at every masked position, keep the k most confident ones and leave the rest masked.

k follows LLaDA's schedule (`transfer_counts`): n // steps per step, one more in the first
n % steps steps, so a row with n positions to fill is done after exactly min(n, steps) model calls.
Confidence is computed from the filtered distribution at the position (top probability, top-1
minus top-2 margin, or negative entropy; see `categorical.confidence`).
"""
from __future__ import annotations

import torch

from adapt.decode.categorical import CONFIDENCES, TokenFilter, confidence
from adapt.decode.loop import Step, Trace, denoise_loop, top_ranked, transfer_counts


def position_confidence(step: Step, kind: str) -> torch.Tensor:
    """(B, L) float confidence at the step's masked positions, -inf elsewhere."""
    rows = step.filt.apply(step.logp[step.masked])
    score = torch.full(step.masked.shape, -torch.inf, device=step.masked.device)
    score[step.masked] = confidence(rows, kind).float()
    return score


def check_confidence(kind: str) -> None:
    if kind not in CONFIDENCES:
        raise ValueError(f"unknown confidence {kind!r}; use one of {', '.join(CONFIDENCES)}")


@torch.no_grad()
def confidence_sample(denoiser, x: torch.Tensor, steps: int, generator: torch.Generator | None = None,
                      confidence: str = "prob", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      active: torch.Tensor | None = None, trace: Trace | None = None) -> torch.Tensor:
    """Fill the mask positions of x (B, L) long, committing the most confident ones first -> (B, L) long."""
    check_confidence(confidence)

    def propose(step: Step) -> torch.Tensor:
        count = transfer_counts(step.initial, step.steps)[:, step.index]
        return top_ranked(position_confidence(step, confidence), step.masked, count)

    filt = TokenFilter(temperature, top_k, top_p)
    return denoise_loop(denoiser, x, steps, propose, generator, filt, active, trace)
