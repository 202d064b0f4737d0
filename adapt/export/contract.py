"""The export folder's contract: its file names, what a user can break in one, and where one may be written.

An export is a self-describing HF folder (weights, config.json, tokenizer, diffusion.json, recipe.yaml, the
model card and the decoder shipped in custom_generate/). This module is the only one that spells those names
(besides the shipped decoder, which runs without this package). Every command that reads an export checks it
first (adapt.export.loader.export_problem, through contents_problem here), so a broken folder gets one message
naming the problem instead of a traceback or garbage output; the export command asks here whether its
destination may be replaced (only an earlier export may).
"""
from __future__ import annotations

import fnmatch
import json
from functools import lru_cache
from pathlib import Path

import torch
import yaml

from adapt.cli.types import write_problem
from adapt import objectives
from adapt.recipe.config import Config, from_dict, schema
from adapt.model.causal import DiffusionMeta, ModelLoadError

META_FILE = "diffusion.json"
RECIPE_FILE = "recipe.yaml"
ADAPTER_DIR = "adapter"
WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "draft_head.safetensors"
"""The speculative decoder's draft head, trained into an export by `python -m adapt.draft_head` (optional)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
"""At least one of these holds a tokenizer's vocabulary (fast, sentencepiece, BPE)."""
EXPORT_ENTRIES = (META_FILE, RECIPE_FILE, ADAPTER_DIR, "model*.safetensors*", "config.json",
                  "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                  "vocab.*", "merges.txt", "spiece.model", "chat_template.*", "README.md", "custom_generate",
                  HEAD_FILE)
"""Every name an export writes: a folder holding anything else is not (only) an export and is never replaced."""
AGAIN = "export the run again with `python -m adapt.export RUN_DIR`"


def save_meta(folder: Path, meta: DiffusionMeta) -> None:
    (Path(folder) / META_FILE).write_text(meta.to_json())


def read_meta(folder: str | Path) -> DiffusionMeta:
    """The diffusion metadata of an export (or a run's base/); ModelLoadError when there is none."""
    path = Path(folder).expanduser() / META_FILE
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no {META_FILE}: it is not an exported diffusion model; "
                             f"export one with `python -m adapt.export RUN_DIR`")
    meta = DiffusionMeta.from_json(path.read_text(), str(path))
    unknown = sorted(set(meta.extra) - _objective_fields(meta))
    if unknown:
        raise ModelLoadError(f"{path} is not valid diffusion metadata (fields {', '.join(unknown)} are none of its "
                             f"objective's); re-export the model with `python -m adapt.export RUN_DIR`")
    return meta


def _objective_fields(meta: DiffusionMeta) -> set[str]:
    """The fields the export's objective records (its `meta_fields` for the default values of its keys); every
    field when the objective is not registered here (its own error comes where it is built)."""
    try:
        spec = objectives.spec_for_meta(meta)
    except objectives.UnknownObjective:
        return set(meta.extra)
    return set(spec.meta_fields(schema({"diffusion": {"objective": spec.name}})))


def exported_meta(name_or_path: str | Path) -> DiffusionMeta | None:
    """The metadata of a folder this project wrote (export or base/), or None for anything else (a causal LM)."""
    folder = Path(name_or_path).expanduser()
    return read_meta(folder) if (folder / META_FILE).is_file() else None


def read_recipe(folder: str | Path) -> Config | None:
    """The resolved training recipe an export was made with, or None when it has none."""
    path = Path(folder) / RECIPE_FILE
    return from_dict(yaml.safe_load(path.read_text())) if path.is_file() else None


def weight_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("model*.safetensors"))


# --- what a user can break -----------------------------------------------------------------------

def contents_problem(path: Path, meta: DiffusionMeta) -> str | None:
    """Why the files of export `path` do not make the model they claim, or None: weights unreadable, a model
    type transformers does not know or that the weights' names and shapes do not fit, vocabulary rows that
    disagree with config.json / diffusion.json / the tokenizer, a missing or unloadable tokenizer, weights
    that are not finite. Reads headers and config first; the finiteness pass reads each tensor once."""
    from safetensors import SafetensorError

    files = tuple(weight_files(path))
    try:
        shapes = _saved_shapes(files)
    except (SafetensorError, OSError) as err:
        return f"{_first_line(err)}: corrupt or truncated; {AGAIN}"
    config, problem = _config(path)
    if problem:
        return problem
    for check in (_vocabulary_problem, _architecture_problem):
        problem = check(path, config, meta, shapes)
        if problem:
            return problem
    return _tokenizer_problem(path, config) or _finite_problem(files)


