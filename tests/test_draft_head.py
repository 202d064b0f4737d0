"""The draft head of the speculative decoder: untrained it drafts as the noised stream does; any head leaves the
output exact; the decoder's chain is the head applied to the features training reads; training lowers the KL;
the head travels in the export folder, and the command refuses what it cannot train for (exit 2)."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_speculative import BOS, MASK, V, canvas, greedy_causal, meta

from adapt.objectives.diffusion import blocked_vocab, denoiser_log_probs
from adapt.draft_head import (DraftHead, acceptance, chain_loss, draft_chains, fit, head_logits, load_draft_head,
                              load_head, save_head, unroll)
from adapt.model.causal import set_causal
from adapt.decode.categorical import TokenFilter
from adapt.decode.speculative import RowBatch, speculative_decode

HIDDEN = 32


def trained_like(seed: int = 3) -> DraftHead:
    """A head whose output layer is not zero: it changes the drafts."""
    torch.manual_seed(seed)
    head = DraftHead(HIDDEN, 16)
    torch.nn.init.normal_(head.out.weight, std=0.5)
    return head.eval().requires_grad_(False)


def model_with(head):
    """The tiny model the heads draft for (the head itself travels apart: speculative_decode(..., draft_head=))."""
    model = tiny_llama(V, seed=9)
    set_causal(model, False)
    return model


@pytest.mark.parametrize("noised", ["bidirectional", "causal"])
def test_an_untrained_head_drafts_as_the_noised_stream(noised):
    x = canvas([5, 2], 27)
    plain, calls = speculative_decode(model_with(None), meta(4, noised=noised), x, temperature=0.0)
    untrained = DraftHead(HIDDEN, 16)
    headed, calls_head = speculative_decode(model_with(untrained), meta(4, noised=noised), x, temperature=0.0,
                                            draft_head=untrained)
    assert torch.equal(plain, headed) and calls == calls_head
    head = DraftHead(HIDDEN, 16)
    batch = RowBatch(model_with(head), meta(4, noised=noised), x[:1], TokenFilter(), torch.Generator().manual_seed(0),
                   head)
    ref = RowBatch(model_with(None), meta(4, noised=noised), x[:1], TokenFilter(), torch.Generator().manual_seed(0))
    for b in (batch, ref):
        b.step(), b.step()
    assert len(ref.rows[0].drafts) == 3 and torch.allclose(batch.rows[0].q, ref.rows[0].q, atol=1e-5)


@pytest.mark.parametrize("b", [4, 5])
def test_any_head_keeps_the_output_the_clean_streams_and_changes_the_drafts(b):
    x = canvas([5, 2, 9], 31)
    trained = trained_like()
    model = model_with(trained)
    out, _ = speculative_decode(model, meta(b), x, temperature=0.0, draft_head=trained)
    assert torch.equal(out, greedy_causal(model, x))
    sampled, _ = speculative_decode(model, meta(b), x, torch.Generator().manual_seed(1), draft_head=trained)
    given = x != MASK
    assert torch.equal(sampled[given], x[given]) and not (sampled == MASK).any()
    off, _ = speculative_decode(model, meta(b), x, temperature=0.0)
    assert torch.equal(off, out)
    with_head = RowBatch(model, meta(b), x[:1], TokenFilter(), None, trained_like())
    without = RowBatch(model, meta(b), x[:1], TokenFilter(), None)
    for batch in (with_head, without):
        batch.step(), batch.step()
    assert not torch.allclose(with_head.rows[0].q, without.rows[0].q, atol=1e-3)


@pytest.mark.parametrize("noised", ["bidirectional", "causal"])
@torch.no_grad()
def test_the_decoders_chain_is_the_head_on_the_training_features(noised):
    """The drafts of a call equal the head unrolled over draft_chains' features of the same text, with the drafts
    as the previous tokens: training and decoding read the same features."""
    head = trained_like()
    model, m = model_with(head), meta(4, noised=noised)
    x = canvas([6], 16)  # prompt ends inside block 1: the second call draws position 8 and drafts 9-11
    batch = RowBatch(model, m, x, TokenFilter(), torch.Generator().manual_seed(0), head)
    row = batch.rows[0]
    batch.step(), batch.step()
    assert row.done == 9 and len(row.drafts) == 3
    text = row.x.clone()[None, :12]
    text[0, 9:12] = torch.tensor(row.drafts)
    chains = draft_chains(model, m, text, 0)  # k = 0: blocks 1 and 2, each drafted from its first token
    assert torch.equal(chains.prev[1], text[0, 8:11]) and torch.equal(chains.answer[1], text[0, 9:12])
    blocked = blocked_vocab(V, MASK, MASK)
    feats = unroll(head, model, chains)
    want = torch.stack([denoiser_log_probs(head_logits(model, f[1]), blocked) for f in feats])
    assert torch.allclose(row.q, want, atol=1e-5)


@torch.no_grad()
def test_rows_drafted_together_draft_as_each_row_alone():
    """The head drafts every row's chain in one pass per drafted place; rows with 1, 0 and 2 places to draft
    (first masks at block offsets 2, 3, 1) draft at every call what each drafts alone."""
    head = trained_like()
    model, m = model_with(head), meta(4)
    x = canvas([5, 6, 8], 16)
    greedy = TokenFilter(temperature=0.0)
    batch = RowBatch(model, m, x, greedy, None, head)
    alone = [RowBatch(model, m, x[r:r + 1], greedy, None, head) for r in range(len(x))]
    for call in range(3):
        for b in [batch, *alone]:
            b.step()
        if call == 0:
            assert [len(row.drafts) for row in batch.rows] == [1, 0, 2]
        for got, want in zip(batch.rows, [a.rows[0] for a in alone]):
            assert got.drafts == want.drafts and torch.equal(got.x, want.x) and got.done == want.done
            assert (got.q is None) == (want.q is None)
            assert got.q is None or torch.allclose(got.q, want.q, atol=1e-5)


def test_chains_hold_the_decoders_state_at_every_offset():
    model, m = model_with(None), meta(4)
    x0 = torch.randint(3, MASK, (2, 16), generator=torch.Generator().manual_seed(0))
    x0[:, 0] = BOS
    for k, blocks in ((0, 3), (1, 4), (2, 4)):  # k = 0 skips block 0 (BOS is given, nothing draws it)
        c = draft_chains(model, m, x0, k)
        assert c.prev.shape == (2 * blocks, 3 - k) and c.noised.shape == (2 * blocks, 3 - k, HIDDEN)
        first = 4 if k == 0 else 0
        assert torch.equal(c.answer[0], x0[0, first + k + 1:first + 4])


def test_training_lowers_the_kl_and_raises_acceptance():
    model, m = model_with(None), meta(4)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(3, MASK, (8, 32), generator=g)
    x0[:, 0] = BOS
    train = {k: draft_chains(model, m, x0, k) for k in range(3)}
    blocked = blocked_vocab(V, MASK, MASK)
    torch.manual_seed(0)
    head = DraftHead(HIDDEN, 64)
    before = float(chain_loss(head, model, train[0], blocked).detach())
    accept_before = acceptance(head, model, train[0], blocked)
    losses = fit(head, model, train, blocked, epochs=30, lr=3e-3, chains_per_step=32, generator=g, say=lambda s: 0)
    after = float(chain_loss(head, model, train[0], blocked).detach())
    assert after < 0.5 * before and losses[-1] < losses[0]
    accept_after = acceptance(head, model, train[0], blocked)
    assert all(accept_after[s]["kept_t1"] > accept_before[s]["kept_t1"] for s in accept_after)
    assert accept_before == acceptance(None, model, train[0], blocked)  # untrained = the noised stream


def test_a_saved_head_loads_with_its_weights_and_refuses_another_width(tmp_path):
    head = trained_like()
    save_head(head, tmp_path, {"epochs": 1})
    back = load_head(tmp_path, HIDDEN)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), back.state_dict().values()))
    (tmp_path / "none").mkdir()
    assert load_head(tmp_path / "none", HIDDEN) is None
    with pytest.raises(ValueError, match="width 32"):
        load_head(tmp_path, 64)
    assert not list(tmp_path.glob(".*partial"))


# --- the command: python -m adapt.draft_head EXPORT ----------------------------------------------------------------

def block_export(folder, model_dir, corpus, cache):
    """A block export with a causal clean stream made directly (the tiny model, the small corpus as its recipe's)."""
    from dataclasses import replace

    from test_sft import exported

    from adapt.recipe.config import to_yaml
    from adapt.recipe.load import load_config
    from adapt.export.contract import RECIPE_FILE, read_meta, save_meta

    folder = exported(folder, model_dir)
    save_meta(folder, replace(read_meta(folder), objective="block", block_length=4, clean_attention="causal",
                              noised_attention="causal"))
    cfg = load_config(None, [f"data.train_files=[{corpus}]", f"data.cache_dir={cache}", "data.seq_length=32",
                             "data.heldout_sequences=2"])
    (folder / RECIPE_FILE).write_text(to_yaml(cfg))
    return folder


def run_head(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "adapt.draft_head", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_the_command_trains_a_head_the_decoder_then_uses(tmp_path, tiny_model_dir, corpus_file):
    import json

    from adapt.export import load_diffusion_model
    from adapt.export.contract import destination_problem
    from adapt.export.contract import HEAD_FILE
    from adapt.model.causal import start_token
    from safetensors.torch import load_file

    folder = block_export(tmp_path / "export", tiny_model_dir, corpus_file, tmp_path / "cache")
    out = run_head(folder, "--sequences", 6, "--epochs", 2, "--chains", 8, "--width", 16, "--json",
                   tmp_path / "head.json", "--dtype", "bf16", "--device", "cpu")  # bf16 features, an fp32 head
    assert out.returncode == 0, out.stderr[-3000:]
    assert (folder / HEAD_FILE).is_file() and "held-out, next token at block offset 0" in out.stdout
    assert {t.dtype for t in load_file(str(folder / HEAD_FILE)).values()} == {torch.float32}
    report = json.loads((tmp_path / "head.json").read_text())
    assert set(report["heldout_after"]) == {"k=0", "k=1", "k=2"} and len(report["losses"]) == 2
    model, tok, meta = load_diffusion_model(folder)
    head = load_draft_head(folder, model)
    assert head is not None and head.width == 16
    ids = [start_token(tok), *tok("The cat sat", add_special_tokens=False).input_ids]
    x = torch.full((1, len(ids) + 16), meta.mask_token_id)
    x[0, :len(ids)] = torch.tensor(ids)
    headed, _ = speculative_decode(model, meta, x, temperature=0.0, draft_head=head)
    plain, _ = speculative_decode(model, meta, x, temperature=0.0)
    assert torch.equal(headed, plain)  # exact either way
    model16, _, _ = load_diffusion_model(folder, "bf16")  # the head runs in the model's dtype
    head16 = load_draft_head(folder, model16)
    assert head16.inp.weight.dtype == torch.bfloat16
    out16, _ = speculative_decode(model16, meta, x, temperature=0.0, draft_head=head16)
    assert not (out16 == meta.mask_token_id).any() and torch.equal(out16[:, :len(ids)], x[:, :len(ids)])
    assert destination_problem(folder, []) is None  # still an export: a new export of the run may replace it


@pytest.mark.parametrize("case, words", [
    ("whole", "needs a block-diffusion export"),
    ("missing", "not found"),
    ("lr", "--lr must be a positive number"),
])
def test_what_it_cannot_train_for_is_one_message_and_exit_2(tmp_path, tiny_model_dir, corpus_file, case, words):
    from test_sft import exported

    if case == "whole":
        folder = exported(tmp_path / "export", tiny_model_dir)
    elif case == "lr":
        folder = block_export(tmp_path / "export", tiny_model_dir, corpus_file, tmp_path / "cache")
    else:
        folder = tmp_path / "nowhere"
    out = run_head(folder, *(["--lr", "-1"] if case == "lr" else []))
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "nowhere").exists() and not list(tmp_path.rglob("draft_head*"))


def test_a_broken_head_file_is_refused_when_the_export_loads(tmp_path, tiny_model_dir, corpus_file):
    from adapt.export import load_diffusion_model
    from adapt.export.contract import HEAD_FILE
    from adapt.model.causal import ModelLoadError

    folder = block_export(tmp_path / "export", tiny_model_dir, corpus_file, tmp_path / "cache")
    (folder / HEAD_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="does not load as a draft head.*python -m adapt.draft_head"):
        load_draft_head(folder, load_diffusion_model(folder)[0])
    out = run_head(folder, "--sequences", 2, "--epochs", 1, "--chains", 8, "--width", 16)  # the fix it names works
    assert out.returncode == 0, out.stderr[-3000:]
    assert load_draft_head(folder, load_diffusion_model(folder)[0]).width == 16


@pytest.mark.parametrize("head", [None, "trained"])
@torch.no_grad()
def test_the_chain_sampler_keeps_every_draft_and_calls_once_per_block(head):
    """check=False (sampler `chain`): one call per block; each block's first token is the clean stream's greedy
    choice after the chain's own earlier tokens, the rest are the drafts as drawn."""
    head = trained_like() if head else None
    model = model_with(head)
    x = canvas([3], 1 + 3 + 32)  # the prompt fills block 0; eight blocks to generate
    out, calls = speculative_decode(model, meta(4), x, temperature=0.0, check=False, draft_head=head)
    assert calls == 8 and not (out == MASK).any() and torch.equal(out[0, :4], x[0, :4])
    set_causal(model, True)
    logits = model(input_ids=out).logits[0].float()
    set_causal(model, False)
    logits[:, MASK:] = -torch.inf
    firsts = torch.arange(4, 36, 4)
    assert torch.equal(out[0, firsts], logits[firsts - 1].argmax(-1))
    assert not torch.equal(out, greedy_causal(model, x))  # the unchecked drafts are not the clean stream's choice
    b1, calls_b1 = speculative_decode(model, meta(1), x, temperature=0.0, check=False, draft_head=head)
    assert torch.equal(b1, greedy_causal(model, x)) and calls_b1 == 32  # b = 1: nothing drafted, the parent's AR
