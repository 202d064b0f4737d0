"""eval.suite on the tiny model at a tiny budget: every stage runs and the report builds."""
from __future__ import annotations

import json

from test_eval_fixtures import exported_dir  # noqa: F401

TINY = {
    "likelihood": dict(blocks=2, length=16, t_samples=2, replicates=2),
    "generation": dict(samplers=["ancestral"], steps=[2, 4], samples=2, length=8, prompt_length=4, gen_length=6,
                       batch_size=2),
    "infill": dict(spans=2, left=4, span_length=3, right=4, samplers=["confidence"]),
    "harness": dict(tasks=["adapt_cloze", "adapt_choice"], limit=2, mc_samples=2, batch_size=4),
    "mauve": dict(seeds=1, max_tokens=32),
    "speed": dict(samplers=["confidence"], steps=[2], lengths=[4], repeats=1),
}


def test_suite_writes_results_and_report(exported_dir, tmp_path, monkeypatch):  # noqa: F811
    from eval import suite

    monkeypatch.setattr(suite, "BUDGETS", {"tiny": TINY})
    out = tmp_path / "out"
    code = suite.main([str(exported_dir), "--out-dir", str(out), "--budget", "tiny",
                       "--mauve-featurizer", str(tmp_path / "missing")])
    assert code == 0
    for name in ("likelihood", "generation", "infill", "harness", "mauve", "speed", "suite"):
        assert (out / f"{name}.json").is_file(), name
    summary = json.loads((out / "suite.json").read_text())
    assert summary["errors"] == {} and set(summary["stage_seconds"]) == set(suite.STAGES)
    report = (out / "report.md").read_text()
    for heading in ("## Held-out perplexity", "## Generation quality", "## Infilling", "## lm-evaluation-harness",
                    "## MAUVE", "## Sampling speed", "![steps / quality frontier](generation.png)"):
        assert heading in report, heading
    assert "MAUVE skipped" in report
    harness = json.loads((out / "harness.json").read_text())
    assert set(harness["results"]) == {"diffusion (ELBO)", "parent"}
    assert 0.0 <= harness["results"]["parent"]["adapt_choice"]["acc"] <= 1.0


def test_a_failing_stage_is_reported_and_others_run(exported_dir, tmp_path, monkeypatch):  # noqa: F811
    from eval import suite

    monkeypatch.setattr(suite, "BUDGETS", {"tiny": {**TINY, "infill": dict(spans=10 ** 6, left=4, span_length=3,
                                                                         right=4, samplers=["confidence"])}})
    out = tmp_path / "out"
    code = suite.main([str(exported_dir), "--out-dir", str(out), "--budget", "tiny",
                       "--skip", "generation", "harness", "mauve", "speed"])
    assert code == 1
    summary = json.loads((out / "suite.json").read_text())
    assert set(summary["errors"]) == {"infill"} and "held-out text makes" in summary["errors"]["infill"]
    assert (out / "likelihood.json").is_file()
    assert "**infill failed**" in (out / "report.md").read_text()
