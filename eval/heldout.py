"""Held-out text for every metric: the blocks `adapt.data.corpus.build_sequences` kept out of training.

The held-out text is the last whole documents of each source, read from the same token stores as training
(`python -m adapt.prepare`; prepared here when missing), and its held-out blocks are the first
`data.heldout_sequences` blocks of that text at the training block size. A metric that wants another length
re-cuts those blocks (never touching training tokens): the BOS at the head of each block is dropped, the bodies
are joined, and cut into pieces of `length - 1` tokens, each given the BOS again, so position 0 is the same given
token as in training.
"""
from __future__ import annotations

import re

import torch

from adapt.recipe.config import DataConfig
from adapt.data.corpus import DataError, build_sequences
from eval.options import EvalError


class HeldoutError(EvalError):
    """The held-out text cannot serve the request; the message says what to change."""


def heldout_stream(dcfg: DataConfig, tokenizer) -> tuple[torch.Tensor, int]:
    """(held-out token stream (T,) long without the per-block BOS, the start token id)."""
    try:
        held = build_sequences(dcfg, tokenizer).heldout  # (N, seq_length)
    except DataError as err:
        source = ", ".join(map(str, dcfg.train_files)) or "the embedded corpus"
        raise HeldoutError(f"no held-out text from {source}: {err}") from None
    return held[:, 1:].reshape(-1), int(held[0, 0])


def heldout_sequences(dcfg: DataConfig, tokenizer, length: int, n: int | None = None) -> torch.Tensor:
    """(n, length) long held-out blocks, each starting with the start token (all of them when n is None)."""
    if length < 2:
        raise HeldoutError(f"block length must be >= 2 (BOS + one token), got {length}")
    stream, start = heldout_stream(dcfg, tokenizer)
    available = len(stream) // (length - 1)
    n = available if n is None else n
    if n > available or n < 1:
        raise HeldoutError(f"the held-out text makes {available} blocks of {length} tokens, {n} asked for; "
                           f"ask for fewer or shorter blocks, or raise data.heldout_sequences in the recipe")
    body = stream[: n * (length - 1)].view(n, length - 1)
    return torch.cat([torch.full((n, 1), start, dtype=torch.long), body], dim=1)


def heldout_documents(dcfg: DataConfig, tokenizer) -> list[str]:
    """The held-out text as documents: the stream split at EOS and decoded (each source's first is whole, its
    last may be cut where its held-out blocks end)."""
    stream, _ = heldout_stream(dcfg, tokenizer)
    eos = tokenizer.eos_token_id
    docs, current = [], []
    for tok in stream.tolist():
        if tok == eos:
            docs.append(current)
            current = []
        else:
            current.append(tok)
    docs.append(current)
    texts = [tokenizer.decode(d, skip_special_tokens=True).strip() for d in docs]
    return [t for t in texts if t]


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def sentences(documents: list[str], min_words: int = 8, max_words: int = 60) -> list[str]:
    """Sentences of plain prose from documents: split after . ! ? and kept when of moderate length."""
    out = []
    for doc in documents:
        for para in doc.split("\n"):
            for sent in _SENTENCE.split(para.strip()):
                words = sent.split()
                if min_words <= len(words) <= max_words and sent[-1:] in ".!?":
                    out.append(" ".join(words))
    return out
