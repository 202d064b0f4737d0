"""The one Monte Carlo estimator of the negative ELBO (an upper bound on NLL) of held-out blocks.

For a block x0 with loss-eligible positions E (under the shift never position 0; for SFT the response),
the linear-schedule continuous-time bound is
    -log p(x0_E | x0_rest) <= E_{t ~ U(eps, 1)} [ (1/t) sum_{i in E, masked} -log p_theta(x0_i | x_t) ].
Integrating t out given the number l of masked positions gives the same bound (eps -> 0) as
    E_{l ~ U{1..|E|}} [ (|E|/l) sum_{i masked} -log p_theta(x0_i | x_t) ], l positions masked uniformly
(LLaDA eq. 6), exact for |E| = 1 and of lower variance. Methods (k draws per block, equal cost):
    stratified  t: one t from each of k equal strata
    uniform     t: k i.i.d. draws
    antithetic  t: k/2 i.i.d. draws and their mirrors
    count       l: k draws stratified over u in (0, 1], l = ceil(u |E|)

The model call belongs to the objective (`objective.nll_sums`), so training evaluation, SFT evaluation,
eval.likelihood, eval.compare and the harness share this file. Under several ranks every rank draws the
masks of all blocks from the same generator and scores an equal share (the last padded), so every rank
runs the same number of forwards (ZeRO-3 gathers weights in each) and the result does not depend on the
number of ranks. Dataset perplexity is exp(sum NLL / sum tokens) (001_*.txt appendix A.1), with a 95%
interval from the spread over blocks (a ratio estimator: blocks may hold different token counts).
The long loops (heldout_bound, replicate_estimates, causal_nll) report progress lines with an ETA on rank 0
(`adapt.train.metrics.Progress`); progress draws nothing, so it changes no number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from adapt.train import distributed
from adapt.objectives.diffusion import loss_weight, maskable_positions, sample_t, token_nll
from adapt.train.metrics import Progress
from adapt.objectives.base import Attention, Forward

METHODS = ("stratified", "uniform", "antithetic", "count")


@dataclass
class BoundEstimate:
    nll_per_token: float
    """Mean negative ELBO per loss-eligible token (nats): summed nats over summed tokens."""
    ci95: float
    """Half-width of the 95% interval of nll_per_token over blocks (normal approximation)."""
    tokens: int
    """Loss-eligible tokens scored."""
    blocks: int
    """Sequences scored."""

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_per_token)

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}nll": self.nll_per_token, f"{prefix}ppl": self.ppl, f"{prefix}ci95": self.ci95,
                f"{prefix}ppl_low": math.exp(self.nll_per_token - self.ci95),
                f"{prefix}ppl_high": math.exp(self.nll_per_token + self.ci95), f"{prefix}tokens": self.tokens}


# --- draws ---------------------------------------------------------------------------------------

def stratified_unit(k: int, generator: torch.Generator) -> torch.Tensor:
    """(k,) float64 in (0, 1]: one draw in each of k equal strata, shuffled."""
    u = 1.0 - (torch.arange(k, dtype=torch.float64) + torch.rand(k, generator=generator, dtype=torch.float64)) / k
    return u[torch.randperm(k, generator=generator)].clamp_min(1e-12)


def draw_masks(maskable: torch.Tensor, k: int, method: str, eps: float, generator: torch.Generator,
               group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for k draws of each block: maskable (N, L) bool -> (masked (N*k, L) bool, weight float64).

    Rows j*k .. j*k+k-1 belong to block j; a row's bound is the weighted sum of its masked NLLs, weight
    (N*k,) per row, or (N*k, L) per position when `group` > 0 and the method is count: then every group of
    `group` positions (block diffusion's blocks) draws its own masked count, and its bound is that block's.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ELBO method {method!r}; use one of {', '.join(METHODS)}")
    reps = maskable.repeat_interleave(k, dim=0)
    if method == "count" and 0 < group < maskable.shape[1]:
        return _group_counts(reps, k, group, generator)
    if method == "count":
        u = torch.rand(reps.shape, generator=generator, dtype=torch.float64)
        size = reps.sum(1).double()
        draws = torch.cat([stratified_unit(k, generator) for _ in range(len(maskable))])
        n_mask = (draws * size).ceil().clamp(min=1)
        # the n_mask maskable positions with the smallest random keys: a uniform subset of that size
        rank = u.masked_fill(~reps, 2.0).argsort(1).argsort(1)
        weight = torch.where(size > 0, size / n_mask, torch.zeros_like(size))
        return (rank < n_mask[:, None]) & reps, weight
    t = torch.cat([sample_t(k, eps, method, generator) for _ in range(len(maskable))])  # per block over [eps, 1]
    u = torch.rand(reps.shape, generator=generator)  # the draw order of adapt.objectives.diffusion.corrupt
    return (u < t[:, None]) & reps, loss_weight(t).double()


def _group_counts(reps: torch.Tensor, k: int, group: int, generator: torch.Generator):
    """Masked-count draws per group of positions: reps (R, L), R = N * k -> (masked (R, L), weight (R, L))."""
    R, L = reps.shape
    pad = -L % group  # a last, partial block: padded with positions that are never maskable
    g = torch.cat([reps, reps.new_zeros(R, pad)], 1).view(R, (L + pad) // group, group)
    keys = torch.rand(g.shape, generator=generator, dtype=torch.float64).masked_fill(~g, 2.0)
    rank = keys.argsort(-1).argsort(-1)
    size = g.sum(-1).double()  # (R, K)
    # each block of each sequence stratifies its own k draws over (0, 1], independently of the other blocks
    blocks = g.shape[1]
    strata = (torch.arange(k, dtype=torch.float64) + torch.rand(R // k, blocks, k, generator=generator,
                                                                 dtype=torch.float64)) / k
    order = torch.rand(strata.shape, generator=generator).argsort(-1)
    draws = (1.0 - strata.gather(-1, order)).clamp_min(1e-12).permute(0, 2, 1).reshape(R, blocks)
    n_mask = (draws * size).ceil().clamp(min=1)
    masked = (rank < n_mask[..., None]) & g
    weight = torch.where(size > 0, size / n_mask, torch.zeros_like(size))[..., None].expand(g.shape)
    return masked.reshape(R, -1)[:, :L], weight.reshape(R, -1)[:, :L]


# --- estimates -----------------------------------------------------------------------------------

def _chunk(n: int) -> tuple[range, int]:
    """This rank's share of n items (contiguous) and how many padding items make every share equal."""
    world, rank = distributed.world_size(), distributed.rank()
    size = math.ceil(n / world)
    mine = range(min(n, rank * size), min(n, (rank + 1) * size))
    return mine, size - len(mine)


