"""Annealing on fast kernels: the window schedule as a FlexAttention BlockMask; flash refuses annealing.

FlexAttention runs forward on CPU in torch 2.13 (compiled by inductor, a few seconds the first time);
its backward is GPU-only, which `adapt.train.loop.setup` reports before training on CPU.
"""
from __future__ import annotations

import subprocess
import sys

import torch
from conftest import ROOT, tiny_llama
from torch.nn.attention.flex_attention import create_mask

from adapt.model.attention import (annealed_visibility, backend_problem, build_mask, document_visibility, flex_problem,
                             usable_backend, uses_block_mask, window_block_mask, window_width)
from adapt.model.causal import forward_logits, set_causal

V, L = 64, 24


def test_block_mask_is_the_window_schedule():
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 19])
    for r in (0.0, 0.1, 0.5, 0.99):
        dense = create_mask(window_block_mask(L, r, block_size=8).mask_mod, None, None, L, L, device="cpu")
        assert torch.equal(dense[0, 0], annealed_visibility(L, r, "window")), r
        with_docs = create_mask(window_block_mask(L, r, docs, block_size=8).mask_mod, 2, None, L, L, device="cpu")
        assert torch.equal(with_docs[:, 0], annealed_visibility(L, r, "window")[None] & document_visibility(docs))
    assert window_width(L, 0.5) == 12 and window_width(L, 2.0) == L
    assert uses_block_mask("flex_attention", "window") and not uses_block_mask("flex_attention", "random")
    assert not uses_block_mask("sdpa", "window")


@torch.no_grad()
def test_flex_block_mask_logits_match_dense_sdpa():
    """Where compiled flex is right (GPU, most CPUs) it equals dense sdpa; where this CPU's compiled flex is
    wrong, the check sees it and the library falls back to sdpa instead of running it."""
    model = tiny_llama(V, layers=2)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    problem = flex_problem("cpu", head_dim, ((L, 8),))
    if problem is not None:
        assert "differs from sdpa" in problem or "fails" in problem
        backend, why = usable_backend("flex_attention", "cpu", head_dim)
        assert backend == "sdpa" and "using sdpa" in why
        assert usable_backend("sdpa", "cpu", head_dim) == ("sdpa", None)
        return
    set_causal(model, False)
    x = torch.randint(3, V, (2, L), generator=torch.Generator().manual_seed(0))
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 16 + [1] * 8])
    for r, d in ((0.0, None), (0.3, None), (0.3, docs)):
        model.set_attn_implementation("sdpa")
        dense = build_mask(annealed_visibility(L, r, "window"), L, torch.float32, "sdpa", d)
        reference = forward_logits(model, x, dense.expand(2, -1, -1, -1))
        model.set_attn_implementation("flex_attention")
        flex = forward_logits(model, x, window_block_mask(L, r, d, block_size=8))
        torch.testing.assert_close(flex, reference, rtol=1e-4, atol=1e-5)
    causal = forward_logits(model, x, window_block_mask(L, 0.0, block_size=8))
    assert (causal - flex).abs().max() > 1e-3  # the comparison can fail


def test_flash_attention_cannot_anneal():
    for schedule in ("random", "window"):
        problem = backend_problem("flash_attention_2", schedule, 100, False)
        assert "(-1, w)" in problem and "flex_attention" in problem and "anneal_steps=0" in problem
    assert backend_problem("flash_attention_2", "random", 0, False) is None  # bidirectional (SFT): fine
    assert backend_problem("flex_attention", "window", 100, True) is None


def test_flex_random_schedule_is_refused_and_flex_masks_are_block_masks():
    """flex takes the random schedule's dense pattern as a score_mod tensor indexed by batch row (micro batch > 1
    failed): it is refused at start with the reason; every mask the objective builds for flex is a BlockMask."""
    from torch.nn.attention.flex_attention import BlockMask

    from adapt.objectives.diffusion import blocked_vocab
    from adapt.objectives import Attention, MaskedDiffusion

    problem = backend_problem("flex_attention", "random", 100, False)
    assert "window" in problem and "sdpa" in problem and "batch" in problem
    assert backend_problem("flex_attention", "random", 0, False) is None  # no annealing: no pattern
    obj = MaskedDiffusion(V - 1, True, blocked_vocab(V, V, V - 1), backend="flex_attention")
    docs = torch.tensor([[0] * 10 + [1] * 14] * 3)
    causal = Attention(annealed_visibility(L, 0.0, "window"), 0.0, "window")
    for att in (causal, Attention(None, 1.0, "window", docs), Attention(annealed_visibility(L, 0.5, "window"),
                                                                        0.5, "window", docs)):
        mask = obj.mask(att, L, 3, torch.device("cpu"))
        assert isinstance(mask, BlockMask)
        want = att.visible if att.visible is not None else torch.ones(L, L, dtype=torch.bool)
        want = want[None] & (document_visibility(docs) if att.docs is not None else True)
        got = create_mask(mask.mask_mod, 3 if att.docs is not None else None, None, L, L, device="cpu")[:, 0]
        assert torch.equal(got, want.expand_as(got))
    assert obj.mask(Attention(None, 1.0, "window"), L, 3, torch.device("cpu")) is None  # bidirectional: no mask


def test_flex_training_on_cpu_is_refused(tmp_path, tiny_model_dir, corpus_file):
    proc = subprocess.run([sys.executable, str(ROOT / "adapt" / "run.py"), str(ROOT / "recipes" / "debug.yaml"),
                           f"model.name_or_path={tiny_model_dir}", "model.dtype=fp32",
                           "model.attn_implementation=flex_attention", "attention.anneal_schedule=window",
                           f"data.train_files=[{corpus_file}]", f"run.output_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no backward pass on CPU" in proc.stderr and "Traceback" not in proc.stderr
