"""The ELBO estimator (adapt.train.likelihood, as eval.likelihood calls it) and eval.likelihood on known answers."""
from __future__ import annotations

import math

import torch
from test_eval_fixtures import (AlignedForward, PeekingDenoiser, TableDenoiser, common_args, ctx,  # noqa: F401
                                exported_dir, objective_for)

from adapt.objectives.diffusion import maskable_positions
from adapt.train.likelihood import block_estimates, draw_masks, estimator_variance, replicate_estimates

V, L, MASK = 11, 12, 10


def _blocks(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, MASK, (n, L), generator=g)
    x[:, 0] = 0
    return x


def test_product_denoiser_bound_equals_true_nll():
    """With p(x0_i | x_t) independent of x_t the ELBO is the exact NLL; every method must agree."""
    g = torch.Generator().manual_seed(0)
    table = torch.log_softmax(torch.randn(L, V, generator=g).index_fill(1, torch.tensor([MASK]), -1e9), -1)
    objective, forward = objective_for(V, MASK), AlignedForward(TableDenoiser(table, MASK))
    x0 = _blocks(3)
    maskable = maskable_positions(x0, shift=True)
    exact = torch.stack([-table[torch.arange(1, L), x0[b, 1:]].sum() for b in range(3)]).double()
    for method in ("stratified", "uniform", "count"):
        est = replicate_estimates(objective, forward, x0, maskable, 64, method, 6, g)  # (3, 6)
        mean, se = est.mean(1), est.std(1) / math.sqrt(est.shape[1])
        assert torch.all((mean - exact).abs() < 4 * se + 1e-6), (method, mean, exact, se)


def test_count_estimator_is_exact_for_one_position():
    """One eligible position: the count estimator masks it every draw with weight 1, no noise."""
    table = torch.log_softmax(torch.randn(L, V), -1)
    x0 = _blocks(2)
    maskable = torch.zeros_like(x0, dtype=torch.bool)
    maskable[:, 5] = True
    forward = AlignedForward(TableDenoiser(table, MASK))
    est = block_estimates(objective_for(V, MASK), forward, x0, maskable, 4, "count",
                          torch.Generator().manual_seed(1))[:, 0]
    assert torch.allclose(est, -table[5, x0[:, 5]].double(), atol=1e-5)


def test_masks_follow_method():
    maskable = maskable_positions(_blocks(2), shift=True)
    masked, weight = draw_masks(maskable, 8, "count", 1e-3, torch.Generator().manual_seed(0))
    counts = masked.sum(1).double()
    assert not masked[:, 0].any() and torch.allclose(weight, (L - 1) / counts)
    assert sorted(counts[:8].long().tolist()) == sorted(set(counts[:8].long().tolist()))  # stratified: 8 distinct
    masked, weight = draw_masks(maskable, 4, "stratified", 1e-3, torch.Generator().manual_seed(0))
    t = 1 / weight[:4]
    assert sorted((t * 4).floor().long().tolist()) == [0, 1, 2, 3]  # one t per quarter of [0, 1]


def test_stratified_t_lowers_estimator_variance():
    x0 = _blocks(4, seed=3)
    objective, forward = objective_for(V, MASK), AlignedForward(PeekingDenoiser(x0, V, MASK))
    maskable = maskable_positions(x0, shift=True)
    tokens = maskable.sum(1)
    g = torch.Generator().manual_seed(0)
    strat = estimator_variance(replicate_estimates(objective, forward, x0, maskable, 8, "stratified", 40, g), tokens)
    iid = estimator_variance(replicate_estimates(objective, forward, x0, maskable, 8, "uniform", 40, g), tokens)
    assert strat < 0.7 * iid, (strat, iid)


def test_likelihood_script_parent_ppl_matches_hf_loss(ctx, tmp_path):  # noqa: F811
    """The parent's exact perplexity equals exp(HF's mean cross-entropy) on the same blocks."""
    from eval import likelihood
    from eval.heldout import heldout_sequences

    args = common_args(ctx.model_dir, tmp_path, blocks=3, length=32, t_samples=2, replicates=2,
                       methods=["stratified", "uniform"], batch_size=8)
    result = likelihood.run(ctx, args)
    blocks = heldout_sequences(ctx.data, ctx.tokenizer, 32, 3)
    with torch.no_grad():
        loss = ctx.parent()(input_ids=blocks, labels=blocks).loss
    assert math.isclose(result["parent"]["ppl"], math.exp(float(loss)), rel_tol=1e-4)
    assert result["elbo"]["tokens"] == 3 * 31 and result["elbo"]["method"] == "stratified"
    assert set(result["variance"]["per_token_nats2"]) == {"stratified", "uniform"}
    assert result["elbo"]["ppl_low"] <= result["elbo"]["ppl"] <= result["elbo"]["ppl_high"]
