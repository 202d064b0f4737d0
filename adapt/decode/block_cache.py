"""Decoding a block-diffusion export: block by block, committed blocks in an exact KV cache, any sampler
family inside the current block.

Sequences are aligned from BOS (position 0) as in training; a block that holds given tokens (a prompt's partial
last block) keeps them fixed while its masks are filled. The cache mechanics are the ones the export's own
decoder uses (`adapt.export.hf_generate.generate.BlockCache`: the current block attends the cache and itself; a
finished block enters the cache within the next block's first call, whose last clean row predicts that
block's first token, so a commit costs no call), and the library and plain transformers decode the same way.
Exact: equal to one forward over [clean blocks < k | block k] under the block mask (tested).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

import torch

from adapt import objectives
from adapt.export.hf_generate import generate as hf
from adapt.export.hf_generate.primitives import split_steps, stop_after_eos
from adapt.decode.loop import Trace


class BlockCachedDenoiser:
    """A denoiser over the whole canvas (B, L) that computes only the current block's rows, from the cache.

    Call `start(x)` once, set `block` to the block being filled, `commit(x, k)` after it is done.
    Rows outside the current block are 0 (never read: samplers only touch active masked positions).
    """

    def __init__(self, model: torch.nn.Module, meta, cached: bool = True):
        self.model, self.meta, self.mask_id, self.shift = model, meta, meta.mask_token_id, False  # rows aligned here
        self.b, self.cached, self.block = objectives.decoding(meta).block_length, cached, 0
        self._state: hf.BlockCache | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def nfe(self) -> int:
        return 0 if self._state is None else self._state.den.calls

    def start(self, x: torch.Tensor, width: int) -> None:
        """x (B, W') padded to whole blocks; columns >= width are padding no query ever sees."""
        valid = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
        valid[:, :width] = True
        pos = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        den = hf.CanvasModel(self.model, asdict(self.meta), valid, pos)
        self._state = hf.BlockCache(den, x, self.b, cached=self.cached)

    def commit(self, x: torch.Tensor, upto: int) -> None:
        self._state.commit(x, upto)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a, e = self.block * self.b, (self.block + 1) * self.b
        logits = self._state.predictions(x[:, :e], self.block)  # (B, b, V), row i predicts column a + i
        out = torch.zeros(x.shape + logits.shape[-1:], dtype=torch.float32, device=x.device)
        out[:, a:e] = self._state.den.log_probs(logits)
        return out


def sample_block_cached(sampler: Callable[..., torch.Tensor], den: BlockCachedDenoiser, x: torch.Tensor,
                        steps: int, generator: torch.Generator | None = None, trace: Trace | None = None,
                        eos_id: int | None = None, **options) -> torch.Tensor:
    """Fill the masks of x (B, L) block by block with `sampler`, steps shared among the blocks to fill."""
    b, width = den.b, x.shape[1]
    # whole blocks: the last one padded with columns that are never filled and that no query sees
    x = torch.cat([x, torch.full((len(x), -width % b), den.mask_id, dtype=x.dtype, device=x.device)], 1)
    generated = x == den.mask_id
    generated[:, width:] = False
    if trace is not None:
        trace.start(x)
    todo = generated.any(0).view(-1, b).any(1).nonzero().flatten().tolist()
    if not todo:
        return x[:, :width].clone()
    den.start(x, width)
    den.commit(x, todo[0])
    for k, n in zip(range(todo[0], todo[-1] + 1), split_steps(steps, todo[-1] + 1 - todo[0])):
        active = torch.zeros_like(generated)
        active[:, k * b:min((k + 1) * b, width)] = True
        den.block = k
        if (active & (x == den.mask_id)).any():
            x = sampler(den, x, n, generator, active=active, trace=trace, **options)
        if eos_id is not None:
            x = stop_after_eos(x, generated, [eos_id])
        if k == todo[-1] or not (generated & (x == den.mask_id))[:, (k + 1) * b:].any():
            break
        den.commit(x, k + 1)
    if trace is not None:
        trace.reveal_step = trace.reveal_step[:, :width]
    return x[:, :width]
