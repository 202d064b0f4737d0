"""Monte Carlo estimate of the negative ELBO (an upper bound on NLL) of token blocks.

For a block x0 of length L, with loss-eligible positions E (all but position 0 under the shift),
    -log p(x0_E | x0_0) <= E_t [ (1/t) * sum_{i masked} -log p_theta(x0_i | x_t) ].
Each block gets `n_t` draws of t, stratified over [eps, 1] by default, so the estimate of the
bound per block is the mean over draws; dataset perplexity = exp(sum NLL / sum tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from adapt.diffusion import corrupt, diffusion_loss_sum, maskable_positions, sample_t, token_nll

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class BoundEstimate:
    nll_per_token: float
    """Mean negative ELBO per loss-eligible token (nats)."""
    ci95: float
    """Half-width of the 95% interval of nll_per_token over blocks (normal approximation)."""
    tokens: int
    """Loss-eligible tokens scored."""
    blocks: int
    """Blocks scored."""

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_per_token)

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}nll": self.nll_per_token, f"{prefix}ppl": self.ppl, f"{prefix}ci95": self.ci95,
                f"{prefix}ppl_low": math.exp(self.nll_per_token - self.ci95),
                f"{prefix}ppl_high": math.exp(self.nll_per_token + self.ci95), f"{prefix}tokens": self.tokens}


def block_bounds(logits_fn: LogitsFn, x0: torch.Tensor, n_t: int, eps: float, mask_id: int, shift: bool,
                 blocked: torch.Tensor, generator: torch.Generator, t_sampling: str = "stratified",
                 batch_size: int = 8) -> torch.Tensor:
    """(N,) negative-ELBO estimate of each block in nats (summed over its tokens, mean over t draws).

    `logits_fn` maps (B, L) ids to raw (B, L, V) logits of the model (unshifted).
    """
    n = x0.shape[0]
    reps = x0.repeat_interleave(n_t, dim=0)
    # stratify per block: the n_t draws of one block cover [eps, 1]
    t = torch.cat([sample_t(n_t, eps, t_sampling, generator) for _ in range(n)])
    maskable = maskable_positions(reps, shift)
    xt, masked = corrupt(reps, t, mask_id, maskable, generator)
    sums = torch.zeros(len(reps), dtype=torch.float64)
    for i in range(0, len(reps), batch_size):
        sl = slice(i, i + batch_size)
        logits = logits_fn(xt[sl])
        for j in range(logits.shape[0]):  # per-row sums without materialising all rows' softmax
            row = slice(j, j + 1)
            sums[i + j] = diffusion_loss_sum(logits[row], reps[sl][row].to(logits.device),
                                             masked[sl][row].to(logits.device), t[sl][row], shift, blocked).double()
    return sums.view(n, n_t).mean(1)


def summarize(per_block: torch.Tensor, tokens_per_block: int) -> BoundEstimate:
    per_token = per_block / tokens_per_block
    n = per_token.numel()
    ci = 1.96 * per_token.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return BoundEstimate(per_token.mean().item(), ci, tokens_per_block * n, n)


def causal_nll(logits_fn: LogitsFn, x0: torch.Tensor, blocked: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(N,) exact NLL (nats) of tokens 1..L-1 of each block under a causal LM's next-token logits."""
    out = []
    for i in range(0, len(x0), batch_size):
        x = x0[i:i + batch_size]
        logits = logits_fn(x)
        masked = maskable_positions(x, shift=True).to(logits.device)
        nll = token_nll(logits, x.to(logits.device), masked, True, blocked)
        out.append(nll.view(len(x), -1).sum(1).double().cpu())
    return torch.cat(out)
