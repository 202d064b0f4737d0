"""The token store: a corpus tokenised once into a flat memory-mapped file, read by every rank as slices.

One store per source, in its own folder under `data.cache_dir`/stores:

    tokens.bin     every document's token ids followed by EOS, concatenated; the narrowest unsigned dtype that
                   holds the vocabulary (uint16 up to 65,536 ids, else uint32); no BOS (added when a block is cut)
    doc_ends.bin   int64, the end offset of each document in tokens.bin (document boundaries, for per-document
                   attention and for keeping whole documents out of training)
    manifest.json  format version, the source (files with size / mtime / a checksum of their ends, or the hub
                   name and revision), the tokenizer's hash, counts, each file's size and sha256, how it was made

(nanoGPT's flat uint16 file, Megatron-LM's .bin/.idx pair.) A store is written into `<name>.partial-<pid>` and
renamed into place once complete, under a file lock per store: a killed prepare leaves only a partial folder that
nothing reads and that the next prepare removes; a second process waits for the first instead of writing a copy.
Documents stream through a pool of `num_proc` tokenising workers, a bounded number of batches in flight, so
memory does not grow with the corpus.
"""
from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
from collections import deque
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

FORMAT, VERSION = "adapt-token-store", 1
TOKENS, DOC_ENDS, MANIFEST = "tokens.bin", "doc_ends.bin", "manifest.json"
BATCH_DOCS, BATCH_CHARS = 512, 2_000_000
"""A tokenising task: up to this many documents or characters (bounds the memory of a batch in flight)."""
LOCK_REPORT_S = 30.0


class DataError(RuntimeError):
    """The corpus cannot be used; the message says what to change."""


def to_stderr(text: str) -> None:
    """The default way a store reports progress (stdout may carry a script's results)."""
    print(text, file=sys.stderr, flush=True)


# --- identity ------------------------------------------------------------------------------------

def tokenizer_hash(tokenizer) -> str:
    """The tokenizer's identity as the store sees it: its vocabulary and EOS, without the mask token (training
    adds it after the corpus may have been prepared; it never comes from text of a store made without it)."""
    mask = tokenizer.mask_token
    vocab = sorted((t, i) for t, i in tokenizer.get_vocab().items() if t != mask)
    return hashlib.sha1(json.dumps([vocab, tokenizer.eos_token_id]).encode()).hexdigest()[:16]


def token_dtype(tokenizer) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of the vocabulary and one more (a mask token)."""
    return np.dtype(np.uint16) if len(tokenizer) + 1 <= 2**16 else np.dtype(np.uint32)


def file_stamp(path: str) -> dict:
    """Size, mtime and the sha1 of the first and last MiB: what tells that a source file changed, read in
    milliseconds whatever its size (a full checksum of a terabyte corpus at every launch is not affordable)."""
    st = os.stat(path)
    h = hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(2**20))
        if st.st_size > 2**21:
            f.seek(-2**20, os.SEEK_END)
        h.update(f.read(2**20))
    return {"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ends_sha1": h.hexdigest()}


def short_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# --- reading a store -----------------------------------------------------------------------------

class TokenStore:
    """An opened store: `tokens` (T,) and `doc_ends` (D,) int64, both memory-mapped read-only."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise DataError(f"{self.folder} is a token store of format {self.manifest.get('format')} version "
                            f"{self.manifest.get('version')}; this version reads {FORMAT} version {VERSION}: remove "
                            f"that folder and run `python -m adapt.prepare RECIPE` to prepare it again")
        n, d = self.manifest["tokens"], self.manifest["documents"]
        dtype = np.dtype(self.manifest["dtype"])
        for name, count, kind in ((TOKENS, n, dtype), (DOC_ENDS, d, np.dtype(np.int64))):
            size = (self.folder / name).stat().st_size
            if size != count * kind.itemsize:
                raise DataError(f"{self.folder / name} holds {size} bytes, its manifest says {count * kind.itemsize}: "
                                f"the store is damaged; remove {self.folder} and prepare it again")
        self.tokens = np.memmap(self.folder / TOKENS, dtype=dtype, mode="r", shape=(n,))
        self.doc_ends = np.memmap(self.folder / DOC_ENDS, dtype=np.int64, mode="r", shape=(d,))

    def __len__(self) -> int:
        return len(self.tokens)

    def check(self, tok_hash: str, stamp: dict) -> None:
        """Refuse a store whose tokenizer or source is not the one asked for (a copied or edited folder)."""
        problems = []
        if self.manifest["tokenizer"]["hash"] != tok_hash:
            made = self.manifest["tokenizer"]["hash"]
            problems.append(f"it was made with tokenizer {made}, this run's is {tok_hash}")
        if self.manifest["source"]["stamp"] != stamp:
            problems.append("its source files differ from the ones it was made from")
        if problems:
            raise DataError(f"token store {self.folder} does not match this corpus: {'; '.join(problems)}. Remove "
                            f"that folder (or point data.cache_dir elsewhere) and prepare again")

    def verify(self) -> list[str]:
        """Files whose sha256 differs from the manifest (reads the whole store)."""
        bad = []
        for name, entry in self.manifest["files"].items():
            h = hashlib.sha256()
            with open(self.folder / name, "rb") as f:
                while chunk := f.read(2**24):
                    h.update(chunk)
            if h.hexdigest() != entry["sha256"]:
                bad.append(name)
        return bad


