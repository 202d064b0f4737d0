"""Self-speculative decoding of a block export with a causal clean stream: its output is the clean stream's own
token-by-token decoding (greedy: equal; sampled: the correction keeps the distribution), drafts come from the
objective's noised rows, rows do not depend on each other, and what it cannot decode is refused."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from adapt.model.causal import DiffusionMeta, set_causal
from adapt.objectives import Attention, BlockDiffusion, ModelForward
from adapt.decode import generate
from adapt.decode.speculative import RowBatch, accept_or_correct, speculative_decode
from adapt.decode.categorical import TokenFilter
from adapt.objectives.diffusion import blocked_vocab
from adapt.decode.denoiser import Denoiser

V, MASK, BOS = 40, 39, 1


def meta(b: int = 4, clean: str = "causal", noised: str = "bidirectional") -> DiffusionMeta:
    return DiffusionMeta(mask_token_id=MASK, real_vocab_size=MASK, block_length=b, clean_attention=clean,
                         noised_attention=noised)


def canvas(prompts: list[int], width: int, seed: int = 2) -> torch.Tensor:
    """Rows of BOS + random prompt tokens (each its own length) then masks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((len(prompts), width), MASK)
    x[:, 0] = BOS
    for r, n in enumerate(prompts):
        x[r, 1:1 + n] = torch.randint(3, MASK, (n,), generator=g)
    return x


@torch.no_grad()
def greedy_causal(model, x: torch.Tensor) -> torch.Tensor:
    """The model read as a causal LM, decoding each row's masks greedily one token per forward."""
    set_causal(model, True)
    out = x.clone()
    for r in range(len(x)):
        for p in (out[r] == MASK).nonzero().flatten().tolist():
            logits = model(input_ids=out[r:r + 1, :p]).logits[0, -1].float()
            logits[MASK:] = -torch.inf
            out[r, p] = int(logits.argmax())
    set_causal(model, False)
    return out


@pytest.mark.parametrize("b", [1, 4, 5])
def test_greedy_output_is_the_clean_streams_greedy_decoding_and_rows_are_independent(b):
    model = tiny_llama(V, seed=9)
    x = canvas([5, 2, 9], 23)
    out, calls = speculative_decode(model, meta(b), x, temperature=0.0)
    assert torch.equal(out, greedy_causal(model, x))  # given tokens kept, every mask filled as AR would
    alone_calls = 0
    for r in range(len(x)):  # a row decodes alone as it does in the batch
        alone, n = speculative_decode(model, meta(b), x[r:r + 1], temperature=0.0)
        assert torch.equal(alone[0], out[r])
        alone_calls += n
    assert calls <= int((x == MASK).sum(1).max())  # never more calls than the longest row's tokens
    assert calls < alone_calls  # the rows share calls
    sampled, _ = speculative_decode(model, meta(b), x, torch.Generator().manual_seed(1))
    given = x != MASK
    assert torch.equal(sampled[given], x[given]) and not (sampled == MASK).any()


def test_a_row_that_stops_early_leaves_the_others_as_they_are_alone():
    model = tiny_llama(V, seed=9)
    x = canvas([3, 6], 30)
    free, _ = speculative_decode(model, meta(4), x, temperature=0.0)
    eos = int(free[0, 6])  # row 0's third generated token: row 0 stops there
    out, _ = speculative_decode(model, meta(4), x, temperature=0.0, eos_id=eos)
    assert (out[0, 6:] == eos).all() and torch.equal(out[0, :6], free[0, :6])
    alone, _ = speculative_decode(model, meta(4), x[1:], temperature=0.0, eos_id=eos)
    assert torch.equal(out[1], alone[0])


def test_kept_drafts_give_several_tokens_per_call():
    """A model whose every row predicts the same token: each draft is kept, so a call yields a block's worth."""
    model = tiny_llama(V, seed=9)
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = model.model.embed_tokens.weight[5]  # every input looks alike
    x = canvas([3], 1 + 3 + 32)
    out, calls = speculative_decode(model, meta(4), x, temperature=0.0)
    assert torch.equal(out, greedy_causal(model, x))
    assert calls <= 32 // 4 + 2  # the first call drafts the prompt's block, then one call per block of 4
    sampled, calls_t1 = speculative_decode(model, meta(4), x, torch.Generator().manual_seed(0))
    assert calls_t1 <= 32 // 4 + 2 and not (sampled == MASK).any()
    eos = int(out[0, 4])  # the token every row predicts: a row stops at its first generated one
    stopped, calls_eos = speculative_decode(model, meta(4), x, temperature=0.0, eos_id=eos)
    assert calls_eos == 1 and (stopped[0, 4:] == eos).all()


