"""Build the sampler input x (B, L) from token ids: prefix and suffix prompting, infilling of
arbitrary spans, unconditional generation. Position 0 is always BOS: with the shift it is never
predicted, so it must be given.
"""
from __future__ import annotations

from typing import Sequence

import torch


def prompt_canvas(bos_id: int, mask_id: int, length: int, prefix: Sequence[int] = (), suffix: Sequence[int] = (),
                  batch: int = 1) -> torch.Tensor:
    """(batch, 1 + len(prefix) + length + len(suffix)) long: BOS, prefix, `length` masks, suffix.

    No prefix and no suffix is unconditional generation.
    """
    if length < 0 or batch < 1:
        raise ValueError(f"need length >= 0 and batch >= 1, got length={length}, batch={batch}")
    row = [bos_id, *prefix, *([mask_id] * length), *suffix]
    return torch.tensor(row, dtype=torch.long).expand(batch, -1).clone()


def infill_canvas(bos_id: int, mask_id: int, ids: Sequence[int], spans: Sequence[tuple[int, int]],
                  batch: int = 1) -> torch.Tensor:
    """(batch, 1 + len(ids)) long: BOS then `ids` with each [start, end) span (indices into `ids`) masked."""
    x = torch.tensor([bos_id, *ids], dtype=torch.long)
    for start, end in spans:
        if not 0 <= start < end <= len(ids):
            raise ValueError(f"span [{start}, {end}) is not inside the {len(ids)} given tokens")
        x[1 + start:1 + end] = mask_id
    return x.expand(batch, -1).clone()


def segments_canvas(bos_id: int, mask_id: int, segments: Sequence[Sequence[int] | int], batch: int = 1) -> torch.Tensor:
    """(batch, L) long from BOS then segments in order: a list of ids is given, an int n is n masks."""
    row = [bos_id]
    for seg in segments:
        row.extend([mask_id] * seg if isinstance(seg, int) else seg)
    return torch.tensor(row, dtype=torch.long).expand(batch, -1).clone()
