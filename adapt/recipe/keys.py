"""Walking a recipe's keys against the schema (adapt.recipe.config): unknown keys with the nearest valid one, wrong
types, values outside a `Literal[...]` field's choices or a field's declared range (adapt.recipe.limits.ranged), and
keys read under their new names (RENAMED). Each check appends messages to a list, so a recipe reports every problem
at once."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import sys
from typing import Any, Literal, get_args, get_origin, get_type_hints

from adapt.recipe.limits import RANGE

RENAMED = {
    "data.block_size": "data.seq_length",
    "data.heldout_blocks": "data.heldout_sequences",
    "diffusion.block_length": "diffusion.block.length",
    "diffusion.clean_attention": "diffusion.block.clean_attention",
    "diffusion.noised_attention": "diffusion.block.noised_attention",
    **{f"diffusion.distill_{k}": f"diffusion.distill.{k}"
       for k in ("weight", "positions", "teacher", "top_k", "temperature", "onpolicy", "schedule")},
}
"""Keys renamed since recipes, runs and exports were first written: old dotted key -> new dotted key."""


def check_tree(schema: Any, tree: Any, prefix: str, problems: list[str]) -> dict:
    """Report unknown keys (with the nearest valid one) and leaf type errors under `schema` (a dataclass, or an
    instance of one whose sections may be subclasses of the declared ones: an objective's own keys).

    Returns the tree without the offending entries, so the remaining values can still be
    range-checked and every problem of a recipe is reported at once.
    """
    if not isinstance(tree, dict):
        problems.append(f"`{prefix.rstrip('.') or 'recipe'}` must be a mapping, got {tree!r}")
        return {}
    cls = schema if isinstance(schema, type) else type(schema)
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    clean: dict = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean `{prefix}{near[0]}`?" if near else f"; valid keys: {', '.join(names)}"
            problems.append(f"unknown key `{path}`{hint}")
            continue
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            inner = kind if isinstance(schema, type) else getattr(schema, key)
            clean[key] = check_tree(inner, value, path + ".", problems)
        elif get_origin(kind) is list and dataclasses.is_dataclass(get_args(kind)[0]) and isinstance(value, list):
            clean[key] = [check_tree(get_args(kind)[0], v, f"{path}[{i}].", problems) for i, v in enumerate(value)]
        elif get_origin(kind) is Literal and not _type_ok(kind, value):
            problems.append(f"`{path}` must be one of {', '.join(map(str, get_args(kind)))}; got {value!r}")
        elif not _type_ok(kind, value):
            problems.append(f"`{path}` must be {_type_name(kind)}, got {value!r}")
        else:
            clean[key] = value
    return clean


def _type_ok(kind: Any, value: Any) -> bool:
    if get_origin(kind) is Literal:  # True == 1, but a bool is no choice of an integer key
        return any(value == choice and type(value) is type(choice) for choice in get_args(kind))
    if get_origin(kind) is list:
        (inner,) = get_args(kind)
        return isinstance(value, (list, tuple)) and all(_type_ok(inner, v) for v in value)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                            and abs(value) <= sys.float_info.max)  # 10**400 is no float
    if kind is str:
        return isinstance(value, str)
    return True


def _type_name(kind: Any) -> str:
    if get_origin(kind) is list:
        return f"a list of {_type_name(get_args(kind)[0])}"
    if dataclasses.is_dataclass(kind):
        return f"mappings ({', '.join(f.name for f in dataclasses.fields(kind))})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def ranges(cfg: Any, prefix: str = "") -> dict[str, tuple]:
    """Every declared range of a config (or section) by its dotted key: (lower, upper or None, lower excluded)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name) if not isinstance(cfg, type) else None
        if dataclasses.is_dataclass(v):
            out.update(ranges(v, f"{prefix}{f.name}."))
        elif RANGE in f.metadata:
            out[f"{prefix}{f.name}"] = f.metadata[RANGE]
    return out


def range_problems(cfg: Any, leaves: dict[str, Any]) -> list[str]:
    """Each value of `leaves` (dotted key -> value) outside the range its field declares, as a message."""
    problems = []
    for key, (lo, hi, open_below) in ranges(cfg).items():
        v = leaves[key]
        finite = not isinstance(v, float) or math.isfinite(v)
        if not (finite and (lo < v if open_below else lo <= v) and (hi is None or v <= hi)):  # NaN fails too
            bound = (f"finite and {'>' if open_below else '>='} {lo}" if hi is None
                     else f"in {'(' if open_below else '['}{lo}, {hi}]")
            problems.append(f"`{key}` must be {bound}; got {v!r}")
    return problems


def _node(tree: dict, parts: list[str], make: bool) -> dict | None:
    """The mapping that holds key parts[-1] (made along the way with `make`), or None when the path is not one."""
    for part in parts[:-1]:
        if make and part not in tree:
            tree[part] = {}
        tree = tree.get(part)
        if not isinstance(tree, dict):
            return None
    return tree


def renamed(tree: Any, problems: list[str], say=None) -> Any:
    """`tree` with each old key of RENAMED under its new name; `say` (when given) gets one line per old key used."""
    if not isinstance(tree, dict):
        return tree
    tree = copy.deepcopy(tree)
    for old, new in RENAMED.items():
        src = _node(tree, old.split("."), make=False)
        if src is None or old.rsplit(".", 1)[1] not in src:
            continue
        dst = _node(tree, new.split("."), make=True)
        if dst is None:  # the new key's section is not a mapping: check_tree reports it
            continue
        value, leaf = src.pop(old.rsplit(".", 1)[1]), new.rsplit(".", 1)[1]
        if leaf in dst:
            problems.append(f"`{old}` and `{new}` are both set; keep only `{new}` (the new name of `{old}`)")
            continue
        dst[leaf] = value
        if say:
            say(f"note: `{old}` is now `{new}`; read as the new key (rename it to silence this)")
    return tree
