"""A training launch writes only inside run.output_dir/run.name, and bad input gets exit code 2 and one message
naming the input and the fix (never a traceback); a lock left by a killed launch is taken over by its pid."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapt.train import runlock
from cli_runner import CliRunner
from test_pipeline import RECIPE, tiny_run_args


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    cli = CliRunner(tmp_path_factory.mktemp("cli"))
    yield cli
    cli.close()


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def refused(result, key: str) -> str:
    """The one problem line of a refused launch, checked to name `key`."""
    assert result.code == 2, (result.code, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("  - ")]
    assert len(lines) == 1 and f"`{key}" in lines[0], result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("name", ["../escape", "ABSOLUTE", "", ".", "..", "a/b/c"])
def test_a_run_name_that_is_not_one_folder_name_is_refused(runner, tmp_path, name):
    """`..`, `.` and the empty name would make output_dir's parent or output_dir itself the run folder."""
    name = str(tmp_path / "abs_run") if name == "ABSOLUTE" else name
    out = tmp_path / "runs" / "out"
    out.mkdir(parents=True)
    before = tree(tmp_path)
    result = runner.run(["adapt/run.py", str(RECIPE), f"run.output_dir={out}", f"run.name={name}",
                         f"data.cache_dir={tmp_path / 'cache'}"])
    line = refused(result, "run.name")
    assert "one plain folder name" in line and "run.output_dir" in line
    assert tree(tmp_path) == before  # nothing written anywhere


@pytest.mark.parametrize("override,key", [
    ("train.seed=9223372036854775808", "train.seed"), ("train.seed=-1", "train.seed"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.micro_batch_size=99999999999999999999", "train.micro_batch_size"),
    ("train.max_steps=-5", "train.max_steps"), ("data.seq_length=0", "data.seq_length"),
    ("dist.timeout_s=1e300", "dist.timeout_s"), ("optim.lr=.nan", "optim.lr"),
])
def test_a_number_out_of_range_is_refused_before_loading(runner, tmp_path, override, key):
    result = runner.run(["adapt/run.py", str(RECIPE), f"run.output_dir={tmp_path / 'out'}", override,
                         f"data.cache_dir={tmp_path / 'cache'}"])
    line = refused(result, key)
    assert "must be" in line
    assert not (tmp_path / "out").exists()


def test_a_block_longer_than_the_model_positions_is_refused(runner, tmp_path, tiny_model_dir, corpus_file):
    """The tiny Llama has 512 positions; the message says both numbers, and the launch leaves no folder."""
    args = tiny_run_args(tmp_path, tiny_model_dir, corpus_file, "data.seq_length=1024")
    line = refused(runner.run(["adapt/run.py", str(RECIPE), *args]), "data.seq_length")
    assert "1024" in line and "512 positions" in line
    assert not (tmp_path / "debug").exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    """A live holder on this host is refused; once it is killed (kill -9) its pid is gone and the lock is ours."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    lock_file = tmp_path / runlock.LOCK_FILE
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "since": "then",
                                     "heartbeat": time.time()}))
    try:
        problem = runlock.acquire(tmp_path)
        assert isinstance(problem, str) and f"pid {holder.pid}" in problem
    finally:
        holder.kill()
        holder.wait()
    lock = runlock.acquire(tmp_path)
    assert not isinstance(lock, str), lock
    assert runlock.read(lock_file)["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists() and tmp_path.is_dir()  # a folder it did not make stays
