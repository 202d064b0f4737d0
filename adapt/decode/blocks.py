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

from adapt.export.hf_generate.primitives import block_spans, split_steps, stop_after_eos
from adapt.decode.loop import Trace

__all__ = ["block_spans", "sample_blocks", "split_steps", "stop_after_eos"]


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
            x = stop_after_eos(x, generated.to(x.device), [eos_id])
    return x
