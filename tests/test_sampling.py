"""Samplers with mock denoisers whose true distribution is known.

FactorizedDenoiser: each position i an independent categorical p_i, whatever the context, so
every sampler (temperature 1) must reproduce p_i at each position (chi-square test).
ExactPairDenoiser: the exact conditionals of a correlated joint over two positions; revealing
one position per step then samples the joint exactly, and using a stale model output would not.
"""
from __future__ import annotations

import pytest
import torch

from adapt.decode import SAMPLERS, generate, sampler_options

MASK = 5  # ids 0..4 are real tokens, 5 is the mask
V = 6
BOS = 0


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of (..., K) counts against (..., K) probabilities, pooled over rows.

    Cells with probability 0 must have count 0 (else p = 0).
    """
    counts, probs = counts.double(), probs.double()
    if (counts[probs == 0] > 0).any():
        return 0.0
    expected = counts.sum(-1, keepdim=True) * probs
    keep = probs > 0
    stat = ((counts - expected)[keep] ** 2 / expected[keep]).sum()
    df = float(keep.sum() - keep.shape[:-1].numel())
    return float(torch.special.gammaincc(torch.tensor(df / 2), stat / 2))


class FactorizedDenoiser:
    """log p(x0_i = v | x_t) = log probs[i, v] for every context; counts calls."""

    def __init__(self, probs: torch.Tensor):
        self.logp = probs.log()
        self.mask_id, self.shift, self.nfe = MASK, True, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.logp.expand(x.shape[0], -1, -1).clone()


class ExactPairDenoiser:
    """x = [BOS, a, b]: the exact conditionals of the joint P(a, b)."""

    def __init__(self, joint: torch.Tensor):
        self.joint, self.mask_id, self.shift, self.nfe = joint, MASK, True, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        p = torch.zeros(x.shape[0], 3, V, dtype=torch.float64)
        p[:, 0, BOS] = 1
        a, b = x[:, 1], x[:, 2]
        p[:, 1, :5] = torch.where((b == MASK)[:, None], self.joint.sum(1), self.joint[:, b.clamp_max(4)].T)
        p[:, 2, :5] = torch.where((a == MASK)[:, None], self.joint.sum(0), self.joint[a.clamp_max(4)])
        p /= p.sum(-1, keepdim=True)
        return p.log().float()


def position_probs(length: int, seed: int = 0) -> torch.Tensor:
    """(length, V) distinct categoricals; the mask id and one real id (3) have probability 0."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(1.5 * torch.randn(length, V, generator=g), -1)
    p[:, MASK] = 0
    p[1:, 3] = 0
    p[0] = 0
    p[0, BOS] = 1
    return p / p.sum(-1, keepdim=True)


def canvas(batch: int, length: int) -> torch.Tensor:
    x = torch.full((batch, length), MASK)
    x[:, 0] = BOS
    return x


CONFIGS = [
    ("ancestral", {}, None),
    ("euler", {"noise": "loglinear"}, None),
    ("euler", {"noise": "geometric"}, None),
    ("analytic", {"noise": "loglinear"}, None),
    ("analytic", {"noise": "geometric"}, None),
    ("confidence", {"confidence": "prob"}, None),
    ("confidence", {"confidence": "margin"}, None),
    ("confidence", {"confidence": "entropy"}, None),
    ("threshold", {"tau": 0.5}, None),
    ("ancestral", {}, 2),
    ("analytic", {"noise": "geometric"}, 3),
    ("confidence", {"confidence": "margin"}, 2),
    ("threshold", {"tau": 0.3}, 2),
]


def counts_of(ids: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.bincount(ids[:, i], minlength=V) for i in range(1, ids.shape[1])])


@pytest.mark.parametrize("name,options,block", CONFIGS, ids=lambda v: str(v))
def test_marginals_match_the_factorized_distribution(name, options, block):
    probs = position_probs(6)
    out = generate(FactorizedDenoiser(probs), canvas(3000, 6), name, steps=4,
                   generator=torch.Generator().manual_seed(1), block_length=block, **options).ids
    assert chi2_pvalue(counts_of(out), probs[1:]) > 1e-3


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_chi_square_detects_a_biased_sampler(name):
    """The test above has power: temperature 0.7 sharpens p_i and must be rejected."""
    probs = position_probs(6)
    out = generate(FactorizedDenoiser(probs), canvas(3000, 6), name, steps=4,
                   generator=torch.Generator().manual_seed(1), temperature=0.7).ids
    assert chi2_pvalue(counts_of(out), probs[1:]) < 1e-6


@pytest.mark.parametrize("name,options", [("confidence", {}), ("threshold", {"tau": 2.0}),
                                          ("ancestral", {}), ("analytic", {"noise": "geometric"})])
