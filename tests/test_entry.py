"""The entry point on bad input: exit code 2, one message naming the fix, nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def run_entry(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "adapt" / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_clean_failure(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr[-3000:])


def test_no_arguments_prints_usage():
    out = run_entry()
    assert out.returncode != 0 and "usage" in (out.stderr + out.stdout)


def test_every_recipe_problem_in_one_message(tmp_path):
    out = run_entry(str(ROOT / "recipes" / "debug.yaml"), "train.max_stpes=3", "optim.lr=fast",
                    "dist.zero_stage=5", f"run.output_dir={tmp_path}")
    assert_clean_failure(out, "train.max_steps", "optim.lr", "dist.zero_stage")
    assert not any(tmp_path.iterdir())


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dtype: bf16\n train: [\n")
    assert_clean_failure(run_entry(str(bad)), "not valid YAML", "line")


def test_missing_model_path_writes_nothing(tmp_path):
    out = run_entry(str(ROOT / "recipes" / "debug.yaml"), f"model.name_or_path={tmp_path / 'nope'}",
                    f"run.output_dir={tmp_path / 'runs'}")
    assert_clean_failure(out, "not found", "HF model folder")
    assert not (tmp_path / "runs").exists()


def test_corpus_smaller_than_one_block_writes_nothing(tmp_path, tiny_model_dir):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("A few words only.\n")
    out = run_entry(str(ROOT / "recipes" / "debug.yaml"), f"model.name_or_path={tiny_model_dir}",
                    f"data.train_files=[{corpus}]", f"data.cache_dir={tmp_path / 'cache'}",
                    f"run.output_dir={tmp_path / 'runs'}")
    assert_clean_failure(out, "smaller than one block", "data.seq_length")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("suffix", [".csv", ".xml"])
def test_unknown_data_format(tmp_path, tiny_model_dir, suffix):
    corpus = tmp_path / f"corpus{suffix}"
    corpus.write_text("text\nhello\n")
    out = run_entry(str(ROOT / "recipes" / "debug.yaml"), f"model.name_or_path={tiny_model_dir}",
                    f"data.train_files=[{corpus}]", f"run.output_dir={tmp_path / 'runs'}")
    assert_clean_failure(out, "unknown data format", ".jsonl")
