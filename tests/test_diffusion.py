"""Masked-diffusion math: the forward process follows t, the weight is 1/t, the shift lines up, and the
loss reduces to the parent's next-token cross-entropy when only the last token is masked."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adapt.recipe.config import ModelConfig
from adapt.objectives.diffusion import (absorbing_score_scale, blocked_vocab, corrupt, denoiser_log_probs,
                                        diffusion_loss_sum,
                             loglinear_sigma_bar, loss_weight, mask_prob, maskable_positions, normaliser,
                             prediction_logits, sample_t, shift_logits, token_nll)

MASK = 99


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ids(b: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (b, n), generator=gen(seed))


def test_masking_rate_follows_t():
    ts = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.97]).repeat_interleave(40)
    x0 = ids(len(ts), 256)
    maskable = maskable_positions(x0, shift=True)
    xt, masked = corrupt(x0, ts, MASK, maskable, gen(1))
    assert torch.equal(xt == MASK, masked) and torch.equal(xt[~masked], x0[~masked])
    for t in ts.unique():
        rows = ts == t
        n = maskable[rows].sum().item()
        rate = masked[rows].sum().item() / n
        sigma = math.sqrt(t * (1 - t) / n)
        assert abs(rate - t) < 5 * sigma, (t.item(), rate)
    # each row's own rate is t as well (rows are not mixed up)
    per_row = masked.sum(1) / maskable.sum(1)
    assert torch.corrcoef(torch.stack([per_row, ts]))[0, 1] > 0.99


def test_t_extremes():
    x0 = ids(8, 2000)
    maskable = maskable_positions(x0, shift=True)
    for t in (0.0, 1e-9):
        _, masked = corrupt(x0, torch.full((8,), t), MASK, maskable, gen())
        assert not masked.any()
    xt, masked = corrupt(x0, torch.ones(8), MASK, maskable, gen())
    assert torch.equal(masked, maskable)
    assert (xt[:, 1:] == MASK).all() and torch.equal(xt[:, 0], x0[:, 0])


def test_position_zero_and_loss_mask():
    x0 = ids(4, 16)
    loss_mask = torch.ones(4, 16, dtype=torch.bool)
    loss_mask[:, 12:] = False  # padding
    loss_mask[0, :5] = False  # a prompt
    before = loss_mask.clone()
    ok = maskable_positions(x0, shift=True, loss_mask=loss_mask)
    assert not ok[:, 0].any() and not ok[:, 12:].any() and not ok[0, :5].any() and ok[1, 1:12].all()
    assert ok[:, 0].sum() == 0 and maskable_positions(x0, shift=False)[:, 0].all()
    assert torch.equal(loss_mask, before)  # the caller's mask is not written into
    _, masked = corrupt(x0, torch.ones(4), MASK, ok, gen())
    assert torch.equal(masked, ok)


@pytest.mark.parametrize("shift", [True, False])
def test_only_masked_tokens_carry_loss(shift):
    """The gradient of the loss reaches exactly the logit rows that predict masked tokens."""
    x0 = ids(3, 12)
    maskable = maskable_positions(x0, shift, loss_mask=torch.arange(12).expand(3, 12) < 10)
    _, masked = corrupt(x0, torch.tensor([0.4, 0.6, 0.9]), MASK, maskable, gen(2))
    logits = torch.randn(3, 12, 128, requires_grad=True)
    t = torch.tensor([0.4, 0.6, 0.9])
    diffusion_loss_sum(logits, x0, masked, t, shift, blocked_vocab(128, 100, MASK)).backward()
    touched = logits.grad.abs().sum(-1) > 0
    expected = torch.zeros_like(masked)
    if shift:
        expected[:, :-1] = masked[:, 1:]
    else:
        expected = masked
    assert masked.any() and torch.equal(touched, expected)


def test_loss_weight_is_one_over_t():
    t = torch.tensor([1e-3, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(loss_weight(t), 1 / t)
    # general form -alpha'(t) / (1 - alpha(t)) with alpha(t) = 1 - mask_prob(t)
    tt = t.clone().requires_grad_(True)
    alpha = 1 - mask_prob(tt)
    (d_alpha,) = torch.autograd.grad(alpha.sum(), tt)
    torch.testing.assert_close(loss_weight(t), -d_alpha / (1 - alpha.detach()))
    # and it is what scales each sequence's summed NLL in the loss
    x0, logits = ids(1, 6), torch.randn(1, 6, 128)
    masked = torch.zeros(1, 6, dtype=torch.bool)
    masked[0, 2:5] = True
    blocked = blocked_vocab(128, 100, MASK)
    nll = token_nll(logits, x0, masked, True, blocked).sum()
    for tv in (0.1, 0.5):
        torch.testing.assert_close(diffusion_loss_sum(logits, x0, masked, torch.tensor([tv]), True, blocked),
                                   nll / tv)


@pytest.mark.parametrize("method", ["uniform", "stratified", "antithetic"])
def test_sample_t_range(method):
    eps = 1e-3
    t = sample_t(4096, eps, method, gen())
    assert t.shape == (4096,) and t.dtype == torch.float32
    assert (t >= eps).all() and (t <= 1).all()
    assert abs(t.mean().item() - (1 + eps) / 2) < 0.02
    assert torch.equal(t, sample_t(4096, eps, method, gen()))  # reproducible from the generator


def test_stratified_one_draw_per_stratum():
    eps, n = 1e-3, 16
    for seed in range(20):
        t = sample_t(n, eps, "stratified", gen(seed))
        strata = torch.floor((t.double() - eps) / (1 - eps) * n).long().clamp(max=n - 1)
        assert torch.equal(strata.sort().values, torch.arange(n))
    # shuffled: the stratum order differs between draws
    assert not torch.equal(sample_t(n, eps, "stratified", gen(0)).argsort(), torch.arange(n))


def test_antithetic_pairs():
    eps = 1e-3
    t = sample_t(64, eps, "antithetic", gen())
    pairs = t.view(32, 2)
    torch.testing.assert_close(pairs.sum(1), torch.full((32,), 1 + eps), rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        sample_t(5, eps, "antithetic")
    with pytest.raises(ValueError):
        sample_t(4, eps, "sobol")


def test_shift_alignment():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    s = shift_logits(logits)
    assert torch.equal(s[:, 1:], logits[:, :-1]) and torch.equal(s[:, 0], logits[:, 0])
    assert torch.equal(prediction_logits(logits, True), s) and prediction_logits(logits, False) is logits
    # token_nll under the shift reads row i-1 for token i, the same as the shifted logits at row i
    x0 = ids(2, 5) % 3
    masked = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    blocked = torch.zeros(3, dtype=torch.bool)
    want = F.cross_entropy(s[masked], x0[masked], reduction="none")
    torch.testing.assert_close(token_nll(logits, x0, masked, True, blocked), want)
    torch.testing.assert_close(token_nll(logits, x0, masked, False, blocked),
                               F.cross_entropy(logits[masked], x0[masked], reduction="none"))


def test_blocked_vocab_gets_minus_inf():
    blocked = blocked_vocab(128, 100, MASK)
    assert blocked[MASK] and blocked[100:].all() and blocked.sum() == 29
    logp = denoiser_log_probs(torch.randn(2, 3, 128, dtype=torch.bfloat16), blocked)
    assert logp.dtype == torch.float32
    assert torch.isneginf(logp[..., blocked]).all() and torch.isfinite(logp[..., ~blocked]).all()
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 3))


def test_normaliser():
    maskable = torch.ones(2, 8, dtype=torch.bool)
    maskable[:, 0] = False
    masked = torch.zeros(2, 8, dtype=torch.bool)
    masked[0, 1:4] = True
    assert normaliser("token", maskable, masked) == 14
    assert normaliser("masked", maskable, masked) == 3
    assert normaliser("sequence", maskable, masked) == 2
    with pytest.raises(ValueError):
        normaliser("batch", maskable, masked)


def test_sedd_view():
    t, eps = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), 1e-3
    sb = loglinear_sigma_bar(t, eps)
    torch.testing.assert_close(1 - torch.exp(-sb), (1 - eps) * t)
    torch.testing.assert_close(absorbing_score_scale(sb), torch.exp(-sb) / (1 - torch.exp(-sb)))


@torch.no_grad()
def test_loss_invariant_parent_next_token(tiny_model_dir):
    """Causal attention + shift + only the last token masked: the diffusion loss is exactly the parent's
    next-token cross-entropy of that token times 1/t (after adding the mask token and padding rows)."""
    from adapt.model.causal import add_mask_token, forward_logits, load_causal_lm, load_tokenizer

    mcfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="fp32", attn_implementation="sdpa")
    parent = load_causal_lm(mcfg)
    model, tok = load_causal_lm(mcfg), load_tokenizer(mcfg)
    meta = add_mask_token(model, tok, mcfg)
    rows = model.get_output_embeddings().weight.shape[0]
    assert rows > meta.real_vocab_size > parent.config.vocab_size  # a new token and padding rows
    blocked = blocked_vocab(rows, meta.real_vocab_size, meta.mask_token_id)

    x0 = torch.randint(3, parent.config.vocab_size, (3, 12), generator=gen())
    masked = torch.zeros_like(x0, dtype=torch.bool)
    masked[:, -1] = True
    xt = x0.masked_fill(masked, meta.mask_token_id)
    t = torch.tensor([0.2, 0.5, 0.9])
    logits = forward_logits(model, xt)  # still causal: nothing was switched
    want = F.cross_entropy(forward_logits(parent, x0)[:, -2], x0[:, -1], reduction="none") / t
    for b in range(3):
        got = diffusion_loss_sum(logits[b:b + 1], x0[b:b + 1], masked[b:b + 1], t[b:b + 1], True, blocked)
        torch.testing.assert_close(got, want[b], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diffusion_loss_sum(logits, x0, masked, t, True, blocked), want.sum(),
                               rtol=1e-5, atol=1e-5)
