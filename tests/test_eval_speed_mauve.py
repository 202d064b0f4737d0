"""eval.speed on the tiny model and eval.mauve_score: skips with a reason, and scores known cases."""
from __future__ import annotations

import json

import pytest
from test_eval_fixtures import common_args, ctx, exported_dir  # noqa: F401


def test_speed_rows_and_table(ctx, tmp_path):  # noqa: F811
    from eval import speed

    args = common_args(ctx.model_dir, tmp_path, samplers=["ancestral", "confidence"], steps=[2, 0], lengths=[4, 8],
                       prompt_length=4, batch_size=2, repeats=2)
    result = speed.run(ctx, args)
    rows = result["rows"]
    assert len(rows) == 2 * (1 + 2 * 2)
    for r in rows:
        assert len(r["latency_s_all"]) == 2 and r["tokens_per_s"] == pytest.approx(2 * r["length"] / r["latency_s"])
    conf = {(r["length"], r["steps"]): r["nfe"] for r in rows if r["sampler"] == "confidence"}
    assert conf[(8, 8)] == 8 and conf[(8, 2)] == 2  # steps 0 = one step (one call) per token
    lines = speed.table(rows)
    assert len(lines) == 2 + len(rows) and "parent (KV cache)" in lines[2]


def _samples(path, good: list[str], bad: list[str]):
    recs = [{"mode": "prompted", "source": "heldout", "index": i, "prompt": "", "text": t} for i, t in enumerate(good)]
    recs += [{"mode": "prompted", "source": "same", "index": i, "prompt": "", "text": t} for i, t in enumerate(good)]
    recs += [{"mode": "prompted", "sampler": "junk", "steps": 4, "index": i, "prompt": "", "text": t}
             for i, t in enumerate(bad)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_mauve_skips_with_a_reason_without_featurizer(tmp_path):
    from eval.mauve_score import main

    path = _samples(tmp_path / "generation_samples.jsonl", ["a b c"] * 4, ["x"] * 4)
    result = main([str(path), "--featurizer", str(tmp_path / "no_such_model")])
    assert result["skipped"].startswith("MAUVE skipped")
    assert json.loads((tmp_path / "mauve.json").read_text())["skipped"] == result["skipped"]


def test_mauve_score_on_known_features():
    """Two samples of one distribution score near 1; a shifted distribution scores near 0.

    (Exactly identical sets are avoided: mauve-text 0.4 can return 0.75 for identical histograms,
    a rounding effect in its divergence curve.)"""
    pytest.importorskip("mauve")
    import numpy as np

    from eval.mauve_score import score

    rng = np.random.default_rng(0)
    p, q = (rng.normal(size=(200, 8)).astype(np.float32) for _ in range(2))
    same, _ = score(p, q, seeds=2)
    far, _ = score(p, q + 4.0, seeds=2)
    assert same > 0.9 and far < 0.2, (same, far)


def test_mauve_end_to_end_with_a_local_featurizer(tmp_path, tiny_model_dir):
    pytest.importorskip("mauve")
    from eval.mauve_score import measure

    good = [f"Sentence {i} is about {w}" for i, w in enumerate(["rivers", "music", "history", "plants"] * 5)]
    path = _samples(tmp_path / "generation_samples.jsonl", good, [("zz " * (1 + i % 5)).strip() for i in range(20)])
    result = measure(path, str(tiny_model_dir), seeds=2, max_tokens=32)
    assert result["human"] == 20 and {r["source"] for r in result["rows"]} == {"same", "junk (4 steps)"}
    assert all(0.0 <= r["mauve"] <= 1.0 for r in result["rows"])
