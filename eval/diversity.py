"""Token-level diversity statistics of 001_*.txt table 4, computed per sequence then averaged.

fraction of unique unigrams: distinct tokens / tokens.
unigram entropy: -sum_w p(w) log p(w) in nats, p(w) = count of w / sequence length.
repetition rate (window w): fraction of the sequence's tokens equal to one of the w tokens before
them (the first token never repeats; the denominator is the sequence length).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence


def unique_unigram_fraction(ids: Sequence[int]) -> float:
    """Distinct tokens / tokens of one sequence."""
    if not ids:
        raise ValueError("empty sequence")
    return len(set(ids)) / len(ids)


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy (nats) of the sequence's own unigram distribution."""
    if not ids:
        raise ValueError("empty sequence")
    n = len(ids)
    return -sum(c / n * math.log(c / n) for c in Counter(ids).values())


def repetition_rate(ids: Sequence[int], window: int = 100) -> float:
    """Fraction of tokens that already occur among the `window` tokens before them."""
    if not ids:
        raise ValueError("empty sequence")
    recent: Counter = Counter()
    repeats = 0
    for i, tok in enumerate(ids):
        if recent[tok] > 0:
            repeats += 1
        recent[tok] += 1
        if i >= window:
            recent[ids[i - window]] -= 1
    return repeats / len(ids)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def diversity(sequences: Sequence[Sequence[int]], window: int = 100) -> dict[str, float]:
    """Mean and standard deviation over sequences of the three statistics (as in table 4)."""
    if not sequences:
        raise ValueError("no sequences")
    out: dict[str, float] = {"sequences": len(sequences), "window": window}
    for name, fn in (("unique_unigrams", unique_unigram_fraction), ("unigram_entropy", unigram_entropy),
                     ("repetition_rate", lambda s: repetition_rate(s, window))):
        out[name], out[f"{name}_std"] = _mean_std([fn(list(s)) for s in sequences])
    return out
