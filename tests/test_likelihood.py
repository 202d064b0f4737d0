"""The Monte Carlo likelihood bound: unbiased where the answer is known, lower variance with stratified t,
and the parent's exact NLL."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from adapt.objectives.diffusion import blocked_vocab, corrupt, diffusion_loss_sum, maskable_positions, sample_t
from adapt.train.likelihood import BoundEstimate, block_estimates, causal_nll, summarize
from adapt.model.causal import forward_logits, set_causal
from adapt.objectives import MaskedDiffusion

V, MASK, L = 21, 20, 12


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def block_bounds(fn, x0, n_t, eps, mask_id, shift, blocked, generator, t_sampling="stratified", batch_size=8):
    """(N,) each block's bound through the library's one estimator (the masked-diffusion objective)."""
    obj = MaskedDiffusion(mask_id, shift, blocked, eps)
    return block_estimates(obj, lambda x, mask=None: fn(x), x0, obj.maskable(x0), n_t, t_sampling, generator,
                           batch_size)[:, 0]


def causal(fn):
    return lambda x, mask=None: fn(x)


def context_free(table: torch.Tensor):
    """A 'model' whose logits at position i are table[i] whatever the input: then masking one token
    cannot change another's prediction, and the ELBO equals the exact NLL in expectation."""
    return lambda x: table[None].expand(len(x), -1, -1).clone()


