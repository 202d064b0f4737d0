"""The recipe study's training keys: position-dependent masking (`diffusion.position_masking`) keeps the loss a
negative ELBO and masks later tokens more; `model.mask_init` sets the new mask row as asked."""
from __future__ import annotations

import math

import pytest
import torch
from test_model import _load

from adapt import objectives
from adapt.recipe.config import ConfigError
from adapt.objectives.diffusion import blocked_vocab, corrupt, diffusion_loss_sum, position_exponents, sample_t
from adapt.model.causal import DiffusionMeta, add_mask_token
from adapt.recipe.load import load_config

V, L = 24, 12
MASK = V - 1


def test_zero_strength_is_the_linear_schedule_bit_for_bit():
    x0 = torch.randint(0, MASK, (6, L), generator=torch.Generator().manual_seed(1))
    ok = torch.ones_like(x0, dtype=torch.bool)
    t = sample_t(6, 1e-3, "stratified", torch.Generator().manual_seed(2))
    ones = position_exponents(torch.arange(L), L, 0.0)
    assert torch.equal(ones, torch.ones(L))
    plain = corrupt(x0, t, MASK, ok, torch.Generator().manual_seed(3))
    flat = corrupt(x0, t, MASK, ok, torch.Generator().manual_seed(3), ones)
    assert all(torch.equal(a, b) for a, b in zip(plain, flat))


def test_later_tokens_are_masked_at_rate_t_to_the_a():
    strength, t, n = 1.0, 0.4, 20000
    a = position_exponents(torch.arange(L), L, strength)
    assert a[0] == pytest.approx(math.e) and a[-1] == pytest.approx(1 / math.e) and bool((a.diff() < 0).all())
    x0 = torch.zeros(n, L, dtype=torch.long)
    _, masked = corrupt(x0, torch.full((n,), t), MASK, torch.ones_like(x0, dtype=torch.bool),
                        torch.Generator().manual_seed(0), a)
    rate = masked.double().mean(0)
    want = torch.tensor(t, dtype=torch.float64) ** a.double()
    assert torch.allclose(rate, want, atol=4 * math.sqrt(0.25 / n))  # 4 standard errors at most
    assert rate[-1] > 2 * rate[0]


