"""Self-speculative decoding of a block-diffusion export whose clean stream is causal (`clean_attention: causal`).

The noised stream drafts the rest of a block in one call; the clean stream, which is the export read as a causal
LM, checks the drafts in the next call, and speculative sampling (Leviathan et al. 2023, Chen et al. 2023) keeps
a draft d with probability min(1, p(d) / q(d)), else draws from the normalised residual max(p - q, 0) and drops
the later drafts. So the output is distributed exactly as the clean stream decoding token by token (greedy:
equal to its greedy decoding; tested), whatever the drafts' quality; the drafts only decide how many tokens a
call yields. Checking block k's drafts and drafting block k+1 share one call (TiDAR, Liu et al. 2025, uses one
model in two modes the same way).

One call holds [clean rows | noised block]:
- clean rows: positions n .. e-1 whose keys/values are not cached yet (the last decided token and the drafts),
  causal over the cache and each other; row p gives p(x_{p+1} | x_{<=p}), the target for position p + 1;
- the noised block K, the block of position e (the first position neither decided nor drafted): columns before e
  hold what is decided or drafted there, the rest masks; it attends the clean keys of blocks < K and itself, as
  in training. Position e is drawn from the clean row e - 1 (the target itself, nothing to check); the noised
  rows draft e + 1 .. the end of block K.
If every draft is kept the clean keys/values stay cached; at the first rejection the cache is cut back to the
kept prefix (exact: the clean stream is causal) and the next call drafts the rest of that block.
Rows are decoded one at a time, each with its own cache, so a row's output never depends on the other rows.
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from adapt.attention import to_additive
from adapt.diffusion import blocked_vocab, denoiser_log_probs
from adapt.sampling.categorical import TokenFilter, draw, uniform
from adapt.sampling.loop import Trace


def check_speculative(meta, backend: str) -> None:
    """Raise ValueError naming why this model cannot be decoded speculatively."""
    if not meta.block_length:
        raise ValueError("speculative decoding needs a block-diffusion export (diffusion.json block_length > 0): "
                         "a whole-sequence model has no causal stream to check drafts with; use another sampler")
    if meta.clean_attention != "causal":
        raise ValueError(f"speculative decoding needs an export trained with diffusion.clean_attention=causal (its "
                         f"clean stream is then a causal LM); this one's is {meta.clean_attention!r}, whose clean "
                         f"rows see later tokens of their block; use the confidence or threshold sampler")
    if backend not in ("sdpa", "eager"):
        raise ValueError(f"speculative decoding passes 4D attention masks, which attn_implementation={backend!r} "
                         f"cannot take; load the model with sdpa or eager")


def accept_or_correct(p: torch.Tensor, q: torch.Tensor, d: int, generator: torch.Generator | None,
                      greedy: bool) -> tuple[bool, int]:
    """Speculative sampling at one position: p, q (V,) target and draft log-probabilities, d the draft ~ q.

    -> (kept, token). Kept with probability min(1, p(d)/q(d)); otherwise the token is drawn from
    max(p - q, 0) normalised, so that the token is distributed as p whatever q is. Greedy: kept iff d is
    p's argmax (lowest id on ties), else that argmax.
    """
    if greedy:
        best = int(p.argmax())
        return best == d, best
    if float(uniform((1,), generator, p.device)) * float(q[d].exp()) <= float(p[d].exp()):
        return True, d
    residual = (p.exp() - q.exp()).clamp_min(0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: the residual is p itself
        return False, int(draw(p[None], generator))
    return False, int(draw(residual.log()[None], generator))


class _Row:
    """The decoding state of one row: the canvas, the cache and the drafts."""

    def __init__(self, model, meta, x: torch.Tensor, filt: TokenFilter, generator: torch.Generator | None):
        self.model, self.b, self.mask_id = model, meta.block_length, meta.mask_token_id
        self.filt, self.gen = filt, generator
        rows = model.get_output_embeddings().weight.shape[0]
        self.blocked = blocked_vocab(rows, meta.real_vocab_size, meta.mask_token_id, device=x.device)
        # transformers renamed forward's `past_key_values` to `cache` (5.2x); use whichever this version takes
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.x, self.width = x.clone(), x.shape[0]
        self.start = int((x == self.mask_id).nonzero()[0])  # first generated position
        self.cache = DynamicCache(config=model.config)
        self.n, self.done, self.calls = 0, self.start, 0  # positions < n cached; < done decided
        self.drafts: list[int] = []
        self.q: torch.Tensor | None = None  # (len(drafts), V) filtered draft log-probabilities

    @property
    def greedy(self) -> bool:
        return self.filt.temperature == 0

    def _layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """-> ids (Q,), positions (Q,), additive mask (1, 1, Q, n + Q), number of clean rows."""
        e = self.done + len(self.drafts)
        cur = self.x.clone()
        cur[self.done:e] = torch.tensor(self.drafts, dtype=torch.long, device=cur.device)
        ids, pos, a = cur[self.n:e], torch.arange(self.n, e, device=cur.device), e
        c = len(ids)
        if e < self.width:
            a = e // self.b * self.b
            end = min(a + self.b, self.width)
            noised = torch.cat([cur[a:e], torch.full((end - e,), self.mask_id, dtype=torch.long, device=cur.device)])
            ids, pos = torch.cat([ids, noised]), torch.cat([pos, torch.arange(a, end, device=pos.device)])
        key_pos = torch.cat([torch.arange(self.n, device=pos.device), pos])
        key_clean = torch.arange(len(key_pos), device=pos.device) < self.n + c
        q_clean = torch.arange(len(pos), device=pos.device) < c
        see = torch.where(q_clean[:, None], key_clean[None] & (key_pos[None] <= pos[:, None]),
                          (key_clean[None] & (key_pos[None] < a)) | ~key_clean[None])
        return ids, pos, to_additive(see, self.model.dtype), c

    @torch.no_grad()
    def step(self) -> None:
        """One model call: check the drafts against the clean rows, draw the next token, draft the next ones."""
        ids, pos, mask, c = self._layout()
        out = self.model(input_ids=ids[None], attention_mask=mask, position_ids=pos[None], use_cache=True,
                         **{self.cache_arg: self.cache}).logits[0]
        self.calls += 1
        target = self.filt.apply(denoiser_log_probs(out[:c], self.blocked))  # row i predicts position n + i + 1
        n, e = self.n, self.done + len(self.drafts)
        for i, d in enumerate(self.drafts):
            kept, tok = accept_or_correct(target[self.done - 1 - n], self.q[i], d, self.gen, self.greedy)
            self.x[self.done] = tok
            self.done += 1
            if not kept:
                self._cut(self.done - 1)
                return
        self._cut(e)
        if e < self.width:
            p = target[e - 1 - n][None]
            self.x[e] = int(p.argmax()) if self.greedy else int(draw(p, self.gen))
            self.done = e + 1
            self._draft(out[c:], e)

    def _cut(self, upto: int) -> None:
        """Keep the cached keys/values of positions < upto; drop the drafts."""
        extra = self.cache.get_seq_length() - upto
        if extra > 0:
            self.cache.crop(-extra)  # transformers 5 crops by a negative count of tokens to remove
        self.n, self.drafts, self.q = upto, [], None

    def _draft(self, noised: torch.Tensor, e: int) -> None:
        """Draft positions e + 1 .. the end of e's block from its noised rows (row j - 1 predicts column j)."""
        a = e // self.b * self.b
        rows = noised[e - a:len(noised) - 1]  # predict columns e + 1 .. end - 1
        if len(rows) == 0:
            return
        self.q = self.filt.apply(denoiser_log_probs(rows, self.blocked))
        tokens = self.q.argmax(-1) if self.greedy else draw(self.q, self.gen)
        self.drafts = tokens.tolist()


