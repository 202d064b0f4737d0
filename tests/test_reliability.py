"""Faults during training, each proven to have happened: kill -9 (also while saving), Ctrl-C, SIGTERM, a second
Ctrl-C, non-finite losses and weights, a second launch on the same folder, and a resume with a longer run.

Two-rank faults (a NaN or a full disk on one rank, a stalled rank) are in tests/test_reliability_ranks.py,
damaged checkpoints and the export in tests/test_checkpoint_integrity.py.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_pipeline import RECIPE, launch, losses, tiny_run_args

from conftest import FAULT_RUN as COMMON

pytestmark = pytest.mark.slow


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def same_as_reference(run_dir: Path, reference: Path) -> None:
    """Every step's loss (the last value logged for it) and the final weights equal the uninterrupted run's."""
    ref, got = losses(reference), losses(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, 7)), (got, ref)
    assert all(got[s] == ref[s] for s in ref), (got, ref)
    a, b = _weights(run_dir / "final"), _weights(reference / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Run:
    """adapt/run.py in the background on the tiny model; stdout and stderr are read while it runs (a full
    pipe would block it), thread counts pinned as `launch` pins them."""

    def __init__(self, root: Path, model_dir: Path, corpus: Path, *overrides: str, env: dict | None = None):
        args = tiny_run_args(root, model_dir, corpus, *COMMON, *overrides)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "adapt" / "run.py"), str(RECIPE), *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", **(env or {})})
        self.err: list[str] = []
        self.out: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(pipe, sink), daemon=True)
                         for pipe, sink in ((self.proc.stderr, self.err), (self.proc.stdout, self.out))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(pipe, sink: list[str]) -> None:
        for line in pipe:
            sink.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, condition, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended early ({self.proc.returncode}): {self.stderr[-3000:]}")
            if time.time() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for the run: {self.stderr[-3000:]}")
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code


def complete(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"step_{step:07d}" / "COMPLETE").exists()


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
    assert "resumed from" in out.stderr and "step_0000002 at step 2" in out.stderr  # not the half-written step 4
    same_as_reference(tmp_path / "debug", reference)


def test_kill_9_at_a_random_moment_loses_nothing(reference, tmp_path, tiny_model_dir, corpus_file):
    """A different moment on every run (printed, to replay a failure), always after the first checkpoint."""
    moment = random.uniform(0.0, 2.5)
    print(f"kill -9 at {moment:.2f} s after the first checkpoint")
    first = Run(tmp_path, tiny_model_dir, corpus_file, env={"ADAPT_FAULT_STEP_DELAY_S": "0.5"})
    first.wait_for(lambda: complete(tmp_path / "debug", 2))
    time.sleep(moment)
    assert first.proc.poll() is None, "the run ended before it was killed"
    first.proc.kill()
    assert first.finish() == -signal.SIGKILL
    out = launch(tmp_path, tiny_model_dir, corpus_file, *COMMON)
    assert "resumed from" in out.stderr
    same_as_reference(tmp_path / "debug", reference)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_saves_and_exits_cleanly(reference, tmp_path, tiny_model_dir, corpus_file, signum):
    """No periodic checkpoint (save_every=0): the only one before the end is the signal's own."""
    run = Run(tmp_path, tiny_model_dir, corpus_file, "train.save_every=0", env={"ADAPT_FAULT_STEP_DELAY_S": "0.5"})
    metrics = tmp_path / "debug" / "metrics.jsonl"
    run.wait_for(lambda: metrics.exists() and '"kind": "train"' in metrics.read_text())
    run.proc.send_signal(signum)
    assert run.finish() == 0, run.stderr[-3000:]
    assert "rerun the same command to resume" in run.stderr and "Traceback" not in run.stderr
    tags = [p.name for p in (tmp_path / "debug" / "checkpoints").glob("step_*") if (p / "COMPLETE").exists()]
    assert len(tags) == 1 and tags[0] != "step_0000006" and f"saved {tmp_path / 'debug' / 'checkpoints' / tags[0]}" \
        in run.stderr, (tags, run.stderr[-2000:])
    assert not (tmp_path / "debug" / "final").exists()
    out = launch(tmp_path, tiny_model_dir, corpus_file, *COMMON, "train.save_every=0")
    assert f"{tags[0]} at step {int(tags[0][5:])}" in out.stderr
    same_as_reference(tmp_path / "debug", reference)


