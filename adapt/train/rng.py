"""Named random streams: every draw in training and evaluation comes from `generator(seed, stream, ...)`.

A stream is a pure function of (seed, stream, step, rank), so a resumed run replays exactly what an
uninterrupted run would have drawn, with no RNG state to carry, and two scripts that ask for the same
stream draw the same numbers.

The stream numbers are the salts the training loop has used since its first release (1: batch noise,
2: attention pattern, 3: dropout, 7919: held-out evaluation), kept so that existing runs resume
bit-identically.
"""
from __future__ import annotations

import torch

STREAMS = {
    "noise": 1,  # t and the masked positions of a training step (global batch, the same on every rank)
    "attention": 2,  # the annealed attention pattern of a training step (the same on every rank)
    "dropout": 3,  # the global torch RNG that dropout draws from (per rank)
    "eval": 7919,  # held-out draws of the training evaluation (the same on every rank)
    "estimate": 5,  # Monte Carlo draws of the evaluation scripts
    "sample": 6,  # samplers of the evaluation scripts and the end-of-run sample
}


def mix(*parts: int) -> int:
    """One 63-bit seed from integers, order-sensitive (a polynomial hash)."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2**63 - 1)
    return h


def seed_for(seed: int, stream: str, step: int | None = None, rank: int | None = None) -> int:
    """The seed of `stream` at `step` on `rank`; None leaves a part out (e.g. streams shared by all ranks)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; use one of {', '.join(STREAMS)}")
    parts = [seed] + ([step] if step is not None else []) + [STREAMS[stream]] + ([rank] if rank is not None else [])
    return mix(*parts)


def generator(seed: int, stream: str, step: int | None = None, rank: int | None = None) -> torch.Generator:
    """A CPU generator for `stream` (see `seed_for`)."""
    return torch.Generator().manual_seed(seed_for(seed, stream, step, rank))
