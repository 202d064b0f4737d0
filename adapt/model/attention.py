"""Attention masks as small pure functions: causal, annealed, bidirectional, per-document.

Masks are built once per forward, outside the layers, as boolean "visible" matrices
(True = query i may attend key j) and turned into the additive float form the model takes.
A fully bidirectional step with no document boundaries needs no mask tensor at all (`None`);
the model's attention modules are then switched to non-causal by `adapt.model.causal.set_causal`.

The window schedule is also built as a FlexAttention `BlockMask` (`window_block_mask`): a mask_mod
instead of a dense (L, L) float tensor, so the flex kernel skips every fully hidden block.
flash_attention_2 cannot anneal: see `backend_problem`.
"""
from __future__ import annotations

import torch

# block diffusion's attention rule, defined once, in the decoder every export ships (it runs without this package)
from adapt.export.hf_generate.primitives import block_visible  # noqa: F401

# Which annealing schedules each backend can express with the masks built here. flash_attention_2
# takes no mask tensor (only 2D padding), and transformers 5.23 turns `sliding_window` into the
# symmetric flash window (w-1, w-1): "causal plus w keys to the right" would need window_size=(-1, w).
_ANNEAL_BACKENDS = {"eager": ("random", "window", "blocks"), "sdpa": ("random", "window", "blocks"),
                    "flex_attention": ("window", "blocks"), "flash_attention_2": ()}


def anneal_ratio(step: int, anneal_steps: int) -> float:
    """r in [0, 1]: fraction of future positions visible at optimizer step `step` (linear ramp)."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, step / anneal_steps))


def causal_visibility(length: int, device: torch.device | None = None) -> torch.Tensor:
    """(L, L) bool, lower triangle including the diagonal."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def annealed_visibility(length: int, r: float, schedule: str = "random",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(L, L) bool: causal plus a fraction r of the future.

    random (DiffuLLaMA): each future (i, j > i) pair visible with probability r, one pattern per step.
    window: query i sees keys j <= i + round(r * L), a right-hand window that grows from 0 to L.
    """
    visible = causal_visibility(length)
    if r >= 1.0:
        return torch.ones_like(visible)
    if r <= 0.0:
        return visible
    if schedule == "window":
        return visible | torch.ones_like(visible).triu(1).tril(round(r * length))
    if schedule == "blocks":
        return block_causal(length, curriculum_block(length, length, r))
    if schedule != "random":
        raise ValueError(f"unknown anneal schedule {schedule!r}; use random, window or blocks")
    future = torch.rand(length, length, generator=generator) < r
    return visible | (future & ~visible)


def curriculum_blocks(target: int, length: int) -> list[int]:
    """The block lengths the `blocks` schedule steps through: the powers of 2 below `target` that divide the
    sequence, then the target itself (a target that is not a power of 2 is reached from the largest power below)."""
    sizes, b = [], 1
    while b < target:
        if length % b == 0:
            sizes.append(b)
        b *= 2
    return sizes + [target]


def curriculum_block(target: int, length: int, r: float) -> int:
    """The block length at anneal ratio r: equal shares of the anneal for each stage, the target at r = 1."""
    sizes = curriculum_blocks(target, length)
    if r >= 1.0:
        return target
    return sizes[min(len(sizes) - 2, int(max(0.0, r) * (len(sizes) - 1)))] if len(sizes) > 1 else target


def block_causal(length: int, block: int, device=None) -> torch.Tensor:
    """(L, L) bool: block i sees blocks <= i, blocks of `block` tokens from position 0 (b = 1: causal; b = L: all)."""
    k = torch.arange(length, device=device) // block
    return k[None, :] <= k[:, None]


def window_width(length: int, r: float) -> int:
    """Keys visible to the right of each query under the window schedule at ratio r (0 .. L)."""
    return round(min(1.0, max(0.0, r)) * length)


def uses_block_mask(backend: str, schedule: str) -> bool:
    """Whether annealed steps pass a FlexAttention BlockMask rather than a dense float mask."""
    return backend == "flex_attention" and schedule == "window"


def window_block_mask(length: int, r: float, doc_ids: torch.Tensor | None = None,
                      device: torch.device | str | None = None, block_size: int = 128):
    """FlexAttention BlockMask of the window schedule: query q sees key kv <= q + round(r * L),
    and only keys of its own document when `doc_ids` (B, L) is given. Same visibility as
    `annealed_visibility(L, r, "window")` (& `document_visibility`), without a dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    width = window_width(length, r)
    device = device if device is not None else (doc_ids.device if doc_ids is not None else "cpu")

    def window(b, h, q, kv):
        return kv <= q + width

    def window_in_document(b, h, q, kv):
        return (kv <= q + width) & (doc_ids[b, q] == doc_ids[b, kv])

    batch = None if doc_ids is None else doc_ids.shape[0]
    mask_mod = window if doc_ids is None else window_in_document
    return create_block_mask(mask_mod, batch, None, length, length, device=device,
                             BLOCK_SIZE=min(block_size, length))


def document_visibility(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) document index per token -> (B, L, L) bool, True where query and key share a document."""
    return doc_ids[:, :, None] == doc_ids[:, None, :]


def to_additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool visibility (..., L, L) -> float mask (B or 1, 1, L, L): 0 where visible, dtype-min elsewhere."""
    if visible.dim() == 2:
        visible = visible[None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]