def test_sigterm_before_the_first_step_stops_with_one_message_and_releases_the_lock(tmp_path, tiny_model_dir,
                                                                                  corpus_file):
    """The signal lands in the evaluation before training (held open by a fault hook): nothing to save, so the
    launch stops at once, says so, exits 128 + SIGTERM and leaves no LOCK; the same command then starts afresh."""
    run = Run(tmp_path, tiny_model_dir, corpus_file, env={"ADAPT_FAULT_EVAL_DELAY_S": "120"})
    run.wait_for(lambda: "a training sequence at t=0.5" in run.stderr)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout=60) == 128 + signal.SIGTERM, run.stderr[-3000:]
    assert "stopped by SIGTERM before the first training step" in run.stderr and "Rerun the same command" \
        in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "debug" / "LOCK").exists()
    assert not list((tmp_path / "debug").glob("checkpoints/step_*"))
    out = launch(tmp_path, tiny_model_dir, corpus_file, *COMMON)
    assert "resumed from" not in out.stderr and complete(tmp_path / "debug", 6)


def test_a_stop_after_the_last_step_says_so_and_the_run_still_finishes(tmp_path, tiny_model_dir, corpus_file):
    """SIGTERM during the evaluation after training (held open by a fault hook): the last checkpoint is already
    saved, so the message says the evaluation and export are being finished (not that a checkpoint is being
    saved), and the run ends normally with its export."""
    run = Run(tmp_path, tiny_model_dir, corpus_file, env={"ADAPT_FAULT_EVAL_DELAY_S": "3"})
    run.wait_for(lambda: "step 6/6" in run.stderr and complete(tmp_path / "debug", 6))
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.stderr[-3000:]
    err = run.stderr
    assert "stop requested after the last step, whose checkpoint is saved" in err, err[-3000:]
    assert "saving a checkpoint" not in err and "Traceback" not in err
    assert (tmp_path / "debug" / "final" / "model.safetensors").is_file()


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, tiny_model_dir, corpus_file):
    """The first Ctrl-C arrives while a step hangs (fault hook); the second aborts it instead of waiting."""
    run = Run(tmp_path, tiny_model_dir, corpus_file, env={"ADAPT_FAULT_STALL_STEPS": "3"})
    run.wait_for(lambda: complete(tmp_path / "debug", 2) and "step 3/6" in run.stderr)
    run.proc.send_signal(signal.SIGINT)
    run.wait_for(lambda: "stop requested" in run.stderr)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=60) == 130, run.stderr[-3000:]
    assert "interrupted again" in run.stderr and "Traceback" not in run.stderr
    ckpts = tmp_path / "debug" / "checkpoints"
    assert [p.name for p in ckpts.glob("step_*")] == ["step_0000002"]  # nothing saved after the first Ctrl-C


