"""The bounds a recipe's numbers are declared with: the shared upper bounds of counts, and `ranged`, which puts
a key's range on its schema field (adapt.recipe.load.validate reads it back). Choices are `Literal[...]` field types."""
from __future__ import annotations

from dataclasses import field

STEPS_MAX = 10**9
"""Upper bound of every count of optimizer steps: far beyond any run, far below what torch's int64 holds."""
SIZE_MAX = 2**20
"""Upper bound of sequence lengths (tokens) and of sampling steps."""
BATCH_MAX = 2**16
"""Upper bound of per-forward counts (sequences, micro-batches, draws, adapter rank, vocabulary multiple)."""
SEED_MAX = 2**32 - 1
"""Largest seed: the data order hashes seed * 100003 + epoch into torch's 64-bit seed, which a larger one overflows."""

RANGE = "range"
"""Field metadata key of a number's range: (lower bound, upper bound or None, lower bound excluded)."""


def ranged(default: float, lo: float, hi: float | None = None, open_below: bool = False):
    """A schema field holding a number in [lo, hi] (bounds inclusive; `open_below`: lo itself excluded, as for a rate
    factor of 0 that would freeze what it scales). `hi` None only for floats, which must then be finite; every integer
    has an upper bound, so none reaches torch as an overflow or sizes an allocation absurdly."""
    return field(default=default, metadata={RANGE: (lo, hi, open_below)})
