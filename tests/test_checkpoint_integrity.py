"""Verified checkpoints and exports: COMPLETE records every file's size and sha256; a truncated, altered or
deleted file makes a checkpoint damaged; resume falls back to the previous intact one, `adapt.export --tag`
of a damaged one fails naming the file; an export killed half-way leaves the previous export as it was;
the pickle and trust_remote_code gates; the run lock's staleness across hosts."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapt.train import checkpoint, runlock
from adapt.export import export, export_problem
from conftest import ROOT
from test_pipeline import launch
from test_reliability import COMMON, same_as_reference


def _damage(folder: Path, how: str) -> str:
    """Break one recorded file of a checkpoint; returns its name."""
    files = sorted(json.loads((folder / checkpoint.COMPLETE).read_text())["files"])
    name = next(n for n in files if n.endswith("optim_states.pt"))
    path = folder / name
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    return name


@pytest.fixture
def run_copy(reference, tmp_path) -> Path:
    """A copy of the finished reference run (checkpoints step_4 and step_6, keep_last 2), its lock released."""
    dest = tmp_path / "debug"
    shutil.copytree(reference, dest, ignore=shutil.ignore_patterns("LOCK"))
    return dest


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_every_kind_of_damage_is_found_and_named(run_copy, how):
    folder = checkpoint.ckpt_root(run_copy) / "step_0000006"
    assert checkpoint.damage(folder) is None
    name = _damage(folder, how)
    problem = checkpoint.damage(folder)
    assert problem is not None and name in problem
    assert {"truncate": "bytes", "flip": "checksum", "delete": "missing"}[how] in problem
    if how != "flip":  # sizes are checked by every rank, checksums by the rank whose share holds the file
        assert checkpoint.damage(folder, (1, 2)) is not None
    with pytest.raises(checkpoint.CheckpointError, match=name):
        export(run_copy, tag="step_0000006", out=run_copy / "again")
    assert not (run_copy / "again").exists()


def test_resume_skips_a_damaged_checkpoint_for_the_previous_one(reference, run_copy, tiny_model_dir,
                                                                corpus_file):
    name = _damage(checkpoint.ckpt_root(run_copy) / "step_0000006", "flip")
    shutil.rmtree(run_copy / "final")
    out = launch(run_copy.parent, tiny_model_dir, corpus_file, *COMMON)
    assert f"skipping damaged checkpoint step_0000006: {checkpoint.ckpt_root(run_copy) / 'step_0000006' / name}" \
        in out.stderr
    assert "step_0000004 at step 4" in out.stderr
    same_as_reference(run_copy, reference)


def test_export_of_a_damaged_tag_fails_from_the_command_line(run_copy):
    name = _damage(checkpoint.ckpt_root(run_copy) / "step_0000004", "truncate")
    out = subprocess.run([sys.executable, "-m", "adapt.export", str(run_copy), "--tag", "step_0000004"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and name in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_an_export_killed_half_way_leaves_the_previous_one_intact(run_copy):
    final = run_copy / "final"
    before = {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()}
    out = subprocess.run([sys.executable, "-m", "adapt.export", str(run_copy), "--tag", "step_0000004"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ADAPT_FAULT_KILL_IN_EXPORT": "1"})
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert any(p.name.startswith(".final.tmp") for p in run_copy.iterdir())  # the export had been written...
    assert {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()} == before  # ...but not moved in
    assert export_problem(final) is None


def test_pickle_weights_are_refused_unless_allowed(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from adapt.recipe.config import ModelConfig
    from adapt.model.causal import ModelLoadError, load_causal_lm

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="model.allow_pickle"):
        load_causal_lm(ModelConfig(name_or_path=str(folder), dtype="fp32"))
    assert load_causal_lm(ModelConfig(name_or_path=str(folder), dtype="fp32", allow_pickle=True)) is not None


def test_remote_code_is_not_run_unless_trusted(tiny_model_dir, tmp_path):
    from adapt.recipe.config import ModelConfig
    from adapt.model.causal import ModelLoadError, load_causal_lm

    folder = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code_ran"
    (folder / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    config["model_type"] = "custom_llama"  # a type transformers does not know: only the folder's code defines it
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_causal_lm(ModelConfig(name_or_path=str(folder), dtype="fp32"))
    assert not marker.exists()


def test_a_lock_is_stale_by_dead_pid_here_and_by_old_heartbeat_anywhere(tmp_path):
    now = time.time()
    here, other = socket.gethostname(), "another-node"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert runlock.stale({"host": here, "pid": dead.pid, "heartbeat": now}, now)
    assert not runlock.stale({"host": here, "pid": os.getpid(), "heartbeat": now}, now)
    # a pid elsewhere says nothing
    assert not runlock.stale({"host": other, "pid": dead.pid, "heartbeat": now - 10}, now)
    assert runlock.stale({"host": other, "pid": 1, "heartbeat": now - runlock.STALE_AFTER_S - 1}, now)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / runlock.LOCK_FILE).write_text(json.dumps({"host": other, "pid": 1, "since": "then", "heartbeat": now}))
    refused = runlock.acquire(run_dir)
    assert isinstance(refused, str) and "host another-node" in refused and "pid 1" in refused
    (run_dir / runlock.LOCK_FILE).write_text(json.dumps({"host": other, "pid": 1, "since": "then",
                                                         "heartbeat": now - runlock.STALE_AFTER_S - 5}))
    lock = runlock.acquire(run_dir)
    assert isinstance(lock, runlock.RunLock) and runlock.read(lock.path)["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists() and run_dir.is_dir()  # the folder existed before: it stays
