"""Distributions over the vocabulary: temperature / top-k / top-p filtering (`TokenFilter`), drawing, confidence.

All functions take rows of log-probabilities (N, V) (one row per position being decided) so that
samplers only pay for the positions they touch, never for the whole (B, L, V) tensor.
Random numbers come from a CPU generator and are moved to the rows' device, so a seed gives the
same draws on CPU and GPU.
"""
from __future__ import annotations

import torch

# the filter, drawing and confidence the decoder every export ships uses too (it runs without this package)
from adapt.export.hf_generate.primitives import CONFIDENCES, TokenFilter, confidence, draw

__all__ = ["CONFIDENCES", "TokenFilter", "confidence", "draw", "uniform"]


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) draws from a CPU generator, moved to `device`."""
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(device)
