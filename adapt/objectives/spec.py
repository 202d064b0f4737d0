"""What an objective tells the code that decodes its exports, asked before any model is built."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decoding:
    """How an export must be decoded (adapt.objectives.decoding)."""

    block_length: int
    """0 = the whole sequence at once, any block length allowed; b > 0 = the block length the export must be
    decoded with."""
    clean_causal: bool
    """The clean stream is a causal LM, so the exact speculative decoder (adapt.sampling.speculative) applies."""


def meta_get(meta, key: str, default=None):
    """Field `key` of a DiffusionMeta or of a diffusion.json dict (`default` when absent)."""
    return meta.get(key, default) if isinstance(meta, dict) else getattr(meta, key, default)
