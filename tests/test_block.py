"""Block diffusion: the [x_t | x_0] mask, b = L is today's objective, b = 1 is the parent, the curriculum,
the estimator's per-block counts and the recipe checks."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch.nn.attention.flex_attention import create_mask

from adapt.model.attention import block_causal, curriculum_block, curriculum_blocks
from adapt.objectives.diffusion import blocked_vocab, corrupt, maskable_positions, sample_t
from adapt.train.likelihood import block_estimates, causal_nll, draw_masks
from adapt.model.causal import set_causal
from adapt.objectives import Attention, BlockDiffusion, MaskedDiffusion, ModelForward, Noised
from adapt.objectives.block import block_mask_flex, block_visibility, source_rows
from adapt.recipe.load import load_config
from adapt.recipe.config import ConfigError

V, MASK, L = 40, 39, 16


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("causal,noised_causal", [(False, False), (True, False), (True, True)])
def test_block_visibility_is_the_definition(causal, noised_causal):
    b = 4
    vis = block_visibility(L, b, clean_causal=causal, noised_causal=noised_causal)
    for q in range(2 * L):
        for kv in range(2 * L):
            qb, kb = (q % L) // b, (kv % L) // b
            if q < L:  # noised: its own noised block (causal: up to itself), clean blocks before it
                want = (qb == kb and (kv <= q or not noised_causal)) if kv < L else kb < qb
            else:  # clean: clean blocks up to its own (causal: clean tokens up to itself), never a noised token
                want = False if kv < L else (kv <= q if causal else kb <= qb)
            assert bool(vis[q, kv]) == want, (q, kv)
    docs = torch.tensor([[0] * 6 + [1] * 10, [0] * 12 + [1] * 4])
    flex = create_mask(block_mask_flex(L, b, docs, "cpu", causal, noised_causal).mask_mod, 2, None, 2 * L, 2 * L,
                       device="cpu")[:, 0]
    doc2 = torch.cat([docs, docs], 1)
    assert torch.equal(flex, vis[None] & (doc2[:, :, None] == doc2[:, None, :]))


def test_source_rows_with_the_shift():
    rows = source_rows(8, 4, shift=True)
    # token 4 starts block 1: read from the clean stream at position 3 (row 8 + 3); others from the noised i-1
    assert rows.tolist() == [0, 0, 1, 2, 11, 4, 5, 6]
    assert source_rows(8, 4, shift=False).tolist() == list(range(8))


def model_and_objectives(shift: bool, block: int):
    model = tiny_llama(V, seed=1)
    set_causal(model, False)
    blocked = blocked_vocab(V, V, MASK)
    return model, MaskedDiffusion(MASK, shift, blocked), BlockDiffusion(MASK, shift, blocked, block_length=block)


@pytest.mark.parametrize("shift", [True, False])
@torch.no_grad()
def test_whole_block_in_the_2l_layout_is_todays_loss(shift):
    model, mdlm, block = model_and_objectives(shift, L)
    x0 = torch.randint(0, MASK, (3, L), generator=gen(2))
    maskable = maskable_positions(x0, shift)
    t = sample_t(3, 1e-3, "stratified", gen(3))
    xt, masked = corrupt(x0, t, MASK, maskable, gen(4))
    noised = Noised(xt, masked, t)
    fwd = ModelForward(model, "cpu")
    want = mdlm.loss_sum(mdlm.predict(fwd, x0, noised, Attention()), x0, noised)
    got = block.loss_sum(block.predict(fwd, x0, noised, Attention()), x0, noised)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    half = BlockDiffusion(MASK, shift, block.blocked, block_length=L // 2)
    assert abs(half.loss_sum(half.predict(fwd, x0, noised, Attention()), x0, noised) - want) > 1e-3  # can fail


@torch.no_grad()
def test_one_token_blocks_are_the_parent_exactly():
    """b = 1 with the shift: the masked-count bound of the unconverted parent is its exact causal NLL, draw by draw."""
    model = tiny_llama(V, seed=5)
    x0 = torch.randint(0, MASK, (3, L), generator=gen(6))
    blocked = blocked_vocab(V, V, MASK)
    exact = causal_nll(lambda x, m=None: model(input_ids=x, use_cache=False).logits, x0, blocked)
    set_causal(model, False)  # the masks decide
    obj = BlockDiffusion(MASK, True, blocked, block_length=1)
    got = block_estimates(obj, ModelForward(model, "cpu"), x0, obj.scored(x0), 2, "count", gen(7))[:, 0]
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-4)
    whole = MaskedDiffusion(MASK, True, blocked)
    other = block_estimates(whole, ModelForward(model, "cpu"), x0, whole.scored(x0), 2, "count", gen(7))[:, 0]
    assert (other - exact).abs().max() > 1e-2  # the whole-sequence bound of the same model is not the parent's


@torch.no_grad()
def test_a_causal_noised_block_reads_a_frontier_token_as_the_parent_does():
    """Both streams causal (I-DLM's masks): a masked token whose earlier block tokens are all visible is predicted
    from exactly the parent's causal forward, at any block length; with a bidirectional noised block it is not."""
    model = tiny_llama(V, seed=5)
    x0 = torch.randint(2, MASK, (2, L), generator=gen(8))
    parent = model(input_ids=x0, use_cache=False).logits
    set_causal(model, False)  # the masks decide
    blocked = blocked_vocab(V, V, MASK)
    xt = x0.clone()
    xt[:, 3::4] = MASK  # the last token of every block of 4: a frontier position
    for noised_causal in (True, False):
        obj = BlockDiffusion(MASK, True, blocked, block_length=4, clean_causal=True, noised_causal=noised_causal)
        got = obj.logits(ModelForward(model, "cpu"), xt, Attention(), x0)[:, 3::4]
        close = torch.allclose(got, parent[:, 2::4], atol=1e-5)
        assert close == noised_causal  # the bidirectional row 2 of a block sees the mask at 3


def test_group_counts_mask_every_block_and_weigh_it():
    maskable = torch.ones(2, L, dtype=torch.bool)
    maskable[:, 0] = False
    masked, weight = draw_masks(maskable, 4, "count", 1e-3, gen(0), group=4)
    assert masked.shape == weight.shape == (8, L)
    per_block = masked.view(8, 4, 4).sum(-1)
    assert (per_block >= 1).all() and not masked[:, 0].any()
    size = maskable.repeat_interleave(4, 0).view(8, 4, 4).sum(-1).double()
    torch.testing.assert_close(weight.view(8, 4, 4)[..., 0], size / per_block)
    # the k draws of one block are stratified: its 4 rows cover the four strata of the count 1..4
    counts = per_block[:4, 1].sort().values.tolist()
    assert counts == [1, 2, 3, 4]
    # a sequence that is not a whole number of blocks (the harness's): the last, partial block draws too
    masked, weight = draw_masks(maskable[:, :14], 2, "count", 1e-3, gen(1), group=4)
    assert masked.shape == weight.shape == (4, 14) and masked[:, 12:].any(1).all()


def test_curriculum():
    assert curriculum_blocks(16, 256) == [1, 2, 4, 8, 16]
    assert curriculum_blocks(12, 48) == [1, 2, 4, 8, 12]  # not a power of 2: the powers below it, then it
    assert [curriculum_block(16, 256, r) for r in (0.0, 0.24, 0.25, 0.5, 0.99, 1.0)] == [1, 1, 2, 4, 8, 16]
    assert torch.equal(block_causal(4, 1), torch.ones(4, 4, dtype=torch.bool).tril())
    assert block_causal(4, 4).all()


def test_recipe_checks():
    with pytest.raises(ConfigError, match="does not divide"):
        load_config(None, ["diffusion.block.length=5", "attention.anneal_schedule=blocks"])
    with pytest.raises(ConfigError, match="anneal_schedule=blocks"):
        load_config(None, ["diffusion.block.length=8", "attention.anneal_schedule=random"])
    with pytest.raises(ConfigError, match="flash_attention_2"):
        load_config(None, ["diffusion.block.length=8", "attention.anneal_steps=0",
                           "model.attn_implementation=flash_attention_2"])
    with pytest.raises(ConfigError, match="diffusion.block.clean_attention"):
        load_config(None, ["diffusion.block.clean_attention=bidirectional"])
    with pytest.raises(ConfigError, match="diffusion.block.noised_attention"):
        load_config(None, ["diffusion.block.length=8", "attention.anneal_schedule=blocks",
                           "diffusion.block.noised_attention=block"])
    with pytest.raises(ConfigError, match="whole-sequence objective has none"):  # mdlm has no noised block
        load_config(None, ["diffusion.block.noised_attention=causal"])
    cfg = load_config(None, ["diffusion.block.length=8", "attention.anneal_schedule=blocks"])
    assert cfg.diffusion.block.length == 8


def test_the_noised_attention_is_recorded_checked_and_described():
    """An export records its noised block; continuing it with another one is refused; its card says which."""
    from dataclasses import asdict

    from adapt.model.causal import DiffusionMeta
    from adapt.objectives import spec_of

    base = ["diffusion.block.length=4", "attention.anneal_schedule=blocks", "diffusion.block.clean_attention=causal"]
    cfg = load_config(None, [*base, "diffusion.block.noised_attention=causal"])
    spec = spec_of(BlockDiffusion)
    meta = DiffusionMeta(mask_token_id=MASK, real_vocab_size=MASK, **spec.meta_fields(cfg))
    assert meta.noised_attention == "causal" and spec.export_problems(cfg, meta) == []
    assert DiffusionMeta.from_json(meta.to_json(), "test").noised_attention == "causal"
    other = load_config(None, base)
    assert "noised_attention=causal" in " ".join(spec.export_problems(other, meta))
    assert "causal inside a block" in spec.card(asdict(meta)).attention
    old = DiffusionMeta.from_json(meta.to_json().replace('"noised_attention": "causal",', ""), "test")
    assert old.noised_attention == "bidirectional"  # exports written before the option
    assert "bidirectional inside a block" in spec.card(asdict(old)).attention


def block_denoiser(b: int = 4, clean: str = "block", noised: str = "bidirectional"):
    from adapt.decode.denoiser import Denoiser
    from adapt.model.causal import DiffusionMeta

    model = tiny_llama(V, seed=9)
    set_causal(model, False)
    model.config.bos_token_id = 1
    return Denoiser(model, DiffusionMeta(mask_token_id=MASK, real_vocab_size=MASK, block_length=b,
                                         clean_attention=clean, noised_attention=noised))


@pytest.mark.parametrize("clean,noised", [("block", "bidirectional"), ("causal", "bidirectional"),
                                          ("causal", "causal")])
@torch.no_grad()
def test_block_decoder_cache_is_exact_and_keeps_given_tokens(clean, noised):
    """The cached rows of block k equal one uncached forward over [x0 blocks < k | block k] under the block mask
    (the objective's own layout, whose clean half is what the cache holds), whatever the export's streams."""
    from adapt.decode.block_cache import BlockCachedDenoiser

    den = block_denoiser(clean=clean, noised=noised)
    x = torch.randint(3, MASK, (2, 13), generator=gen(1))
    x[:, 0] = 1
    x[:, 9:] = MASK
    cached = BlockCachedDenoiser(den.model, den.meta)
    xp = torch.cat([x, torch.full((2, 3), MASK)], 1)  # whole blocks, as the decoder pads them
    cached.start(xp, 13)
    cached.commit(xp, 2)
    cached.block = 2
    got = cached(xp)[:, 8:12]
    full = xp[:, :12]  # clean blocks 0, 1 and the noised block 2 in the objective's 2L layout

    def log_probs(causal: bool, noised_causal: bool) -> torch.Tensor:
        obj = BlockDiffusion(MASK, True, den.blocked, block_length=4, clean_causal=causal, noised_causal=noised_causal)
        logits = obj.logits(ModelForward(den.model, "cpu"), full, Attention(), full.clone())
        return torch.log_softmax(logits.float().masked_fill(den.blocked, float("-inf")), -1)[:, 8:12]

    torch.testing.assert_close(got, log_probs(clean == "causal", noised == "causal"), rtol=1e-5, atol=1e-5)
    # the decoder follows the export's streams: another clean stream, or another noised block, differs
    assert not torch.allclose(got, log_probs(clean != "causal", noised == "causal"), atol=1e-4)
    assert not torch.allclose(got, log_probs(clean == "causal", noised != "causal"), atol=1e-4)


@torch.no_grad()
def test_block_decoding_is_batch_independent_and_refuses_another_block_length():
    from adapt.decode import generate

    den = block_denoiser()
    x = torch.full((3, 14), MASK)
    x[:, 0] = 1
    x[:, 1:6] = torch.randint(3, MASK, (3, 5), generator=gen(2))
    out = generate(den, x, "confidence", steps=8, temperature=0.0)
    assert not (out.ids == MASK).any() and torch.equal(out.ids[:, :6], x[:, :6])  # given tokens never change
    for r in range(3):
        alone = generate(den, x[r:r + 1], "confidence", steps=8, temperature=0.0)
        assert torch.equal(alone.ids[0], out.ids[r])
    # blocks 1-3 are filled (block 1 holds the prompt's tail) in 8 steps; the prefix and each finished block
    # enter the cache within the next block's first call, so no call is spent on commits
    assert out.nfe <= 8
    with pytest.raises(ValueError, match="force_block_length"):
        generate(den, x, "confidence", steps=8, block_length=2)
    forced = generate(den, x, "confidence", steps=8, block_length=2, force_block_length=True, temperature=0.0)
    assert not (forced.ids == MASK).any()


@pytest.mark.slow
def test_block_adapt_then_sft_through_the_entry_point(tmp_path, tiny_model_dir, corpus_file):
    """adapt with blocks of 8 (the blocks curriculum), export, then SFT of that export: the export records
    its block length, SFT keeps it (prompts end inside a block: those tokens are given, the response's are
    noised), and the end-of-run samples are decoded block by block."""
    import json

    from test_pipeline import launch

    from adapt.export import read_meta

    common = ("train.max_steps=2", "train.save_every=0", "train.eval_t_samples=2", "data.seq_length=64",
              "data.heldout_sequences=3", "diffusion.block.length=8", "run.sample_length=15")
    launch(tmp_path / "a", tiny_model_dir, corpus_file, *common, "attention.anneal_schedule=blocks",
           "attention.anneal_steps=1")
    export = tmp_path / "a" / "debug" / "final"
    assert read_meta(export).block_length == 8
    rows = [json.loads(line) for line in (tmp_path / "a" / "debug" / "metrics.jsonl").read_text().splitlines()]
    summary = rows[-1]
    assert summary["after_tokens"] == 3 * 63 and "sample" in summary
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": "An answer."}) + "\n"
                           for i in range(12)))
    launch(tmp_path / "s", export, sft, *common, "stage=sft", "attention.anneal_steps=0")
    assert read_meta(tmp_path / "s" / "debug" / "final").block_length == 8
    out = launch(tmp_path / "s2", export, sft, *common, "stage=sft", "attention.anneal_steps=0",
                 "diffusion.block.length=4", check=False)
    assert out.returncode == 2 and "block_length=8" in out.stderr


