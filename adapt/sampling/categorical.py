"""Distributions over the vocabulary: temperature / top-k / top-p filtering, drawing, confidence.

All functions take rows of log-probabilities (N, V) (one row per position being decided) so that
samplers only pay for the positions they touch, never for the whole (B, L, V) tensor.
Random numbers come from a CPU generator and are moved to the rows' device, so a seed gives the
same draws on CPU and GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CONFIDENCES = ("prob", "margin", "entropy")


@dataclass(frozen=True)
class TokenFilter:
    """How a token is drawn from p_theta(x0_i | x_t) at a position being revealed."""

    temperature: float = 1.0
    """Logits are divided by this; 0 = greedy (argmax of the filtered distribution)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1 = off)."""

    def __post_init__(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def identity(self) -> bool:
        return self.temperature in (0.0, 1.0) and self.top_k == 0 and self.top_p == 1.0

    def apply(self, logp: torch.Tensor) -> torch.Tensor:
        """(N, V) log-probabilities -> (N, V) renormalised log-probabilities after the filter.

        Temperature 0 filters as temperature 1 (greedy drawing happens in `draw`). The identity
        filter returns the rows as they are (they are already normalised).
        """
        logp = logp.float()
        if self.identity:
            return logp
        if self.temperature > 0 and self.temperature != 1.0:
            logp = logp / self.temperature
        if self.top_k > 0 and self.top_k < logp.shape[-1]:
            kth = logp.topk(self.top_k, dim=-1).values[..., -1:]
            logp = logp.masked_fill(logp < kth, -math.inf)
        if self.top_p < 1.0:
            logp = _top_p(logp, self.top_p)
        return torch.log_softmax(logp, dim=-1)


def _top_p(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: drop tokens once the probability of the more likely ones reaches top_p."""
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logp, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= top_p  # the most likely token has before = 0 and is always kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logp.masked_fill(drop, -math.inf)


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) draws from a CPU generator, moved to `device`."""
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(device)


def draw(logp: torch.Tensor, generator: torch.Generator | None, filt: TokenFilter = TokenFilter()) -> torch.Tensor:
    """One token id per row of (N, V) log-probabilities -> (N,) long, after the filter.

    Inverse-CDF sampling: one uniform per row (not per vocabulary entry), so drawing costs
    one cumulative sum of the touched rows. Ids with probability 0 are never drawn.
    """
    if logp.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=logp.device)
    if filt.temperature == 0:
        return filt.apply(logp).argmax(-1)
    cdf = filt.apply(logp).exp().double().cumsum(-1)
    u = uniform((logp.shape[0], 1), generator, logp.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(logp.shape[-1] - 1)


def confidence(logp: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, V) log-probabilities -> (N,) confidence of the position (higher = more certain).

    prob: top probability (LLaDA's low-confidence remasking, Dream's maskgit_plus);
    margin: top-1 minus top-2 probability (Dream's topk_margin);
    entropy: negative entropy sum_v p_v log p_v (Dream's entropy).
    Computed from the distribution, not from the drawn token, so which positions are committed
    does not depend on which tokens were drawn there (this keeps each position's marginal exact
    when positions are independent; see tests/test_sampling_distribution.py).
    """
    if kind == "prob":
        return logp.max(-1).values.exp()
    if kind == "margin":
        top2 = logp.topk(2, dim=-1).values.exp()
        return top2[:, 0] - top2[:, 1]
    if kind == "entropy":
        p = logp.exp()
        return (p * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)
    raise ValueError(f"unknown confidence {kind!r}; use one of {', '.join(CONFIDENCES)}")