def _rows(n: int, per: int, split: bool) -> tuple[list[int], int]:
    """The rows this rank scores of n blocks of `per` rows each (with `split` its share, padded with copies of
    its first row so every rank runs the same forwards) and how many of them are real."""
    blocks, pad = _chunk(n) if split else (range(n), 0)
    rows = [b * per + j for b in blocks for j in range(per)]
    rows += rows[:1] * (pad * per) if rows else [0] * (pad * per)  # padding rows: scored, then discarded
    return rows, len(blocks) * per


def batch_count(n: int, per: int, batch_size: int, split: bool = False) -> int:
    """Forwards this rank runs to score n blocks of `per` rows each (the progress lines' total)."""
    return math.ceil(len(_rows(n, per, split)[0]) / batch_size)


def _progress(label: str, total: int) -> Progress:
    return Progress(label, total, enabled=distributed.is_main())


def block_estimates(objective, forward: Forward, x0: torch.Tensor, maskable: torch.Tensor, k: int,
                    method: str, generator: torch.Generator, batch_size: int = 8,
                    attention: Attention | None = None, parts: tuple[torch.Tensor, ...] = (),
                    split: bool = False, progress: Progress | None = None) -> torch.Tensor:
    """(N, 1 + P) float64: each block's bound in nats (summed over its eligible tokens, mean of k draws),
    then each part's share of it. Costs N * k model rows; with `split` this rank scores only its share
    (equal forwards on every rank) and the rows of the other ranks' blocks are zero. `progress` counts forwards."""
    masked, weight = draw_masks(maskable, k, method, objective.eps, generator, objective.bound_group(x0.shape[1]))
    n = len(x0)
    rows, real = _rows(n, k, split)
    reps = x0.repeat_interleave(k, dim=0)
    sums = torch.zeros(n * k, 1 + len(parts), dtype=torch.float64)
    for i in range(0, len(rows), batch_size):
        idx = torch.tensor(rows[i:i + batch_size])
        att = attention or Attention()
        if att.docs is not None:
            att = replace(att, docs=att.docs.repeat_interleave(k, 0)[idx])
        got = objective.nll_sums(forward, reps[idx], masked[idx], att,
                                 tuple(p.repeat_interleave(k, 0)[idx] for p in parts), weight[idx])
        keep = torch.arange(i, i + len(idx)) < real
        sums[idx[keep]] = got[keep]
        if progress is not None:
            progress.update()
    return sums.view(n, k, -1).mean(1)


def summarize(nats: torch.Tensor, tokens: torch.Tensor | int) -> BoundEstimate:
    """Summed nats over summed tokens, with a 95% interval over blocks, across every rank's blocks.

    nats (N,) per block; tokens (N,) or one count for all. Each rank passes the blocks it scored.
    """
    c = torch.as_tensor(tokens, dtype=torch.float64).expand(nats.shape).double()
    s = nats.double()
    S, C, n, S2, SC, C2 = distributed.all_sum([s.sum().item(), c.sum().item(), float(len(s)), (s * s).sum().item(),
                                               (s * c).sum().item(), (c * c).sum().item()])
    mean = S / C
    # ratio estimator: var(mean) ~ sum (s_i - mean c_i)^2 / (n (n-1) cbar^2); with equal c_i it is var(s/c)/n
    resid = max(0.0, S2 - 2 * mean * SC + mean * mean * C2)
    ci = 1.96 * math.sqrt(resid / (n * (n - 1))) / (C / n) if n > 1 else float("nan")
    return BoundEstimate(mean, ci, int(round(C)), int(n))


