"""The `diffusion-lm` model's arguments: lm-eval's `--model_args key=value,...` and the generation options
of a request (`--gen_kwargs`, a task's generation_kwargs), each with its type and range.

lm-eval turns `key=value` into bool, int, float or str by the look of the value, and hands every key to the
model's constructor; unchecked, a misspelled key was ignored with a warning and a value of the wrong type
failed deep inside the run ("'<' not supported between 'str' and 'int'"). `check_model_args` names every
unknown key (with the nearest valid one) and every bad value, once, before the model loads.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable

from adapt.cli.types import SEED_LIMIT, text_problem
from adapt.train.likelihood import METHODS
from adapt.model.causal import DTYPES
from adapt.decode import SAMPLER_NAMES
from eval.options import MAX_COUNT, MAX_TOKENS, EvalError

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Arg:
    kind: type | None
    """bool, int, float or str (None: any value, e.g. lm-eval's batch_size, an int or "auto")."""
    check: Check
    """The value's problem ("must be >= 1"), or None."""


def between(low: float, high: float) -> Check:
    return lambda v: None if low <= v <= high else f"must be in [{low}, {high}]"


def one_of(names) -> Check:
    return lambda v: None if v in names else f"use one of {', '.join(names)}"


def _max_length(value: int) -> str | None:
    return None if value == 0 or 2 <= value <= MAX_TOKENS else f"0 = the training block size, else in [2, {MAX_TOKENS}]"


def _finite_non_negative(value: float) -> str | None:
    return None if math.isfinite(value) and value >= 0 else "must be a finite number >= 0 (0 = greedy)"


def _any(value: Any) -> None:
    return None


MODEL_ARGS: dict[str, Arg] = {
    "pretrained": Arg(str, _any),
    "device": Arg(str, _any),
    "dtype": Arg(str, one_of(tuple(DTYPES))),
    "mc_samples": Arg(int, between(1, MAX_COUNT)),
    "estimator": Arg(str, one_of(METHODS)),
    "mc_batch": Arg(int, between(1, MAX_COUNT)),
    "max_length": Arg(int, _max_length),
    "sampler": Arg(str, one_of(SAMPLER_NAMES)),
    "steps": Arg(int, between(0, MAX_COUNT)),
    "gen_length": Arg(int, between(1, MAX_TOKENS)),
    "temperature": Arg(float, _finite_non_negative),
    "seed": Arg(int, between(0, SEED_LIMIT - 1)),
    "batch_size": Arg(None, _any),  # lm-eval's --batch_size: accepted and ignored (requests go one at a time)
    "max_batch_size": Arg(None, _any),
}
"""Every key `--model_args` may hold, and what its value must be."""

GEN_KWARGS: dict[str, Arg] = {
    "max_gen_toks": Arg(int, between(1, MAX_TOKENS)),
    "temperature": Arg(float, _finite_non_negative),
    "do_sample": Arg(bool, _any),
}
"""The generation options `diffusion-lm` reads (others of a task's generation_kwargs are left alone)."""


def coerce(value: Any, kind: type | None) -> Any:
    """`value` as `kind`: an int from 4, 4.0 or "4", a float from an int or a numeric string, a bool from
    true/false; ValueError or TypeError when it is not one (True is no number: `mc_samples=true` is a mistake)."""
    if kind is None:
        return value
    if kind is str:
        return str(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(value)
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, str):
        value = float(value) if kind is float else int(value.strip(), 10)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return kind(value)


def _problems(given: dict, table: dict[str, Arg], where: str) -> tuple[dict, list[str]]:
    """(the values coerced to their kinds, a line per bad value naming it and saying what it must be)."""
    out, problems = {}, []
    for key, value in given.items():
        arg = table[key]
        try:
            value = coerce(value, arg.kind)
        except (ValueError, TypeError, KeyError):
            problems.append(f"{where} {key}={value!r}: expected {arg.kind.__name__}")
            continue
        problem = arg.check(value) or (text_problem(value) if isinstance(value, str) else None)
        if problem:
            problems.append(f"{where} {key}={value!r}: {problem}")
        out[key] = value
    return out, problems


def unknown_keys(given: dict, table: dict[str, Arg], where: str) -> list[str]:
    """A line per key `table` does not hold, with the nearest valid key when one is close."""
    lines = []
    for key in (k for k in given if k not in table):
        near = difflib.get_close_matches(key, list(table), n=1)
        hint = f"did you mean {near[0]}?" if near else f"valid keys: {', '.join(table)}"
        lines.append(f"{where}: unknown key {key!r} ({hint})")
    return lines


def check_model_args(given: dict) -> dict:
    """The `diffusion-lm` model arguments coerced to their kinds; EvalError naming every unknown key and
    every bad value, all at once."""
    problems = unknown_keys(given, MODEL_ARGS, "--model_args")
    values, bad = _problems({k: v for k, v in given.items() if k in MODEL_ARGS}, MODEL_ARGS, "--model_args")
    if problems + bad:
        raise EvalError("diffusion-lm: " + "; ".join(problems + bad))
    return values


def check_gen_kwargs(given: dict, where: str = "--gen_kwargs") -> dict:
    """The generation options `diffusion-lm` reads, coerced; EvalError naming a bad one. `until` must be
    a string or a list of strings."""
    values, problems = _problems({k: v for k, v in given.items() if k in GEN_KWARGS}, GEN_KWARGS, where)
    until = given.get("until")
    if until is not None and not isinstance(until, str) and not (
            isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until)):
        problems.append(f"{where} until={until!r}: expected a string or a list of strings")
    if problems:
        raise EvalError("diffusion-lm: " + "; ".join(problems))
    return values
