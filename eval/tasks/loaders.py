"""Dataset loaders for the local tasks' `custom_dataset: !function loaders.<name>`.

lm-eval imports this file by path, so it imports nothing from the project. Data is read from
(in order) the `data_dir` metadata (`--metadata '{"data_dir": "..."}'`), $ADAPT_EVAL_TASK_DATA, or
eval/tasks/data/; make it with `python -m eval.tasks.make_data [MODEL_DIR]`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import datasets


def data_dir(kwargs: dict) -> Path:
    return Path(kwargs.get("data_dir") or os.environ.get("ADAPT_EVAL_TASK_DATA") or Path(__file__).parent / "data")


def _load(name: str, kwargs: dict) -> datasets.DatasetDict:
    path = data_dir(kwargs) / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make the local task data first with "
                                f"`python -m eval.tasks.make_data [MODEL_DIR] --out {path.parent}`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def cloze(**kwargs) -> datasets.DatasetDict:
    """{context, target}: a held-out sentence without its last word, and that word (with its space)."""
    return _load("cloze", kwargs)


def choice(**kwargs) -> datasets.DatasetDict:
    """{context, endings (4), label}: the start of a held-out sentence and four candidate endings."""
    return _load("choice", kwargs)


def documents(**kwargs) -> datasets.DatasetDict:
    """{text}: held-out paragraphs for rolling log-likelihood (word / byte perplexity)."""
    return _load("documents", kwargs)
