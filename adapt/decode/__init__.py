"""Samplers: token ids in, token ids out. Each takes a denoiser (see adapt.decode.denoiser.Denoiser):
a callable (B, L) ids -> (B, L, V) log p_theta(x0_i | x_t), rows already aligned for the shift,
with attributes `mask_id` and `nfe` (model calls so far).

Positions of x holding the mask id are filled; every other position is given and never changes.
`generate` is the common entry: it picks a sampler from `SAMPLERS` by name and adds what works
with all of them: semi-autoregressive blocks, a prefix KV cache, stopping at EOS, the trajectory.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from adapt import objectives
from adapt.draft_head import DraftHead
from adapt.decode.ancestral import ancestral_sample
from adapt.decode.blocks import sample_blocks, stop_after_eos
from adapt.decode.confidence import confidence_sample
from adapt.decode.loop import Trace
from adapt.decode.sedd import analytic_sample, euler_sample
from adapt.decode.speculative import speculative_decode
from adapt.decode.threshold import threshold_sample

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ancestral": ancestral_sample,
    "euler": euler_sample,
    "analytic": analytic_sample,
    "confidence": confidence_sample,
    "threshold": threshold_sample,
}
"""name -> fn(denoiser, x (B, L) long, steps, generator=None, **options) -> (B, L) long."""

SPECULATIVE = "speculative"
"""Not a family inside a block but a decoder of block exports with a causal clean stream
(adapt.decode.speculative): the noised stream drafts, the clean stream checks; `steps` does not apply."""
CHAIN = "chain"
"""The speculative decoder with every draft kept unchecked: one call per block, each block's first token from the
clean stream and the rest drafted one after another (through the export's draft head when it has one); not exact."""
SAMPLER_NAMES = (*SAMPLERS, SPECULATIVE, CHAIN)
"""Every name `generate` takes."""

_LOOP_ARGS = ("denoiser", "x", "steps", "generator", "active", "trace", "model", "meta", "eos_id", "check",
              "draft_head")


@dataclass
class SampleResult:
    """What `generate` returns."""

    ids: torch.Tensor
    """(B, L) long: x with every mask position filled."""
    nfe: int
    """Model calls made (prefix-cache builds included)."""
    steps_run: int
    """Sampler steps taken (steps that reused the cached model output included)."""
    trajectory: torch.Tensor | None = None
    """(B, L) long: step at which each position was revealed, -1 for given positions and positions
    filled with EOS after a stop; None unless asked for."""

    def revealed(self, row: int = 0) -> list[tuple[int, list[int]]]:
        """[(step, [positions revealed at that step])] of one row, in step order (needs the trajectory)."""
        if self.trajectory is None:
            raise ValueError("no trajectory recorded: call generate(..., trajectory=True)")
        steps = self.trajectory[row]
        return [(int(s), steps.eq(s).nonzero().flatten().tolist()) for s in steps[steps >= 0].unique()]


def sampler_options(name: str) -> dict[str, object]:
    """The options (name -> default) a sampler accepts besides the loop arguments."""
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLER_NAMES)}")
    fn = speculative_decode if name in (SPECULATIVE, CHAIN) else SAMPLERS[name]
    params = inspect.signature(fn).parameters
    return {k: p.default for k, p in params.items() if k not in _LOOP_ARGS}


def _check(denoiser, x: torch.Tensor, sampler: str, options: dict) -> None:
    unknown = sorted(set(options) - set(sampler_options(sampler)))
    problems = [f"sampler {sampler!r} takes no option {', '.join(unknown)} "
                f"(it takes {', '.join(sampler_options(sampler))})"] if unknown else []
    if x.dim() != 2 or x.dtype != torch.long:
        problems.append(f"x must be (B, L) long token ids, got {tuple(x.shape)} {x.dtype}")
    elif getattr(denoiser, "shift", False) and (x[:, 0] == denoiser.mask_id).any():
        problems.append("position 0 is masked, but with the shift it is never predicted: prepend BOS")
    if problems:
        raise ValueError("; ".join(problems))


def _with_prefix_cache(denoiser):
    from adapt.decode.denoiser import PrefixCachedDenoiser

    if isinstance(denoiser, PrefixCachedDenoiser):
        return denoiser
    if not hasattr(denoiser, "model") or not hasattr(denoiser, "meta"):
        raise ValueError("prefix_cache needs an adapt.decode.denoiser.Denoiser (a model to cache keys/values of)")
    return PrefixCachedDenoiser(denoiser.model, denoiser.meta)


