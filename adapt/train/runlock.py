"""One training launch per run folder: <run>/LOCK names its holder (host, pid, since) and carries a heartbeat.

A second launch on the same folder is refused at once with the holder's name. A lock whose holder is gone
is stale and taken over: on the same host when its pid no longer runs, from any host when its heartbeat is
older than STALE_AFTER_S (the holder rewrites it every HEARTBEAT_S, so this works across nodes and on
shared file systems where a pid means nothing). Export and evaluation never take the lock: they read
complete checkpoints only.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from pathlib import Path

LOCK_FILE = "LOCK"
HEARTBEAT_S = float(os.environ.get("ADAPT_LOCK_HEARTBEAT_S", 30))
STALE_AFTER_S = float(os.environ.get("ADAPT_LOCK_STALE_AFTER_S", 300))


class RunLock:
    """The lock this process holds on a run folder; `release()` (also at exit) removes it."""

    def __init__(self, run_dir: Path, made: list[Path]):
        self.path = Path(run_dir) / LOCK_FILE
        self.made = made
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "heartbeat": time.time()}
        self._stop = threading.Event()

    def beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if holder(self.path) != _identity(self.me):
                return  # taken over (this process was thought dead): stop touching it
            _write(self.path, self.me | {"heartbeat": time.time()})

    def release(self) -> None:
        self._stop.set()
        if holder(self.path) == _identity(self.me):
            self.path.unlink(missing_ok=True)
        for folder in self.made:  # a launch that failed before writing anything leaves no folder behind
            try:
                folder.rmdir()
            except OSError:
                break


def acquire(run_dir: Path) -> RunLock | str:
    """The lock on `run_dir` (created if needed), or a message saying who holds it."""
    run_dir = Path(run_dir).absolute()
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir, made)
    try:
        fd = os.open(lock.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
        _write(lock.path, lock.me)
    except FileExistsError:
        problem = _take_over_if_stale(lock)
        if problem:
            return problem
    threading.Thread(target=lock.beat, name="run-lock-heartbeat", daemon=True).start()
    atexit.register(lock.release)
    return lock


def _take_over_if_stale(lock: RunLock) -> str | None:
    info = read(lock.path)
    if info is not None and not stale(info):
        age = time.time() - float(info.get("heartbeat", 0))
        return (f"{lock.path.parent} is in use by another launch: pid {info.get('pid')} on host {info.get('host')} "
                f"since {info.get('since')} (heartbeat {age:.0f} s ago). Wait for it to finish or stop it, or "
                f"train into another folder (run.name=...). Export and evaluation of its checkpoints work meanwhile")
    _write(lock.path, lock.me)  # stale or unreadable: take it over, then make sure no other launch did too
    time.sleep(0.2)
    if holder(lock.path) != _identity(lock.me):
        return f"{lock.path.parent} was just taken by another launch ({read(lock.path)}); use another run.name"
    return None


def stale(info: dict, now: float | None = None) -> bool:
    """Whether a lock's holder is gone: a dead pid on this host, or a heartbeat older than STALE_AFTER_S."""
    now = time.time() if now is None else now
    if now - float(info.get("heartbeat", 0)) > STALE_AFTER_S:
        return True
    if info.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


def read(path: Path) -> dict | None:
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def holder(path: Path) -> tuple | None:
    info = read(path)
    return None if info is None else _identity(info)


def _identity(info: dict) -> tuple:
    return info.get("host"), info.get("pid"), info.get("since")


def _write(path: Path, info: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)
