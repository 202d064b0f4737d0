"""Read, tokenize, pack and serve training blocks; the data position is a pure function of the step.

The embedded default corpus is the English Wikipedia extract shipped in gensim's test data
(206 pages of a 2014 dump; CC BY-SA 3.0, Wikipedia contributors), turned once into a local
JSONL file of plain text. Nothing is downloaded.
"""
from __future__ import annotations

import bz2
import glob
import hashlib
import html
import importlib.util
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapt.config import DataConfig
from adapt.model import start_token

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(RuntimeError):
    """The corpus cannot be used; the message says what to change."""


# --- embedded corpus ---------------------------------------------------------------------------

def _strip_nested(text: str, open_: str, close: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_FILE = re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I)


def clean_wikitext(text: str) -> str:
    """Wikitext -> plain paragraphs: drop templates, tables, refs, files, categories; keep link text."""
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _FILE.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("*", "#", ":", ";", "|", "!"))]
    return "\n".join(lines)


def gensim_wiki_dump() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise DataError("the embedded corpus needs the gensim wheel: pip install --no-deps gensim "
                        "(or set data.train_files)")
    path = Path(spec.origin).parent / "test" / "test_data" / WIKI_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall gensim or set data.train_files")
    return path


def embedded_corpus(cache_dir: str | os.PathLike) -> Path:
    """Plain-text JSONL of the embedded Wikipedia extract, made once (written then renamed)."""
    out = Path(cache_dir) / "embedded" / "enwiki_gensim.jsonl"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    try:
        _write_wiki_jsonl(gensim_wiki_dump(), tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # an interrupted build leaves nothing behind
    return out


def _write_wiki_jsonl(dump: Path, tmp: Path) -> None:
    with bz2.open(dump, "rb") as src, tmp.open("w") as dst:
        for _, elem in ET.iterparse(src):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.find("{*}ns")
            body = elem.find("{*}revision/{*}text")
            if ns is not None and ns.text == "0" and elem.find("{*}redirect") is None and body is not None:
                text = clean_wikitext(body.text or "")
                if len(text) > 200:
                    title = elem.find("{*}title").text
                    dst.write(json.dumps({"title": title, "text": text}) + "\n")
            elem.clear()


# --- reading and packing -----------------------------------------------------------------------

def resolve_files(dcfg: DataConfig) -> tuple[str, list[str]]:
    """(datasets builder name, files) for the configured corpus; a hub name gives (name, [])."""
    if not dcfg.train_files:
        return "json", [str(embedded_corpus(dcfg.cache_dir))]
    files: list[str] = []
    for pattern in dcfg.train_files:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches and (os.path.sep in pattern or Path(pattern).suffix):
            raise DataError(f"data file `{pattern}` not found; check data.train_files")
        if not matches:
            return pattern, []  # a hub dataset name
        files += matches
    kinds = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds:
        bad = [f for f in files if Path(f).suffix.lower() not in FORMATS]
        raise DataError(f"unknown data format for {bad[0]}; use .txt, .jsonl/.json or .parquet files")
    if len(kinds) > 1:
        raise DataError("data.train_files mixes formats; use files of one format (.txt, .jsonl or .parquet)")
    return kinds.pop(), files


def load_documents(dcfg: DataConfig):
    """A `datasets.Dataset` with one `text` column."""
    import datasets

    builder, files = resolve_files(dcfg)
    try:
        if files:
            ds = datasets.load_dataset(builder, data_files=files, split="train",
                                       cache_dir=str(Path(dcfg.cache_dir) / "hf"))
        else:
            ds = datasets.load_dataset(builder, split="train")
    except Exception as err:  # datasets raises many types for unreadable files
        raise DataError(f"cannot read {files or builder}: {_reason(err)}; check data.train_files (UTF-8 .txt, "
                        f".jsonl with one object per line, or .parquet; not empty)") from None
    field = "text" if builder == "text" else dcfg.text_field
    if field not in ds.column_names:
        raise DataError(f"the data has no `{field}` column (columns: {', '.join(ds.column_names)}); "
                        f"set data.text_field")
    kind = ds.features[field]
    if not (isinstance(kind, datasets.Value) and kind.dtype in ("string", "large_string")):
        raise DataError(f"the `{field}` column holds {kind}, not text; set data.text_field to a text column")
    return ds.select_columns([field]).rename_column(field, "text") if field != "text" else ds.select_columns(["text"])


def _reason(err: BaseException) -> str:
    """The innermost cause of an exception as one line (datasets wraps the useful one)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def pack(ds, tokenizer, block_size: int, num_proc: int = 1):
    """Tokenize, join documents with EOS and cut into blocks of `block_size` tokens.

    Every block starts with BOS (or EOS when there is none) so that position 0, which is never
    masked under the shift, is the same given token at training and sampling time. `doc_ids`
    numbers the documents inside a block for per-document attention.
    """
    start = start_token(tokenizer)
    eos = tokenizer.eos_token_id
    body = block_size - 1

    def tokenize(batch):
        ids = tokenizer([t or "" for t in batch["text"]], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] if x else [] for x in ids]}  # null/empty documents add no lone EOS

    def group(batch):
        flat, docs = [], []
        for d, ids in enumerate(x for x in batch["ids"] if x):
            flat += ids
            docs += [d] * len(ids)
        n = len(flat) // body
        blocks = [[start] + flat[i * body:(i + 1) * body] for i in range(n)]
        doc_ids = [[docs[i * body]] + docs[i * body:(i + 1) * body] for i in range(n)]
        return {"input_ids": blocks, "doc_ids": [[x - d[0] for x in d] for d in doc_ids]}

    tok = ds.map(tokenize, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                 desc="tokenize")
    return tok.map(group, batched=True, batch_size=2000, remove_columns=["ids"], desc="pack")


@dataclass
class Blocks:
    """Packed token blocks, split into train and held-out."""

    train: torch.Tensor  # (N_train, L) long
    train_docs: torch.Tensor  # (N_train, L) long
    heldout: torch.Tensor  # (N_heldout, L) long
    heldout_docs: torch.Tensor
    train_loss_mask: torch.Tensor | None = None
    """(N_train, L) bool: the positions that may carry loss (SFT: the response); None = all."""
    heldout_loss_mask: torch.Tensor | None = None
    """(N_heldout, L) bool, the same for the held-out blocks."""
    heldout_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Named subsets of the held-out eligible positions whose share of the bound is reported (SFT: answer)."""
    summary: str = ""
    """One line about the data for the start-up log."""


def _cache_key(dcfg: DataConfig, tokenizer) -> str:
    builder, files = resolve_files(dcfg)
    stamp = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files] or builder
    vocab = hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    return hashlib.sha1(json.dumps([stamp, vocab, dcfg.block_size, dcfg.text_field]).encode()).hexdigest()[:16]