@torch.no_grad()
def test_harness_scores_a_one_token_block_model_as_the_parent(tiny_model_dir):
    """The harness reads the block length from the metadata: at b = 1 its log-likelihood of a continuation is
    the parent's exact one (any sequence length, not only whole blocks)."""
    from dataclasses import replace

    import torch.nn.functional as F

    from adapt.recipe.config import ModelConfig
    from adapt.model.causal import add_mask_token, load_causal_lm, load_tokenizer
    from eval.harness import DiffusionLM

    mcfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="fp32")
    model, tok = load_causal_lm(mcfg).eval(), load_tokenizer(mcfg)
    meta = replace(add_mask_token(model, tok, mcfg), block_length=1)
    lm = DiffusionLM(loaded=(model, tok, meta), mc_samples=2, max_length=64)
    ctx, cont = tok("The river flows", add_special_tokens=False).input_ids, tok(" to the sea.").input_ids
    got, _ = lm.score_tokens(ctx, cont, gen(0))
    x = torch.tensor([[lm.start_id, *ctx, *cont]])
    set_causal(model, True)
    logits = model(input_ids=x).logits[0, :-1].float().masked_fill(lm.objective.blocked, float("-inf"))
    set_causal(model, False)
    logp = F.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
    assert got == pytest.approx(float(logp[-len(cont):].sum()), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("docs", [False, True])
@torch.no_grad()
def test_the_causal_clean_stream_gives_the_joint_causal_term_of_its_own_forward(docs):
    """With clean_attention=causal the clean half of the 2L forward is the causal forward of x0 (within
    documents), so the joint term read from its rows equals the term's own causal forward; the block-causal
    clean stream is not causal and asks for that forward (None)."""
    model = tiny_llama(V, seed=4)
    set_causal(model, False)
    blocked, fwd = blocked_vocab(V, V, MASK), ModelForward(model, "cpu")
    x0 = torch.randint(0, MASK, (2, L), generator=gen(7))
    doc_ids = torch.tensor([[0] * 5 + [1] * 11, [0] * 9 + [1] * 7]) if docs else None
    obj = BlockDiffusion(MASK, True, blocked, block_length=4, clean_causal=True, ar_weight=0.3)
    noised = obj.corrupt(x0, obj.maskable(x0), gen(8))
    attention = Attention(docs=doc_ids)
    logits, causal = obj.predict_joint(fwd, x0, noised, attention)
    scored = obj.scored(x0)
    torch.testing.assert_close(obj.causal_nll_sum(causal, x0, scored), obj.causal_loss_sum(fwd, x0, scored, doc_ids),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, obj.predict(fwd, x0, noised, attention), rtol=1e-5, atol=1e-5)
    block = BlockDiffusion(MASK, True, blocked, block_length=4, ar_weight=0.3)
    assert block.predict_joint(fwd, x0, noised, attention)[1] is None
    wide = block.logits(fwd, noised.xt, attention, x0, clean_rows=True)[:, L:]  # block-causal clean rows differ
    assert not torch.allclose(block.causal_nll_sum(wide, x0, scored), obj.causal_loss_sum(fwd, x0, scored, doc_ids))
