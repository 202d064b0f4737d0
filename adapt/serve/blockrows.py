"""Requests to a block export with a causal clean stream, decoded by the speculative decoder (or `chain`) as rows of
one batch (adapt.decode.speculative.RowBatch): a waiting request joins between model calls with its own filter and
random stream, a finished, abandoned or timed-out one leaves at the next call, and every call serves all rows.
A row decodes as the same request alone (the decoder's rows never read each other's columns)."""
from __future__ import annotations

import threading
import time
import torch

from adapt.decode import CHAIN, SPECULATIVE
from adapt.decode.categorical import TokenFilter
from adapt.decode.speculative import RowBatch
from adapt.serve.jobs import Event, Job

DECODERS = (SPECULATIVE, CHAIN)
"""The samplers these rows serve."""


class BlockRows:
    """One thread, one batch: admits waiting jobs up to the engine's row cap, then makes one call for all rows."""

    def __init__(self, engine):
        self.engine = engine  # adapt.serve.engine.Engine: the model, the row cap, the admission count
        self.waiting: list[Job] = []
        self.active: dict[int, tuple[object, Job]] = {}  # id(row) -> (row, job)
        self.batch = self._fresh()
        threading.Thread(target=self._loop, name="block-rows", daemon=True).start()

    def _fresh(self) -> RowBatch:
        e = self.engine
        return RowBatch(e.model, e.meta, torch.empty((0, 1), dtype=torch.long, device=e.denoiser.device), TokenFilter(),
                      None, e.draft_head)

    def add(self, job: Job) -> None:
        with self.engine.cv:
            self.waiting.append(job)
            self.engine.cv.notify_all()

    def _admit(self) -> None:
        e = self.engine
        with e.cv:
            while not self.waiting and not self.active and not e.stopped:
                e.cv.wait()
            take = self.waiting[:max(0, e.max_rows - len(self.active))]
            del self.waiting[:len(take)]
        rows = []
        for job in take:
            o = job.options
            filt = TokenFilter(o.get("temperature", 1.0), o.get("top_k", 0), o.get("top_p", 1.0))
            x = torch.tensor(job.canvas, dtype=torch.long, device=e.denoiser.device)
            row = self.batch.new_row(x, filt, torch.Generator().manual_seed(job.seed), job.sampler == SPECULATIVE)
            rows.append(row)
            self.active[id(row)] = (row, job)
        if rows:
            self.batch.join(rows)

    def _loop(self) -> None:
        while not self.engine.stopped:
            try:
                self._call()
            except Exception as err:  # every row of the call fails with it; a fresh batch serves the next ones
                for key, (_, job) in list(self.active.items()):
                    self._leave(key, job, error=f"{type(err).__name__}: {err}")
                self.batch = self._fresh()

    def _call(self) -> None:
        """Admit the waiting rows, make one model call for every row, report what it decided."""
        self._admit()
        if not self.active:
            return
        before = {key: row.done for key, (row, _) in self.active.items()}
        self.batch.step()
        self.engine.calls += 1
        for key, (row, job) in list(self.active.items()):
            self._advance(key, row, job, before[key])

    def _advance(self, key: int, row, job: Job, before: int) -> None:
        job.calls += 1
        row.stop_at(job.eos_id)
        if row.done > before:
            job.emit(Event(list(range(before, row.done)), row.x[before:row.done].tolist(), job.calls))
        if job.cancelled.is_set() or time.monotonic() > job.deadline:
            row.stopped = True
            self._leave(key, job, error="gone")
        elif row.finished:
            self._leave(key, job, ids=row.x.cpu().tolist())

    def _leave(self, key: int, job: Job, ids: list[int] | None = None, error: str | None = None) -> None:
        self.active.pop(key, None)
        job.emit(Event([], [], job.calls, done=True, ids=ids, error=error))
        with self.engine.cv:
            self.engine.admitted -= 1
            self.engine.cv.notify_all()
