"""Sampler math: SEDD transition probabilities against the paper's matrix form, schedules, filters."""
from __future__ import annotations

import math

import pytest
import torch

from adapt.decode.ancestral import reveal_prob
from adapt.decode.blocks import block_spans, split_steps, stop_after_eos
from adapt.decode.categorical import TokenFilter, confidence, draw
from adapt.decode.loop import top_ranked, transfer_counts
from adapt.decode.sedd import Noise, analytic_reveal_prob, euler_reveal_prob

NOISES = [Noise("loglinear", eps=1e-3), Noise("geometric", sigma_min=1e-4, sigma_max=20.0)]


def absorbing_q(n: int) -> torch.Tensor:
    """(n+1, n+1) SEDD Q^absorb, column x = rates out of state x (last state = MASK)."""
    q = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    q[torch.arange(n), torch.arange(n)] = -1.0
    q[n, :n] = 1.0
    return q


def eq19(p_theta: torch.Tensor, sb_t: float, sb_s: float) -> torch.Tensor:
    """SEDD eq. 19 at a masked position with a dense matrix exponential -> (n+1,) probabilities."""
    n = p_theta.shape[0]
    q, d = absorbing_q(n), sb_t - sb_s
    score = torch.cat([p_theta / math.expm1(sb_t), torch.ones(1, dtype=torch.float64)])  # s_y, and 1 for MASK itself
    return (torch.linalg.matrix_exp(-d * q) @ score) * torch.linalg.matrix_exp(d * q)[n, :]


@pytest.mark.parametrize("noise", NOISES, ids=lambda n: n.kind)
@pytest.mark.parametrize("t,s", [(1.0, 0.9), (0.5, 0.25), (0.1, 0.05), (0.9, 0.899)])
def test_analytic_matches_eq19_matrix_form(noise, t, s):
    p_theta = torch.softmax(torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), 0)
    tt, ss = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    dense = eq19(p_theta, float(noise.sigma_bar(tt)), float(noise.sigma_bar(ss)))
    reveal = analytic_reveal_prob(noise, tt, ss)
    torch.testing.assert_close(dense[:-1], p_theta * reveal, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dense[-1], 1 - reveal, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("t,s", [(1.0, 0.75), (0.5, 0.1), (0.02, 0.01)])
def test_loglinear_samplers_reduce_to_mdlm(t, s):
    noise = Noise("loglinear", eps=1e-3)
    tt, ss = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    assert float(analytic_reveal_prob(noise, tt, ss)) == pytest.approx(reveal_prob(t, s), rel=1e-9)
    assert float(euler_reveal_prob(noise, tt, ss)) == pytest.approx(reveal_prob(t, s), rel=1e-9)


@pytest.mark.parametrize("noise", NOISES, ids=lambda n: n.kind)
def test_rate_is_derivative_and_euler_converges_to_analytic(noise):
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-6
    finite = (noise.sigma_bar(t + h) - noise.sigma_bar(t - h)) / (2 * h)
    torch.testing.assert_close(noise.rate(t), finite, rtol=1e-6, atol=0)
    gaps = [(euler_reveal_prob(noise, t, t - dt) - analytic_reveal_prob(noise, t, t - dt)).abs().max()
            for dt in (1e-3, 1e-4)]
    assert gaps[1] < 1e-5  # first-order scheme: local error O(dt^2); exactly 0 for log-linear
    assert gaps[0] < 1e-12 or gaps[0] / gaps[1] > 50


def test_geometric_euler_clamps_to_one():
    noise = Noise("geometric")
    big = euler_reveal_prob(noise, torch.tensor(0.02, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    assert 0 <= float(big) <= 1


def test_transfer_counts_follow_llada_schedule():
    counts = transfer_counts(torch.tensor([10, 3, 0]), 4)
    assert counts.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0]]


def test_top_ranked_picks_highest_allowed():
    score = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.1, 0.0]])
    allowed = torch.tensor([[True, False, True, True], [True, True, True, True]])
    got = top_ranked(score, allowed, torch.tensor([2, 0]))
    assert got.tolist() == [[False, False, True, True], [False, False, False, False]]


def test_top_k_and_top_p_filters():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept_k = TokenFilter(top_k=2).apply(logp).exp()
    torch.testing.assert_close(kept_k, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    kept_p = TokenFilter(top_p=0.8).apply(logp).exp()  # 0.5 + 0.3 reaches 0.8: keep two
    torch.testing.assert_close(kept_p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    kept_p = TokenFilter(top_p=0.81).apply(logp).exp()
    assert (kept_p > 0).sum() == 3
    tempered = TokenFilter(temperature=0.5).apply(logp).exp()
    torch.testing.assert_close(tempered, torch.softmax(2 * logp, -1))


def test_filter_rejects_bad_values():
    with pytest.raises(ValueError, match="temperature.*top_k.*top_p"):
        TokenFilter(temperature=-1, top_k=-1, top_p=0)


def test_draw_never_picks_zero_probability_and_greedy_is_argmax():
    logp = torch.log(torch.tensor([[0.0, 0.7, 0.3, 0.0]])).expand(5000, -1)
    ids = draw(logp, torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {1, 2}
    assert abs((ids == 1).float().mean().item() - 0.7) < 0.03
    assert draw(logp, None, TokenFilter(temperature=0)).unique().tolist() == [1]


def test_confidence_kinds():
    logp = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.4, 0.2]]))
    torch.testing.assert_close(confidence(logp, "prob"), torch.tensor([0.6, 0.4]))
    torch.testing.assert_close(confidence(logp, "margin"), torch.tensor([0.3, 0.0]))
    ent = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(confidence(logp, "entropy"), -ent)
    with pytest.raises(ValueError, match="unknown confidence"):
        confidence(logp, "loss")


def test_block_spans_and_step_split():
    fill = torch.zeros(2, 12, dtype=torch.bool)
    fill[0, 3:9] = True
    fill[1, 10] = True
    assert block_spans(fill, 4) == [(3, 7), (7, 11)]
    assert split_steps(7, 3) == [3, 2, 2]
    with pytest.raises(ValueError, match="cannot cover"):
        split_steps(2, 3)


def test_stop_after_eos_only_touches_generated_positions():
    x = torch.tensor([[1, 5, 2, 6, 7, 8], [1, 5, 6, 7, 8, 9]])
    generated = torch.tensor([[False, True, True, True, True, False]] * 2)
    out = stop_after_eos(x, generated, [2])
    assert out.tolist() == [[1, 5, 2, 2, 2, 8], [1, 5, 6, 7, 8, 9]]
