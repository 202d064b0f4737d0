"""Semi-autoregressive block decoding (LLaDA, Nie et al. 2025; Block Diffusion) and stopping at EOS.

The span from the first to the last position to fill is cut into blocks of `block_length`
positions, filled left to right; any sampler runs inside each block with its share of the steps,
while later blocks stay masked (and visible to the model as masks). With a prefix-cached
denoiser the cache is extended to everything committed before each block (as in Fast-dLLM's
block-wise cache). With `eos_id`, generated positions after a row's first generated EOS are set to
EOS after every block, so once every row has stopped the remaining blocks cost no model call.
"""
from __future__ import annotations

from typing import Callable

import torch

from adapt.sampling.loop import Trace


def block_spans(fill: torch.Tensor, block_length: int) -> list[tuple[int, int]]:
    """fill (B, L) bool positions to generate -> [(start, end)) column ranges of the blocks, left to right."""
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    cols = fill.any(0).nonzero().flatten()
    if len(cols) == 0:
        return []
    first, last = int(cols[0]), int(cols[-1]) + 1
    return [(a, min(a + block_length, last)) for a in range(first, last, block_length)]


def split_steps(steps: int, blocks: int) -> list[int]:
    """Share `steps` among `blocks` as evenly as possible (earlier blocks get the remainder)."""
    if steps < blocks:
        raise ValueError(f"{steps} steps cannot cover {blocks} blocks (one step each at least); "
                         f"raise steps or block_length")
    return [steps // blocks + (i < steps % blocks) for i in range(blocks)]


def stop_after_eos(x: torch.Tensor, generated: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Set every generated position after a row's first generated EOS to EOS -> (B, L) long.

    x (B, L) long; generated (B, L) bool marks positions that were masked at the start (given
    positions are never changed).
    """
    is_eos = generated & (x == eos_id)
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return torch.where(after & generated, torch.full_like(x, eos_id), x)


def sample_blocks(sampler: Callable[..., torch.Tensor], denoiser, x: torch.Tensor, steps: int, block_length: int,
                  generator: torch.Generator | None = None, trace: Trace | None = None,
                  eos_id: int | None = None, **options) -> torch.Tensor:
    """Run `sampler` block by block over the mask positions of x (B, L) long -> (B, L) long."""
    generated = x == denoiser.mask_id
    spans = block_spans(generated, block_length)
    if not spans:
        return x.clone()
    for (a, b), n in zip(spans, split_steps(steps, len(spans))):
        active = torch.zeros_like(generated)
        active[:, a:b] = True
        if not (active & (x == denoiser.mask_id)).any():
            continue  # nothing left here (or every row stopped at EOS)
        if hasattr(denoiser, "update_prefix"):
            denoiser.update_prefix(x)
        x = sampler(denoiser, x, n, generator, active=active, trace=trace, **options)
        if eos_id is not None:
            x = stop_after_eos(x, generated.to(x.device), eos_id)
    return x
