"""Value types of command-line options that refuse bad input at parse time: argparse then names the flag,
prints one message and exits 2 (adapt.sample and every eval script use them)."""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import unicodedata
from pathlib import Path
from typing import Callable

import torch

SEED_LIMIT = 2**63
"""Seeds are < 2**63: torch.Generator.manual_seed and numpy take a signed 64-bit integer."""


def at_least(low: int, most: int | None = None, why: str = "") -> Callable[[str], int]:
    """An int option that must be >= low (and <= most when given; `why` says where that bound comes from,
    e.g. the memory a longer sequence would need)."""
    def parse_int(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be <= {most}{f' ({why})' if why else ''}, got {value}")
        return value

    return parse_int


def seed(text: str) -> int:
    """A random seed: an integer with 0 <= seed < 2**63 (what torch and numpy accept)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**63 - 1], got {value}")
    return value


def text_problem(value: str) -> str | None:
    """Why `value` is not printable UTF-8 text, or None. On Linux, argv bytes that are not UTF-8 arrive as
    lone surrogates (surrogateescape), which a tokenizer or a UTF-8 file cannot take; control characters
    other than tab and newline are refused too (they garble a prompt and the files it is written to)."""
    for i, char in enumerate(value):
        if "\ud800" <= char <= "\udfff":
            byte = f" (byte 0x{ord(char) - 0xDC00:02x})" if ord(char) >= 0xDC80 else ""
            return f"is not valid UTF-8{byte} at character {i}; pass UTF-8 text"
        if char not in "\t\n" and unicodedata.category(char) == "Cc":
            return f"holds the control character U+{ord(char):04X} at character {i}; only tab and newline are allowed"
    return None


def text(value: str) -> str:
    """A text option (a prompt, a model name): valid UTF-8, no control characters but tab and newline."""
    problem = text_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"{ascii(value)[:80]} {problem}")
    return value


def write_problem(path: Path, keep: bool = False) -> str | None:
    """Why no file can be made in the folder `path`, or None: the folder is created with its parents, a temporary
    file is written and removed, and the folders it had to create are removed again unless `keep` (a refused
    command leaves nothing behind; a command creates its folder when it writes)."""
    missing = [p for p in (path, *path.parents) if not os.path.lexists(p)]
    blocker = next((p for p in (path, *path.parents) if os.path.lexists(p)), None)
    if blocker is not None and not blocker.is_dir():
        return f"{blocker} is a file, not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check"):
            pass
    except OSError as err:
        where = f" at {err.filename}" if err.filename and Path(err.filename) != path else ""
        return f"{path} is not writable ({err.strerror or err}{where})"
    finally:
        for folder in missing if not keep else ():  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
    return None


def writable_dir(value: str) -> Path:
    """An output folder this process can write to, checked before any work (`write_problem`; nothing is left)."""
    problem = write_problem(Path(value))
    if problem:
        raise argparse.ArgumentTypeError(f"cannot write to {value}: {problem}; choose a folder you can write to")
    return Path(value)


def fraction(text: str) -> float:
    """A float in (0, 1] (nucleus p)."""
    value = _finite(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def non_negative(text: str) -> float:
    """A float >= 0 (a temperature; 0 = greedy)."""
    value = _finite(text)
    if value < 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seconds(text: str) -> float:
    """A duration in seconds, > 0 and at most a day."""
    value = _finite(text)
    if not 0.0 < value <= 86400.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 86400] seconds, got {value}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or abs(value) == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def device(text: str) -> str:
    """cpu, cuda or cuda:N, refused at parse time when this machine cannot run it."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text
