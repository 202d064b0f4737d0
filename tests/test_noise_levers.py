"""Training-noise variance levers: clipped t (`diffusion.t_min`/`t_max`, BD3-LM), one t per block
(`diffusion.t_per_block`) and complementary masks (`diffusion.complementary_masks`, Fast-dLLM v2). The defaults
draw exactly what they drew before; per-block t and complementary pairs keep the loss an unbiased negative ELBO."""
from __future__ import annotations

import math

import pytest
import torch

from adapt import objectives
from adapt.recipe.config import ConfigError
from adapt.objectives.diffusion import blocked_vocab, corrupt, diffusion_loss_sum, sample_t
from adapt.model.causal import DiffusionMeta
from adapt.recipe.load import load_config

V, L, B = 24, 12, 4
MASK = V - 1
BLOCKED = blocked_vocab(V, MASK, MASK)


def block(**kw):
    return objectives.BlockDiffusion(MASK, False, BLOCKED, block_length=B, **kw)


def test_the_defaults_draw_what_they_drew_before():
    x0 = torch.randint(0, MASK, (6, L), generator=torch.Generator().manual_seed(1))
    ok = torch.ones_like(x0, dtype=torch.bool)
    for obj in (objectives.MaskedDiffusion(MASK, True, BLOCKED), block()):
        gen, ref = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
        got = obj.corrupt(x0, ok, gen)
        t = sample_t(6, 1e-3, "stratified", ref)
        want = corrupt(x0, t, MASK, ok, ref)
        assert torch.equal(got.t, t) and torch.equal(got.xt, want[0]) and torch.equal(got.masked, want[1])
        assert torch.equal(obj.batch_rows(torch.arange(6)), torch.arange(6))


def test_clipped_t_stays_in_its_range():
    obj = block(t_range=(0.45, 0.95))
    t = obj.corrupt(torch.zeros(64, L, dtype=torch.long), torch.ones(64, L, dtype=torch.bool),
                    torch.Generator().manual_seed(0)).t
    assert float(t.min()) >= 0.45 and float(t.max()) <= 0.95 and float(t.max() - t.min()) > 0.4
    with pytest.raises(ConfigError, match="empty"):
        load_config(None, ["diffusion.t_min=0.8", "diffusion.t_max=0.5"])
    with pytest.raises(ConfigError, match="t_max"):
        load_config(None, ["diffusion.t_max=1.5"])


