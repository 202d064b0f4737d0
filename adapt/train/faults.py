"""Fault injection for the reliability tests, driven by environment variables (off when unset).

A value lists steps, each optionally for one rank only (`3@1`: step 3 on rank 1; `3`: every rank).

    ADAPT_FAULT_NAN_STEPS=3,4       make the loss of these (0-based) optimizer steps non-finite
    ADAPT_FAULT_NAN_WEIGHT=3        write a NaN into one weight after (0-based) optimizer step 3
    ADAPT_FAULT_STALL_STEPS=3@1     hang (sleep) at the start of (0-based) step 3, as a stuck rank would
    ADAPT_FAULT_STEP_DELAY_S=0.5    sleep this long before every step (a slower machine: a wider window for signals)
    ADAPT_FAULT_EVAL_DELAY_S=30     sleep this long before every held-out evaluation (a window for signals
                                    before step 1)
    ADAPT_FAULT_KILL_IN_SAVE=6      SIGKILL the process after the DeepSpeed shards of this step's
                                    checkpoint are written and before it is marked COMPLETE
    ADAPT_FAULT_ENOSPC_IN_SAVE=6@1  the first file this rank writes into this step's checkpoint fails with
                                    ENOSPC (disk full), as a full disk would fail it
    ADAPT_FAULT_KILL_IN_EXPORT=1    SIGKILL an export after its weights are written, before it is moved into place
"""
from __future__ import annotations

import errno
import os
import signal
import time


def _steps(name: str) -> frozenset[int]:
    """The steps `name` lists for this process' rank."""
    rank = os.environ.get("RANK", "0")
    out = set()
    for item in os.environ.get(name, "").split(","):
        step, _, only = item.strip().partition("@")
        if step and (not only or only == rank):
            out.add(int(step))
    return frozenset(out)


def nan_steps() -> frozenset[int]:
    return _steps("ADAPT_FAULT_NAN_STEPS")


def maybe_nan_weight(step: int, engine) -> None:
    """The NaN goes where an update would put it: ZeRO-1/2's fp32 master partition (copied into the module at
    the next step), else the parameter itself (its ZeRO-3 partition)."""
    if step in _steps("ADAPT_FAULT_NAN_WEIGHT"):
        masters = getattr(engine.optimizer, "single_partition_of_fp32_groups", None)
        target = masters[0] if masters else next(p for p in engine.module.parameters() if p.requires_grad)
        getattr(target, "ds_tensor", target).data.view(-1)[0] = float("nan")


def maybe_stall(step: int) -> None:
    time.sleep(float(os.environ.get("ADAPT_FAULT_STEP_DELAY_S", 0)))
    if step in _steps("ADAPT_FAULT_STALL_STEPS"):
        time.sleep(3600)


def maybe_slow_eval() -> None:
    time.sleep(float(os.environ.get("ADAPT_FAULT_EVAL_DELAY_S", 0)))


def maybe_kill_in_save(step: int) -> None:
    if step in _steps("ADAPT_FAULT_KILL_IN_SAVE"):
        os.kill(os.getpid(), signal.SIGKILL)


def save_hook(step: int):
    """A callback run before each file of this step's checkpoint is written (None when no fault is set)."""
    if step not in _steps("ADAPT_FAULT_ENOSPC_IN_SAVE"):
        return None
    def before_write(path: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return before_write


def maybe_kill_in_export() -> None:
    if os.environ.get("ADAPT_FAULT_KILL_IN_EXPORT"):
        os.kill(os.getpid(), signal.SIGKILL)
