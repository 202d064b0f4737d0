"""Attention masks, proved by behaviour: which tokens change which logits.

influence[i, j] is True when changing token j changes the logits at position i. For a 1-layer model
that is exactly the visibility matrix (query i sees key j); for deeper models it is its closure.
"""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from adapt.model.attention import (anneal_ratio, annealed_visibility, backend_problem, build_mask, causal_visibility,
                             document_visibility, step_visibility, to_additive)
from adapt.model.causal import forward_logits, set_causal

V, L = 64, 10
BACKENDS = ["eager", "sdpa"]


def model_for(backend: str, layers: int = 1) -> torch.nn.Module:
    model = tiny_llama(V, layers=layers, seed=layers)
    model.set_attn_implementation(backend)
    assert model.config._attn_implementation == backend
    return model


def tokens(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (batch, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def influence(model, mask: torch.Tensor | None, x: torch.Tensor | None = None) -> torch.Tensor:
    """(L, L) bool: row i, column j = changing token j changed the logits at i. One forward for all j."""
    x = tokens() if x is None else x
    batch = x.repeat(L + 1, 1)
    for j in range(L):
        batch[j + 1, j] = 3 + (batch[j + 1, j] - 3 + 7) % (V - 3)
    if mask is not None and mask.shape[0] > 1:
        mask = mask.repeat(L + 1, 1, 1, 1)
    logits = forward_logits(model, batch, mask)
    delta = (logits[1:] - logits[:1]).abs().amax(-1)  # (j, i)
    return (delta > 1e-6).T


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_mask_matches_hf_default(backend):
    """Our 4D causal mask (with the model switched to non-causal) reproduces HF's own causal attention."""
    model = model_for(backend, layers=2)
    x = tokens(batch=3)
    with torch.no_grad():
        reference = forward_logits(model, x)
        set_causal(model, False)
        ours = forward_logits(model, x, build_mask(causal_visibility(L), L, torch.float32, backend))
        bidirectional = forward_logits(model, x, build_mask(None, L, torch.float32, backend))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert (bidirectional - reference).abs().max() > 1e-3  # the comparison can fail


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_model_is_causal(backend):
    assert torch.equal(influence(model_for(backend), None), causal_visibility(L))


@pytest.mark.parametrize("backend", BACKENDS)
def test_after_annealing_fully_bidirectional(backend):
    model = model_for(backend)
    set_causal(model, False)
    visible = step_visibility(L, anneal_ratio(100, 100), "random")
    assert visible is None
    mask = build_mask(visible, L, torch.float32, backend)
    assert (mask is None) == (backend == "sdpa")  # sdpa runs with no mask tensor at all
    assert influence(model, mask).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_before_annealing_causal(backend):
    model = model_for(backend)
    set_causal(model, False)  # as in training: the mask alone decides
    mask = build_mask(step_visibility(L, anneal_ratio(0, 100), "random"), L, torch.float32, backend)
    assert torch.equal(influence(model, mask), causal_visibility(L))


@pytest.mark.parametrize("schedule", ["random", "window"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_halfway_exactly_the_visible_pairs(backend, schedule):
    model = model_for(backend)
    set_causal(model, False)
    r = anneal_ratio(50, 100)
    visible = step_visibility(L, r, schedule, torch.Generator().manual_seed(3))
    future = visible & ~causal_visibility(L)
    assert 0 < future.sum() < L * (L - 1) // 2  # some, not all, of the future is visible
    assert torch.equal(influence(model, build_mask(visible, L, torch.float32, backend)), visible)


def _set_module_flags(model, causal: bool) -> None:
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = causal


def test_module_flags_alone_can_leave_attention_causal():
    """Measured with transformers 5.23, no mask tensor: the model's forward passes `config.is_causal`
    (when the config has it) down as sdpa's is_causal kwarg, overriding the modules' flags, and the
    mask builder makes a causal mask for eager whatever the modules say. So flipping only the module
    flags is silently causal for eager, and for sdpa as soon as the config carries is_causal=True
    (any config that went through set_causal(model, True), or a saved one). set_causal sets both."""
    expected_alone = {"eager": causal_visibility(L), "sdpa": torch.ones(L, L, dtype=torch.bool)}
    for backend in BACKENDS:
        model = model_for(backend)
        assert not hasattr(model.config, "is_causal")  # Llama's config has no such field by default
        _set_module_flags(model, False)
        assert torch.equal(influence(model, None), expected_alone[backend]), backend
        model.config.is_causal = True
        assert torch.equal(influence(model, None), causal_visibility(L)), backend  # flags ignored
        set_causal(model, False)
        assert influence(model, None).all(), backend
        set_causal(model, True)
        assert torch.equal(influence(model, None), causal_visibility(L)), backend
        _set_module_flags(model, False)
        assert torch.equal(influence(model, None), causal_visibility(L)), backend


def test_eager_needs_float_masks():
    """eager adds the mask to the scores: a bool mask adds 0/1 and hides nothing. build_mask is float."""
    model = model_for("eager")
    set_causal(model, False)
    assert influence(model, causal_visibility(L)[None, None]).all()  # silently bidirectional
    mask = build_mask(causal_visibility(L), L, torch.bfloat16, "eager")
    assert mask.dtype == torch.bfloat16 and mask.shape == (1, 1, L, L)
    assert torch.equal(influence(model, build_mask(causal_visibility(L), L, torch.float32, "eager")),
                       causal_visibility(L))


@pytest.mark.parametrize("backend", BACKENDS)
def test_document_mask_separates_packed_documents(backend):
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])
    same_doc = document_visibility(docs)[0]
    model = model_for(backend)
    set_causal(model, False)
    # bidirectional step: exactly the same-document pairs
    assert torch.equal(influence(model, build_mask(None, L, torch.float32, backend, docs)), same_doc)
    # mid-anneal step: the step's pattern and the documents
    visible = step_visibility(L, 0.5, "random", torch.Generator().manual_seed(1))
    assert torch.equal(influence(model, build_mask(visible, L, torch.float32, backend, docs)), visible & same_doc)
    # deeper model: no leak across documents through intermediate layers either
    deep = model_for(backend, layers=2)
    set_causal(deep, False)
    assert not (influence(deep, build_mask(None, L, torch.float32, backend, docs)) & ~same_doc).any()


def test_document_mask_per_sequence_in_batch():
    docs = torch.tensor([[0] * 5 + [1] * 5, [0] * L])
    mask = build_mask(None, L, torch.float32, "sdpa", docs)
    assert mask.shape == (2, 1, L, L)
    assert (mask[1] == 0).all() and (mask[0, 0, :5, 5:] < -1e30).all() and (mask[0, 0, :5, :5] == 0).all()


def test_anneal_ratio_schedule():
    assert anneal_ratio(0, 100) == 0.0
    assert anneal_ratio(50, 100) == 0.5
    assert anneal_ratio(100, 100) == 1.0
    assert anneal_ratio(250, 100) == 1.0
    assert anneal_ratio(-1, 100) == 0.0
    assert anneal_ratio(0, 0) == 1.0  # anneal_steps=0: bidirectional from the start


def test_visibility_patterns():
    n = 64
    assert torch.equal(annealed_visibility(n, 0.0), causal_visibility(n))
    assert annealed_visibility(n, 1.0).all()
    upper = ~causal_visibility(n)
    for r in (0.25, 0.75):
        vis = annealed_visibility(n, r, "random", torch.Generator().manual_seed(0))
        assert vis[causal_visibility(n)].all()
        assert abs(vis[upper].float().mean().item() - r) < 0.05
        win = annealed_visibility(n, r, "window")
        k = round(r * n)
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        assert torch.equal(win, j <= i + k)
    # the random pattern depends only on the generator's seed (same on every rank)
    a = annealed_visibility(n, 0.5, "random", torch.Generator().manual_seed(5))
    assert torch.equal(a, annealed_visibility(n, 0.5, "random", torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError):
        annealed_visibility(n, 0.5, "spiral")


def test_to_additive():
    vis = causal_visibility(4)
    m = to_additive(vis, torch.float32)
    assert m.shape == (1, 1, 4, 4)
    assert (m[0, 0][vis] == 0).all() and (m[0, 0][~vis] == torch.finfo(torch.float32).min).all()


def test_backend_problem():
    assert backend_problem("sdpa", "random", 100, True) is None
    assert backend_problem("eager", "window", 100, False) is None
    msg = backend_problem("flash_attention_2", "random", 100, False)
    assert msg and "sdpa" in msg and "anneal_steps=0" in msg
    assert backend_problem("flash_attention_2", "random", 0, False) is None  # bidirectional from the start
    assert "document_mask" in backend_problem("flash_attention_2", "random", 0, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_masks(backend):
    """Training runs in bf16 with bf16 masks (dtype-min fill): same visibility, no NaN."""
    model = model_for(backend).to(torch.bfloat16)
    set_causal(model, False)
    visible = step_visibility(L, 0.5, "random", torch.Generator().manual_seed(2))
    mask = build_mask(visible, L, torch.bfloat16, backend)
    assert torch.isfinite(forward_logits(model, tokens(), mask)).all()
    assert torch.equal(influence(model, mask), visible)