def test_one_t_per_block_is_stratified_over_every_block_of_the_batch():
    rows = 5
    obj = block(t_per_block=True)
    t = obj.draw_t(rows, L, torch.Generator().manual_seed(3))
    assert t.shape == (rows, L)
    per_block = t.view(rows, L // B, B)
    assert torch.equal(per_block, per_block[..., :1].expand_as(per_block))  # constant inside a block
    n = rows * (L // B)
    strata = ((per_block[..., 0].flatten().double() - 1e-3) / (1 - 1e-3) * n).floor().long()
    assert torch.equal(strata.sort().values, torch.arange(n))  # one draw in each of n strata
    # the whole-sequence objective has one block: one t per row, as without the key
    whole = objectives.MaskedDiffusion(MASK, True, BLOCKED, t_per_block=True)
    assert whole.draw_t(rows, L, torch.Generator()).shape == (rows,)


def test_complementary_pairs_split_every_maskable_token():
    x0 = torch.randint(0, MASK, (8, L), generator=torch.Generator().manual_seed(4))
    obj = block(complementary=True)
    idx = obj.batch_rows(torch.arange(10, 18))
    assert idx.tolist() == [10, 10, 11, 11, 12, 12, 13, 13]
    x0 = x0[idx - 10]
    ok = torch.ones_like(x0, dtype=torch.bool)
    ok[:, 0] = False
    noised = obj.corrupt(x0, ok, torch.Generator().manual_seed(5))
    first, second = noised.masked[0::2], noised.masked[1::2]
    assert not (first & second).any() and torch.equal(first | second, ok[0::2])
    torch.testing.assert_close(noised.t[1::2], (1 - noised.t[0::2]).clamp_min(1e-3))
    assert torch.equal(noised.xt, x0.masked_fill(noised.masked, MASK))


@pytest.mark.parametrize("lever", ["per_block", "complementary"])
def test_the_levers_keep_the_loss_an_unbiased_bound(lever):
    """For logits that ignore the context the negative ELBO is exactly the sum of the tokens' NLLs: the mean of the
    training loss sum over many draws must land on it with per-block times and with complementary pairs (whose
    second copy is weighted 1 / (1 - t)). How much each lowers the variance is measured by bench/loss_variance.py."""
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(1, L, V, generator=gen) * 2
    x0 = torch.randint(0, MASK, (1, L), generator=gen)
    nll = -torch.log_softmax(logits.masked_fill(BLOCKED, -math.inf), -1)[0].gather(-1, x0[0, :, None]).sum()
    n = 20000
    xs, ok = x0.expand(n, -1), torch.ones(n, L, dtype=torch.bool)
    obj = block(t_per_block=True, eps=1e-4) if lever == "per_block" else block(complementary=True, eps=1e-4)
    noised = obj.corrupt(xs, ok, gen)
    w = 1 / noised.t.double()
    w = (w[:, None] if w.dim() == 1 else w) * noised.masked
    draws = (w * -torch.log_softmax(logits.masked_fill(BLOCKED, -math.inf), -1)[0].gather(
        -1, x0[0, :, None]).squeeze(-1).double()[None]).sum(1)
    some = slice(0, 64)  # the same numbers through the training loss
    summed = diffusion_loss_sum(logits.expand(64, -1, -1), xs[some], noised.masked[some], noised.t[some], False,
                                BLOCKED)
    torch.testing.assert_close(summed.double(), draws[some].sum(), rtol=1e-5, atol=1e-4)
    if lever == "complementary":
        draws = draws.view(-1, 2).mean(1)  # one estimate per pair
    se = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - nll) < 4 * se


def test_the_recipe_keys_reach_the_objective_and_are_checked():
    cfg = load_config(None, ["diffusion.block.length=4", "attention.anneal_steps=0", "diffusion.t_min=0.3",
                             "diffusion.t_max=0.8", "diffusion.t_per_block=true", "diffusion.complementary_masks=true"])
    made = objectives.from_config(cfg, DiffusionMeta(mask_token_id=MASK, real_vocab_size=MASK), BLOCKED)
    assert (made.t_range, made.t_per_block, made.complementary) == ((0.3, 0.8), True, True)
    with pytest.raises(ConfigError, match="even"):
        load_config(None, ["diffusion.complementary_masks=true", "train.micro_batch_size=3", "train.grad_accum=1"])
    with pytest.raises(ConfigError, match="position_masking=0"):
        load_config(None, ["diffusion.complementary_masks=true", "diffusion.position_masking=0.5"])


@pytest.mark.parametrize("per_block", [False, True])
def test_a_share_of_fully_masked_draws(per_block):
    """diffusion.full_mask_share: that share of the draws (rows, or blocks with t_per_block) is at t = 1, so every
    maskable token of it is masked; the other draws are those of the objective without the option."""
    x0 = torch.randint(0, MASK, (512, L), generator=torch.Generator().manual_seed(3))
    ok = torch.ones_like(x0, dtype=torch.bool)
    got = block(t_per_block=per_block, full_mask_share=0.25).corrupt(x0, ok, torch.Generator().manual_seed(4))
    plain = block(t_per_block=per_block).corrupt(x0, ok, torch.Generator().manual_seed(4))
    units = got.t.view(512, -1)[:, ::B] if per_block else got.t.view(512, 1)  # one t per row or per block
    full = units == 1
    assert abs(full.float().mean().item() - 0.25) < 0.05 and 0 < full.sum() < full.numel()
    rows_full = (got.t == 1).view(512, L) if per_block else (got.t == 1)[:, None].expand(512, L)
    assert got.masked[rows_full].all()  # fully masked where t = 1
    other = (plain.t != 1).view(512, -1) if per_block else (plain.t != 1)[:, None]
    assert torch.equal(got.t.view(512, -1)[~full.repeat_interleave(B if per_block else 1, 1) & other],
                       plain.t.view(512, -1)[~full.repeat_interleave(B if per_block else 1, 1) & other])
    cfg = load_config(None, ["diffusion.full_mask_share=0.5"])
    made = objectives.from_config(cfg, DiffusionMeta(mask_token_id=MASK, real_vocab_size=MASK), BLOCKED)
    assert made.full_mask_share == 0.5
    with pytest.raises(ConfigError, match="full_mask_share"):
        load_config(None, ["diffusion.full_mask_share=1.5"])