def speculative_decode(model, meta, x: torch.Tensor, generator: torch.Generator | None = None,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
                       trace: Trace | None = None) -> tuple[torch.Tensor, int]:
    """Fill the masks of x (B, L) long, each row a prompt followed by masks only -> ((B, L) long, model calls).

    temperature / top_k / top_p filter the clean stream's distribution (the output's) and the drafts alike;
    temperature 0 is greedy (ties to the lowest id). eos_id: a row stops at its first generated EOS and its
    later positions become EOS.
    """
    check_speculative(meta, getattr(model.config, "_attn_implementation", "sdpa"))
    masked = x == meta.mask_token_id
    first = torch.where(masked.any(1), masked.float().argmax(1), torch.full_like(x[:, 0], x.shape[1]))
    if (masked != (torch.arange(x.shape[1], device=x.device)[None] >= first[:, None])).any() or (first == 0).any():
        raise ValueError("speculative decoding continues a prompt: each row must be given tokens (BOS at least) "
                         "then masks only; use the confidence or threshold sampler to infill")
    filt, out, calls = TokenFilter(temperature, top_k, top_p), x.clone(), 0
    if trace is not None:
        trace.start(x)
    for r in range(len(x)):
        if not masked[r].any():
            continue
        row = _Row(model, meta, x[r], filt, generator)
        while row.done < row.width:
            before = row.done
            row.step()
            if trace is not None:
                trace.reveal_step[r, before:row.done] = row.calls - 1
            if eos_id is not None and (row.x[row.start:row.done] == eos_id).any():
                stop = row.start + int((row.x[row.start:] == eos_id).nonzero()[0])
                row.x[stop:] = eos_id
                break
        out[r], calls = row.x, calls + row.calls
    if trace is not None:
        trace.steps_run = calls
    return out, calls
