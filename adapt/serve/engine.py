"""The server's decoding engine: every request row runs the library's own decoder with its own random stream,
and rows join and leave between model calls; a row's output is the same request's output alone.

Whole-sequence exports: each row runs adapt.decode.generate in a thread, and one thread makes the model calls of all
rows that are waiting together, one batched call per canvas shape. Block exports with a causal clean stream: the
speculative decoder (and `chain`) keeps every row in one batch (adapt.serve.blockrows). A row whose client went
away or whose time ran out leaves at its next call. The block exports' other samplers (the exact block cache) run
their rows one at a time through the same decoder: exact too, their calls not shared.
"""
from __future__ import annotations

import threading
import time

import torch

from adapt import objectives
from adapt.decode import generate
from adapt.decode.denoiser import Denoiser
from adapt.serve.blockrows import DECODERS, BlockRows
from adapt.serve.jobs import Busy, Event, Gone, Job

TICK_WAIT_S = 0.005
"""How long a batched call waits for rows that are between calls (drawing their tokens) before it starts."""


class RowDenoiser:
    """The denoiser one row's sampler sees: its calls go to the engine's batched call."""

    def __init__(self, engine: "Engine", job: Job):
        self.engine, self.job = engine, job
        self.mask_id, self.device, self.nfe = engine.denoiser.mask_id, engine.denoiser.device, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        job = self.job
        if job.cancelled.is_set() or time.monotonic() > job.deadline:
            raise Gone()
        self.engine.report(job, x[0])
        logp = self.engine.call(job, x)
        self.nfe += 1
        job.calls += 1
        return logp


class Engine:
    """Rows in, events out. `submit` refuses past `max_queue` rows waiting or running."""

    def __init__(self, model, meta, max_rows: int = 16, max_queue: int = 64, draft_head=None):
        self.model, self.meta, self.draft_head = model, meta, draft_head  # the head: speculative and chain rows
        self.denoiser = Denoiser(model, meta)
        self.max_rows, self.max_queue = max_rows, max_queue
        decoding = objectives.decoding(meta)
        self.shared = not decoding.block_length  # whole-sequence decoders: calls shared between rows
        self.cv = threading.Condition()
        self.posted: dict[int, torch.Tensor] = {}
        self.results: dict[int, torch.Tensor] = {}
        self.live: set[int] = set()
        self.slots = threading.Semaphore(max_rows)
        self.exclusive = threading.Lock()
        self.admitted = 0
        self.calls = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()
        self.block_rows = BlockRows(self) if decoding.clean_causal else None

    # --- rows -------------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.cv:
            if self.admitted >= self.max_queue:
                raise Busy(f"{self.admitted} rows are waiting or decoding (the server's --max-queue)")
            self.admitted += 1
        if self.block_rows is not None and job.sampler in DECODERS:
            self.block_rows.add(job)
            return
        threading.Thread(target=self._row, args=(job,), name="row", daemon=True).start()

    def _row(self, job: Job) -> None:
        try:
            with self.slots:
                ids = self._decode(job)
            self.report(job, ids)
            job.emit(Event([], [], job.calls, done=True, ids=ids.tolist()))
        except Gone:
            job.emit(Event([], [], job.calls, done=True, error="gone"))
        except Exception as err:  # a decoder refusal names the option; anything else is the server's
            job.emit(Event([], [], job.calls, done=True, error=f"{type(err).__name__}: {err}"))
        finally:
            with self.cv:
                self.live.discard(id(job))
                self.admitted -= 1
                self.cv.notify_all()

    def _decode(self, job: Job) -> torch.Tensor:
        x = torch.tensor([job.canvas], dtype=torch.long)
        gen = torch.Generator().manual_seed(job.seed)
        if not self.shared:
            with self.exclusive:
                res = generate(self.denoiser, x, job.sampler, steps=job.steps, generator=gen, eos_id=job.eos_id,
                               draft_head=self.draft_head, **job.options)
            job.calls = res.nfe
            return res.ids[0].cpu()
        with self.cv:
            self.live.add(id(job))
        res = generate(RowDenoiser(self, job), x, job.sampler, steps=job.steps, generator=gen, eos_id=job.eos_id,
                       **job.options)
        return res.ids[0].cpu()

    def report(self, job: Job, x: torch.Tensor) -> None:
        """Emit the positions of `x` (L,) decided since the row's last report."""
        x = x.cpu()
        before = job.last if job.last is not None else torch.tensor(job.canvas)
        changed = (x != before).nonzero().flatten()
        job.last = x.clone()
        if len(changed):
            job.emit(Event(changed.tolist(), x[changed].tolist(), job.calls))

    # --- the batched model call ---------------------------------------------------------------------------------
    def call(self, job: Job, x: torch.Tensor) -> torch.Tensor:
        key = id(job)
        with self.cv:
            self.posted[key] = x
            self.cv.notify_all()
            while key not in self.results:
                if self.stopped:
                    raise Gone()
                self.cv.wait()
            out = self.results.pop(key)
        if isinstance(out, Exception):
            raise out
        return out

    def _take(self) -> dict[int, torch.Tensor] | None:
        with self.cv:
            while not self.posted and not self.stopped:
                self.cv.wait()
            if self.stopped:
                return None
            end = time.monotonic() + TICK_WAIT_S
            while len(self.posted) < len(self.live) and (left := end - time.monotonic()) > 0:
                self.cv.wait(left)
            taken, self.posted = self.posted, {}
            return taken

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            by_shape: dict[tuple, list[int]] = {}
            for key, x in taken.items():
                by_shape.setdefault(tuple(x.shape), []).append(key)
            out = {}
            for keys in by_shape.values():
                try:
                    logp = self.denoiser(torch.cat([taken[k] for k in keys]))
                except Exception as err:  # every row of the call fails with it; the engine goes on
                    out.update({k: err for k in keys})
                    continue
                self.calls += 1
                out.update({k: logp[i:i + 1] for i, k in enumerate(keys)})
            with self.cv:
                self.results.update(out)
                self.cv.notify_all()

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
