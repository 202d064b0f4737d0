"""Masked (absorbing-state) diffusion math in MDLM / SEDD notation.

Linear schedule: each token of x0 is replaced by [MASK] independently with probability t,
t ~ U(eps, 1); the continuous-time negative ELBO weights the cross-entropy of every masked
token by w(t) = -alpha'(t) / (1 - alpha(t)) = 1/t (alpha(t) = 1 - t). With the shift
(DiffuLLaMA), the prediction for position i is read from the logits at position i-1, so
position 0 is never masked.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_t(n: int, eps: float, method: str = "uniform",
             generator: torch.Generator | None = None, high: float = 1.0) -> torch.Tensor:
    """(n,) diffusion times in [eps, high] (high < 1: BD3-LM's clipped schedule, for training draws only).

    uniform: i.i.d.; stratified: one draw in each of n equal strata of [0, 1), then shuffled;
    antithetic: n/2 i.i.d. draws u and their mirrors 1-u (n must be even).
    """
    if method == "uniform":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
    elif method == "stratified":
        u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=generator, dtype=torch.float64)) / n
        u = u[torch.randperm(n, generator=generator)]
    elif method == "antithetic":
        if n % 2:
            raise ValueError(f"antithetic t needs an even count, got {n}")
        half = torch.rand(n // 2, generator=generator, dtype=torch.float64)
        u = torch.stack([half, 1 - half], dim=1).reshape(n)
    else:
        raise ValueError(f"unknown t sampling {method!r}; use uniform, stratified or antithetic")
    return (eps + (high - eps) * u).float()


def mask_prob(t: torch.Tensor) -> torch.Tensor:
    """q(x_t^i = [MASK] | x_0): the probability a token is masked at time t (linear schedule: t)."""
    return t


def loss_weight(t: torch.Tensor) -> torch.Tensor:
    """w(t) = -alpha'(t) / (1 - alpha(t)) = 1/t for alpha(t) = 1 - t."""
    return 1.0 / t


def position_exponents(offsets: torch.Tensor, span: int, strength: float) -> torch.Tensor:
    """(L,) float exponents a_i of position-dependent masking: token i is masked w.p. t ** a_i.

    a_i = exp(-strength * (2 u_i - 1)) with u_i = offsets_i / (span - 1) in [0, 1] (the place of token i
    in its block): strength > 0 masks later tokens more often (Efficient-DLM's left-to-right bias), 0 gives
    a_i = 1 (the linear schedule). Each token keeps a proper schedule (masked w.p. 0 at t = 0, 1 at t = 1),
    so weighting its cross-entropy by the hazard a_i / t keeps the loss a negative ELBO.
    """
    u = offsets.double() / max(span - 1, 1)
    return torch.exp(-strength * (2 * u - 1)).float()


def maskable_positions(x0: torch.Tensor, shift: bool, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool: positions that may be noised and carry loss.

    With the shift, position 0 has no logits to predict it from, so it is always given.
    `loss_mask` (B, L) marks tokens that may carry loss at all (False for padding and prompts).
    """
    ok = torch.ones_like(x0, dtype=torch.bool) if loss_mask is None else loss_mask.bool().clone()
    if shift:
        ok[:, 0] = False
    return ok


def corrupt(x0: torch.Tensor, t: torch.Tensor, mask_id: int, maskable: torch.Tensor,
            generator: torch.Generator | None = None,
            exponents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw x_t ~ q(x_t | x_0). x0 (B, L) long, t (B,) or (B, L) (a time per token, e.g. per block) ->
    (x_t (B, L), masked (B, L) bool); with `exponents` (L,) (position_exponents), token i is masked w.p.
    t ** a_i instead of t."""
    u = torch.rand(x0.shape, generator=generator, device="cpu").to(x0.device)
    t = per_token(t)
    p = mask_prob(t) if exponents is None else t.double() ** exponents.double()[None]
    masked = (u < p.to(x0.device)) & maskable
    return x0.masked_fill(masked, mask_id), masked


def per_token(t: torch.Tensor) -> torch.Tensor:
    """Diffusion times (B,) per row or (B, L) per token, as (B, 1) or (B, L): broadcastable over tokens."""
    return t[:, None] if t.dim() == 1 else t


def shift_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, L, V) -> (B, L, V) where row i holds the logits that predict token i (row i-1 of the input).

    Row 0 repeats row 0; it is never used because position 0 is never masked.
    """
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def prediction_logits(logits: torch.Tensor, shift: bool) -> torch.Tensor:
    """Logits aligned so that row i predicts token i, for either setting of the shift."""
    return shift_logits(logits) if shift else logits


def blocked_vocab(vocab_rows: int, real_vocab: int, mask_id: int, device=None) -> torch.Tensor:
    """(V,) bool: ids the denoiser must never predict (the mask token and padding rows >= real_vocab)."""
    blocked = torch.zeros(vocab_rows, dtype=torch.bool, device=device)
    blocked[real_vocab:] = True
    blocked[mask_id] = True
    return blocked


def denoiser_log_probs(logits: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """log p_theta(x0 | x_t) over the vocabulary, in float32, with blocked ids at -inf (MDLM's SUBS)."""
    return F.log_softmax(logits.float().masked_fill(blocked, -math.inf), dim=-1)


def token_nll(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, shift: bool,
              blocked: torch.Tensor) -> torch.Tensor:
    """-log p_theta(x0_i | x_t) at masked positions, (N_masked,), in masked's row-major order.

    Only the masked rows go through the softmax, which keeps memory at O(N_masked * V).
    """
    if shift:
        rows = logits[:, :-1][masked[:, 1:]]
        targets = x0[:, 1:][masked[:, 1:]]
    else:
        rows, targets = logits[masked], x0[masked]
    logp = denoiser_log_probs(rows, blocked)
    return -logp.gather(-1, targets[:, None]).squeeze(-1)


def diffusion_loss_sum(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                       shift: bool, blocked: torch.Tensor, exponents: torch.Tensor | None = None) -> torch.Tensor:
    """sum over masked tokens of w(t) * -log p_theta(x0_i | x_t) (t (B,) per row or (B, L) per token); a scalar
    (float32). With `exponents` (L,) (position-dependent masking) token i's weight is a_i / t, the hazard of its
    schedule t ** a_i.

    Divide by `normaliser` counts summed across micro-batches and ranks to get the loss.
    """
    nll = token_nll(logits, x0, masked, shift, blocked)
    w = per_token(loss_weight(t.float())).to(nll.device).expand_as(masked)
    if exponents is not None:
        w = w * exponents.to(w.device)[None]
    w = w[:, 1:][masked[:, 1:]] if shift else w[masked]
    return (w * nll).sum()


def normaliser(norm: str, maskable: torch.Tensor, masked: torch.Tensor) -> float:
    """Count the summed loss is divided by: token (loss-eligible tokens; gives the ELBO per token),
    masked (masked tokens), or sequence (sequences)."""
    if norm == "token":
        return float(maskable.sum())
    if norm == "masked":
        return float(masked.sum())
    if norm == "sequence":
        return float(maskable.shape[0])
    raise ValueError(f"unknown loss normalisation {norm!r}; use token, masked or sequence")


# --- SEDD view of the same denoiser (absorbing graph) -------------------------------------------

def loglinear_sigma_bar(t: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """SEDD log-linear total noise sigma_bar(t) = -log(1 - (1 - eps) t); masking prob 1 - e^{-sigma_bar}."""
    return -torch.log1p(-(1 - eps) * t)


def geometric_sigma_bar(t: torch.Tensor, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> torch.Tensor:
    """SEDD geometric total noise sigma_bar(t) = sigma_min^(1-t) * sigma_max^t."""
    return sigma_min ** (1 - t) * sigma_max ** t


def absorbing_score_scale(sigma_bar: torch.Tensor) -> torch.Tensor:
    """e^{-sigma_bar} / (1 - e^{-sigma_bar}): the concrete score at a masked position is this times p_theta(x0=y|x_t).
    """
    return 1.0 / torch.expm1(sigma_bar)


def _spans(masked: torch.Tensor, span: int) -> torch.Tensor:
    """(B, n, span) view of `masked` (B, L) in spans of `span` from position 0; a last, partial span is padded with
    masked positions, which hide nothing from the real ones before them."""
    B, L = masked.shape
    return torch.cat([masked, masked.new_ones(B, -L % span)], 1).view(B, -1, span)


def frontier_positions(masked: torch.Tensor, span: int) -> torch.Tensor:
    """(B, L) bool: masked positions whose span (blocks of `span` from position 0) shows every earlier token and
    hides every later one. There the exact target p(x_i | x_t) is the parent's next-token distribution
    p(x_i | x_<i) given the clean blocks before, so a teacher's distribution is an unbiased soft target."""
    B, L = masked.shape
    m = _spans(masked, span)
    shown_before = torch.cumprod((~m).int(), -1).roll(1, -1)  # 1 while every earlier token of the span is shown
    shown_before[..., 0] = 1
    hidden_after = torch.cumprod(m.flip(-1).int(), -1).flip(-1).roll(-1, -1)  # every later token hidden
    hidden_after[..., -1] = 1
    return (m & shown_before.bool() & hidden_after.bool()).view(B, -1)[:, :L]


def context_shares(masked: torch.Tensor, span: int) -> torch.Tensor:
    """(B, L) float32: for each position i > 0, the share of the i tokens before it that the model sees: those of
    earlier spans (blocks of `span` from position 0; a model sees them clean) and the shown ones of its own span
    before it; 1 at position 0. With span = L it is the share of x_<i shown in x_t."""
    B, L = masked.shape
    m = _spans(masked, span).float()
    hidden_before = (m.cumsum(-1) - m).view(B, -1)[:, :L]
    return 1.0 - hidden_before / torch.arange(L, device=masked.device).clamp(min=1)


def distill_scale(schedule: str, step: int, total_steps: int) -> float:
    """The distillation weight's factor at optimizer step `step` of `total_steps` (diffusion.distill.schedule):
    1 throughout (constant), or 1 - step / total_steps (linear: 1 at the first step, 1 / total_steps at the last)."""
    return 1.0 if schedule == "constant" else max(0.0, 1.0 - step / total_steps)


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, blocked: torch.Tensor, top_k: int = 0,
               temperature: float = 1.0) -> torch.Tensor:
    """(N,) float32: tau^2 KL(p_T || p_S) per row of logits (N, V), p = softmax(z / tau) over the ids not blocked
    (Hinton et al. 2015; the tau^2 keeps the gradient's scale across temperatures). With top_k > 0 the teacher is
    its k most likely ids, renormalised, against the student's full distribution (OPDLM's top-k forward KL); top_k
    >= V is the full KL. The teacher carries no gradient."""
    log_s = denoiser_log_probs(student / temperature, blocked)
    log_t = denoiser_log_probs(teacher.detach() / temperature, blocked)
    if 0 < top_k < log_t.shape[-1]:
        top, ids = log_t.topk(top_k, dim=-1)
        log_t, log_s = top - top.logsumexp(-1, keepdim=True), log_s.gather(-1, ids)
    p_t = log_t.exp()
    terms = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t))  # 0 log 0 = 0 (blocked ids)
    return temperature ** 2 * terms.sum(-1)