@pytest.mark.parametrize("strength", [0.0, 0.7])
def test_weighted_loss_is_the_exact_nll_of_a_context_free_model(strength):
    """For logits that ignore the context, the negative ELBO is exactly the sum of the tokens' NLLs, whatever
    each token's schedule t ** a_i: the Monte Carlo mean of the weighted loss must land on it. Weighting by 1/t
    alone (the linear schedule's weight) would land on sum_i nll_i / a_i instead."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, L, V, generator=gen) * 2
    x0 = torch.randint(0, MASK, (1, L), generator=gen)
    blocked = blocked_vocab(V, MASK, MASK)
    logp = torch.log_softmax(logits.masked_fill(blocked, -math.inf), -1)
    nll = -logp[0].gather(-1, x0[0, :, None]).squeeze(-1)
    a = position_exponents(torch.arange(L), L, strength)
    n = 40000
    t = sample_t(n, 1e-6, "stratified", gen)
    xs = x0.expand(n, -1)
    _, masked = corrupt(xs, t, MASK, torch.ones_like(xs, dtype=torch.bool), gen, a)
    w = (a[None] / t[:, None]) * masked
    draws = (w * nll[None]).sum(1).double()
    # the same numbers through the training loss (no shift: row i predicts token i)
    some = slice(0, 64)
    summed = diffusion_loss_sum(logits.expand(64, -1, -1), xs[some], masked[some], t[some], False, blocked, a)
    torch.testing.assert_close(summed.double(), draws[some].sum(), rtol=1e-5, atol=1e-4)
    se = draws.std() / math.sqrt(n)
    assert abs(draws.mean() - nll.sum()) < 4 * se
    if strength:
        assert abs(draws.mean() - (nll / a).sum()) > 8 * se  # the wrong weight is told apart


def test_objectives_mask_by_place_in_block():
    blocked = blocked_vocab(V, MASK, MASK)
    whole = objectives.MaskedDiffusion(MASK, True, blocked, position_masking=0.5)
    block = objectives.BlockDiffusion(MASK, True, blocked, position_masking=0.5, block_length=4)
    torch.testing.assert_close(whole.exponents(L), position_exponents(torch.arange(L), L, 0.5))
    per_block = block.exponents(L)
    torch.testing.assert_close(per_block, position_exponents(torch.arange(4), 4, 0.5).repeat(L // 4))
    assert objectives.MaskedDiffusion(MASK, True, blocked).exponents(L) is None
    cfg = load_config(None, ["diffusion.position_masking=0.5"])
    made = objectives.from_config(cfg, DiffusionMeta(mask_token_id=MASK, real_vocab_size=MASK), blocked)
    assert made.position_masking == 0.5


@pytest.mark.parametrize("how", ["normal", "eos"])
@torch.no_grad()
def test_mask_init(how, tiny_model_dir):
    model, tok, cfg = _load(tiny_model_dir, mask_init=how)
    old = model.get_input_embeddings().weight.clone()
    n = len(tok)
    meta = add_mask_token(model, tok, cfg)
    row = model.get_input_embeddings().weight[meta.mask_token_id]
    if how == "eos":
        assert torch.equal(row, old[tok.eos_token_id])
    else:
        z = (row - old.mean(0)) / old.std(0)
        assert not torch.allclose(row, old.mean(0)) and 0.5 < float(z.std()) < 1.5  # a typical random row
        again, tok2, _ = _load(tiny_model_dir, mask_init=how)
        add_mask_token(again, tok2, cfg)
        assert torch.equal(again.get_input_embeddings().weight[meta.mask_token_id], row)  # seeded
    assert torch.equal(model.get_input_embeddings().weight[:n], old[:n])


def test_mask_init_with_a_reused_token_is_refused():
    with pytest.raises(ConfigError, match="mask_init"):
        load_config(None, ["model.mask_init=normal", "model.mask_token_id=5"])
    with pytest.raises(ConfigError, match="position_masking"):
        load_config(None, ["diffusion.position_masking=-1"])


TRAINING_PARTS = ("model", "diffusion", "attention", "data", "lora", "optim", "dist")
"""The recipe sections that decide what a run trains (run names and sampling aside)."""

def test_the_default_recipe_is_the_study_finalist_it_was_measured_as():
    """recipes/llama_to_mdlm.yaml must train exactly as `lora1.35x+constlr+kdp1m+kdlin` of bench/recipe_study.py
    at the finalists' size did (docs/decisions.md), or the README's figures describe another recipe."""
    from bench import recipe_study

    study = load_config(recipe_study.ROOT / "recipes" / "llama_to_mdlm.yaml",
                        ["train.max_steps=40", "attention.anneal_steps=20", "optim.warmup_steps=4",
                         *recipe_study.overrides("lora1.35x+constlr+kdp1m+kdlin", "2e-4", 40)])
    default = load_config(recipe_study.ROOT / "recipes" / "llama_to_mdlm.yaml")
    for part in TRAINING_PARTS:
        assert getattr(study, part) == getattr(default, part), part
    assert (study.train.max_steps, study.train.micro_batch_size, study.train.seed) == (
        default.train.max_steps, default.train.micro_batch_size, default.train.seed)
    with pytest.raises(SystemExit, match="unknown variant 'nope'"):
        recipe_study.overrides("lora+nope", "", 30)


def test_the_block_recipe_is_the_default_job_with_blocks():
    """recipes/llama_to_bd.yaml trains the default job's data, tokens and optimiser with blocks of 4 and a causal
    clean stream, causal noised tokens and clipped training times (the study's
    `b4+cleancausal+noanneal+tclip+noisedcausal` variant), so its bound
    compares with the default's at equal training tokens; nothing else may differ."""
    from bench import recipe_study

    default = load_config(recipe_study.ROOT / "recipes" / "llama_to_mdlm.yaml",
                          [*recipe_study.NO_TEACHER,
                           *recipe_study.overrides("b4+cleancausal+noanneal+tclip+noisedcausal", "", 54)])
    block = load_config(recipe_study.ROOT / "recipes" / "llama_to_bd.yaml")
    for part in TRAINING_PARTS:
        assert getattr(block, part) == getattr(default, part), part
    assert block.train == default.train
    assert block.diffusion.block.length == 4 and block.diffusion.block.clean_attention == "causal"
    assert block.diffusion.block.noised_attention == "causal"
    assert (block.diffusion.t_min, block.diffusion.t_max) == (0.45, 0.95)
