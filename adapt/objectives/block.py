"""Block diffusion (BD3-LM, Arriola et al. 2025; the target of Fast-dLLM v2, SDAR, LLaDA 2): the block of L
tokens is cut into L/b blocks; each block is a masked diffusion given the clean blocks before it,
    -log p(x) <= sum_k E_t [ (1/t) sum_{i in block k, masked} -log p_theta(x0_i | x_t^k, x0^{<k}) ].
b = L is the whole-sequence objective (`mdlm`); b = 1 with the shift is the parent causal LM.

Training runs in one forward over [x_t | x_0] (2L positions, x_0 reusing x_t's position ids) under the
block mask: noised block k attends noised block k and clean blocks < k; clean block k attends clean
blocks <= k (so the clean half is exactly what a decoder's KV cache holds). With `clean_causal` the clean
half is causal instead (clean token i attends clean tokens <= i): the clean stream is then the parent's own
forward, so the keys and values every noised block reads start as the parent's, and each block's first token
is predicted exactly as the parent predicts it; b = 1 and b = L are unchanged. With `noised_causal` (I-DLM's
causal masks) a noised token attends its own block only up to itself: a masked token whose earlier block tokens
are all visible is then predicted by the parent's own computation, at the price of never seeing the visible
tokens after it in its block. Any denoiser gives a valid bound, so the ELBO holds; decoders use the same mask.

The shift with blocks: the prediction for position i is read from the logits at i-1 (the causal head's
habit). Inside a block, i-1 is a noised position of the same block. For the first token of a block,
i-1 is the last token of the previous block, and its logits are taken from the CLEAN stream: that token
is predicted from the clean blocks before it only, which at b = 1 is exactly the parent's computation
(the masked-count bound of the unconverted parent at b = 1 is its exact causal NLL), and which a decoder
gets for free from the call that commits the previous block. Only the L rows that predict a token go
through the head (`logits_to_keep`), never the clean half's other rows.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from adapt.model.attention import block_visible, document_visibility, to_additive
from adapt.recipe.limits import SIZE_MAX, ranged
from adapt.objectives.base import Attention, Forward, Noised
from adapt.objectives.mdlm import MaskedDiffusion, MaskedDiffusionSpec
from adapt.objectives.spec import CardNotes, Decoding, meta_get


@dataclass
class BlockConfig:
    """Block diffusion's recipe keys (`diffusion.block.*`)."""

    length: int = ranged(0, 0, SIZE_MAX)
    """Blocks of this many tokens, bidirectional inside, causal across (BD3-LM); 0 = the whole sequence (masked
    diffusion over data.seq_length tokens). Must divide data.seq_length."""
    clean_attention: Literal["block", "causal"] = "block"
    """The clean stream: block (BD3-LM: clean block k attends clean blocks <= k) or causal (each clean token attends
    the clean tokens up to itself: the parent's own computation, so the decoder's cache holds the parent's keys and
    values at the start)."""
    noised_attention: Literal["bidirectional", "causal"] = "bidirectional"
    """The noised block: bidirectional (each noised token attends its whole block) or causal (I-DLM: it attends its
    block up to itself, so a masked token after visible ones is read as the parent reads it; the bound stays an ELBO,
    and the decoders use the same mask)."""


def block_ids(length: int, block: int, device=None) -> torch.Tensor:
    """(L,) long: the block of each position, blocks of `block` tokens from position 0."""
    return torch.arange(length, device=device) // block


def block_visibility(length: int, block: int, device=None, clean_causal: bool = False,
                     noised_causal: bool = False) -> torch.Tensor:
    """(2L, 2L) bool over [x_t | x_0]: True where query (row) may attend key (column), by `block_visible`. With
    `noised_causal` a noised query sees its own block only up to itself (the on-policy teacher's view of a drafted
    block)."""
    i = torch.arange(2 * length, device=device)
    pos, clean = i % length, i >= length
    return block_visible(pos[:, None], pos[None, :], clean[:, None], clean[None, :], block, clean_causal,
                         noised_causal)


def source_rows(length: int, block: int, shift: bool, device=None) -> torch.Tensor:
    """(L,) long: the row of the 2L sequence whose logits predict token i (see the module docstring)."""
    pos = torch.arange(length, device=device)
    if not shift:
        return pos
    first = (pos % block == 0) & (pos > 0)
    return torch.where(first, length + pos - 1, pos - 1).clamp_min(0)  # row 0 is never used (position 0 given)


