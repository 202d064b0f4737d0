"""Masked diffusion over the whole sequence (MDLM / SEDD absorbing; DiffuLLaMA's adaptation objective).

Every loss-eligible token of x0 is masked with probability t, t ~ U(eps, 1); the negative ELBO weights
the cross-entropy of each masked token by 1/t (adapt.objectives.diffusion). Attention is whatever the loop's
annealing asks for: causal at the start of adaptation, bidirectional after.

An optional joint causal term (`ar_weight` alpha > 0; Nemotron-Labs-Diffusion, I-DLM) adds alpha x the next-token
cross-entropy of the clean x0 under causal attention, from a second forward: under bidirectional attention the
next token is visible, so that target would be a copy task. The loop divides its sum by its own token count.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from adapt.model.attention import build_mask, causal_visibility, step_visibility, uses_block_mask, window_block_mask
from adapt.objectives.diffusion import (context_shares, corrupt, diffusion_loss_sum, distill_kl, frontier_positions,
                             maskable_positions, normaliser, position_exponents, prediction_logits, sample_t,
                             shift_logits, token_nll)
from adapt.model.causal import DTYPES
from adapt.objectives.base import Attention, Forward, JointCausal, Noised
from adapt.objectives.distill import Distill, DistillConfig
from adapt.objectives.spec import CardNotes, Decoding


def sequence_mask(attention: Attention, length: int, batch: int, device: torch.device, backend: str,
                  dtype: torch.dtype):
    """The attention mask of one forward over L positions: None (bidirectional), a dense 4D mask, or a flex
    BlockMask."""
    docs = None if attention.docs is None else attention.docs.to(device)
    if uses_block_mask(backend, attention.schedule) and (attention.visible is not None or docs is not None):
        # flex takes masks as BlockMasks only: the window at the step's ratio (the schedule flex anneals
        # with; ratio 0 is causal, 1 all visible), within documents
        return window_block_mask(length, attention.ratio if attention.visible is not None else 1.0, docs, device)
    mask = build_mask(attention.visible, length, dtype, backend, docs)
    return None if mask is None else mask.to(device).expand(batch, -1, -1, -1)


class MaskedDiffusionSpec:
    """What is asked of masked diffusion over the whole sequence before a model exists; implements
    `adapt.objectives.spec.Spec` for `objective`, the registered run-time class (MaskedDiffusion or a subclass)."""

    def __init__(self, objective: type):
        self.objective, self.name, self.sections = objective, objective.name, objective.sections
        self.build, self.rebuild, self.meta_fields = objective.from_config, objective.from_meta, objective.meta_fields

    def recipe_problems(self, cfg) -> list[str]:
        problems = []
        block = cfg.diffusion.block
        if block.length:
            problems.append(f"`diffusion.objective={self.name}` trains over the whole sequence, but "
                            f"`diffusion.block.length={block.length}`; set diffusion.block.length=0, "
                            f"or diffusion.objective=block for block diffusion")
        if cfg.diffusion.distill.weight and cfg.diffusion.distill.teacher == "clean":
            problems.append("`diffusion.distill.teacher=clean` reads the clean stream of block diffusion, which masked "
                            "diffusion over the whole sequence does not run; set diffusion.distill.teacher=parent "
                            "(the parent's own forward), or diffusion.objective=block diffusion.block.length=4 "
                            "diffusion.block.clean_attention=causal, or diffusion.distill.weight=0")
        if block.noised_attention != "bidirectional":
            problems.append(f"`diffusion.block.noised_attention={block.noised_attention}` shapes the noised block of "
                            f"block diffusion; the whole-sequence objective has none: set "
                            f"diffusion.block.noised_attention=bidirectional, or diffusion.objective=block "
                            f"diffusion.block.length=4")
        if cfg.attention.anneal_schedule == "blocks" and cfg.model.attn_implementation == "flex_attention" \
                and cfg.attention.anneal_steps > 0:
            problems.append("the `blocks` schedule of the whole-sequence target is a dense block-causal mask: use "
                            "sdpa, or attention.anneal_schedule=window with flex_attention")
        return problems

    def export_problems(self, cfg, meta) -> list[str]:
        return []

    def anneal_target(self, cfg, length: int) -> int:
        return length

    def forward_positions(self, cfg, length: int) -> int:
        return length

    def always_masked(self, cfg) -> bool:
        return False

    def decode_block(self, meta) -> int:
        return 0

    def decoding(self, meta) -> Decoding:
        return Decoding(block_length=0, clean_causal=False)

    def card(self, meta: dict) -> CardNotes:
        return CardNotes()


class MaskedDiffusion:
    """Masked diffusion over the whole sequence; implements `adapt.objectives.base.Objective`."""

    name = "mdlm"
    spec_class = MaskedDiffusionSpec
    """The class of its `Spec` (adapt.objectives.spec_of builds one around this class)."""
    sections = {"distill": DistillConfig}
    """The recipe sections under `diffusion` this objective reads (key -> dataclass; adapt.recipe.config.schema)."""

    def __init__(self, mask_id: int, shift: bool, blocked: torch.Tensor, eps: float = 1e-3,
                 t_sampling: str = "stratified", loss_norm: str = "token", backend: str = "sdpa",
                 dtype: str = "fp32", ar_weight: float = 0.0, position_masking: float = 0.0,
                 t_range: tuple[float, float] = (0.0, 1.0), t_per_block: bool = False, complementary: bool = False,
                 distill: Distill | None = None, full_mask_share: float = 0.0):
        self.mask_id, self.shift, self.blocked, self.eps = mask_id, shift, blocked, eps
        self.t_sampling, self.loss_norm, self.backend, self.dtype = t_sampling, loss_norm, backend, DTYPES[dtype]
        self.read_shift = shift
        """Whether `predict`'s logits still need the shift when read (row i-1 predicts token i)."""
        self.ar_weight = ar_weight
        """alpha of the joint causal term (diffusion.ar_loss_weight); 0 = none, and no second forward."""
        self.position_masking = position_masking
        """Strength of position-dependent masking (diffusion.position_masking); 0 = one rate t per row."""
        self.t_range, self.t_per_block, self.complementary = t_range, t_per_block, complementary
        """Training draws: t in [max(eps, lo), hi]; one t per block or per row; complementary mask pairs."""
        self.full_mask_share = full_mask_share
        """Share of the draws of t set to 1 (fully masked rows or blocks: one-step drafts); 0 = none."""
        self.distill = distill
        """The distillation term (a training term only), or None."""

    # --- building (class level: read by its spec) --------------------------------------------------

    @classmethod
    def options(cls, cfg) -> dict:
        """The constructor's keyword arguments from a recipe's `diffusion` and `model` sections."""
        d = cfg.diffusion
        return dict(eps=d.eps, t_sampling=d.t_sampling, loss_norm=d.loss_norm, backend=cfg.model.attn_implementation,
                    dtype=cfg.model.dtype, ar_weight=d.ar_loss_weight, position_masking=d.position_masking,
                    t_range=(d.t_min, d.t_max), t_per_block=d.t_per_block, complementary=d.complementary_masks,
                    full_mask_share=d.full_mask_share, distill=d.distill if d.distill.weight else None)

    @classmethod
    def from_config(cls, cfg, meta, blocked: torch.Tensor) -> "MaskedDiffusion":
        return cls(meta.mask_token_id, cfg.diffusion.shift, blocked, **cls.options(cfg))

    @classmethod
    def from_meta(cls, meta, blocked: torch.Tensor, backend: str = "sdpa", dtype: str = "fp32") -> "MaskedDiffusion":
        return cls(meta.mask_token_id, meta.shift, blocked, meta.eps, backend=backend, dtype=dtype)

    @classmethod
    def meta_fields(cls, cfg) -> dict:
        return {"objective": cls.name, "shift": cfg.diffusion.shift, "eps": cfg.diffusion.eps, "block_length": 0}

    # --- training ---------------------------------------------------------------------------------

    def maskable(self, x0: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) bool: positions that may be noised and carry loss (never position 0 under the shift)."""
        return maskable_positions(x0, self.shift, loss_mask)

    def scored(self, x0: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) bool: the positions a held-out bound covers, the same the parent's exact NLL covers:
        never position 0 (the given BOS), with or without the shift."""
        ok = self.maskable(x0, loss_mask)
        ok[:, 0] = False
        return ok

    def masking_span(self, length: int) -> int:
        """The span position-dependent masking ranks a token's place in: the whole sequence of `length`."""
        return length

    def exponents(self, length: int) -> torch.Tensor | None:
        """(L,) exponents of position-dependent masking by a token's place in its span, or None when it is off."""
        if not self.position_masking:
            return None
        span = self.masking_span(length)
        return position_exponents(torch.arange(length) % span, span, self.position_masking)

    def batch_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The step's sequence indices: as drawn, or with complementary masks half of them, each twice in a row."""
        return idx[: len(idx) // 2].repeat_interleave(2) if self.complementary else idx

    def draw_t(self, rows: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """Training times: (rows,) one per row, or (rows, L) one per block (`t_per_block`), drawn by
        `diffusion.t_sampling` over all of them, in [max(eps, t_min), t_max]; a share `full_mask_share` of them
        set to 1."""
        span = self.masking_span(length) if self.t_per_block else length
        units = -(-length // span)
        t = sample_t(rows * units, max(self.eps, self.t_range[0]), self.t_sampling, generator, self.t_range[1])
        if self.full_mask_share:  # drawn only when on: the draws without it stay those of before
            t = torch.where(torch.rand(t.shape, generator=generator) < self.full_mask_share, torch.ones_like(t), t)
        return t if units == 1 else t.view(rows, units)[:, torch.arange(length) // span]

    def corrupt(self, x0: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator) -> Noised:
        """t per row or per block (`draw_t`), then each maskable token masked w.p. t (t ** a_i under
        position-dependent masking). With complementary masks rows 2j and 2j+1 hold the same sequence: the
        second is masked exactly where the first is not, at time 1 - t."""
        exponents = self.exponents(x0.shape[1])
        if not self.complementary:
            t = self.draw_t(len(x0), x0.shape[1], generator)
            xt, masked = corrupt(x0, t, self.mask_id, maskable, generator, exponents)
            return Noised(xt, masked, t)
        t = self.draw_t(len(x0) // 2, x0.shape[1], generator)
        _, first = corrupt(x0[0::2], t, self.mask_id, maskable[0::2], generator, exponents)
        masked = torch.stack([first, maskable[1::2] & ~first], dim=1).reshape(x0.shape)
        t = torch.stack([t, (1 - t).clamp_min(self.eps)], dim=1).reshape(-1, *t.shape[1:])
        return Noised(x0.masked_fill(masked, self.mask_id), masked, t)

    def normaliser(self, maskable: torch.Tensor, masked: torch.Tensor) -> float:
        return normaliser(self.loss_norm, maskable, masked)

    def mask(self, attention: Attention, length: int, batch: int, device: torch.device):
        """The attention mask of one forward: None (bidirectional), a dense 4D mask, or a flex BlockMask."""
        return sequence_mask(attention, length, batch, device, self.backend, self.dtype)

    def logits(self, forward: Forward, xt: torch.Tensor, attention: Attention) -> torch.Tensor:
        """(B, L, V) raw logits of the model on x_t under `attention` (one model call)."""
        return forward(xt, self.mask(attention, xt.shape[1], len(xt), getattr(forward, "device", xt.device)))

    def predict(self, forward: Forward, x0: torch.Tensor, noised: Noised, attention: Attention) -> torch.Tensor:
        """The logits the loss and the bound read for a noised batch (one model call)."""
        return self.logits(forward, noised.xt, attention)

    def predict_joint(self, forward: Forward, x0: torch.Tensor, noised: Noised, attention: Attention):
        """`predict`'s logits and, where the same call gives them, the clean sequence's causal logits (B, L, V)
        for the joint causal term (else None: `causal_loss_sum` runs its own forward)."""
        return self.predict(forward, x0, noised, attention), None

    def aligned_logits(self, forward: Forward, x0: torch.Tensor, masked: torch.Tensor,
                       attention: Attention) -> torch.Tensor:
        """(B, L, V) logits of x0 with `masked` hidden, row i predicting token i (the shift applied)."""
        return prediction_logits(self.predict(forward, x0, self._hidden(x0, masked), attention), self.read_shift)

    def loss_sum(self, logits: torch.Tensor, x0: torch.Tensor, noised: Noised) -> torch.Tensor:
        """sum over masked tokens of (1/t) * -log p_theta(x0_i | x_t) (a_i / t under position-dependent masking):
        a scalar, to divide by `normaliser`."""
        dev = logits.device
        return diffusion_loss_sum(logits, x0.to(dev), noised.masked.to(dev), noised.t, self.read_shift, self.blocked,
                                  self.exponents(x0.shape[1]))

    def distill_sum(self, logits: torch.Tensor, teacher: torch.Tensor | None, noised: Noised) -> torch.Tensor | None:
        """weight x sum over the distilled positions of tau^2 KL(p_teacher || p_theta)
        (adapt.objectives.diffusion.distill_kl), a scalar to divide by `normaliser` like `loss_sum`; None when the term
        is off. `teacher` (B, L, V) are causal logits of the clean sequence (row i-1 predicts token i), `logits` the
        step's prediction logits."""
        if self.distill is None:
            return None
        d, dev = self.distill, logits.device
        student, teacher = prediction_logits(logits, self.read_shift), shift_logits(teacher.to(dev))
        span = self.masking_span(logits.shape[1])
        sel = frontier_positions(noised.masked, span) if d.positions == "frontier" else noised.masked.clone()
        sel = sel.to(dev)
        sel[:, 0] = False  # position 0 is given (never masked; a copy, the draw's own mask stays as it is)
        kl = distill_kl(student[sel], teacher[sel], self.blocked, d.top_k, d.temperature)
        if d.positions == "context":
            kl = kl * context_shares(noised.masked.to(dev), span)[sel]
        return d.weight * kl.sum()

    def joint_term(self, forward: Forward, scored_all: torch.Tensor, mine: slice,
                   all_sum: Callable[[list[float]], list[float]]) -> JointCausal | None:
        """The step's joint causal term over the global batch's scored positions (this rank's rows `mine`), or
        None when it is off (ar_weight 0)."""
        return JointCausal(self, forward, scored_all, mine, all_sum) if self.ar_weight else None

    def causal_loss_sum(self, forward: Forward, x0: torch.Tensor, scored: torch.Tensor,
                        docs: torch.Tensor | None = None) -> torch.Tensor:
        """sum over `scored` (B, L) of -log p_theta(x0_i | x0_<i): the joint causal term's numerator, a float32
        scalar. One forward of the clean x0 (L positions, for either objective) under causal attention, within
        documents when `docs` (B, L) is given; the blocked ids are excluded, as in the parent's exact NLL."""
        return self.causal_nll_sum(self.causal_logits(forward, x0, docs), x0, scored)

    def causal_logits(self, forward: Forward, x0: torch.Tensor, docs: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, V) logits of one forward of the clean x0 under causal attention (within documents when `docs`
        (B, L) is given): the parent's computation, row i-1 predicting token i."""
        length, device = x0.shape[1], getattr(forward, "device", x0.device)
        causal = Attention(causal_visibility(length), 0.0, "window", docs)  # a window of width 0 is causal
        return forward(x0, sequence_mask(causal, length, len(x0), device, self.backend, self.dtype))

    def drafts(self, noised: Noised, logits: torch.Tensor) -> torch.Tensor:
        """x_t with each masked position filled with the model's most likely id (blocked ids never), from the
        step's prediction logits (B, L, V): the model's own one-step fill, which on-policy distillation teaches on."""
        best = prediction_logits(logits, self.read_shift).detach().masked_fill(self.blocked, -math.inf).argmax(-1)
        return torch.where(noised.masked.to(best.device), best, noised.xt.to(best.device))

    def onpolicy_teacher(self, forward: Forward, x0: torch.Tensor, noised: Noised, logits: torch.Tensor,
                         attention: Attention) -> torch.Tensor:
        """(B, L, V) the teacher's causal logits over the model's drafts (`drafts`): row i-1 is its distribution
        of token i given the drafted sequence before i. `forward` is the teacher's (no gradient is taken)."""
        return self.causal_logits(forward, self.drafts(noised, logits), attention.docs)

    def causal_nll_sum(self, logits: torch.Tensor, x0: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """sum over `scored` of -log p(x0_i | x0_<i) from causal logits (B, L, V), row i-1 predicting token i."""
        dev = logits.device
        return token_nll(logits, x0.to(dev), scored.to(dev), True, self.blocked).sum()

    # --- the bound --------------------------------------------------------------------------------

    def eval_attention(self, causal: bool, length: int, docs: torch.Tensor | None) -> Attention:
        """The attention of a held-out bound: bidirectional, or causal (the parent's attention, the 'before'
        view: a window of width 0)."""
        visible = step_visibility(length, 0.0, "window") if causal else None
        return Attention(visible, 0.0 if causal else 1.0, "window", docs)

    def bound_group(self, length: int) -> int:
        """Positions that draw their masked count together in the bound's count estimator (0: the whole row)."""
        return 0


    @torch.no_grad()
    def nll_sums(self, forward: Forward, x0: torch.Tensor, masked: torch.Tensor, attention: Attention,
                 parts: tuple[torch.Tensor, ...] = (), weight: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + P) float64: per row, the sum over masked positions of w_row * -log p_theta(x0_i | x_t)
        (w = `weight` (B,), else 1), then the same sum restricted to each of `parts` ((B, L) bool each).
        One model call. The weight multiplies each term in float32 before the sum, as the training loss does."""
        w = torch.ones(masked.shape) if weight is None else weight.float()
        w = w[:, None].expand(masked.shape) if w.dim() == 1 else w  # a weight per row or per position
        logits = self.predict(forward, x0, self._hidden(x0, masked), attention)
        dev = logits.device
        sums = torch.zeros(len(x0), 1 + len(parts), dtype=torch.float64)
        for j in range(len(x0)):  # per-row sums without materialising all rows' softmax
            row = slice(j, j + 1)
            for c, sel in enumerate((masked,) + tuple(masked & p for p in parts)):
                sel = sel[row].to(dev)
                nll = self._row_nll(logits[row], x0[row].to(dev), sel)
                sums[j, c] = (self._selected(w[row].to(dev), sel) * nll.float()).sum().double().cpu()
        return sums

    def _hidden(self, x0: torch.Tensor, masked: torch.Tensor) -> Noised:
        """x0 with `masked` replaced by [MASK] (no t: the bound's draws carry their own weights)."""
        return Noised(x0.masked_fill(masked, self.mask_id), masked, None)

    def _row_nll(self, logits: torch.Tensor, x0: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """-log p_theta(x0_i | x_t) at the selected positions of one row, in row-major order."""
        return token_nll(logits, x0, sel, self.read_shift, self.blocked)

    def _selected(self, w: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """The weights of the selected positions, in `_row_nll`'s order."""
        return w[:, 1:][sel[:, 1:]] if self.read_shift else w[sel]