def exact_nll(table: torch.Tensor, x0: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(table.masked_fill(blocked, -math.inf), -1)  # row i-1 predicts token i
    return -logp[:-1].gather(-1, x0[:, 1:].T).T.sum(1).double()


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny ops: with 2 intra-op threads on a busy 2-core machine each op waits ~5 ms for
    the other thread (measured: 900 log_softmax calls on (5, 21) take 5.6 s with 2 threads, 2 ms with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_elbo_equals_exact_nll_for_a_context_free_model():
    table = torch.randn(L, V, generator=gen(1)) * 2
    x0 = torch.randint(0, MASK, (3, L), generator=gen(2))
    blocked = blocked_vocab(V, V, MASK)
    want = exact_nll(table, x0, blocked)
    reps = 120  # independent estimates of each block's bound, to measure their spread
    got = block_bounds(context_free(table), x0.repeat_interleave(reps, 0), n_t=40, eps=1e-3, mask_id=MASK,
                       shift=True, blocked=blocked, generator=gen(3), batch_size=320)
    assert got.shape == (3 * reps,) and got.dtype == torch.float64
    got = got.view(3, reps)
    mean, stderr = got.mean(1), got.std(1) / math.sqrt(reps)
    assert (stderr < 0.03 * want).all()  # precise enough to see a wrong weight or a misaligned shift
    assert ((mean - want).abs() < 4 * stderr).all(), (mean, want, stderr)
    # and causal_nll of the same 'model' is the exact NLL itself
    torch.testing.assert_close(causal_nll(causal(context_free(table)), x0, blocked), want, rtol=1e-5, atol=1e-5)


def test_elbo_is_per_block():
    """Two blocks with very different NLL keep their own estimates (rows are not mixed up)."""
    table = torch.zeros(L, V)
    table[:, 5] = 8.0  # token 5 is almost certain everywhere
    x0 = torch.stack([torch.full((L,), 5), torch.arange(L) % 4])
    blocked = blocked_vocab(V, V, MASK)
    got = block_bounds(context_free(table), x0, 64, 1e-3, MASK, True, blocked, gen(0))
    want = exact_nll(table, x0, blocked)
    assert got[0] < 0.2 and got[1] > 50
    torch.testing.assert_close(got, want, rtol=0.1, atol=0.05)


def progressions(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, 32) arithmetic progressions mod 20: every token follows from its neighbours."""
    a, b = torch.randint(0, 20, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    return (a + b * torch.arange(32)) % 20


@pytest.fixture(scope="module")
def context_model():
    """A tiny Llama trained for a few steps with the diffusion loss, so that its predictions depend on
    context (a random-weight model is nearly context-free, and for a context-free model stratifying t
    cannot lower the variance: E[estimate | t] is then constant in t)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_llama(V, layers=1, seed=3).train()
    set_causal(model, False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g, blocked, losses = gen(0), blocked_vocab(V, V, MASK), []
    for _ in range(40):
        x0 = progressions(16, g)
        t = sample_t(16, 1e-3, "stratified", g)
        maskable = maskable_positions(x0, True)
        xt, masked = corrupt(x0, t, MASK, maskable, g)
        loss = diffusion_loss_sum(forward_logits(model, xt), x0, masked, t, True, blocked) / maskable.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.set_num_threads(before)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])  # it learned something
    return model.eval()


@torch.no_grad()
def test_stratified_t_has_lower_variance(context_model):
    x0 = progressions(1, gen(9))
    blocked = blocked_vocab(V, V, MASK)
    fn = lambda x: forward_logits(context_model, x)  # noqa: E731

    def runs(method: str) -> torch.Tensor:
        return torch.tensor([block_bounds(fn, x0, 8, 1e-3, MASK, True, blocked, gen(100 + r), t_sampling=method,
                                          batch_size=8).item() for r in range(40)])

    strat, iid = runs("stratified"), runs("uniform")
    assert abs(strat.mean() - iid.mean()) < 3 * (strat.var() / 40 + iid.var() / 40).sqrt()  # same target
    assert strat.var() < 0.6 * iid.var(), (strat.var(), iid.var())  # measured ratio: about 0.27


@torch.no_grad()
def test_causal_nll_matches_cross_entropy():
    model = tiny_llama(V, layers=2, seed=5)
    x0 = torch.randint(0, MASK, (5, L), generator=gen(6))
    logits = forward_logits(model, x0)
    no_block = torch.zeros(V, dtype=torch.bool)
    want = F.cross_entropy(logits[:, :-1].transpose(1, 2), x0[:, 1:], reduction="none").sum(1).double()
    got = causal_nll(causal(lambda x: forward_logits(model, x)), x0, no_block, batch_size=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # with the mask token blocked, the softmax runs over the real vocabulary only
    blocked = blocked_vocab(V, V, MASK)
    want = F.cross_entropy(logits[:, :-1, :MASK].transpose(1, 2), x0[:, 1:], reduction="none").sum(1).double()
    torch.testing.assert_close(causal_nll(causal(lambda x: forward_logits(model, x)), x0, blocked), want,
                               rtol=1e-5, atol=1e-5)


def test_summarize():
    per_block = torch.tensor([10.0, 12.0, 14.0], dtype=torch.float64)
    est = summarize(per_block, 10)
    assert isinstance(est, BoundEstimate) and est.blocks == 3 and est.tokens == 30
    assert est.nll_per_token == pytest.approx(1.2)
    assert est.ci95 == pytest.approx(1.96 * 0.2 / math.sqrt(3))
    d = est.as_dict("x_")
    assert d["x_ppl"] == pytest.approx(math.exp(1.2)) and d["x_ppl_low"] < d["x_ppl"] < d["x_ppl_high"]
    assert math.isnan(summarize(per_block[:1], 10).ci95)


def test_summarize_weights_blocks_by_tokens():
    """Sequences with different token counts (SFT responses): the point is summed nats over summed tokens and the
    interval is the ratio estimator's around that same point (not the spread of unweighted per-block ratios)."""
    nats = torch.tensor([10.0, 40.0, 18.0, 30.0], dtype=torch.float64)
    tokens = torch.tensor([5, 10, 6, 12])
    est = summarize(nats, tokens)
    mean = 98.0 / 33.0
    assert est.nll_per_token == pytest.approx(mean) and est.tokens == 33 and est.blocks == 4
    resid = ((nats - mean * tokens.double()) ** 2).sum().item()
    assert est.ci95 == pytest.approx(1.96 * math.sqrt(resid / (4 * 3)) / (33.0 / 4))
    unweighted = (nats / tokens).std().item() / 2 * 1.96
    assert abs(est.ci95 - unweighted) > 0.02  # the two constructions differ on these blocks


def test_bound_positions_match_the_parent_with_or_without_the_shift():
    """The held-out bound covers the parent's positions 1..L-1 whatever the shift (position 0, the given BOS,
    is maskable without the shift but never scored against the parent)."""
    x0 = torch.randint(0, MASK, (2, L), generator=gen(0))
    blocked = blocked_vocab(V, V, MASK)
    for shift in (True, False):
        obj = MaskedDiffusion(MASK, shift, blocked)
        assert obj.maskable(x0)[:, 0].tolist() == [not shift] * 2
        scored = obj.scored(x0)
        assert not scored[:, 0].any() and scored[:, 1:].all() and int(scored.sum()) == 2 * (L - 1)
