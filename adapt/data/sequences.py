"""Training sequences cut from token stores when they are read, and the draw of each step's sequences.

Here a "block" is one training sequence of L = data.seq_length tokens (not a diffusion block). A block of L
tokens is the start token (BOS, or EOS without one) followed by the next L - 1 tokens of a source's stream,
documents joined by their EOS: block i of a source covers stream tokens [i (L-1), (i+1) (L-1)). Nothing is
materialised per block, so the store serves any `data.seq_length`, and a rank holds only the rows it reads.

The data order is a pure function of (seed, step): `batch_indices` walks a fresh permutation of the blocks per
epoch. With several sources (`Mixture`), each row of a step's global batch is given a source by systematic
sampling of the weights (every source gets floor or ceil of its share of the rows), in an order shuffled by
(seed, step); the row at global position p of source s reads that source's permutation at p, so a source's rows
are distinct within each of its epochs and it is read at the rate of its weight.
"""
from __future__ import annotations

import numpy as np
import torch

from adapt.train import rng

MIX_SALT = 11
"""The salt of the mixture's draws in `rng.mix` (apart from adapt.train.rng's streams, whose numbers old runs fix)."""


def batch_indices(step: int, n_blocks: int, per_rank: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """Block indices this rank trains on at `step`: a fresh permutation per epoch, no state but the step.

    Resuming at step s reads exactly the blocks an uninterrupted run would have read.
    """
    global_batch = per_rank * world
    first = step * global_batch + rank * per_rank
    out = []
    for pos in range(first, first + per_rank):
        epoch, offset = divmod(pos, n_blocks)
        perm = _epoch_permutation(seed, epoch, n_blocks)
        out.append(perm[offset])
    return torch.stack(out)


_PERMS: dict[tuple, torch.Tensor] = {}


def _epoch_permutation(seed: int, epoch: int, n: int, source: int | None = None) -> torch.Tensor:
    key = (seed, epoch, n, source)
    if key not in _PERMS:
        if len(_PERMS) > 4:
            _PERMS.clear()
        salt = seed * 100003 + epoch if source is None else rng.mix(seed, epoch, source, MIX_SALT)
        _PERMS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(salt))
    return _PERMS[key]


class Mixture:
    """Sources of `sizes` blocks drawn by `weights`; block ids are global (source s's come after those of < s)."""

    def __init__(self, sizes: list[int], weights: list[float], labels: list[str]):
        self.sizes, self.labels = list(sizes), list(labels)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        w = torch.tensor(weights, dtype=torch.float64)
        self.weights = (w / w.sum()).tolist()
        self._cum = torch.cumsum(w / w.sum(), 0)

    def sources(self, step: int, n: int, seed: int) -> torch.Tensor:
        """(n,) the source of each row of the step's global batch."""
        if len(self.sizes) == 1:
            return torch.zeros(n, dtype=torch.long)
        g = torch.Generator().manual_seed(rng.mix(seed, step, MIX_SALT))
        u = torch.rand((), generator=g, dtype=torch.float64)
        src = torch.searchsorted(self._cum, (torch.arange(n, dtype=torch.float64) + u) / n, right=True)
        return src.clamp(max=len(self.sizes) - 1)[torch.randperm(n, generator=g)]

    def draw(self, step: int, n: int, seed: int) -> torch.Tensor:
        """(n,) global block ids of the step's global batch of n rows."""
        if len(self.sizes) == 1:
            return batch_indices(step, self.sizes[0], n, 0, 1, seed)
        out = torch.empty(n, dtype=torch.long)
        for j, s in enumerate(self.sources(step, n, seed).tolist()):
            epoch, offset = divmod(step * n + j, self.sizes[s])
            out[j] = self.offsets[s] + _epoch_permutation(seed, epoch, self.sizes[s], s)[offset]
        return out

    def realised(self, steps: int, n: int, seed: int) -> list[float]:
        """Each source's share of the rows of steps 0 .. steps-1."""
        counts = torch.zeros(len(self.sizes), dtype=torch.long)
        for step in range(steps):
            counts += torch.bincount(self.sources(step, n, seed), minlength=len(self.sizes))
        return (counts.double() / max(1, int(counts.sum()))).tolist()

    def describe(self, steps: int, n: int, seed: int) -> str:
        """One log line: each source's weight and its realised share of the first `steps` steps' rows."""
        shares = self.realised(steps, n, seed)
        parts = [f"{lab} {w:.3f} -> {r:.3f}" for lab, w, r in zip(self.labels, self.weights, shares)]
        head = f"mixture (weight -> realised share of the rows of steps 0-{steps - 1}, {n} rows each): "
        return head + ", ".join(parts)


class StoreSequences:
    """`n` blocks of `length` tokens from one store's stream, the first starting at token `first`."""

    def __init__(self, store, first: int, n: int, length: int, start: int):
        self.store, self.first, self.n, self.length, self.start = store, first, n, length, start

    def rows(self, local: np.ndarray) -> torch.Tensor:
        """(k, length) long: the blocks `local` (indices < n), each the start token then length - 1 tokens."""
        body = self.length - 1
        out = np.empty((len(local), self.length), dtype=np.int64)
        out[:, 0] = self.start
        for r, i in enumerate(local.tolist()):
            a = self.first + i * body
            out[r, 1:] = self.store.tokens[a:a + body]
        return torch.from_numpy(out)

    def docs(self, local: np.ndarray) -> torch.Tensor:
        """(k, length) long: the document number of each position, 0 for the start token and the first document,
        +1 after each document's end."""
        body = self.length - 1
        pos = self.first + local.astype(np.int64)[:, None] * body + np.arange(body)  # (k, body) stream offsets
        doc = np.searchsorted(self.store.doc_ends, pos, side="right")  # the document holding each token
        doc = doc - doc[:, :1]
        return torch.from_numpy(np.concatenate([np.zeros((len(local), 1), np.int64), doc], axis=1))


class SequenceView:
    """The training blocks of every source as one indexable sequence: view[idx] -> (k, L) long (ids, or the
    document numbers with docs=True), read from the memory-mapped stores; len(view) blocks in all."""

    def __init__(self, parts: list[StoreSequences], docs: bool = False):
        self.parts, self.docs = parts, docs
        self.offsets = np.cumsum([0] + [p.n for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.parts[0].length

    def __getitem__(self, idx) -> torch.Tensor:
        idx = np.asarray(torch.as_tensor(idx).reshape(-1), dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"block index out of range 0..{len(self) - 1}")
        out = torch.empty((len(idx), self.parts[0].length), dtype=torch.long)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(which).tolist():
            rows = np.nonzero(which == s)[0]
            local = idx[rows] - self.offsets[s]
            part = self.parts[s]
            out[torch.from_numpy(rows)] = part.docs(local) if self.docs else part.rows(local)
        return out
