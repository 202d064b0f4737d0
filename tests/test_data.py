"""Corpus reading, blocks cut from the token store, and the resumable data order (the store's own format and
faults: tests/test_store.py)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapt.data.corpus as data
from adapt.recipe.config import DataConfig
from adapt.data.corpus import DataError, batch_indices, build_sequences, embedded_corpus, iter_texts, resolve_sources

DOCS = ["The quick brown fox jumps over the lazy dog.", "Packing joins documents with an end token.",
        "Short.", "A fourth document, somewhat longer than the others, to span more than one block of tokens."]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def dcfg(tmp_path: Path, files, **kw) -> DataConfig:
    return DataConfig(train_files=[str(f) for f in files], cache_dir=str(tmp_path / "cache"),
                      **{"seq_length": 16, "heldout_sequences": 1, **kw})


# --- embedded corpus ---------------------------------------------------------------------------

def test_embedded_corpus_built_once(tmp_path, monkeypatch):
    path = embedded_corpus(tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) > 50 and all(len(r["text"]) > 200 and r["title"] for r in rows)
    text = " ".join(r["text"] for r in rows)
    assert "{{" not in text and "<ref" not in text and "&nbsp;" not in text
    assert text.count("[[") < 5  # two image captions with nested links keep their brackets (of 2.5M chars)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left
    monkeypatch.setattr(data, "gensim_wiki_dump", lambda: pytest.fail("rebuilt an existing corpus"))
    assert embedded_corpus(tmp_path) == path


def test_embedded_corpus_never_half_written(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = data.clean_wikitext

    def flaky(text):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt  # killed while writing
        return real(text)

    monkeypatch.setattr(data, "clean_wikitext", flaky)
    with pytest.raises(KeyboardInterrupt):
        embedded_corpus(tmp_path)
    folder = tmp_path / "embedded"
    assert list(folder.iterdir()) == []  # neither the final file nor a temporary one
    monkeypatch.setattr(data, "clean_wikitext", real)
    assert embedded_corpus(tmp_path).is_file()


# --- blocks ------------------------------------------------------------------------------------

def _texts(cfg: DataConfig) -> list[str]:
    (src,) = resolve_sources(cfg)
    return [t for batch in iter_texts(src) for t in batch]


def test_blocks_start_with_bos_and_number_documents(tmp_path, tok):
    texts = DOCS + ["", DOCS[0]] + DOCS
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts + [None]))
    blocks = build_sequences(dcfg(tmp_path, [tmp_path / "a.jsonl"]), tok)
    ids, docs = blocks.train[torch.arange(len(blocks.train))], blocks.train_docs[torch.arange(len(blocks.train))]
    flat = []
    for t in texts:
        if t:
            flat += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids.shape[1] == 16 and len(ids) >= 3
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert ids[:, 1:].reshape(-1).tolist() == flat[:len(ids) * 15]  # nothing lost or reordered
    # doc_ids: 0 at the start of every block, +1 exactly after each EOS (no lone EOS for empty/null docs)
    assert (docs[:, 0] == 0).all() and (docs[:, 1] == 0).all()
    step = docs[:, 2:] - docs[:, 1:-1]
    assert torch.equal(step, (ids[:, 1:-1] == tok.eos_token_id).long())
    assert not ((ids[:, 1:-1] == tok.eos_token_id) & (ids[:, 2:] == tok.eos_token_id)).any()
    rows = torch.tensor([2, 0, 2])  # any order, repeats: the rows asked for
    assert torch.equal(blocks.train[rows], ids[rows]) and torch.equal(blocks.train_docs[rows], docs[rows])


def test_read_txt_jsonl_parquet(tmp_path):
    import pandas as pd

    (tmp_path / "a.txt").write_text("\n".join(DOCS) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(DOCS)))
    pd.DataFrame({"text": DOCS, "n": range(4)}).to_parquet(tmp_path / "a.parquet")
    assert _texts(dcfg(tmp_path, [tmp_path / "a.txt"])) == DOCS
    assert _texts(dcfg(tmp_path, [tmp_path / "a.jsonl"], text_field="body")) == DOCS
    assert _texts(dcfg(tmp_path, [tmp_path / "a.parquet"])) == DOCS
    assert _texts(dcfg(tmp_path, [tmp_path / "*.txt"])) == DOCS  # globs


def test_build_blocks_split_and_cache(tmp_path, tok, monkeypatch):
    (tmp_path / "a.txt").write_text("\n".join(DOCS * 5) + "\n")
    cfg = dcfg(tmp_path, [tmp_path / "a.txt"], heldout_sequences=2)
    blocks = build_sequences(cfg, tok)
    assert blocks.train.shape[1] == 16 and len(blocks.heldout) == 2 and len(blocks.train) >= 5
    assert blocks.heldout_docs.shape == blocks.heldout.shape
    assert not list(Path(cfg.cache_dir).rglob("*.partial*"))
    monkeypatch.setattr(data, "iter_texts", lambda *a, **k: pytest.fail("the store was not used"))
    again = build_sequences(cfg, tok)
    every = torch.arange(len(blocks.train))
    assert torch.equal(again.train[every], blocks.train[every]) and torch.equal(again.heldout, blocks.heldout)


@pytest.mark.parametrize("name,content,kw,needle", [
    ("a.csv", "text\nhello\n", {}, "unknown data format"),
    ("tiny.txt", "hello\n", {}, "smaller than one block"),
    ("few.txt", "\n".join(DOCS) + "\n", {"heldout_sequences": 50}, "data.heldout_sequences"),
    # one document: no split
    ("one.txt", " ".join(DOCS * 3) + "\n", {"heldout_sequences": 1}, "data.heldout_sequences"),
    ("a.jsonl", '{"text": 1}\n', {}, "data.text_field"),
    ("b.jsonl", '{"body": "x"}\n', {}, "data.text_field"),
    ("c.jsonl", "not json\n", {}, "cannot read"),
    ("e.jsonl", "", {}, "check data.train_files"),
    ("n.jsonl", '{"text": null}\n{"text": ""}\n', {}, "holds no text"),
    ("bad.txt", b"\xff\xfe hello\n", {}, "UnicodeDecodeError"),
])
def test_corpus_problems_are_data_errors(tmp_path, tok, name, content, kw, needle):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(DataError, match=needle):
        build_sequences(dcfg(tmp_path, [path], **kw), tok)


def test_missing_and_mixed_files(tmp_path, tok):
    with pytest.raises(DataError, match="not found; check data.train_files"):
        build_sequences(dcfg(tmp_path, [tmp_path / "missing.jsonl"]), tok)
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="mixes formats"):
        build_sequences(dcfg(tmp_path, [tmp_path / "a.txt", tmp_path / "b.jsonl"]), tok)


# --- data order --------------------------------------------------------------------------------

def _fresh(step, n, per_rank, rank, world, seed=0):
    data._PERMS.clear()  # as in a new process after a restart
    return batch_indices(step, n, per_rank, rank, world, seed)


def test_batch_indices_pure_function_of_step():
    n, per_rank, world = 23, 3, 2
    run = {s: batch_indices(s, n, per_rank, 1, world, seed=4) for s in range(12)}
    for s in (0, 5, 11):  # a resumed run at step s reads the same blocks
        assert torch.equal(_fresh(s, n, per_rank, 1, world, seed=4), run[s])
    assert not torch.equal(_fresh(0, n, per_rank, 1, world, seed=5), run[0])  # the seed matters


def test_batch_indices_ranks_disjoint_and_epochs_cover_all():
    n, per_rank, world = 20, 3, 2  # the global batch (6) does not divide the 20 blocks
    order = []
    for step in range(10):
        parts = [batch_indices(step, n, per_rank, r, world, seed=1) for r in range(world)]
        order += torch.cat(parts).tolist()
    for epoch in range(3):  # positions epoch*n ... (epoch+1)*n - 1 are one permutation of all blocks
        assert sorted(order[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert order[:n] != order[n:2 * n]  # a fresh order each epoch


def test_batch_indices_disjoint_within_an_epoch():
    n, per_rank, world = 64, 4, 4
    for step in range(4):  # 4 steps x 16 = one epoch: no block on two ranks in one step
        idx = torch.cat([batch_indices(step, n, per_rank, r, world, seed=0) for r in range(world)])
        assert len(set(idx.tolist())) == len(idx)


# --- fuzzing: odd text files give blocks or a DataError, nothing else -----------------------------

_line = st.one_of(st.text(max_size=40), st.just(""), st.sampled_from(["\r", "\u2028", "\x00", "\ufeff", "  "]),
                  st.integers(1, 50_000).map(lambda n: "ab " * n))
_record = st.one_of(st.builds(lambda v: {"text": v}, st.one_of(st.text(max_size=30), st.none(), st.integers(),
                                                               st.lists(st.text(max_size=3), max_size=2))),
                    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["txt", "jsonl", "raw_jsonl"]), lines=st.lists(_line, max_size=8),
       records=st.lists(_record, max_size=6), raw=st.binary(max_size=40))
def test_fuzz_loader_only_data_errors(tok, kind, lines, records, raw):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if kind == "txt":
            path = tmp / "c.txt"
            path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        elif kind == "jsonl":
            path = tmp / "c.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        else:
            path = tmp / "c.jsonl"
            path.write_bytes(raw)
        try:
            blocks = build_sequences(DataConfig(train_files=[str(path)], cache_dir=str(tmp / "cache"), seq_length=8,
                                             heldout_sequences=1), tok)
        except DataError as err:
            assert str(err)
        else:
            rows = blocks.train[torch.arange(len(blocks.train))]
            assert rows.shape[1] == 8 and (rows[:, 0] == tok.bos_token_id).all()
