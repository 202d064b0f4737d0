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
Rows are decoded together, one call per step for every unfinished row (each at its own place: rows accept
different numbers of drafts), in one cache that keeps per row which columns are valid; a row's queries see only
its own keys, so its output does not depend on the other rows (greedy: tested equal to each row alone).
With a draft head (adapt.draft_head, trained into the export folder) the drafts of a call are drawn one after
another, each from the noised row's feature, the token drawn before it and the previous draft's feature, so the
draft for e + 1 knows x_e (one head pass per drafted place for all rows of the call); the call and the check
are the same.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache

from adapt import objectives
from adapt.model.attention import block_visible, to_additive
from adapt.objectives.diffusion import blocked_vocab, denoiser_log_probs
from adapt.draft_head import DraftHead, captured_features, head_logits
from adapt.model.causal import cache_kwarg
from adapt.decode.categorical import TokenFilter, draw, uniform
from adapt.decode.loop import Trace


def check_speculative(meta, backend: str) -> None:
    """Raise ValueError naming why this model cannot be decoded speculatively."""
    decoding = objectives.decoding(meta)
    if not decoding.block_length:
        raise ValueError("speculative decoding needs a block-diffusion export (diffusion.json block_length > 0): "
                         "a whole-sequence model has no causal stream to check drafts with; use another sampler")
    if not decoding.clean_causal:
        raise ValueError("speculative decoding needs an export trained with diffusion.clean_attention=causal (its "
                         "clean stream is then a causal LM); this one's clean rows see later tokens "
                         "of their block; use the confidence or threshold sampler")
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
    """The decoding state of one row: its canvas, how much of it is decided, cached and drafted."""

    def __init__(self, b: int, mask_id: int, x: torch.Tensor, filt: TokenFilter, generator: torch.Generator | None,
                 blocked: torch.Tensor, headed: bool = False, check: bool = True):
        self.b, self.mask_id, self.blocked, self.headed = b, mask_id, blocked, headed
        self.check = check  # False: every draft is kept unchecked (one call per block; not exact)
        self.filt, self.gen = filt, generator
        self.x, self.width = x.clone(), x.shape[0]
        masks = (x == self.mask_id).nonzero()
        self.start = int(masks[0]) if len(masks) else self.width  # first generated position
        self.n, self.done, self.stopped = 0, self.start, False  # positions < n cached; < done decided
        self.drafts: list[int] = []
        self.q: torch.Tensor | None = None  # (len(drafts), V) filtered draft log-probabilities
        self.pending = None  # with a draft head: (noised features (m, D), carry (D,)) of the chain to draft

    @property
    def greedy(self) -> bool:
        return self.filt.temperature == 0

    @property
    def finished(self) -> bool:
        return self.stopped or self.done >= self.width

    def stop_at(self, eos_id: int | None) -> None:
        """After the row's first decided EOS every position becomes EOS and the row stops."""
        if eos_id is not None and (self.x[self.start:self.done] == eos_id).any():
            stop = self.start + int((self.x[self.start:] == eos_id).nonzero()[0])
            self.x[stop:], self.stopped = eos_id, True

    def queries(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This call's rows: (ids, positions) of [clean n .. e-1 | the noised block of e] and the clean count."""
        e = self.done + len(self.drafts)
        cur = self.x.clone()
        cur[self.done:e] = torch.tensor(self.drafts, dtype=torch.long, device=cur.device)
        ids, pos = cur[self.n:e], torch.arange(self.n, e, device=cur.device)
        if e < self.width:
            a = e // self.b * self.b
            end = min(a + self.b, self.width)
            noised = torch.cat([cur[a:e], torch.full((end - e,), self.mask_id, dtype=torch.long, device=cur.device)])
            ids, pos = torch.cat([ids, noised]), torch.cat([pos, torch.arange(a, end, device=pos.device)])
        return ids, pos, e - self.n

    def absorb(self, clean: torch.Tensor, noised: torch.Tensor, features=None) -> int:
        """Check the drafts against this call's clean logits (c, V), draw the next token, draft from the noised
        logits (with a draft head: from `features`, this call's (clean, noised) LM-head inputs); -> the positions
        whose cached keys/values stay valid (< the returned count)."""
        target = self.filt.apply(denoiser_log_probs(clean, self.blocked))  # row i predicts position n + i + 1
        n, e = self.n, self.done + len(self.drafts)
        for i, d in enumerate(self.drafts):
            kept, tok = accept_or_correct(target[self.done - 1 - n], self.q[i], d, self.gen, self.greedy)
            self.x[self.done] = tok
            self.done += 1
            if not kept:
                return self._keep(self.done - 1)
        self._keep(e)
        if e < self.width:
            p = target[e - 1 - n][None]
            self.x[e] = int(p.argmax()) if self.greedy else int(draw(p, self.gen))
            self.done = e + 1
            if not self.headed:
                self._draft(noised, e)
                self.settle()
            else:  # drafted through the head by the batch, every row's chain together (RowBatch._draft_chains)
                a = e // self.b * self.b
                self.pending = (features[1][e - a:len(noised) - 1], features[0][e - 1 - n])
        return e

    def settle(self) -> None:
        """After drafting: without the check the drafts are kept as drawn (the next call caches them and draws the
        next block's first token)."""
        self.pending = None
        if not self.check and self.drafts:
            self.x[self.done:self.done + len(self.drafts)] = torch.tensor(self.drafts, dtype=torch.long)
            self.done += len(self.drafts)
            self.drafts, self.q = [], None

    def _keep(self, upto: int) -> int:
        """Positions < upto stay cached; the drafts are dropped."""
        self.n, self.drafts, self.q = upto, [], None
        return upto

    def _draft(self, noised: torch.Tensor, e: int) -> None:
        """Draft positions e + 1 .. the end of e's block from its noised rows (row j - 1 predicts column j)."""
        a = e // self.b * self.b
        rows = noised[e - a:len(noised) - 1]  # predict columns e + 1 .. end - 1
        if len(rows) == 0:
            return
        self.q = self.filt.apply(denoiser_log_probs(rows, self.blocked))
        tokens = self.q.argmax(-1) if self.greedy else draw(self.q, self.gen)
        self.drafts = tokens.tolist()

    def add_draft(self, logq: torch.Tensor, tok: int) -> int:
        """Record the next draft of the chain, drawn from logq (1, V), the head's filtered log-probabilities."""
        self.q = logq if self.q is None else torch.cat([self.q, logq])
        self.drafts.append(tok)
        return tok


class RowBatch:
    """Rows decoded together: one model call per step for all unfinished rows, one cache.

    Each row's queries sit at its own place in the call: [its clean rows | padding | its noised block |
    padding]. The cache keeps, per row, the logical position of every column and whether it is valid; a
    rejected draft's columns are marked invalid instead of cropped (rows keep different numbers of drafts), and
    the noised and padding columns, which no later query reads, are cropped after every call. A finished row
    leaves the batch (its cache row is dropped), so later calls compute only the rows still decoding.
    """

    def __init__(self, model, meta, x: torch.Tensor, filt: TokenFilter, generator: torch.Generator | None,
                 head=None, check: bool = True):
        self.model, self.mask_id, self.head = model, meta.mask_token_id, head
        self.noised_causal = meta.noised_attention == "causal"  # a noised row then sees its block up to itself
        self.b = objectives.decoding(meta).block_length
        self.blocked = blocked_vocab(model.get_output_embeddings().weight.shape[0], meta.real_vocab_size,
                                     meta.mask_token_id, device=x.device)
        self.rows = [self.new_row(x[r], filt, generator, check) for r in range(len(x))]
        self.cache_arg = cache_kwarg(model)
        self.cache = DynamicCache(config=model.config)
        self.slots = [r for r, row in enumerate(self.rows) if not row.finished]  # the rows in the cache, in order
        self.kv_pos = torch.zeros((len(self.slots), 0), dtype=torch.long, device=x.device)
        self.kv_ok = torch.zeros((len(self.slots), 0), dtype=torch.bool, device=x.device)
        self.calls = 0

    def new_row(self, x: torch.Tensor, filt: TokenFilter, generator: torch.Generator | None, check: bool) -> _Row:
        """A row of this batch's export: x (L,) long, a prompt then masks."""
        return _Row(self.b, self.mask_id, x, filt, generator, self.blocked, self.head is not None, check)

    def join(self, rows: list[_Row]) -> None:
        """Rows that start between calls (a server's new requests), each with its own filter and generator: they
        get cache rows whose earlier columns they never see. Finished rows are forgotten first."""
        self._drop_finished()
        self.rows, self.slots = [self.rows[r] for r in self.slots], list(range(len(self.slots)))
        if not self.slots:  # nothing cached is read any more: start the cache afresh
            self.cache = DynamicCache(config=self.model.config)
            self.kv_pos, self.kv_ok = self.kv_pos[:, :0], self.kv_ok[:, :0]
        new = [row for row in rows if not row.finished]
        for layer in getattr(self.cache, "layers", []):
            if layer.get_seq_length() > 0:
                layer.keys = torch.cat([layer.keys, layer.keys.new_zeros((len(new), *layer.keys.shape[1:]))])
                layer.values = torch.cat([layer.values, layer.values.new_zeros((len(new), *layer.values.shape[1:]))])
        self.slots += range(len(self.rows), len(self.rows) + len(new))
        self.rows += new
        width = self.kv_pos.shape[1]
        self.kv_pos = torch.cat([self.kv_pos, self.kv_pos.new_zeros((len(new), width))])
        self.kv_ok = torch.cat([self.kv_ok, self.kv_ok.new_zeros((len(new), width))])

    def _draft_chains(self) -> None:
        """Draft every waiting row's chain through the head: one head and LM-head pass per drafted offset for all
        of them (a row's draft j reads its noised feature j, the token drawn before it and the previous feature)."""
        rows = [row for row in self.rows if row.pending is not None]
        if not rows:
            return
        feats = [row.pending[0] for row in rows]
        carry = torch.stack([row.pending[1] for row in rows])
        prev = torch.stack([row.x[row.done - 1] for row in rows])
        emb, first = self.model.get_input_embeddings(), rows[0]
        shared = all(row.filt == first.filt and row.gen is first.gen for row in rows)
        for s in range(max(len(f) for f in feats)):
            live = [i for i, f in enumerate(feats) if len(f) > s]
            idx = torch.tensor(live, device=carry.device)
            f = self.head(torch.stack([feats[i][s] for i in live]), emb(prev[idx]), carry[idx])
            logp = denoiser_log_probs(head_logits(self.model, f), self.blocked)
            if shared:  # one filter and one generator: the rows' drafts in one draw
                logq = first.filt.apply(logp)
                tokens = (logq.argmax(-1) if first.greedy else draw(logq, first.gen)).tolist()
            else:  # each row its own filter and random stream (a server's requests): drawn as each alone
                logq = torch.cat([rows[i].filt.apply(logp[j:j + 1]) for j, i in enumerate(live)])
                tokens = [int(logq[j].argmax()) if rows[i].greedy else int(draw(logq[j:j + 1], rows[i].gen))
                          for j, i in enumerate(live)]
            carry[idx] = f.to(carry.dtype)
            for j, i in enumerate(live):
                prev[i] = rows[i].add_draft(logq[j:j + 1], tokens[j])
        for row in rows:
            row.settle()

    def _drop_finished(self) -> None:
        """Rows that finished since the last call leave the cache and the batch."""
        keep = [i for i, r in enumerate(self.slots) if not self.rows[r].finished]
        if len(keep) == len(self.slots):
            return
        if self.kv_pos.shape[1]:
            self.cache.batch_select_indices(torch.tensor(keep, dtype=torch.long, device=self.kv_pos.device))
        self.kv_pos, self.kv_ok, self.slots = self.kv_pos[keep], self.kv_ok[keep], [self.slots[i] for i in keep]

    def _layout(self):
        """ids (B, Q), positions (B, Q), additive mask (B, 1, Q, K + Q), the clean width C, and per slot its
        clean and noised query counts (B: the rows still decoding)."""
        parts = {i: self.rows[r].queries() for i, r in enumerate(self.slots)}
        width_c = max(c for _, _, c in parts.values())
        width_n = max(len(tok) - c for tok, _, c in parts.values())
        batch, q, device = len(self.slots), width_c + width_n, self.kv_pos.device
        ids = torch.full((batch, q), self.mask_id, dtype=torch.long, device=device)
        pos = torch.zeros((batch, q), dtype=torch.long, device=device)
        kind = torch.zeros((batch, q), dtype=torch.long, device=device)  # 0 padding, 1 clean, 2 noised
        counts = {}
        for s, (tok, at, c) in parts.items():
            m = len(tok) - c
            cols = slice(width_c, width_c + m)
            ids[s, :c], pos[s, :c], kind[s, :c] = tok[:c], at[:c], 1
            ids[s, cols], pos[s, cols], kind[s, cols] = tok[c:], at[c:], 2
            counts[s] = (c, m)
        key_pos = torch.cat([self.kv_pos, pos], 1)[:, None, :]
        key_clean = torch.cat([torch.ones_like(self.kv_ok), kind == 1], 1)[:, None, :]  # the cache holds clean keys
        usable = torch.cat([self.kv_ok, kind > 0], 1)[:, None, :]  # valid cached columns, this call's real rows
        see = block_visible(pos[:, :, None], key_pos, kind[:, :, None] == 1, key_clean, self.b, clean_causal=True,
                            noised_causal=self.noised_causal) & usable & (kind > 0)[:, :, None]
        see[:, torch.arange(q), self.kv_pos.shape[1] + torch.arange(q)] |= True  # every query sees itself
        return ids, pos, to_additive(see, self.model.dtype), width_c, counts

    @torch.no_grad()
    def step(self) -> list[int]:
        """One model call for every unfinished row; -> the rows that took part."""
        self._drop_finished()
        ids, pos, mask, width_c, counts = self._layout()
        with captured_features(self.model) if self.head is not None else contextlib.nullcontext([]) as seen:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                             **{self.cache_arg: self.cache}).logits
        self.calls += 1
        if ids.shape[1] > width_c:  # the noised and padding columns: no later query reads them
            self.cache.crop(-(ids.shape[1] - width_c))  # transformers 5 crops by a negative count to remove
        self.kv_pos = torch.cat([self.kv_pos, pos[:, :width_c]], 1)
        self.kv_ok = torch.cat([self.kv_ok, torch.zeros_like(pos[:, :width_c], dtype=torch.bool)], 1)
        for i, r in enumerate(self.slots):
            (c, m), k = counts[i], self.kv_ok.shape[1] - width_c
            feats = (seen[0][i, :c], seen[0][i, width_c:width_c + m]) if seen else None
            upto = self.rows[r].absorb(out[i, :c], out[i, width_c:width_c + m], feats)
            self.kv_ok[i, k:k + c] = self.kv_pos[i, k:k + c] < upto  # this call's clean rows up to the kept prefix
        self._draft_chains()
        return list(self.slots)