def step_visibility(length: int, r: float, schedule: str,
                    generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The (L, L) bool pattern of one optimizer step, or None once attention is fully bidirectional."""
    return None if r >= 1.0 else annealed_visibility(length, r, schedule, generator)


def build_mask(visible: torch.Tensor | None, length: int, dtype: torch.dtype, backend: str,
               doc_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """The 4D additive mask for one forward, or None when attention is fully bidirectional.

    `visible` is the step's pattern (None = all visible); `doc_ids` (B, L) adds document boundaries.
    eager needs an explicit zero mask for bidirectional attention (it would otherwise build a causal one).
    """
    if visible is None and doc_ids is None and backend != "eager":
        return None
    device = doc_ids.device if doc_ids is not None else None
    if visible is None:
        visible = torch.ones(length, length, dtype=torch.bool, device=device)
    visible = visible.to(device) if device is not None else visible
    if doc_ids is not None:
        visible = visible[None] & document_visibility(doc_ids)
    return to_additive(visible, dtype)


def backend_problem(backend: str, schedule: str, anneal_steps: int, document_mask: bool) -> str | None:
    """Why `backend` cannot run this attention plan, or None when it can."""
    if backend not in _ANNEAL_BACKENDS:
        return None  # reported by the choices check
    if backend == "flex_attention" and anneal_steps > 0 and schedule == "random":
        return ("model.attn_implementation=flex_attention cannot run the `random` annealing schedule: its pattern "
                "is an arbitrary dense (L, L) mask, which flex would take as a dense score_mod tensor (no block "
                "sparsity; transformers indexes it by batch row, so micro batches > 1 fail); use "
                "attention.anneal_schedule=window with flex_attention (block-sparse), or sdpa for `random`")
    if anneal_steps > 0 and schedule not in _ANNEAL_BACKENDS[backend]:
        return (f"attention backend `{backend}` cannot express the `{schedule}` annealing schedule: it takes no "
                f"mask tensor, and transformers passes it only a symmetric sliding window (w-1, w-1), not the "
                f"asymmetric causal+right window (-1, w) annealing needs; use model.attn_implementation="
                f"flex_attention with attention.anneal_schedule=window (block-sparse kernel) or sdpa, or "
                f"attention.anneal_steps=0 for bidirectional attention from the start (e.g. SFT)")
    if document_mask and backend == "flash_attention_2":
        return ("attention.document_mask needs a mask tensor, which flash_attention_2 does not take; "
                "use model.attn_implementation=sdpa")
    return None


_FLEX_PROBLEMS: dict[tuple, str | None] = {}
# (sequence length, BLOCK_SIZE) of the check problems: one that the block size does not divide, one ordinary
FLEX_CHECKS = ((24, 8), (256, 128))


def flex_problem(device: torch.device | str = "cpu", head_dim: int = 64,
                 checks: tuple[tuple[int, int], ...] = FLEX_CHECKS) -> str | None:
    """Why compiled FlexAttention cannot be trusted on `device` for this head size, or None when it matches sdpa.

    torch 2.13's inductor-compiled flex_attention gives wrong results on some CPUs (seen on an AVX2-only
    AMD EPYC: a causal BlockMask with head size 8 differs from sdpa by up to 2.0 or gives NaN, while eager
    flex matches to 2e-7; other shapes are right), so before flex runs on a device it is checked once per
    head size, on small causal problems, against sdpa.
    """
    key = (torch.device(device).type, head_dim, checks)
    if key not in _FLEX_PROBLEMS:
        _FLEX_PROBLEMS[key] = next(filter(None, (_check_flex(torch.device(device), head_dim, length, block)
                                                 for length, block in checks)), None)
    return _FLEX_PROBLEMS[key]


def _check_flex(device: torch.device, head_dim: int, length: int, block: int) -> str | None:
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, length, head_dim, generator=g).to(device) for _ in range(3))
    causal = create_block_mask(lambda b, h, i, j: j <= i, None, None, length, length, device=device,
                               BLOCK_SIZE=block)
    try:
        got = torch.compile(flex_attention)(q, k, v, block_mask=causal)
    except Exception as err:  # noqa: BLE001 - any compiler failure means: do not use it here
        return f"compiled flex_attention fails on this {device.type} ({type(err).__name__}: {err})"
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    err = float((got - want).abs().max())
    if not err <= 1e-4:  # NaN fails too
        return (f"compiled flex_attention differs from sdpa by up to {err:.3g} on a causal test problem "
                f"(head size {head_dim}, length {length}, block {block}) on this {device.type}: a torch inductor "
                f"issue seen on some CPUs")
    return None


def usable_backend(backend: str, device: torch.device | str, head_dim: int) -> tuple[str, str | None]:
    """(backend to use, why it was changed or None): flex_attention falls back to sdpa where it is wrong."""
    if backend != "flex_attention":
        return backend, None
    problem = flex_problem(device, head_dim)
    if problem is None:
        return backend, None
    return "sdpa", f"{problem}; using sdpa with the same masks (dense) instead"
