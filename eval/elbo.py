"""Monte Carlo estimates of the negative ELBO of token blocks under a denoiser (an upper bound on NLL).

For tokens x0 with loss-eligible positions E (under the shift, never position 0; in the harness,
the continuation only), the linear-schedule continuous-time bound is
    -log p(x0_E | x0_rest) <= E_{t ~ U(eps, 1)} [ (1/t) sum_{i in E, masked} -log p_theta(x0_i | x_t) ].
Integrating t out given the number l of masked positions gives the same bound (eps -> 0) as
    E_{l ~ U{1..|E|}} [ (|E|/l) sum_{i masked} -log p_theta(x0_i | x_t) ], l positions masked uniformly
(LLaDA eq. 6), which is exact for |E| = 1 and has lower variance. Methods:
    stratified  t: the k draws of one block take one t from each of k equal strata (the default)
    uniform     t: k i.i.d. draws
    antithetic  t: k/2 i.i.d. draws and their mirrors
    count       l: the k draws of one block are stratified over u in (0, 1], l = ceil(u |E|)
Each method is unbiased for the same bound; they differ only in variance at equal cost (k model rows).
"""
from __future__ import annotations

import torch

from adapt.diffusion import sample_t

METHODS = ("stratified", "uniform", "antithetic", "count")


def stratified_unit(k: int, generator: torch.Generator) -> torch.Tensor:
    """(k,) float64 in (0, 1]: one draw in each of k equal strata, shuffled."""
    u = 1.0 - (torch.arange(k, dtype=torch.float64) + torch.rand(k, generator=generator, dtype=torch.float64)) / k
    return u[torch.randperm(k, generator=generator)].clamp_min(1e-12)


def draw_masks(maskable: torch.Tensor, k: int, method: str, eps: float,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for k draws of each row. maskable (N, L) bool -> (masked (N*k, L) bool, weight (N*k,) float64).

    Rows are grouped by block: rows j*k .. j*k+k-1 belong to block j.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ELBO method {method!r}; use one of {', '.join(METHODS)}")
    reps = maskable.repeat_interleave(k, dim=0)
    u = torch.rand(reps.shape, generator=generator, dtype=torch.float64)
    if method == "count":
        size = reps.sum(1).double()
        draws = torch.cat([stratified_unit(k, generator) for _ in range(len(maskable))])
        n_mask = (draws * size).ceil().clamp(min=1)
        # mask the n_mask maskable positions with the smallest random keys: a uniform subset of that size
        keys = u.masked_fill(~reps, 2.0)
        rank = keys.argsort(1).argsort(1)
        masked = (rank < n_mask[:, None]) & reps
        weight = torch.where(size > 0, size / n_mask, torch.zeros_like(size))
        return masked, weight
    t = torch.cat([sample_t(k, eps, method, generator) for _ in range(len(maskable))]).double()
    return (u < t[:, None]) & reps, 1.0 / t


@torch.no_grad()
def masked_nll_sums(denoiser, x0: torch.Tensor, masked: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """sum_{i masked} -log p_theta(x0_i | x_t) of each row, x_t = x0 with `masked` replaced by [MASK].

    x0, masked (R, L) -> (R,) float64. Rows with nothing masked cost no model call (their sum is 0).
    """
    sums = torch.zeros(len(x0), dtype=torch.float64)
    rows = masked.any(1).nonzero().flatten()
    for i in range(0, len(rows), batch_size):
        idx = rows[i:i + batch_size]
        xt = x0[idx].masked_fill(masked[idx], denoiser.mask_id)
        logp = denoiser(xt)  # (b, L, V) log-probabilities, row i predicts token i
        target = x0[idx].to(logp.device)
        nll = -logp.gather(-1, target[..., None]).squeeze(-1)
        sums[idx] = torch.where(masked[idx].to(logp.device), nll, 0.0).sum(1).double().cpu()
    return sums


def elbo_estimates(denoiser, x0: torch.Tensor, maskable: torch.Tensor, k: int, method: str, eps: float,
                   generator: torch.Generator, batch_size: int = 8) -> torch.Tensor:
    """(N,) float64: each block's bound (nats, summed over its eligible tokens), the mean of k draws.

    x0, maskable (N, L). Costs at most N * k model rows.
    """
    masked, weight = draw_masks(maskable, k, method, eps, generator)
    sums = masked_nll_sums(denoiser, x0.repeat_interleave(k, dim=0), masked, batch_size)
    return (weight * sums).view(len(x0), k).mean(1)


def replicate_estimates(denoiser, x0: torch.Tensor, maskable: torch.Tensor, k: int, method: str, eps: float,
                        replicates: int, generator: torch.Generator, batch_size: int = 8,
                        progress=None) -> torch.Tensor:
    """(N, R) float64: R independent k-draw estimates of each block's bound (for the estimator's variance)."""
    cols = []
    for _ in range(replicates):
        cols.append(elbo_estimates(denoiser, x0, maskable, k, method, eps, generator, batch_size))
        if progress is not None:
            progress.update(1)
    return torch.stack(cols, dim=1)


def estimator_variance(estimates: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean over blocks of the variance across replicates of the per-token estimate (nats^2).

    estimates (N, R) with R >= 2, tokens (N,) eligible tokens of each block.
    """
    if estimates.shape[1] < 2:
        raise ValueError("the estimator's variance needs at least 2 replicates")
    per_token = estimates / tokens.double()[:, None]
    return float(per_token.var(dim=1, unbiased=True).mean())
