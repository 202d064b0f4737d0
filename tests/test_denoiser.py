"""The denoiser: the shift, blocked ids, model-call counting, and the prefix KV cache."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from adapt.model.attention import to_additive
from adapt.decode.denoiser import Denoiser, PrefixCachedDenoiser
from adapt.model.causal import DiffusionMeta, set_causal
from adapt.decode import generate
from conftest import tiny_llama

V, REAL, MASK = 40, 38, 37  # rows 38, 39 are embedding padding; 37 is the mask token


class EchoModel(torch.nn.Module):
    """Logits at position j peak at the input token at j (so row alignment is visible)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, V, bias=False)
        self.config = SimpleNamespace(_attn_implementation="sdpa")

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=5.0 * torch.nn.functional.one_hot(input_ids, V).float())


@pytest.mark.parametrize("shift", [True, False])
def test_row_i_predicts_token_i_from_logits_at_i_minus_1(shift):
    den = Denoiser(EchoModel(), DiffusionMeta(mask_token_id=MASK, real_vocab_size=REAL, shift=shift))
    x = torch.tensor([[1, 7, 3, 9, 4]])
    best = den(x).argmax(-1)[0]
    expected = [1, 1, 7, 3, 9] if shift else [1, 7, 3, 9, 4]
    assert best.tolist() == expected
    assert den.nfe == 1


def test_blocked_ids_are_minus_inf_and_rows_normalised():
    den = Denoiser(EchoModel(), DiffusionMeta(mask_token_id=MASK, real_vocab_size=REAL))
    logp = den(torch.tensor([[1, MASK, 39, 2]]))
    assert torch.isinf(logp[..., MASK]).all() and torch.isinf(logp[..., REAL:]).all()
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(1, 4))


def make_tiny(bidirectional: bool, backend: str):
    model = tiny_llama(V, seed=1)
    model.set_attn_implementation(backend)
    set_causal(model, not bidirectional)
    return model, DiffusionMeta(mask_token_id=MASK, real_vocab_size=REAL, bidirectional=bidirectional)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_llama_matches_raw_logits_with_the_shift(dtype):
    model, meta = make_tiny(True, "sdpa")
    model.to(dtype)
    x = torch.randint(0, REAL, (2, 9), generator=torch.Generator().manual_seed(0))
    raw = model(input_ids=x).logits.float()
    raw[..., REAL:] = -torch.inf
    raw[..., MASK] = -torch.inf
    expected = torch.log_softmax(raw, -1)
    torch.testing.assert_close(Denoiser(model, meta)(x)[:, 1:], expected[:, :-1])


def canvas_with_prompt(prompt: int, length: int, batch: int = 2) -> torch.Tensor:
    x = torch.randint(0, REAL - 2, (batch, length), generator=torch.Generator().manual_seed(5))
    x[:, prompt:] = MASK
    x[:, prompt + 2] = 11  # a given token inside the generated part
    return x


@pytest.mark.filterwarnings("error::FutureWarning")  # the cache goes by the name this transformers takes
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_prefix_cache_is_exact_for_a_causal_model(backend):
    model, meta = make_tiny(False, backend)
    x = canvas_with_prompt(5, 12)
    cached = PrefixCachedDenoiser(model, meta)
    cached.update_prefix(x)
    assert cached.cache_len == 4 and cached.nfe == 1  # the prompt's last token is recomputed
    for _ in range(2):  # the cache is cropped back after each call
        torch.testing.assert_close(cached(x)[:, 5:], Denoiser(model, meta)(x)[:, 5:], atol=1e-5, rtol=1e-5)
    assert cached.nfe == 3


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_prefix_cache_equals_prompt_blind_to_the_rest_under_bidirectional_attention(backend):
    model, meta = make_tiny(True, backend)
    n, L = 4, 12
    x = canvas_with_prompt(n + 1, L)
    cached = PrefixCachedDenoiser(model, meta)
    cached.update_prefix(x)
    got = cached(x)
    visible = torch.ones(L, L, dtype=torch.bool)
    visible[:n, n:] = False  # the approximation: cached prompt positions do not see the rest
    ref = model(input_ids=x, attention_mask=to_additive(visible, model.dtype)).logits.float()
    ref[..., REAL:] = -torch.inf
    ref[..., MASK] = -torch.inf
    torch.testing.assert_close(got[:, n + 1:], torch.log_softmax(ref, -1)[:, n:-1], atol=1e-5, rtol=1e-5)
    exact = Denoiser(model, meta)(x)
    assert not torch.allclose(got[:, n + 1:], exact[:, n + 1:], atol=1e-4)  # it is an approximation
    assert (got[:, : n + 1].argmax(-1) == x[:, : n + 1]).all()  # prompt rows: one-hot on the given token


def test_prefix_cache_falls_back_when_the_prefix_changes():
    model, meta = make_tiny(True, "sdpa")
    x = canvas_with_prompt(5, 10)
    cached = PrefixCachedDenoiser(model, meta)
    cached.update_prefix(x)
    y = x.clone()
    y[:, 1] = 3
    torch.testing.assert_close(cached(y), Denoiser(model, meta)(y))


@pytest.mark.parametrize("block", [None, 3])
def test_generate_with_prefix_cache_on_a_causal_model_gives_the_same_samples(block):
    model, meta = make_tiny(False, "sdpa")
    x = canvas_with_prompt(4, 13)
    runs = [generate(Denoiser(model, meta), x, "confidence", steps=8, block_length=block, prefix_cache=cache,
                     generator=torch.Generator().manual_seed(0), temperature=0) for cache in (False, True)]
    assert torch.equal(runs[0].ids, runs[1].ids)
    given = x != MASK
    assert torch.equal(runs[1].ids[given], x[given])
    builds = 1 if block is None else 3  # one cache build per block (the prefix grows)
    assert runs[1].nfe == runs[0].nfe + builds