def heldout_bound(objective, forward: Forward, x0: torch.Tensor, maskable: torch.Tensor, k: int, method: str,
                  generator: torch.Generator, batch_size: int = 8, attention: Attention | None = None,
                  parts: dict[str, torch.Tensor] | None = None, progress: Progress | None = None) -> dict:
    """The bound of blocks x0 (N, L) split over ranks, as `BoundEstimate.as_dict()`; `parts` name subsets of
    the eligible positions whose share is reported beside it with the prefix `<name>_`. Progress lines
    ("eval bound") on rank 0 unless `progress` is given."""
    parts = parts or {}
    progress = progress or _progress("eval bound", batch_count(len(x0), k, batch_size, split=True))
    est = block_estimates(objective, forward, x0, maskable, k, method, generator, batch_size, attention,
                          tuple(parts.values()), split=True, progress=progress)
    mine = _chunk(len(x0))[0]
    sel = torch.tensor(list(mine), dtype=torch.long)
    out = summarize(est[sel, 0], maskable[sel].sum(1)).as_dict()
    for c, (name, part) in enumerate(parts.items(), 1):
        out |= summarize(est[sel, c], (part & maskable)[sel].sum(1)).as_dict(f"{name}_")
    return out


def replicate_estimates(objective, forward: Forward, x0: torch.Tensor, maskable: torch.Tensor, k: int,
                        method: str, replicates: int, generator: torch.Generator, batch_size: int = 8,
                        progress=None) -> torch.Tensor:
    """(N, R) float64: R independent k-draw estimates of each block's bound (for the estimator's variance).
    Progress lines (forwards of all replicates) on rank 0 unless `progress` is given."""
    progress = progress or _progress(f"ELBO replicates ({method})", replicates * batch_count(len(x0), k, batch_size))
    cols = []
    for _ in range(replicates):
        cols.append(block_estimates(objective, forward, x0, maskable, k, method, generator, batch_size,
                                    progress=progress)[:, 0])
    return torch.stack(cols, dim=1)


def estimator_variance(estimates: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean over blocks of the variance across replicates of the per-token estimate (nats^2).

    estimates (N, R) with R >= 2, tokens (N,) eligible tokens of each block.
    """
    if estimates.shape[1] < 2:
        raise ValueError("the estimator's variance needs at least 2 replicates")
    per_token = estimates / tokens.double()[:, None]
    return float(per_token.var(dim=1, unbiased=True).mean())


# --- the parent ----------------------------------------------------------------------------------

@torch.no_grad()
def causal_nll(forward: Forward, x0: torch.Tensor, blocked: torch.Tensor, batch_size: int = 8,
               split: bool = False, progress: Progress | None = None) -> torch.Tensor:
    """(N,) exact NLL (nats) of tokens 1..L-1 of each block under a causal LM's next-token logits.

    `forward(ids, None)` is the causal model call. With `split` this rank scores its share (equal forwards
    on every rank, the last share padded) and the other ranks' rows are zero. Progress lines ("parent
    perplexity") on rank 0 unless `progress` is given."""
    n = len(x0)
    rows, real = _rows(n, 1, split)
    progress = progress or _progress("parent perplexity", batch_count(n, 1, batch_size, split))
    out = torch.zeros(n, dtype=torch.float64)
    for i in range(0, len(rows), batch_size):
        idx = torch.tensor(rows[i:i + batch_size])
        x = x0[idx]
        logits = forward(x, None)
        masked = maskable_positions(x, shift=True).to(logits.device)
        nll = token_nll(logits, x.to(logits.device), masked, True, blocked).view(len(x), -1).sum(1).double().cpu()
        keep = torch.arange(i, i + len(idx)) < real
        out[idx[keep]] = nll[keep]
        progress.update()
    return out


def parent_perplexity(forward: Forward, x0: torch.Tensor, blocked: torch.Tensor, batch_size: int = 8) -> dict:
    """Exact held-out perplexity of a causal LM over every rank's share of x0 (positions 1..L-1)."""
    nll = causal_nll(forward, x0, blocked, batch_size, split=True)
    mine = torch.tensor(list(_chunk(len(x0))[0]), dtype=torch.long)
    est = summarize(nll[mine], x0.shape[1] - 1)
    return {"parent_nll": est.nll_per_token, "parent_ppl": est.ppl, "parent_ci95": est.ci95}
