"""Every eval/ and bench/ script runs from its command line at a tiny size and writes its output file, so
none can rot unseen. The speed and quality targets live in the benchmarks; nothing here asserts a speed."""
from __future__ import annotations

import json
import time

import pytest
import torch
from cli_runner import run_fresh
from test_eval_fixtures import exported_dir  # noqa: F401

TINY = {  # script -> (options, files it writes)
    "likelihood": (["--blocks", "2", "--length", "16", "--t-samples", "2", "--replicates", "2"], ["likelihood.json"]),
    "generation": (["--samplers", "confidence", "--steps", "2", "--samples", "2", "--length", "6", "--prompt-length",
                    "4", "--gen-length", "4", "--batch-size", "2"],
                   ["generation.json", "generation.png", "generation_samples.jsonl"]),
    "infill": (["--spans", "2", "--left", "4", "--span-length", "2", "--right", "2", "--samplers", "confidence"],
               ["infill.json"]),
    "speed": (["--samplers", "confidence", "--steps", "2", "--lengths", "4", "--repeats", "1", "--prompt-length", "4"],
              ["speed.json", "speed.png"]),
    "local_tasks": (["--tasks", "adapt_cloze", "--limit", "2", "--mc-samples", "2", "--batch-size", "4"],
                    ["harness.json", "task_data/cloze.jsonl"]),
}


@pytest.fixture(scope="module")
def outputs(exported_dir, tmp_path_factory):  # noqa: F811
    """One out dir written by the command line of every script that takes MODEL_DIR; seconds per script."""
    import importlib

    out = tmp_path_factory.mktemp("scripts")
    seconds = {}
    for name, (options, _) in TINY.items():
        start = time.perf_counter()
        importlib.import_module(f"eval.{name}").main([str(exported_dir), "--out-dir", str(out), "--device", "cpu",
                                                      "--seed", "1", *options])
        seconds[name] = time.perf_counter() - start
    return out, seconds


@pytest.mark.parametrize("name", list(TINY))
def test_each_script_writes_its_files_with_the_options_it_ran(outputs, exported_dir, name):  # noqa: F811
    out, seconds = outputs
    for file in TINY[name][1]:
        assert (out / file).is_file() and (out / file).stat().st_size > 0, file
    result = json.loads((out / TINY[name][1][0]).read_text())
    prov = result["provenance"]
    assert prov["model_dir"] == str(exported_dir) and prov["seed"] == 1 and prov["options"]["out_dir"] == str(out)
    assert prov["machine"]["torch"]
    print(f"{name}: {seconds[name]:.1f} s")


def test_likelihood_defaults_to_the_masked_count_estimator(outputs):
    result = json.loads((outputs[0] / "likelihood.json").read_text())
    assert result["elbo"]["method"] == "count" and list(result["methods"]) == ["count", "stratified"]
    assert result["elbo"]["tokens"] == 2 * 15 and result["variance"]["replicates"] == 2
    assert result["methods"]["count"]["model_calls"] == 2  # 2 blocks x 2 draws fit one batch: a call per replicate


def test_mauve_and_report_read_the_folder(outputs, tmp_path):
    from eval import mauve_score, report

    out, _ = outputs
    result = mauve_score.main(["--out-dir", str(out), "--featurizer", str(tmp_path / "no_featurizer")])
    assert result["skipped"].startswith("MAUVE skipped") and (out / "mauve.json").is_file()
    text = report.main([str(out)]).read_text()
    for heading in ("## Held-out perplexity", "## Generation quality", "## Infilling", "## lm-evaluation-harness",
                    "## MAUVE", "## Sampling speed"):
        assert heading in text, heading