def test_a_second_launch_on_the_same_folder_is_refused_and_a_dead_holder_is_taken_over(
        reference, tmp_path, tiny_model_dir, corpus_file):
    first = Run(tmp_path, tiny_model_dir, corpus_file, env={"ADAPT_FAULT_STALL_STEPS": "3"})  # hangs at step 4
    first.wait_for(lambda: complete(tmp_path / "debug", 2) and "step 3/6" in first.stderr)
    second = launch(tmp_path, tiny_model_dir, corpus_file, *COMMON, check=False)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"pid {first.proc.pid} on host" in second.stderr and "in use by another launch" in second.stderr
    exported = subprocess.run([sys.executable, "-m", "adapt.export", str(tmp_path / "debug"), "--tag", "step_0000002",
                               "--out", str(tmp_path / "early")], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=300)
    assert exported.returncode == 0 and (tmp_path / "early" / "model.safetensors").is_file(), exported.stderr[-2000:]
    first.proc.kill()
    first.finish()
    assert (tmp_path / "debug" / "LOCK").exists()  # left by the killed launch
    out = launch(tmp_path, tiny_model_dir, corpus_file, *COMMON)  # its pid is gone: stale, taken over
    assert "step_0000002 at step 2" in out.stderr
    assert not (tmp_path / "debug" / "LOCK").exists()  # released at the end
    same_as_reference(tmp_path / "debug", reference)


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
    from adapt.train.distributed import consolidated_state_dict

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


def test_a_non_finite_weight_is_never_saved(tmp_path, tiny_model_dir, corpus_file):
    """A NaN written into a weight after step 3 (the loss stays finite): the save at step 4 refuses it."""
    os.environ["ADAPT_FAULT_NAN_WEIGHT"] = "2"
    try:
        out = launch(tmp_path, tiny_model_dir, corpus_file, *COMMON, check=False)
    finally:
        del os.environ["ADAPT_FAULT_NAN_WEIGHT"]
    assert out.returncode == 2 and "no longer finite" in out.stderr and "Traceback" not in out.stderr
    ckpts = tmp_path / "debug" / "checkpoints"
    assert [p.name for p in ckpts.glob("step_*")] == ["step_0000002"]
    from adapt.train.distributed import consolidated_state_dict

    assert all(torch.isfinite(v).all() for v in consolidated_state_dict(ckpts, "step_0000002").values())


def test_a_resume_may_lengthen_the_run(tmp_path, tiny_model_dir, corpus_file):
    """train.max_steps is resume-safe: a finished 4-step run continues to 6 from its last checkpoint."""
    launch(tmp_path, tiny_model_dir, corpus_file, *COMMON, "train.max_steps=4")
    out = launch(tmp_path, tiny_model_dir, corpus_file, *COMMON)
    assert "step_0000004 at step 4" in out.stderr
    assert sorted(losses(tmp_path / "debug")) == list(range(1, 7))
    assert json.loads((tmp_path / "debug" / "checkpoints" / "step_0000006" / "COMPLETE").read_text())["step"] == 6


def test_the_offload_recipe_runs_on_cpu(tmp_path, tiny_model_dir, corpus_file):
    """The offload recipe's DeepSpeed settings (ZeRO-3, optimizer and parameters offloaded, DeepSpeedCPUAdam,
    the recipe's JSON) for a few steps, then resumed and exported like any run."""
    from adapt.recipe.load import load_config

    recipe = load_config(str(ROOT / "recipes" / "llama2_7b_to_mdlm_offload.yaml"), [])
    dist = [f"dist.{k}={getattr(recipe.dist, k)}" for k in ("zero_stage", "offload_optimizer", "offload_param")]
    dist.append(f"dist.deepspeed_config={ROOT / recipe.dist.deepspeed_config}")
    launch(tmp_path, tiny_model_dir, corpus_file, *COMMON, *dist, "train.max_steps=2")
    out = launch(tmp_path, tiny_model_dir, corpus_file, *COMMON, *dist, "train.max_steps=3")
    text = out.stdout + out.stderr
    assert "step_0000002 at step 2" in text and "zero stage ZeroStageEnum.weights" in text, text[-3000:]  # ZeRO-3
    saved = (tmp_path / "debug" / "checkpoints" / "step_0000003" / "config.yaml").read_text()
    assert "offload_optimizer: true" in saved and "offload_param: true" in saved  # DeepSpeedCPUAdam, params on CPU
    rows = [json.loads(line) for line in (tmp_path / "debug" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] for r in rows if r["kind"] == "train")  # finite, not NaN
    assert (tmp_path / "debug" / "final" / "model.safetensors").is_file()