def _saved_shapes(files: tuple[Path, ...]) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in the safetensors files (headers only)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as handle:
                shapes |= {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except (SafetensorError, OSError) as err:
            raise type(err)(f"{file} ({_first_line(err)})") from None
    return shapes


def _config(path: Path):
    """(the transformers config of `path`, None) or (None, why it does not load)."""
    from transformers import AutoConfig

    file = path / "config.json"
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        return None, f"{file} is missing or unreadable ({_first_line(err)}); {AGAIN}"
    try:
        return AutoConfig.from_pretrained(path), None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, (f"{file} names model_type={model_type!r}, which this transformers cannot build "
                      f"({_first_line(err)}); restore the export's config.json or {AGAIN}")


def _architecture_problem(path: Path, config, meta, shapes: dict) -> str | None:
    """The weights' names and shapes against the model config.json describes (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = getattr(model, "_tied_weights_keys", None) or {}
    missing = sorted(k for k in want if k not in shapes and k not in tied)
    unexpected = sorted(k for k in shapes if k not in want)
    wrong = sorted(k for k in want.keys() & shapes.keys() if want[k] != shapes[k])
    if not (missing or unexpected or wrong):
        return None
    detail = "; ".join(f"{what} {', '.join(keys[:3])}" + (" ..." if len(keys) > 3 else "")
                       for what, keys in (("missing", missing), ("unexpected", unexpected),
                                          ("other shape", wrong)) if keys)
    return (f"{path}: the weights do not fit the {config.model_type!r} model config.json describes ({detail}); "
            f"restore the export's config.json or {AGAIN}")


def _vocabulary_problem(path: Path, config, meta: DiffusionMeta, shapes: dict) -> str | None:
    rows = next((s[0] for k, s in shapes.items() if k.endswith("embed_tokens.weight")), config.vocab_size)
    if rows != config.vocab_size:
        return (f"{path}: the weights have {rows} vocabulary rows but config.json says "
                f"vocab_size={config.vocab_size}; {AGAIN}")
    if not 0 <= meta.mask_token_id < rows or not 0 < meta.real_vocab_size <= rows:
        return (f"{path / META_FILE} disagrees with the weights: mask_token_id={meta.mask_token_id} and "
                f"real_vocab_size={meta.real_vocab_size} must lie within the {rows} vocabulary rows; {AGAIN}")
    return None


def _tokenizer_problem(path: Path, config) -> str | None:
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); {AGAIN}"
    try:
        size = len(AutoTokenizer.from_pretrained(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{path}: the tokenizer does not load ({_first_line(err)}); {AGAIN}"
    if size > config.vocab_size:
        return f"{path}: the tokenizer has {size} tokens but the weights only {config.vocab_size} rows; {AGAIN}"
    return None


def _finite_problem(files: tuple[Path, ...]) -> str | None:
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    bad = _non_finite_tensor(stamp)
    return f"{bad} holds NaN or infinite values: the weights are broken; {AGAIN}" if bad else None


@lru_cache(maxsize=8)
def _non_finite_tensor(stamp: tuple) -> str | None:
    """'file: tensor' of the first tensor with a NaN or inf, or None; cached per (file, size, mtime)."""
    from safetensors import safe_open

    for file, _, _ in stamp:
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return f"{file}: {key}"
    return None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


# --- where an export may be written ----------------------------------------------------------------

def destination_problem(out: Path, keep: list[Path]) -> str | None:
    """Why `out` may not receive an export, or None. `keep` are folders an export must never replace or enter
    (the run folder's own checkpoints and base). Only an empty folder or an earlier export (its metadata,
    weights and only names an export writes) may be replaced: anything else would lose what it holds."""
    try:
        target = out.expanduser().resolve()
        kept = [k.expanduser().resolve() for k in keep]
    except (OSError, RuntimeError) as err:
        return f"--out {out} cannot be resolved ({_first_line(err)}); choose another folder"
    for folder in kept:
        if target == folder or target.is_relative_to(folder) or folder.is_relative_to(target):
            return (f"--out {out} would replace or enter {folder}, which the run needs; choose a folder of its "
                    f"own (default: RUN_DIR/final)")
    if not out.exists():
        return None
    if not out.is_dir():
        return f"--out {out} is a file; choose a folder (it is never replaced by an export)"
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if not any(fnmatch.fnmatch(n, pattern) for pattern in EXPORT_ENTRIES)]
    if names and (foreign or not (out / META_FILE).is_file() or not weight_files(out)):
        what = f"holds {', '.join(foreign[:3])}" if foreign else "is not an earlier export"
        return (f"--out {out} {what}{' ...' if len(foreign) > 3 else ''}: an export replaces only an empty folder "
                f"or an earlier export; choose a new folder, or move its contents away yourself")
    return None


def writable_problem(folder: Path) -> str | None:
    """Why no file can be made in `folder` (made with its parents if missing, and kept), or None."""
    return write_problem(folder, keep=True)