# --- the lock ------------------------------------------------------------------------------------

class _Waiting:
    """`with cache_lock(path):` one holder at a time, across processes and ranks; a waiter says so every 30 s."""

    def __init__(self, path: Path, say: Callable[[str], None]):
        from filelock import FileLock

        self.path, self.say, self.lock = path, say, FileLock(str(path))

    def __enter__(self):
        from filelock import Timeout

        t0 = time.monotonic()
        while True:
            try:
                self.lock.acquire(timeout=LOCK_REPORT_S)
                return self
            except Timeout:
                self.say(f"waiting for another process preparing the same data ({self.path} is locked, "
                         f"{time.monotonic() - t0:.0f} s so far)")

    def __exit__(self, *exc):
        self.lock.release()


def cache_lock(path: Path, say: Callable[[str], None] = to_stderr) -> _Waiting:
    """A file lock at `path` (made with its folder when missing)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {path.parent} ({err.strerror}); set data.cache_dir to a writable "
                        f"folder") from None
    return _Waiting(path, say)


# --- writing a store -----------------------------------------------------------------------------

def ensure(folder: Path, batches: Callable[[], Iterable[list]], tokenizer, identity: dict, num_proc: int = 1,
           say: Callable[[str], None] = to_stderr) -> TokenStore:
    """The store in `folder`, prepared from `batches()` (lists of texts) unless it exists; one writer per folder."""
    if (folder / MANIFEST).is_file():
        return TokenStore(folder)
    with cache_lock(folder.with_name(folder.name + ".lock"), say):
        if (folder / MANIFEST).is_file():  # another rank or launch made it while this one waited
            return TokenStore(folder)
        for stale in folder.parent.glob(folder.name + ".partial-*"):  # a killed prepare's: nobody writes it now
            say(f"removing {stale}, left by an interrupted prepare")
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        try:
            tmp.mkdir(parents=True)
            say(f"preparing token store {folder} from {identity['source']['where']} ({num_proc} worker(s))")
            manifest = _write(tmp, batches(), tokenizer, num_proc, say)
            if not manifest["tokens"]:
                where = identity["source"]["where"]
                files = [f.get("path") for f in identity["source"]["stamp"].get("files", [])]
                named = f" ({', '.join(map(str, files))})" if files else ""
                raise DataError(f"{where} holds no text (no document with a token); check {where}{named}: its "
                                f"files and text field")
            manifest.update(identity)
            _fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=1))
            os.rename(tmp, folder)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise DataError(f"no room to write the token store in {folder.parent} ({os.strerror(err.errno)}; "
                                f"nothing of it is kept): free space or set data.cache_dir to a larger disk, then "
                                f"rerun") from None
            if isinstance(err, PermissionError):
                raise DataError(f"cannot write the token store in {folder.parent} ({err.strerror}); set "
                                f"data.cache_dir to a writable folder") from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return TokenStore(folder)


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


_WORKER: dict = {}


def _init_worker(tokenizer, dtype) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tokenizer=tokenizer, dtype=dtype)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of the non-empty documents, each followed by EOS, concatenated; their lengths)."""
    tok, dtype = _WORKER["tokenizer"], _WORKER["dtype"]
    eos = tok.eos_token_id
    ids = [x for x in tok(texts, add_special_tokens=False)["input_ids"] if x]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(x + [eos] for x in ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _encoded(batches: Iterable[list], tokenizer, dtype, num_proc: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded batches in order; with num_proc > 1 a pool with at most 2 batches per worker in flight."""
    if num_proc <= 1:
        _init_worker(tokenizer, dtype)
        yield from map(_encode, batches)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_proc, _init_worker, (tokenizer, dtype)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _write(tmp: Path, batches: Iterable[list], tokenizer, num_proc: int, say) -> dict:
    """Tokenise into tmp/tokens.bin and tmp/doc_ends.bin; returns the manifest's counts and checksums."""
    dtype = token_dtype(tokenizer)
    hashes = {TOKENS: hashlib.sha256(), DOC_ENDS: hashlib.sha256()}
    n_tok = n_doc = 0
    t0 = last = time.monotonic()
    delay = float(os.environ.get("ADAPT_FAULT_PREPARE_DELAY_S", 0))  # tests: a window to kill a prepare in
    with open(tmp / TOKENS, "wb") as ftok, open(tmp / DOC_ENDS, "wb") as fdoc:
        for flat, lengths in _encoded(batches, tokenizer, dtype, num_proc):
            ends = n_tok + np.cumsum(lengths)
            for f, arr, name in ((ftok, flat, TOKENS), (fdoc, ends, DOC_ENDS)):
                f.write(arr.data)
                hashes[name].update(arr.data)
            n_tok, n_doc = n_tok + len(flat), n_doc + len(lengths)
            if time.monotonic() - last > LOCK_REPORT_S:
                last = time.monotonic()
                say(f"prepare {tmp.name}: {n_tok / 1e6:.1f}M tokens, {n_doc} documents, "
                    f"{n_tok / (last - t0) / 1e6:.2f}M tokens/s")
            time.sleep(delay)
        for f in (ftok, fdoc):
            f.flush()
            os.fsync(f.fileno())
    seconds = time.monotonic() - t0
    return {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "tokens": n_tok, "documents": n_doc,
            "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": h.hexdigest()}
                      for name, h in hashes.items()},
            "prepared": {"seconds": round(seconds, 2), "tokens_per_s": round(n_tok / max(seconds, 1e-9)),
                         "num_proc": num_proc, "host": socket.gethostname(), "pid": os.getpid(),
                         "time": time.strftime("%Y-%m-%d %H:%M:%S"), "python": sys.version.split()[0]}}


def text_batches(rows: Iterable[dict], field: str, where: str, key: str) -> Iterator[list]:
    """Lists of texts from batches of records (column -> values), at most BATCH_DOCS documents or BATCH_CHARS
    characters each; a value that is neither text nor null is refused naming the source and the field."""
    out, chars = [], 0
    for rows_batch in rows:
        for text in rows_batch[field]:
            if text is not None and not isinstance(text, str):
                raise DataError(f"{where}: the `{field}` field holds {type(text).__name__}, not text; set {key} "
                                f"to a text column")
            out.append(text or "")
            chars += len(out[-1])
            if len(out) >= BATCH_DOCS or chars >= BATCH_CHARS:
                yield out
                out, chars = [], 0
    if out:
        yield out
