"""The decoding primitives the shipped decoder (generate.py beside this file, custom_generate/ in every export) and
this package's samplers share: token filters and draws, confidences, commit schedules, block spans, the EOS stop and
block diffusion's attention rule. Torch and the standard library only: an export runs them without adapt-diffusion
installed, and the library imports them from here, so each exists once."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class DecodeError(ValueError):
    """generate() cannot honour a request; the message says what to change."""


CONFIDENCES = ("prob", "margin", "entropy")


@dataclass(frozen=True)
class TokenFilter:
    """How a token is drawn from p_theta(x0_i | x_t): temperature (0 = greedy: argmax of the filtered rows), top_k
    (0 = off), top_p (1 = off: keep the smallest set of tokens whose probability reaches top_p)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0, top_k >= 0 (0 = off), 0 < top_p <= 1; got {self.temperature}, "
                             f"{self.top_k}, {self.top_p}")

    def apply(self, logp: torch.Tensor) -> torch.Tensor:
        """(N, V) log-probabilities -> float32, renormalised after the filter (temperature 0 filters as 1)."""
        logp = logp.float()
        if self.temperature in (0.0, 1.0) and self.top_k == 0 and self.top_p == 1.0:
            return logp
        if self.temperature > 0 and self.temperature != 1.0:
            logp = logp / self.temperature
        if 0 < self.top_k < logp.shape[-1]:
            logp = logp.masked_fill(logp < logp.topk(self.top_k, dim=-1).values[..., -1:], -math.inf)
        if self.top_p < 1.0:  # nucleus: drop a token once the strictly more likely ones reach top_p
            sorted_logp, order = logp.sort(dim=-1, descending=True)
            probs = torch.softmax(sorted_logp, dim=-1)
            drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, probs.cumsum(-1) - probs >= self.top_p)
            logp = logp.masked_fill(drop, -math.inf)
        return torch.log_softmax(logp, dim=-1)


def draw(logp: torch.Tensor, generator: torch.Generator | None = None, filt: TokenFilter = TokenFilter()):
    """One id per row (N,) after the filter: argmax when greedy (ties -> lowest id), else inverse-CDF sampling with
    one float64 uniform per row from a CPU generator (None: torch's global one), so a seed draws alike on any device."""
    if logp.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=logp.device)
    if filt.temperature == 0:
        return filt.apply(logp).argmax(-1)
    cdf = filt.apply(logp).exp().double().cumsum(-1)
    u = torch.rand((logp.shape[0], 1), generator=generator, dtype=torch.float64).to(logp.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(logp.shape[-1] - 1)


def confidence(logp: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, V) -> (N,): top probability (LLaDA), top1 - top2 margin or negative entropy (Dream), from the
    distribution, not the drawn token (so which positions commit does not depend on the draws)."""
    if kind == "prob":
        return logp.max(-1).values.exp()
    if kind == "margin":
        top2 = logp.topk(2, dim=-1).values.exp()
        return top2[:, 0] - top2[:, 1]
    if kind == "entropy":
        return (logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)
    raise ValueError(f"unknown confidence {kind!r}; use one of {', '.join(CONFIDENCES)}")


def transfer_counts(n: torch.Tensor, steps: int) -> torch.Tensor:
    """(B,) positions to fill -> (B, steps): n // steps per step, one more in the first n % steps."""
    k = torch.arange(steps, device=n.device)
    return (n[:, None] // steps) + (k[None, :] < (n[:, None] % steps)).long()


def top_ranked(score: torch.Tensor, allowed: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(B, W) bool: the count[b] allowed positions of each row with the highest score (ties: leftmost)."""
    score = score.masked_fill(~allowed, -torch.inf)
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(score.shape[1], device=score.device)
                                            .expand_as(order).contiguous())
    return (rank < count[:, None]) & allowed


def split_steps(steps: int, blocks: int) -> list[int]:
    """Share `steps` among `blocks` as evenly as possible (earlier blocks get the remainder)."""
    if steps < blocks:
        raise DecodeError(f"{steps} steps cannot cover {blocks} blocks (one step each at least); raise the steps "
                          f"(diffusion_steps) or the block length")
    return [steps // blocks + (i < steps % blocks) for i in range(blocks)]


def stop_after_eos(x: torch.Tensor, generated: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """Every generated position after a row's first generated EOS becomes EOS (given ones never change)."""
    is_eos = generated & torch.isin(x, torch.tensor(eos, device=x.device))
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return torch.where(after & generated, torch.full_like(x, eos[0]), x)


def block_spans(fill: torch.Tensor, length: int) -> list[tuple[int, int]]:
    """Column ranges [a, b) of `length` from the first to the last position to fill (whole span if 0)."""
    if length < 0:
        raise DecodeError(f"a block length must be >= 0 (0 = the whole span), got {length}")
    cols = fill.any(0).nonzero().flatten()
    if len(cols) == 0:
        return []
    first, last = int(cols[0]), int(cols[-1]) + 1
    length = length or last - first
    return [(a, min(a + length, last)) for a in range(first, last, length)]


def block_visible(q_pos, k_pos, q_clean, k_clean, block: int, clean_causal: bool = False, noised_causal: bool = False):
    """Block diffusion's attention rule, elementwise over broadcastable tensors: may the query at position q_pos, of
    the clean stream if q_clean (else the noised one), attend the key at k_pos (clean if k_clean)? A noised query
    sees the clean blocks before its own and its own noised block (up to itself if noised_causal); a clean query
    sees the clean blocks up to its own (the clean keys up to itself if clean_causal). The training masks, the flex
    mask, the block cache here and the speculative decoder's calls all ask this."""
    q_blk, k_blk = q_pos // block, k_pos // block
    clean = k_pos <= q_pos if clean_causal else k_blk <= q_blk
    own = (q_blk == k_blk) & (k_pos <= q_pos) if noised_causal else q_blk == k_blk
    return (q_clean & k_clean & clean) | (~q_clean & k_clean & (k_blk < q_blk)) | (~q_clean & ~k_clean & own)
