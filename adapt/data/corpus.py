"""The corpus: its sources, their token stores (adapt.data.store), the split into training sequences and
held-out documents, served as sequences of data.seq_length tokens (adapt.data.sequences);
the data position is a pure function of the step.

Sources are `data.sources` (files or a hub dataset each, with a text field and a weight), else
`data.train_files` as one source, else the embedded corpus. Held-out text is the last whole documents of each
source (no document is split between training and held-out), enough for its share of `data.heldout_sequences`.

The embedded default corpus is the English Wikipedia extract shipped in gensim's test data
(206 pages of a 2014 dump; CC BY-SA 3.0, Wikipedia contributors), turned once into a local
JSONL file of plain text. Nothing is downloaded.
"""
from __future__ import annotations

import bz2
import glob
import html
import importlib.util
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adapt.data import store
from adapt.data.sequences import SequenceView, Mixture, StoreSequences, batch_indices, _PERMS  # noqa: F401 (the data API)
from adapt.recipe.config import DataConfig
from adapt.model.causal import start_token
from adapt.data.store import DataError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


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


# --- sources -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One source of the corpus, resolved: its files (or a hub dataset), text field and weight."""

    label: str
    builder: str
    """datasets builder (json, text, parquet) of the files, or the hub dataset's name."""
    files: tuple[str, ...]
    text_field: str
    weight: float
    where: str
    """The recipe key that names it, for messages (data.train_files, data.sources[1])."""
    subset: str = ""


def source_problems(dcfg: DataConfig) -> list[str]:
    """What is wrong with data.sources as a whole: weights that are not finite numbers >= 0 or all zero,
    a source without a path, two sources with one name, sources together with data.train_files."""
    problems = []
    for i, src in enumerate(dcfg.sources):
        if not isinstance(src.weight, (int, float)) or not math.isfinite(src.weight) or src.weight < 0:
            problems.append(f"`data.sources[{i}].weight` must be a finite number >= 0; got {src.weight!r}")
        if not src.path.strip():
            problems.append(f"`data.sources[{i}].path` is empty; give a file, a glob or a hub dataset name")
    weights = [s.weight for s in dcfg.sources]
    if dcfg.sources and not problems and not sum(weights) > 0:
        problems.append("every `data.sources[i].weight` is 0; give at least one source a weight > 0")
    names = [s.name for s in dcfg.sources if s.name]
    problems += [f"two sources are named `{n}` in data.sources; give each its own name" for n in sorted(set(names))
                 if names.count(n) > 1]
    if dcfg.sources and dcfg.train_files:
        problems.append("set `data.sources` or `data.train_files`, not both (data.train_files is one source)")
    return problems


def resolve_files(patterns: list[str], where: str) -> tuple[str, list[str]]:
    """(datasets builder name, files) for file patterns; a hub name gives (name, [])."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches and (os.path.sep in pattern or Path(pattern).suffix):
            raise DataError(f"data file `{pattern}` not found; check {where}")
        if not matches:
            return pattern, []  # a hub dataset name
        files += matches
    kinds = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds:
        bad = [f for f in files if Path(f).suffix.lower() not in FORMATS]
        raise DataError(f"unknown data format for {bad[0]} ({where}); use .txt, .jsonl/.json or .parquet files")
    if len(kinds) > 1:
        raise DataError(f"{where} mixes formats; use files of one format (.txt, .jsonl or .parquet)")
    return kinds.pop(), files


def _label(text: str) -> str:
    stem = Path(text.rstrip("/*")).stem if os.path.sep in text or Path(text).suffix else text
    return re.sub(r"\W+", "_", stem).strip("_")[:40] or "source"


def resolve_sources(dcfg: DataConfig) -> list[Source]:
    """The corpus's sources with a weight > 0: data.sources, else data.train_files, else the embedded corpus."""
    problems = source_problems(dcfg)
    if problems:
        raise DataError("; ".join(problems))
    if not dcfg.sources:
        if not dcfg.train_files:
            return [Source("enwiki_gensim", "json", (str(embedded_corpus(dcfg.cache_dir)),), "text", 1.0,
                           "the embedded corpus")]
        builder, files = resolve_files(list(dcfg.train_files), "data.train_files")
        return [Source(_label(dcfg.train_files[0]), builder, tuple(files), dcfg.text_field, 1.0, "data.train_files")]
    out = []
    for i, src in enumerate(dcfg.sources):
        where = f"data.sources[{i}]"
        builder, files = resolve_files([src.path], f"{where}.path")
        out.append(Source(_label(src.name or src.path), builder, tuple(files), src.text_field, float(src.weight),
                          where, src.subset))
    labels = [s.label for s in out]
    if len(set(labels)) < len(labels):
        raise DataError(f"two sources share the name {max(labels, key=labels.count)!r}; set data.sources[i].name")
    return [s for s in out if s.weight > 0]


