"""curve.png from a run's metrics.jsonl: rows as MetricsLog writes them (adapt run with eval_every, an SFT run
with its answers' share), the points drawn, the standalone command, and a run without matplotlib."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from adapt import curve as curve_command
from adapt.train import curve
from adapt.train.metrics import MetricsLog

STEP_TOKENS = 2 * 1 * 1 * 64  # micro batch x accumulation x ranks x block size


def bound(prefix: str, ppl: float) -> dict:
    return {f"{prefix}nll": 0.0, f"{prefix}ppl": ppl, f"{prefix}ci95": 0.1, f"{prefix}ppl_low": ppl * 0.9,
            f"{prefix}ppl_high": ppl * 1.1, f"{prefix}tokens": 126}


def write_run(run_dir: Path, sft: bool = False) -> None:
    """metrics.jsonl of a 6-step run with eval_every=3, written through MetricsLog as the stages do."""
    log = MetricsLog(run_dir, False, True)
    first = bound("before_", 900.0) | ({} if sft else {"parent_ppl": 40.0, "parent_nll": 3.7}
                                        | bound("before_causal_", 60.0))
    if sft:
        first |= bound("before_answer_", 700.0)
    log.record(0, first, "eval")
    step = {"loss": 5.0, "masked_tokens": 30, "lr": 1e-4, "anneal_ratio": 1.0, "grad_norm": 1.0,
            "tokens": STEP_TOKENS, "seconds": 0.2, "skipped": False}
    for s in range(1, 7):
        log.status(s, [step])
        if s == 3:
            log.record(3, bound("", 500.0) | (bound("answer_", 400.0) if sft else {}), "eval")
    log.record(6, bound("after_", 300.0) | (bound("after_answer_", 200.0) if sft else {}), "eval")
    log.record(6, {"parent_ppl": 40.0, "after_ppl": 300.0, "export": "x"}, "summary")


def test_adapt_run_curve(tmp_path):
    write_run(tmp_path)
    out = curve.draw(tmp_path)
    assert out["path"] == tmp_path / "curve.png" and out["path"].read_bytes()[:4] == b"\x89PNG"
    assert out["points"] == {"bound": [(0.0, 900.0), (3.0 * STEP_TOKENS, 500.0), (6.0 * STEP_TOKENS, 300.0)],
                             "causal bound": [(0.0, 60.0)]}
    assert out["parent_ppl"] == 40.0


def test_sft_run_curve_has_the_answers_share(tmp_path):
    write_run(tmp_path, sft=True)
    out = curve.draw(tmp_path, tmp_path / "other.png")
    assert out["points"]["answer bound"] == [(0.0, 700.0), (3.0 * STEP_TOKENS, 400.0), (6.0 * STEP_TOKENS, 200.0)]
    assert out["parent_ppl"] is None and (tmp_path / "other.png").read_bytes()[:4] == b"\x89PNG"


def test_standalone_command_redraws(tmp_path, capsys):
    write_run(tmp_path)
    assert curve_command.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert curve_command.main([str(empty)]) == 1 and "no held-out evaluation" in capsys.readouterr().err
    assert curve_command.main([]) == 2


def test_without_matplotlib_one_line_and_no_file(tmp_path, monkeypatch):
    write_run(tmp_path)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    lines = []
    assert curve.try_draw(tmp_path, lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("curve.png skipped: matplotlib is not installed")
    assert not (tmp_path / "curve.png").exists()


def test_train_records_carry_the_step_tokens(tmp_path):
    write_run(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows if r["kind"] == "train"] == [STEP_TOKENS] * 6
    with pytest.raises(curve.CurveError):
        curve.draw(tmp_path / "missing")


def test_several_runs_on_one_figure(tmp_path, capsys):
    a, b, empty = tmp_path / "a", tmp_path / "b", tmp_path / "empty"
    for folder in (a, b, empty):
        folder.mkdir()
    write_run(a)
    write_run(b, sft=True)
    out = curve.draw_runs([a, b], tmp_path / "both.png")
    assert out["points"] == {"a": [(0.0, 900.0), (3.0 * STEP_TOKENS, 500.0), (6.0 * STEP_TOKENS, 300.0)],
                             "b": [(0.0, 900.0), (3.0 * STEP_TOKENS, 500.0), (6.0 * STEP_TOKENS, 300.0)]}
    assert out["parent_ppl"] == 40.0 and (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
    assert curve_command.main([str(a), str(b), "--out", str(tmp_path / "cli.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli.png")
    assert curve_command.main([str(a), str(empty), "--out", str(tmp_path / "x.png")]) == 1
    assert "no held-out evaluation" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    assert curve_command.main([str(a), str(b)]) == 2 and "usage" in capsys.readouterr().err  # several runs need --out


def test_the_final_summary_names_each_bound_without_claiming_an_attention(tmp_path, capsys):
    """The closing summary prints every bound it has with its interval; the objective's attention (a block mask
    for block diffusion) is named as such, never as bidirectional."""
    log = MetricsLog(tmp_path, False, True)
    log.final({"export": "x", "parent_ppl": 40.0} | bound("before_causal_", 60.0) | bound("before_", 900.0)
              | bound("after_", 300.0))
    out = capsys.readouterr().out
    assert "exact held-out perplexity:      40.00" in out
    assert "before adaptation, causal attention:" in out and "<= 60.00 (95% CI 54.00-66.00)" in out
    assert "before adaptation, objective's attention:" in out and "<= 900.00 (95% CI 810.00-990.00)" in out
    assert "bound after adaptation:" in out and "<= 300.00 (95% CI 270.00-330.00)" in out
    assert "bidirectional" not in out