def bench_module(name: str):
    """bench/<name>.py loaded as a module (bench/ holds scripts, not a package)."""
    import importlib.util

    from cli_runner import ROOT

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_sampling_speed_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    bench = bench_module("sampling_speed")
    out = tmp_path / "speed.json"
    assert bench.main(["--model", str(tiny_model_dir), "--length", "4", "--steps", "2", "--block-length", "2",
                       "--prompt-tokens", "4", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["label"] for r in result["samplers"]] == [
        c[0].replace("tau", "tau=0.9").replace("blocks", "blocks of 2").replace("block export", "block export b=8")
        for c in bench.CONFIGS if "draft_head" not in c[2]]  # the row without a draft head: only when there is one
    assert all(r["nfe"] >= 1 for r in result["samplers"]) and len(result["prefix_cache_quality"]) == 4
    assert "overhead target" in capsys.readouterr().out
    # fewer steps than the blocks of 2 the 4 new tokens span: one error line and exit 2, not a traceback
    assert bench.main(["--model", str(tiny_model_dir), "--length", "4", "--steps", "1", "--block-length", "2",
                       "--prompt-tokens", "4", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: 1 steps cannot cover 2 blocks") and "Traceback" not in err


def test_bench_adapt_step_on_a_tiny_model(tiny_model_dir, tmp_path):
    """The nine variants (causal, annealed, bidirectional, block diffusion, the joint causal term on the
    bidirectional and the block step, distillation from the parent on the bidirectional step and on the block step
    off and on policy) on the tiny model, in one process; --only runs a subset and the baseline."""
    out = tmp_path / "step.json"
    res = run_fresh(["bench/adapt_step.py", "--model", str(tiny_model_dir), "--batch", "2", "--length", "16",
                     "--steps", "1", "--dtype", "fp32", "--in-process", "--json", str(out)])
    assert res.code == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"causal", "anneal", "bidirectional", "block", "ar", "kd", "blockar", "blockkd",
                            "blockopd"}
    assert results["causal"]["speed_ratio"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 for r in results.values())
    assert "joint causal term (alpha=0.3) vs block" in res.stdout
    assert "on-policy distillation from the parent vs block" in res.stdout
    assert "distillation from the parent vs bidirectional" in res.stdout
    res = run_fresh(["bench/adapt_step.py", "--model", str(tiny_model_dir), "--batch", "2", "--length", "16",
                     "--steps", "1", "--dtype", "fp32", "--in-process", "--only", "block", "--json", str(out)])
    assert res.code == 0, res.stderr[-3000:]
    assert set(json.loads(out.read_text())["results"]) == {"causal", "block"} and "vs block" not in res.stdout



def test_bench_block_length_on_a_tiny_model(tiny_model_dir, tmp_path):
    """The b table of an unconverted causal LM: at b = 1 the bound is its exact perplexity, whichever clean stream;
    the clean streams differ at b = 4."""
    bench, nll = bench_module("block_length"), {}
    for clean in ("block", "causal"):
        out = tmp_path / f"{clean}.json"
        assert bench.main(["--model", str(tiny_model_dir), "--lengths", "1", "4", "0", "--blocks", "2", "--length",
                           "16", "--draws", "1", "--batch", "2", "--clean-attention", clean, "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        for part in ("in_domain", "out_of_domain"):
            assert set(result[part]) == {"parent", "b=1", "b=4", "b=L"}
            assert abs(result[part]["b=1"]["nll"] - result[part]["parent"]["nll"]) < 1e-5
        nll[clean] = result["in_domain"]["b=4"]["nll"]
    assert abs(nll["block"] - nll["causal"]) > 1e-4
    assert bench.main(["--model", str(tiny_model_dir), "--lengths", "5"]) == 2
    out = tmp_path / "offsets.json"  # the split by place in blocks of 4 adds up to the whole bound
    assert bench.main(["--model", str(tiny_model_dir), "--lengths", "4", "--blocks", "2", "--length", "16", "--draws",
                       "1", "--batch", "2", "--offsets", "4", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["in_domain"]["b=4"]
    parts = [(row[f"offset{o}_nll"], row[f"offset{o}_tokens"]) for o in range(4)]
    assert [n for _, n in parts] == [2 * 3, 2 * 4, 2 * 4, 2 * 4]  # position 0 is never scored
    # float32 sums of ~10.8 nats: a relative 1e-6 is a few ulp; a wrong split is off by whole nats
    assert sum(v * n for v, n in parts) / row["tokens"] == pytest.approx(row["nll"], rel=1e-6, abs=0)
    assert len({round(v, 6) for v, _ in parts}) == 4


def test_bench_loss_variance_on_a_tiny_model(tiny_model_dir, tmp_path):
    """The levers' training losses on paired draws: the base lever is the reference of the ratios, a clipped range
    moves the mean, and a bad lever or batch exits 2."""
    bench, out = bench_module("loss_variance"), tmp_path / "var.json"
    assert bench.main(["--model", str(tiny_model_dir), "--levers", "base", "tclip", "perblock+complementary",
                       "--t-min", "0.6", "--t-max", "0.9", "--draws", "4", "--batch", "2", "--pool", "2",
                       "--length", "16", "--json", str(out)]) == 0
    levers = json.loads(out.read_text())["levers"]
    assert set(levers) == {"base", "tclip", "perblock+complementary"} and "var_ratio" not in levers["base"]
    low, high = levers["tclip"]["var_ratio_ci95"]
    assert low <= levers["tclip"]["var_ratio"] <= high and levers["tclip"]["mean"] != levers["base"]["mean"]
    assert all(row["draws"] == 4 and row["var"] > 0 for row in levers.values())
    assert bench.main(["--model", str(tiny_model_dir), "--levers", "base", "complementary", "--draws", "3",
                       "--batch", "2", "--pool", "2", "--length", "16", "--fixed-data", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["args"]["fixed_data"] is True
    assert bench.main(["--model", str(tiny_model_dir), "--levers", "base", "nope"]) == 2
    assert bench.main(["--model", str(tiny_model_dir), "--batch", "3"]) == 2


def test_bench_gpu_check_smoke_run_on_cpu(tiny_model_dir, tmp_path, capsys):
    """The prepared GPU run at --tiny on CPU: random weights of the given shape, each check in its own process,
    one report with the step and decoding figures; a shape folder without config.json is one error line."""
    bench = bench_module("gpu_check")
    assert bench.main(["--shape", str(tiny_model_dir), "--out", str(tmp_path), "--tiny", "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(result["checks"]) == {"decode_batch1", "step_sdpa", "decode_big"}
    assert all(c["ok"] for c in result["checks"].values())
    assert set(result["step_a"]["results"]) == {"causal", "block"} and result["decode_b"]["args"]["batch"] == 2
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| step_a | block |" in text and "| decode_b | parent `generate`, batch 2 |" in text
    assert bench.main(["--shape", str(tmp_path), "--out", str(tmp_path), "--tiny", "--device", "cpu"]) == 2
    assert "has no config.json" in capsys.readouterr().err


@torch.no_grad()
def test_bench_gpu_check_flex_block_mask_matches_dense_where_flex_is_trusted(tiny_model_dir):
    """The GPU run's FlexAttention check on CPU where this CPU's compiled flex passes its own check; it must find
    the two block masks (both clean streams) equal to the dense ones."""
    from adapt.model.attention import flex_problem

    if flex_problem("cpu", 8, ((16, 8),)) is not None:
        pytest.skip("compiled flex_attention is wrong on this CPU (adapt.model.attention.flex_problem)")
    res = bench_module("gpu_check").flex_check(tiny_model_dir, "cpu", 8, 2)
    assert set(res["max_abs_diff"]) == {"block clean", "causal clean"} and res["logit_scale"] > 0
    assert max(res["max_abs_diff"].values()) < 1e-4