def block_mask_flex(length: int, block: int, doc_ids: torch.Tensor | None, device, clean_causal: bool = False,
                    noised_causal: bool = False):
    """The same visibility as `block_visibility` (and documents) as a FlexAttention BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, q, kv):
        ok = block_visible(q % length, kv % length, q >= length, kv >= length, block, clean_causal, noised_causal)
        if doc_ids is not None:
            ok = ok & (doc_ids[b, q % length] == doc_ids[b, kv % length])
        return ok

    batch = None if doc_ids is None else doc_ids.shape[0]
    return create_block_mask(visible, batch, None, 2 * length, 2 * length, device=device,
                             BLOCK_SIZE=min(128, 2 * length))


class BlockDiffusionSpec(MaskedDiffusionSpec):
    """What is asked of block diffusion before a model exists; implements `adapt.objectives.spec.Spec` for
    `objective`, the registered run-time class (BlockDiffusion or a subclass)."""

    def recipe_problems(self, cfg) -> list[str]:
        """The block length must divide the sequence; the model is annealed only by growing blocks; the mask over
        [x_t | x_0] needs a backend that takes one."""
        b, length, d = cfg.diffusion.block.length, cfg.data.seq_length, cfg.diffusion
        if b <= 0:
            return [f"`diffusion.objective={self.name}` needs blocks: set diffusion.block.length to a divisor of "
                    f"data.seq_length={length} (4 is the bundled recipe's), or diffusion.objective=mdlm for the "
                    f"whole sequence"]
        problems = []
        if length % b:
            problems.append(f"`diffusion.block.length={b}` does not divide `data.seq_length={length}`; choose a "
                            f"divisor (e.g. {max(k for k in range(1, min(b, length) + 1) if length % k == 0)}) or "
                            f"diffusion.block.length=0 for the whole sequence")
        if cfg.attention.anneal_steps > 0 and cfg.attention.anneal_schedule != "blocks":
            problems.append(f"block diffusion (`diffusion.block.length={b}`) anneals by growing the block length: set "
                            f"attention.anneal_schedule=blocks, or attention.anneal_steps=0 to train at b={b} from "
                            f"the start")
        if d.distill.weight and d.distill.teacher == "clean" and d.block.clean_attention != "causal":
            problems.append("`diffusion.distill.teacher=clean` needs a causal clean stream (the block clean stream "
                            "sees the token it would teach); set diffusion.block.clean_attention=causal, or "
                            "diffusion.distill.teacher=parent")
        if cfg.model.attn_implementation == "flash_attention_2":
            problems.append("block diffusion needs a block mask over [x_t | x_0], which flash_attention_2 does not "
                            "take; use model.attn_implementation=sdpa (CPU) or flex_attention (GPU, block-sparse)")
        return problems

    def export_problems(self, cfg, meta) -> list[str]:
        block, problems = cfg.diffusion.block, []
        for key, field in (("length", "block_length"), ("clean_attention", "clean_attention"),
                           ("noised_attention", "noised_attention")):
            mine, trained = getattr(block, key), getattr(meta, field)
            if mine != trained:
                problems.append(f"`diffusion.block.{key}={mine}` but the exported block model was trained with "
                                f"{field}={trained}; set `diffusion.block.{key}={trained}`")
        return problems

    def anneal_target(self, cfg, length: int) -> int:
        return min(cfg.diffusion.block.length, length)

    def forward_positions(self, cfg, length: int) -> int:
        return 2 * length  # [x_t | x_0]; logits for L rows only

    def always_masked(self, cfg) -> bool:
        return True

    def decode_block(self, meta) -> int:
        return meta_get(meta, "block_length", 0) or 0

    def decoding(self, meta) -> Decoding:
        return Decoding(block_length=self.decode_block(meta),
                        clean_causal=meta_get(meta, "clean_attention") == "causal")

    def card(self, meta: dict) -> CardNotes:
        block = meta.get("block_length") or 0
        causal = meta.get("clean_attention") == "causal"
        inside = "causal" if meta.get("noised_attention") == "causal" else "bidirectional"
        return CardNotes(
            tags=("block-diffusion",),
            attention=(f"block diffusion with blocks of {block} tokens: attention is {inside} inside a block and "
                       f"causal across blocks, and text is generated block by block with an exact key/value cache"
                       + ("; committed blocks are read causally, as the parent reads text" if causal else "")),
            plain_forward=(" A plain forward pass of this block-diffusion model is not its diffusion forward: that "
                           "needs the block-causal mask that `generate` builds."),
            limits=(f"\n- This is a block-diffusion model (blocks of {block}): a plain forward without its "
                    f"block-causal mask is neither its diffusion forward nor a causal LM."))


class BlockDiffusion(MaskedDiffusion):
    """Masked diffusion inside blocks of `block_length`, causal across blocks. The noising, weights,
    normalisers and the estimator are the masked-diffusion ones; the forward and the shift differ."""

    name = "block"
    spec_class = BlockDiffusionSpec
    sections = {**MaskedDiffusion.sections, "block": BlockConfig}

    def __init__(self, *args, block_length: int, clean_causal: bool = False, noised_causal: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.block_length, self.clean_causal, self.noised_causal = block_length, clean_causal, noised_causal
        self.read_shift = False  # `logits` reads each token's row itself (clean stream for a block's first)

    @classmethod
    def from_config(cls, cfg, meta, blocked: torch.Tensor) -> "BlockDiffusion":
        block = cfg.diffusion.block
        return cls(meta.mask_token_id, cfg.diffusion.shift, blocked, block_length=block.length,
                   clean_causal=block.clean_attention == "causal", noised_causal=block.noised_attention == "causal",
                   **cls.options(cfg))

    @classmethod
    def from_meta(cls, meta, blocked: torch.Tensor, backend: str = "sdpa", dtype: str = "fp32") -> "BlockDiffusion":
        return cls(meta.mask_token_id, meta.shift, blocked, meta.eps, backend=backend, dtype=dtype,
                   block_length=meta.block_length, clean_causal=meta.clean_attention == "causal",
                   noised_causal=meta.noised_attention == "causal")

    @classmethod
    def meta_fields(cls, cfg) -> dict:
        block = cfg.diffusion.block
        return super().meta_fields(cfg) | {"block_length": block.length, "clean_attention": block.clean_attention,
                                           "noised_attention": block.noised_attention}

    def eval_attention(self, causal: bool, length: int, docs: torch.Tensor | None) -> Attention:
        """The causal view runs blocks of one token (the parent's computation); the bidirectional one the target."""
        return replace(super().eval_attention(causal, length, docs), block=1 if causal else 0)

    def bound_group(self, length: int) -> int:
        """Each block draws its own masked count: its bound is that block's."""
        return self.block_length

    def masking_span(self, length: int) -> int:
        """Position-dependent masking ranks a token's place in its block."""
        return min(self.block_length, length)

    def step_block(self, attention: Attention, length: int) -> int:
        """The block length of this forward: the target, or the curriculum's (attention.block) while it grows."""
        return min(attention.block or self.block_length, length)

    def mask(self, attention: Attention, length: int, batch: int, device: torch.device, teacher: bool = False):
        """The [x_t | x_0] mask: a FlexAttention BlockMask for flex, else a dense 4D additive mask. `teacher`: the
        on-policy teacher's (a drafted block and the clean stream, both causal: a causal LM's view of each block
        drafted after the clean blocks before it)."""
        b = self.step_block(attention, length)
        docs = None if attention.docs is None else attention.docs.to(device)
        causal = self.clean_causal or teacher
        if self.backend == "flex_attention":
            return block_mask_flex(length, b, docs, device, causal, noised_causal=teacher or self.noised_causal)
        visible = block_visibility(length, b, device, causal, noised_causal=teacher or self.noised_causal)
        if docs is not None:
            doc2 = torch.cat([docs, docs], dim=1)
            visible = visible[None] & document_visibility(doc2)
        return to_additive(visible, self.dtype).expand(batch, -1, -1, -1)

    def logits(self, forward: Forward, xt: torch.Tensor, attention: Attention, x0: torch.Tensor | None = None,
               clean_rows: bool = False):
        """(B, L, V) logits aligned so row i predicts token i, from one forward over [x_t | x_0]; with
        `clean_rows` (B, 2L, V): those, then the clean stream's own rows."""
        length = xt.shape[1]
        device = getattr(forward, "device", xt.device)
        b = self.step_block(attention, length)
        pos = torch.arange(length, device=device)
        ids = torch.cat([xt.to(device), x0.to(device)], dim=1)
        keep = source_rows(length, b, self.shift, device)
        return forward(ids, self.mask(attention, length, len(xt), device),
                       position_ids=torch.cat([pos, pos])[None].expand(len(xt), -1),
                       logits_to_keep=torch.cat([keep, length + pos]) if clean_rows else keep)

    def predict(self, forward: Forward, x0: torch.Tensor, noised: Noised, attention: Attention) -> torch.Tensor:
        return self.logits(forward, noised.xt, attention, x0)

    def onpolicy_teacher(self, forward: Forward, x0: torch.Tensor, noised: Noised, logits: torch.Tensor,
                         attention: Attention) -> torch.Tensor:
        """(B, L, V) the teacher's causal logits with each block drafted by the model (`drafts`) after the clean
        blocks before it (OPDLM): one forward over [drafts | x_0] under the teacher's mask. Row i-1 predicts token
        i: the drafted row inside a block, the clean row at a block's last position (its next token starts a
        block, whose context is clean)."""
        length, device = x0.shape[1], getattr(forward, "device", x0.device)
        b = self.step_block(attention, length)
        pos = torch.arange(length, device=device)
        rows = torch.where((pos + 1) % b == 0, length + pos, pos)
        ids = torch.cat([self.drafts(noised, logits).to(device), x0.to(device)], dim=1)
        return forward(ids, self.mask(attention, length, len(x0), device, teacher=True),
                       position_ids=torch.cat([pos, pos])[None].expand(len(x0), -1), logits_to_keep=rows)

    def predict_joint(self, forward: Forward, x0: torch.Tensor, noised: Noised, attention: Attention):
        """With a causal clean stream the clean half of the 2L forward IS the causal forward of x0 (within
        documents): the joint causal term and the distillation teacher read its rows (L more rows through the
        head) instead of a second forward."""
        if not ((self.ar_weight or self.distill) and self.clean_causal):
            return super().predict_joint(forward, x0, noised, attention)
        out = self.logits(forward, noised.xt, attention, x0, clean_rows=True)
        length = x0.shape[1]
        return out[:, :length], out[:, length:]