def _stamp(src: Source) -> dict:
    """What identifies the source's content: each file's size/mtime/checksum, or the hub name and revision."""
    if src.files:
        return {"files": [store.file_stamp(f) for f in src.files], "text_field": src.text_field}
    revision = None
    try:
        from huggingface_hub import HfApi

        revision = HfApi().dataset_info(src.builder).sha
    except Exception:  # offline, or no such dataset (the read then says so)
        pass
    return {"hub": src.builder, "subset": src.subset, "revision": revision, "text_field": src.text_field}


def _records(src: Source):
    """Batches of records (column -> values) of a source, streamed: local files and hub datasets alike."""
    import datasets

    try:
        if src.files:
            ds = datasets.load_dataset(src.builder, data_files=list(src.files), split="train", streaming=True)
        else:
            ds = datasets.load_dataset(src.builder, src.subset or None, split="train", streaming=True)
        field = "text" if src.builder == "text" else src.text_field
        for batch in ds.iter(batch_size=256):
            if field not in batch:
                raise DataError(f"{src.where}: the data has no `{field}` column (columns: {', '.join(batch)}); "
                                f"set {_field_key(src)}")
            yield batch
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for unreadable files
        raise DataError(f"cannot read {', '.join(src.files) or src.builder} ({src.where}): {_reason(err)}; check "
                        f"{src.where} (UTF-8 .txt, .jsonl with one object per line, or .parquet; not empty)") from None


def _field_key(src: Source) -> str:
    return f"{src.where}.text_field" if src.where.startswith("data.sources") else "data.text_field"


def iter_texts(src: Source):
    """The source's texts in batches (lists of str; null/missing become empty documents)."""
    field = "text" if src.builder == "text" else src.text_field
    return store.text_batches(_records(src), field, f"{src.where}", _field_key(src))


def _reason(err: BaseException) -> str:
    """The innermost cause of an exception as one line (datasets wraps the useful one)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def store_folder(src: Source, dcfg: DataConfig, tokenizer, stamp: dict | None = None) -> Path:
    """data.cache_dir/stores/<label>-<hash of the format version, the source's content and the tokenizer>."""
    key = [store.VERSION, src.builder, stamp or _stamp(src), store.tokenizer_hash(tokenizer)]
    return Path(dcfg.cache_dir) / "stores" / f"{src.label}-{store.short_hash(key)}"


