"""What the engine and the HTTP layer pass: a row's work (`Job`), what a model call decided (`Event`), and the two
ways a row ends early (`Busy`: refused at the door; `Gone`: its client left or its time ran out)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch


class Busy(RuntimeError):
    """The queue is full: the request is refused (HTTP 429), not absorbed."""


class Gone(Exception):
    """The row's client disconnected or its time ran out: the row leaves at its next model call."""


@dataclass
class Event:
    """What one model call decided for one row."""

    positions: list[int]
    """Canvas positions decided since the row's previous event."""
    tokens: list[int]
    """Their token ids."""
    calls: int
    """The row's model calls so far."""
    done: bool = False
    ids: list[int] | None = None
    """The whole canvas, on the last event."""
    error: str | None = None


@dataclass
class Job:
    """One row: a canvas to fill and how."""

    canvas: list[int]
    """BOS, prompt, masks, suffix."""
    sampler: str
    steps: int | None
    options: dict
    seed: int
    eos_id: int | None
    emit: Callable[[Event], None]
    deadline: float
    """time.monotonic() after which the row leaves."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    calls: int = 0
    last: torch.Tensor | None = None