@torch.no_grad()
def generate(denoiser, x: torch.Tensor, sampler: str = "ancestral", steps: int | None = None,
             generator: torch.Generator | None = None, block_length: int | None = None,
             prefix_cache: bool = False, eos_id: int | None = None, trajectory: bool = False,
             force_block_length: bool = False, draft_head: DraftHead | None = None, **options) -> SampleResult:
    """Fill the mask positions of x (B, L) long with the named sampler.

    steps: sampler steps (the model is called at most this often, plus one call per prefix-cache
    build); None = one per position to fill. block_length: fill left to right in blocks of this
    many positions (semi-autoregressive), steps shared among the blocks. prefix_cache: reuse the
    keys/values of the given prefix (an approximation under bidirectional attention; see
    adapt.decode.denoiser). eos_id: generated positions after a row's first generated EOS become EOS,
    and block mode stops once every row has one. options: the sampler's own (see `sampler_options`).
    sampler "speculative" decodes a block export with a causal clean stream by drafting with the noised
    stream and checking with the clean one (adapt.decode.speculative); `steps` does not apply to it, nor to
    "chain", which keeps every draft unchecked (one call per block). draft_head: the export's draft head
    (adapt.draft_head.load_draft_head) those two draft through; None drafts from the noised stream; other samplers
    do not use it.
    A block-diffusion export (meta.block_length > 0) is decoded block by block with its exact KV cache
    (adapt.decode.block_cache); another block_length is refused unless force_block_length.
    """
    _check(denoiser, x, sampler, options)
    if sampler in (SPECULATIVE, CHAIN):
        return _generate_speculative(denoiser, x, generator, block_length, eos_id, trajectory,
                                     dict(options, check=sampler == SPECULATIVE, draft_head=draft_head))
    meta = getattr(denoiser, "meta", None)
    trained = 0 if meta is None else objectives.decoding(meta).block_length
    if trained and not force_block_length:
        if block_length not in (None, 0, trained):
            raise ValueError(f"this is a block-diffusion export trained with blocks of {trained} tokens: decoding "
                             f"with block_length={block_length} conditions each block on a context it was never "
                             f"trained on; omit block_length (the export's is used), or pass "
                             f"force_block_length=True (--force-block-length) to decode it as a whole-sequence model")
        return _generate_blocks(denoiser, x, sampler, steps, generator, eos_id, trajectory, options)
    den = _with_prefix_cache(denoiser) if prefix_cache else denoiser
    x = x.to(getattr(den, "device", x.device))
    generated = x == den.mask_id
    steps = capped_steps(steps, generated, sampler)
    trace, nfe0 = Trace(), den.nfe
    trace.start(x)
    fn = SAMPLERS[sampler]
    if prefix_cache:
        den.update_prefix(x)
    if block_length:
        ids = sample_blocks(fn, den, x, steps, block_length, generator, trace, eos_id, **options)
    else:
        ids = fn(den, x, steps, generator, trace=trace, **options)
    if eos_id is not None:
        ids = stop_after_eos(ids, generated, [eos_id])
    nfe = den.nfe - nfe0
    if den is not denoiser:
        denoiser.nfe += nfe
    return SampleResult(ids, nfe, trace.steps_run, trace.reveal_step if trajectory else None)


COMMIT_SAMPLERS = ("confidence", "threshold")
"""Samplers that commit at least one position per step: steps past the positions to fill commit nothing."""
GRID_STEPS_PER_POSITION = 256
"""A time-grid sampler (ancestral, SEDD) at this many steps per position to fill reveals two positions in the same
step with probability about n / 512 for n positions: as close to its continuous-time limit as more steps would be."""


def capped_steps(steps: int | None, generated: torch.Tensor, sampler: str) -> int:
    """The steps to run: `steps` (None = one per position to fill), capped at what the positions to fill can use:
    their count for a committing sampler (the same output), GRID_STEPS_PER_POSITION times it for a time-grid one.
    The loop stays bounded by the work it has: an enormous --steps would otherwise spin through empty steps."""
    need = max(1, int(generated.sum(1).max()))
    if steps is None:
        return need
    return min(steps, need if sampler in COMMIT_SAMPLERS else need * GRID_STEPS_PER_POSITION)


def _generate_blocks(denoiser, x, sampler, steps, generator, eos_id, trajectory, options) -> SampleResult:
    from adapt.decode.block_cache import BlockCachedDenoiser, sample_block_cached

    den = BlockCachedDenoiser(denoiser.model, denoiser.meta)
    x = x.to(den.device)
    steps = capped_steps(steps, x == den.mask_id, sampler)
    trace = Trace()
    ids = sample_block_cached(SAMPLERS[sampler], den, x, steps, generator, trace, eos_id, **options)
    denoiser.nfe += den.nfe
    return SampleResult(ids, den.nfe, trace.steps_run, trace.reveal_step if trajectory else None)


def _generate_speculative(denoiser, x, generator, block_length, eos_id, trajectory, options) -> SampleResult:
    meta = getattr(denoiser, "meta", None)
    if meta is None or not hasattr(denoiser, "model"):
        raise ValueError("speculative decoding needs an adapt.decode.denoiser.Denoiser (a model and its metadata)")
    own = objectives.decoding(meta).block_length
    if block_length not in (None, 0, own):
        raise ValueError(f"speculative decoding drafts whole blocks of the export's own length ({own}); "
                         f"omit block_length")
    trace = Trace()
    ids, calls = speculative_decode(denoiser.model, meta, x.to(denoiser.device), generator, eos_id=eos_id,
                                    trace=trace, **options)
    denoiser.nfe += calls
    return SampleResult(ids, calls, trace.steps_run, trace.reveal_step if trajectory else None)


__all__ = ["SAMPLER_NAMES", "SPECULATIVE", "SAMPLERS", "SampleResult", "generate", "sampler_options",
           "ancestral_sample", "euler_sample", "analytic_sample", "confidence_sample", "threshold_sample"]