def test_the_correction_keeps_the_target_distribution():
    """Whatever the draft distribution q, accept-or-correct yields tokens distributed as the target p."""
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.tensor([2.0, 0.5, 0.0, -1.0, 1.0]), -1)
    q = torch.log_softmax(torch.tensor([-1.0, 2.0, 0.5, 1.0, 0.0]), -1)
    n, counts, kept = 20000, torch.zeros(5), 0
    drafts = torch.multinomial(q.exp(), n, replacement=True, generator=g)
    for d in drafts.tolist():
        ok, tok = accept_or_correct(p, q, d, g, greedy=False)
        counts[tok] += 1
        kept += ok
    freq, want = counts / n, p.exp()
    assert (freq - want).abs().max() < 4 * (want * (1 - want) / n).sqrt().max()
    assert abs(kept / n - float(torch.minimum(p.exp(), q.exp()).sum())) < 0.02  # kept w.p. sum min(p, q)
    assert accept_or_correct(p, q, 1, g, greedy=True) == (False, 0)
    assert accept_or_correct(p, q, 0, g, greedy=True) == (True, 0)


@pytest.mark.parametrize("noised", ["bidirectional", "causal"])
@torch.no_grad()
def test_drafts_are_the_objectives_noised_rows(noised):
    """The noised rows of a speculative call equal the objective's 2L forward over [clean blocks < K | block K],
    with the export's noised block (a causal one: each draft sees its block up to itself); the output stays the
    clean stream's greedy decoding."""
    model = tiny_llama(V, seed=9)
    set_causal(model, False)
    x = canvas([6], 16)  # prompt ends at position 6, inside block 1 (positions 4-7)
    batch = RowBatch(model, meta(4, noised=noised), x, TokenFilter(), torch.Generator().manual_seed(0))
    row = batch.rows[0]
    batch.step()  # prefill: position 7, the end of block 1, drawn from the clean stream; nothing left to draft
    batch.step()  # verifies nothing, draws position 8 (block 2's first), drafts 9-11 with 8 masked
    assert row.done == 9 and len(row.drafts) == 3
    full = row.x.clone()
    full[8:] = MASK
    full = full[None, :12]
    blocked = blocked_vocab(V, MASK, MASK)
    for causal in (True, False):
        obj = BlockDiffusion(MASK, True, blocked, block_length=4, clean_causal=True, noised_causal=causal)
        logits = obj.logits(ModelForward(model, "cpu"), full, Attention(), full.clone())
        want = torch.log_softmax(logits.float().masked_fill(blocked, -torch.inf), -1)[0, 9:12]
        assert torch.allclose(row.q, want, rtol=1e-5, atol=1e-5) == (causal == (noised == "causal"))
    out, _ = speculative_decode(model, meta(4, noised=noised), x, temperature=0.0)
    assert torch.equal(out, greedy_causal(model, x))


def test_what_it_cannot_decode_is_refused():
    model = tiny_llama(V, seed=9)
    x = canvas([3], 12)
    with pytest.raises(ValueError, match="clean_attention=causal"):
        speculative_decode(model, meta(4, "block"), x)
    with pytest.raises(ValueError, match="block-diffusion export"):
        speculative_decode(model, meta(0), x)
    infill = x.clone()
    infill[0, 8] = 7
    with pytest.raises(ValueError, match="continues a prompt"):
        speculative_decode(model, meta(4), infill)
    den = Denoiser(model, meta(4))
    with pytest.raises(ValueError, match="omit block_length"):
        generate(den, x, "speculative", block_length=2)
    with pytest.raises(ValueError, match="takes no option tau"):
        generate(den, x, "speculative", tau=0.9)
    res = generate(den, x, "speculative", temperature=0.0, trajectory=True)
    assert res.nfe == den.nfe and not (res.ids == MASK).any()
    assert (res.trajectory[0, 4:] >= 0).all() and (res.trajectory[0, :4] == -1).all()


def test_finished_rows_leave_the_batch():
    """A row with fewer masks finishes first; later calls hold only the rows still decoding (cache rows too)."""
    model = tiny_llama(V, seed=9)
    x = canvas([14, 2], 18)  # row 0: 3 masks, row 1: 15
    batch = RowBatch(model, meta(4), x, TokenFilter(temperature=0.0), None)
    seen = []
    while not all(row.finished for row in batch.rows):
        seen.append(batch.step())
    assert seen[0] == [0, 1] and seen[-1] == [1] and batch.rows[0].finished
    assert batch.cache.layers[0].keys.shape[0] == 1 and batch.kv_pos.shape[0] == 1
    out = torch.stack([row.x for row in batch.rows])
    assert torch.equal(out, greedy_causal(model, x))