def build_blocks(dcfg: DataConfig, tokenizer) -> Blocks:
    """Packed blocks, cached under `data.cache_dir` (written then renamed); held-out = the last blocks."""
    cache = Path(dcfg.cache_dir) / f"blocks-{_cache_key(dcfg, tokenizer)}.pt"
    if cache.is_file():
        ids, docs = torch.load(cache, weights_only=True).values()
    else:
        packed = pack(load_documents(dcfg), tokenizer, dcfg.block_size, dcfg.num_proc)
        if len(packed) == 0:
            raise DataError(f"the corpus is smaller than one block of {dcfg.block_size} tokens; "
                            f"add text to data.train_files or lower data.block_size")
        ids = torch.tensor(packed["input_ids"], dtype=torch.long)
        docs = torch.tensor(packed["doc_ids"], dtype=torch.long)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save({"input_ids": ids, "doc_ids": docs}, tmp)
        os.replace(tmp, cache)
    if len(ids) <= dcfg.heldout_blocks:
        raise DataError(f"the corpus makes {len(ids)} blocks of {dcfg.block_size} tokens, not more than "
                        f"data.heldout_blocks={dcfg.heldout_blocks}; add data or lower data.heldout_blocks")
    n = len(ids) - dcfg.heldout_blocks
    return Blocks(ids[:n], docs[:n], ids[n:], docs[n:])


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


_PERMS: dict[tuple[int, int, int], torch.Tensor] = {}


def _epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    key = (seed, epoch, n)
    if key not in _PERMS:
        if len(_PERMS) > 4:
            _PERMS.clear()
        _PERMS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return _PERMS[key]
