"""Fault injection for the reliability tests, driven by environment variables (off when unset).

    ADAPT_FAULT_NAN_STEPS=3,4       make the loss of these (0-based) optimizer steps non-finite
    ADAPT_FAULT_KILL_IN_SAVE=6      SIGKILL the process after the DeepSpeed shards of this step's
                                    checkpoint are written and before it is marked COMPLETE
"""
from __future__ import annotations

import os
import signal


def _steps(name: str) -> frozenset[int]:
    raw = os.environ.get(name, "")
    return frozenset(int(x) for x in raw.split(",") if x.strip())


def nan_steps() -> frozenset[int]:
    return _steps("ADAPT_FAULT_NAN_STEPS")


def maybe_kill_in_save(step: int) -> None:
    if step in _steps("ADAPT_FAULT_KILL_IN_SAVE"):
        os.kill(os.getpid(), signal.SIGKILL)
