"""Faults during training: non-finite losses, kill -9 (also while saving), Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_pipeline import RECIPE, launch, losses

COMMON = ("train.max_steps=6", "train.save_every=2", "attention.anneal_steps=2", "optim.lr=1e-3",
          "optim.warmup_steps=0")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, corpus_file) -> Path:
    """An uninterrupted run to compare the faulty ones against."""
    root = tmp_path_factory.mktemp("reference")
    launch(root, tiny_model_dir, corpus_file, *COMMON)
    return root / "debug"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _same_as_reference(run_dir: Path, reference: Path) -> None:
    ref, got = losses(reference), losses(run_dir)
    assert all(got[s] == ref[s] for s in range(1, 7) if s in got), (got, ref)
    a, b = _weights(run_dir / "final"), _weights(reference / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_while_saving_resumes_from_the_last_complete_checkpoint(reference, tmp_path, tiny_model_dir,
                                                                     corpus_file):
    os.environ["ADAPT_FAULT_KILL_IN_SAVE"] = "4"
    try:
        out = launch(tmp_path, tiny_model_dir, corpus_file, *COMMON, check=False)
    finally:
        del os.environ["ADAPT_FAULT_KILL_IN_SAVE"]
    assert out.returncode == -signal.SIGKILL
    ckpts = tmp_path / "debug" / "checkpoints"
    assert (ckpts / "step_0000004").is_dir() and not (ckpts / "step_0000004" / "COMPLETE").exists()
    out = launch(tmp_path, tiny_model_dir, corpus_file, *COMMON, f"data.cache_dir={tmp_path / 'cache'}")
    assert "step_0000002 at step 2" in out.stderr  # the half-written step 4 was not picked up
    _same_as_reference(tmp_path / "debug", reference)


def test_kill_9_at_a_random_moment_loses_nothing(reference, tmp_path, tiny_model_dir, corpus_file):
    import random

    first = _start(tmp_path, tiny_model_dir, corpus_file)
    _wait_for(lambda: (tmp_path / "debug" / "checkpoints" / "step_0000002" / "COMPLETE").exists(), first)
    time.sleep(random.Random(0).uniform(0.0, 3.0))
    first.kill()
    first.wait()
    launch(tmp_path, tiny_model_dir, corpus_file, *COMMON)
    _same_as_reference(tmp_path / "debug", reference)


def test_ctrl_c_saves_and_exits_cleanly(reference, tmp_path, tiny_model_dir, corpus_file):
    proc = _start(tmp_path, tiny_model_dir, corpus_file)
    metrics = tmp_path / "debug" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and '"kind": "train"' in metrics.read_text(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "rerun the same command to resume" in err and "Traceback" not in err
    tags = [p for p in (tmp_path / "debug" / "checkpoints").glob("step_*") if (p / "COMPLETE").exists()]
    assert tags, "Ctrl-C left no complete checkpoint"
    launch(tmp_path, tiny_model_dir, corpus_file, *COMMON)
    _same_as_reference(tmp_path / "debug", reference)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, tiny_model_dir, corpus_file):
    os.environ["ADAPT_FAULT_NAN_STEPS"] = "2,3"
    try:
        out = launch(tmp_path, tiny_model_dir, corpus_file, *COMMON, "train.save_every=1", "train.keep_last=10")
    finally:
        del os.environ["ADAPT_FAULT_NAN_STEPS"]
    assert "update skipped (2 in a row" in out.stderr
    rows = [json.loads(line) for line in (tmp_path / "debug" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped"] for r in rows if r["kind"] == "train"}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 0, 6: 0}
    from adapt.distributed import consolidated_state_dict

    ckpts = tmp_path / "debug" / "checkpoints"
    w2, w4 = consolidated_state_dict(ckpts, "step_0000002"), consolidated_state_dict(ckpts, "step_0000004")
    assert all(torch.equal(w2[k], w4[k]) for k in w2)  # the skipped steps changed no weight
    w5 = consolidated_state_dict(ckpts, "step_0000005")
    assert any(not torch.equal(w4[k], w5[k]) for k in w4)


def test_too_many_non_finite_steps_stop_the_run(tmp_path, tiny_model_dir, corpus_file):
    os.environ["ADAPT_FAULT_NAN_STEPS"] = "2,3"
    try:
        out = launch(tmp_path, tiny_model_dir, corpus_file, *COMMON, "train.max_bad_steps=2", check=False)
    finally:
        del os.environ["ADAPT_FAULT_NAN_STEPS"]
    assert out.returncode == 2 and "train.max_bad_steps" in out.stderr and "Traceback" not in out.stderr
    ckpts = tmp_path / "debug" / "checkpoints"
    assert [p.name for p in ckpts.glob("step_*")] == ["step_0000002"]
    assert not (tmp_path / "debug" / "final").exists()


def _start(root: Path, model_dir: Path, corpus: Path) -> subprocess.Popen:
    args = [f"model.name_or_path={model_dir}", "model.dtype=fp32", f"data.train_files=[{corpus}]",
            f"data.cache_dir={root / 'cache'}", f"run.output_dir={root}", "train.log_every=1",
            "run.sample_length=4", "run.sample_steps=2", *COMMON]
    return subprocess.Popen([sys.executable, str(ROOT / "adapt" / "run.py"), str(RECIPE), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)