def test_one_reveal_per_step_samples_the_exact_joint(name, options):
    joint = torch.tensor([[0.30, 0.02, 0.0, 0.0, 0.01], [0.02, 0.25, 0.0, 0.0, 0.02],
                          [0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.13, 0.02, 0.0, 0.0, 0.23]],
                         dtype=torch.float64)
    # confidence / threshold reveal one position per step at steps=2; ancestral / analytic reveal
    # both positions in the same step with probability about 1/steps only.
    steps = 2 if name in ("confidence", "threshold") else 300
    out = generate(ExactPairDenoiser(joint), canvas(2000, 3), name, steps=steps,
                   generator=torch.Generator().manual_seed(2), **options).ids
    pairs = torch.bincount(out[:, 1] * 5 + out[:, 2], minlength=25)
    assert chi2_pvalue(pairs[None], joint.flatten()[None]) > 1e-3
    independent = torch.outer(joint.sum(1), joint.sum(0)).flatten()
    assert chi2_pvalue(pairs[None], independent[None]) < 1e-6


def infill_problem(batch: int, length: int, seed: int) -> torch.Tensor:
    """Random given tokens at random positions (position 0 always BOS), the rest masked."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 5, (batch, length), generator=g)
    x[torch.rand(batch, length, generator=g) < 0.6] = MASK
    x[:, 0] = BOS
    return x


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("block", [None, 3])
def test_given_tokens_never_change_and_masks_are_all_filled(name, block):
    x = infill_problem(64, 12, seed=3)
    out = generate(FactorizedDenoiser(position_probs(12)), x, name, steps=5,
                   generator=torch.Generator().manual_seed(0), block_length=block).ids
    given = x != MASK
    assert torch.equal(out[given], x[given])
    assert not (out == MASK).any()
    assert not (out[~given] == 3).any()  # probability-0 token never drawn


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_deterministic_under_a_seed(name):
    den = FactorizedDenoiser(position_probs(10))
    runs = [generate(den, canvas(16, 10), name, steps=4, generator=torch.Generator().manual_seed(s)).ids
            for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("steps,n,expected", [(4, 9, 4), (9, 9, 9), (20, 9, 9)])
def test_confidence_calls_the_model_as_the_schedule_says(steps, n, expected):
    den = FactorizedDenoiser(position_probs(n + 1))
    res = generate(den, canvas(2, n + 1), "confidence", steps=steps)
    assert res.nfe == den.nfe == expected
    block = generate(den, canvas(2, n + 1), "confidence", steps=6, block_length=3)
    assert block.nfe == 6  # three blocks of two steps


def test_threshold_calls():
    den = FactorizedDenoiser(position_probs(9))
    assert generate(den, canvas(2, 9), "threshold", tau=2.0).nfe == 8  # one position per call
    assert generate(den, canvas(2, 9), "threshold", tau=0.0).nfe == 1  # everything at once
    assert generate(den, canvas(2, 9), "threshold", steps=3, tau=2.0).nfe == 3  # the budget's floor


@pytest.mark.parametrize("name", ["ancestral", "euler", "analytic"])
def test_caching_skips_calls_when_nothing_changed(name):
    den = FactorizedDenoiser(position_probs(5))
    g = torch.Generator().manual_seed(4)
    cached = generate(den, canvas(1, 5), name, steps=64, generator=g, trajectory=True)
    distinct = cached.trajectory[cached.trajectory >= 0].unique()
    assert cached.nfe == len(distinct) < 64  # one call before each step that reveals something
    uncached = generate(den, canvas(1, 5), name, steps=64, generator=torch.Generator().manual_seed(4),
                        trajectory=True, cache=False)
    assert torch.equal(uncached.ids, cached.ids)
    assert uncached.nfe == int(uncached.trajectory.max()) + 1 > cached.nfe


def test_sedd_final_step_denoises_everything():
    den = FactorizedDenoiser(position_probs(30))
    res = generate(den, canvas(8, 30), "analytic", steps=2, noise="geometric", trajectory=True)
    assert res.nfe <= 2 and not (res.ids == MASK).any()


def test_eos_stop_truncates_and_ends_block_decoding_early():
    probs = position_probs(13)
    probs[1:] = 0
    probs[1:, 2] = 1.0  # every position: EOS (id 2) with certainty
    den = FactorizedDenoiser(probs)
    res = generate(den, canvas(2, 13), "confidence", steps=12, block_length=4, eos_id=2, trajectory=True)
    assert (res.ids[:, 1:] == 2).all()
    assert res.nfe == 4  # first block only (4 steps of 1); later blocks are filled without a call
    assert (res.trajectory[:, 5:] == -1).all()


def test_generate_rejects_bad_input():
    den = FactorizedDenoiser(position_probs(4))
    with pytest.raises(ValueError, match="takes no option tau"):
        generate(den, canvas(1, 4), "ancestral", tau=0.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        generate(den, canvas(1, 4), "beam")
    with pytest.raises(ValueError, match="prepend BOS"):
        generate(den, torch.full((1, 4), MASK), "ancestral")
    assert "tau" in sampler_options("threshold") and "noise" in sampler_options("analytic")
