"""eval.infill: metrics on hand-made spans, a perfect denoiser scores 1, the parent sees the left side only."""
from __future__ import annotations

import dataclasses

import torch
from test_eval_fixtures import OracleDenoiser, common_args, ctx, exported_dir  # noqa: F401

from eval.infill import run, span_metrics


def test_span_metrics():
    truth = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert span_metrics(truth, truth) == {"exact_match": 1.0, "token_accuracy": 1.0}
    fill = torch.tensor([[1, 2, 3], [4, 0, 0]])
    assert span_metrics(fill, truth) == {"exact_match": 0.5, "token_accuracy": 4 / 6}


def _args(ctx, tmp_path, **kw):  # noqa: F811
    base = dict(spans=3, left=6, span_length=4, right=5, samplers=["ancestral", "confidence"], steps=0,
                temperature=0.0, batch_size=2)
    base.update(kw)
    return common_args(ctx.model_dir, tmp_path, **base)


def test_oracle_denoiser_fills_every_span(ctx, tmp_path):  # noqa: F811
    from eval.heldout import heldout_sequences

    blocks = heldout_sequences(ctx.data, ctx.tokenizer, 15, 3)
    vocab = ctx.model.get_output_embeddings().weight.shape[0]
    oracle = dataclasses.replace(ctx, denoiser=OracleDenoiser(blocks, vocab, ctx.meta.mask_token_id))
    result = run(oracle, _args(ctx, tmp_path))
    by = {r["method"]: r for r in result["rows"]}
    for name in ("truth", "ancestral", "confidence"):
        assert by[name]["exact_match"] == 1.0 and by[name]["token_accuracy"] == 1.0, name
    # the same fill scores the same under the judge as the truth
    assert abs(by["ancestral"]["fill_ppl"]["ppl"] - by["truth"]["fill_ppl"]["ppl"]) < 1e-6
    assert by["confidence"]["nfe"] == 2 * 4  # two batches, one call per span token (steps = span length)
    assert "parent (left context only)" in by


def test_parent_fill_ignores_the_right_context(ctx, tmp_path):  # noqa: F811
    """Changing the text after the span must not change the parent's greedy fill."""
    from eval.heldout import heldout_sequences
    from eval.infill import parent_fill

    args = _args(ctx, tmp_path)
    blocks = heldout_sequences(ctx.data, ctx.tokenizer, 15, 3)
    other = blocks.clone()
    other[:, 10:] = torch.flip(other[:, 10:], dims=[0])
    a, _ = parent_fill(ctx, blocks, args)
    b, _ = parent_fill(ctx, other, args)
    assert a.shape == (3, 4) and torch.equal(a, b)