def speculative_decode(model, meta, x: torch.Tensor, generator: torch.Generator | None = None,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
                       trace: Trace | None = None, draft_head: DraftHead | None = None,
                       check: bool = True) -> tuple[torch.Tensor, int]:
    """Fill the masks of x (B, L) long, each row a prompt followed by masks only -> ((B, L) long, model calls).

    temperature / top_k / top_p filter the clean stream's distribution (the output's) and the drafts alike;
    temperature 0 is greedy (ties to the lowest id). eos_id: a row stops at its first generated EOS and its
    later positions become EOS. draft_head: draft through this head (the export's, from
    adapt.draft_head.load_draft_head); None drafts from the noised stream alone. check=False keeps
    every draft unchecked: one call per block (the `chain` sampler), the output distributed as the drafts, not as
    the clean stream.
    """
    check_speculative(meta, getattr(model.config, "_attn_implementation", "sdpa"))
    masked = x == meta.mask_token_id
    first = torch.where(masked.any(1), masked.float().argmax(1), torch.full_like(x[:, 0], x.shape[1]))
    if (masked != (torch.arange(x.shape[1], device=x.device)[None] >= first[:, None])).any() or (first == 0).any():
        raise ValueError("speculative decoding continues a prompt: each row must be given tokens (BOS at least) "
                         "then masks only; use the confidence or threshold sampler to infill")
    batch = RowBatch(model, meta, x, TokenFilter(temperature, top_k, top_p), generator, draft_head, check)
    if trace is not None:
        trace.start(x)
    while not all(row.finished for row in batch.rows):
        before = [row.done for row in batch.rows]
        for r in batch.step():
            row = batch.rows[r]
            if trace is not None:
                trace.reveal_step[r, before[r]:row.done] = batch.calls - 1
            row.stop_at(eos_id)
    if trace is not None:
        trace.steps_run = batch.calls
    return torch.stack([row.x for row in batch.rows]), batch.calls