def open_store(src: Source, dcfg: DataConfig, tokenizer, say=store.to_stderr) -> store.TokenStore:
    """The source's token store under data.cache_dir/stores, prepared first when missing (one writer per folder)."""
    tok_hash, stamp = store.tokenizer_hash(tokenizer), _stamp(src)
    folder = store_folder(src, dcfg, tokenizer, stamp)
    identity = {"source": {"label": src.label, "where": src.where, "builder": src.builder, "stamp": stamp},
                "tokenizer": {"hash": tok_hash, "size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id},
                "seq_length": dcfg.seq_length}
    if not (folder / store.MANIFEST).is_file():
        _say_why_new(folder, stamp, tok_hash, say)
    opened = store.ensure(folder, lambda: iter_texts(src), tokenizer, identity, dcfg.num_proc, say)
    opened.check(tok_hash, stamp)
    return opened


def _say_why_new(folder: Path, stamp: dict, tok_hash: str, say) -> None:
    """Name what changed when a store of the same source exists with other contents or another tokenizer."""
    for old in sorted(folder.parent.glob(folder.name.rsplit("-", 1)[0] + "-*/" + store.MANIFEST)):
        m = json.loads(old.read_text())
        paths = [f.get("path") for f in stamp.get("files", [])]
        if [f.get("path") for f in m["source"]["stamp"].get("files", [])] != paths:
            continue
        why = ("the tokenizer differs" if m["tokenizer"]["hash"] != tok_hash
               else "its files changed (size, mtime or content)")
        say(f"{old.parent} was made from the same source but {why}: preparing a new store (the old one is kept)")


# --- training sequences and held-out documents ------------------------------------------------

@dataclass
class Sequences:
    """Training sequences (tensors, or views of token stores read when indexed) and held-out sequences (tensors);
    a "block" in the data path is one such sequence of data.seq_length tokens, not a diffusion block."""

    train: torch.Tensor | SequenceView  # (N_train, L) long
    train_docs: torch.Tensor | SequenceView  # (N_train, L) long
    heldout: torch.Tensor  # (N_heldout, L) long
    heldout_docs: torch.Tensor
    train_loss_mask: torch.Tensor | None = None
    """(N_train, L) bool: the positions that may carry loss (SFT: the response); None = all."""
    heldout_loss_mask: torch.Tensor | None = None
    """(N_heldout, L) bool, the same for the held-out blocks."""
    heldout_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Named subsets of the held-out eligible positions whose share of the bound is reported (SFT: answer;
    a mixture: each source)."""
    summary: str = ""
    """One line about the data for the start-up log."""
    mixture: Mixture | None = None
    """How each step draws its blocks from the sources (None: `batch_indices` over all of `train`)."""


def heldout_shares(total: int, weights: list[float]) -> list[int]:
    """data.heldout_sequences split over sources by weight, at least one block each."""
    return [max(1, round(total * w / sum(weights))) for w in weights]


def split(tokens: store.TokenStore, src: Source, length: int, heldout: int) -> tuple[int, int]:
    """(training blocks, first held-out token): the held-out text is the fewest last whole documents that
    give `heldout` blocks; the training blocks are cut from the documents before them."""
    body, total = length - 1, len(tokens)
    if total < body:
        raise DataError(f"{src.where}: the corpus is smaller than one block of {length} tokens ({total} "
                        f"tokens); add text to it or lower data.seq_length")
    need = heldout * body
    k = int(np.searchsorted(tokens.doc_ends, total - need, side="right"))
    cut = int(tokens.doc_ends[k - 1]) if k else 0
    if cut < body:
        raise DataError(f"{src.where}: its {len(tokens.doc_ends)} documents ({total} tokens) leave no training block "
                        f"of {length} tokens once whole documents for {heldout} held-out blocks are kept out "
                        f"(data.heldout_sequences={heldout}); add data or lower data.heldout_sequences")
    return cut // body, cut


def build_sequences(dcfg: DataConfig, tokenizer, say=store.to_stderr) -> Sequences:
    """Training blocks and held-out blocks of every source, from its token store (prepared when missing)."""
    sources = resolve_sources(dcfg)
    start, length = start_token(tokenizer), dcfg.seq_length
    parts, held, held_docs, lines = [], [], [], []
    for src, h in zip(sources, heldout_shares(dcfg.heldout_sequences, [s.weight for s in sources])):
        tokens = open_store(src, dcfg, tokenizer, say)
        n, cut = split(tokens, src, length, h)
        parts.append(StoreSequences(tokens, 0, n, length, start))
        kept = StoreSequences(tokens, cut, h, length, start)
        held.append(kept.rows(np.arange(h)))
        held_docs.append(kept.docs(np.arange(h)))
        out_docs = len(tokens.doc_ends) - int(np.searchsorted(tokens.doc_ends, cut, side="right"))
        lines.append(f"{src.label}: {len(tokens):,} tokens, {len(tokens.doc_ends):,} documents -> {n:,} "
                     f"train blocks, {h} held-out blocks from its last {out_docs} documents ({tokens.folder})")
    rows = np.cumsum([0] + [len(x) for x in held])
    heldout = torch.cat(held)
    parts_mask = {}
    if len(sources) > 1:  # each source's share of the held-out bound, reported beside it
        for src, a, b in zip(sources, rows[:-1], rows[1:]):
            mask = torch.zeros(heldout.shape, dtype=torch.bool)
            mask[a:b] = True
            parts_mask[src.label] = mask
    mixture = Mixture([p.n for p in parts], [s.weight for s in sources], [s.label for s in sources])
    return Sequences(SequenceView(parts), SequenceView(parts, docs=True), heldout, torch.cat(held_docs),
                     heldout_parts=parts_mask, summary="data: " + " | ".join(lines), mixture=mixture)
