"""The token store (adapt.data.store) and its use by adapt.data.corpus: format, whole held-out documents, mixtures, and
the faults of issue 30 (a changed source, another tokenizer, a tampered store, a second writer, kill -9, a full
disk)."""
from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import adapt.data.corpus as data
from adapt.data import store
from adapt.data.sequences import Mixture, _PERMS, batch_indices
from adapt.recipe.config import DataConfig, SourceConfig
from adapt.data.corpus import DataError, build_sequences, resolve_sources, store_folder


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def corpus(path: Path, n: int, tag: str = "Document") -> Path:
    """n documents of different lengths, each naming its number (to tell where a block's text came from)."""
    rows = [{"text": f"{tag} {i} begins. " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(5 + i % 23))}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(tmp_path: Path, files, **kw) -> DataConfig:
    return DataConfig(train_files=[str(f) for f in files], cache_dir=str(tmp_path / "cache"),
                      **{"seq_length": 16, "heldout_sequences": 2, **kw})


def stores(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache" / "stores").iterdir() if p.is_dir())


def doc_numbers(tok, rows: torch.Tensor, tag: str = "Document") -> set[int]:
    return {int(n) for n in re.findall(rf"{tag} (\d+) begins", tok.decode(rows[:, 1:].reshape(-1)))}


# --- the format ----------------------------------------------------------------------------------

def test_store_holds_the_stream_narrow_ids_and_a_manifest(tmp_path, tok):
    path = corpus(tmp_path / "c.jsonl", 40)
    blocks = build_sequences(cfg_for(tmp_path, [path]), tok)
    (folder,) = stores(tmp_path)
    m = json.loads((folder / store.MANIFEST).read_text())
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    flat = [t for x in texts for t in tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    tokens = np.fromfile(folder / store.TOKENS, dtype=np.uint16)  # SmolLM2: 49,152 ids fit in 16 bits
    assert m["dtype"] == "uint16" and tokens.tolist() == flat and m["tokens"] == len(flat) and m["documents"] == 40
    ends = np.fromfile(folder / store.DOC_ENDS, dtype=np.int64)
    assert ends[-1] == len(flat) and (tokens[ends - 1] == tok.eos_token_id).all()
    assert m["tokenizer"]["hash"] == store.tokenizer_hash(tok)
    assert m["source"]["stamp"]["files"][0]["bytes"] == path.stat().st_size
    assert store.TokenStore(folder).verify() == []
    assert not list(folder.parent.glob("*.partial-*"))
    assert isinstance(blocks.train.parts[0].store.tokens, np.memmap)  # read in place, not loaded


def test_the_narrowest_unsigned_dtype():
    class Vocab:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    assert store.token_dtype(Vocab(49152)) == np.uint16 and store.token_dtype(Vocab(65535)) == np.uint16
    assert store.token_dtype(Vocab(65536)) == np.uint32 and store.token_dtype(Vocab(128256)) == np.uint32


def test_workers_write_the_same_store(tmp_path, tok):
    path = corpus(tmp_path / "c.jsonl", 1500)  # three tokenising batches
    one = build_sequences(cfg_for(tmp_path / "one", [path]), tok)
    two = build_sequences(cfg_for(tmp_path / "two", [path], num_proc=2), tok)
    a, b = (x.train.parts[0].store.folder for x in (one, two))
    assert a.name == b.name
    for name in (store.TOKENS, store.DOC_ENDS):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert json.loads((b / store.MANIFEST).read_text())["prepared"]["num_proc"] == 2


def test_heldout_is_whole_documents(tmp_path, tok):
    path = corpus(tmp_path / "c.jsonl", 60)
    blocks = build_sequences(cfg_for(tmp_path, [path], heldout_sequences=3), tok)
    train = blocks.train[torch.arange(len(blocks.train))]
    seen, held = doc_numbers(tok, train), doc_numbers(tok, blocks.heldout)
    assert held and seen and max(seen) < min(held)  # no document on both sides
    part = blocks.train.parts[0]
    assert part.store.doc_ends[np.searchsorted(part.store.doc_ends, len(blocks.train) * 15)] > len(blocks.train) * 15
    first = tok(f"Document {min(held)} begins.", add_special_tokens=False)["input_ids"]
    assert blocks.heldout[0, 1:1 + len(first)].tolist() == first  # held-out text starts at a document's start


def test_another_seq_length_reads_the_same_store(tmp_path, tok, monkeypatch):
    path = corpus(tmp_path / "c.jsonl", 50)
    build_sequences(cfg_for(tmp_path, [path]), tok)
    monkeypatch.setattr(data, "iter_texts", lambda *a, **k: pytest.fail("tokenised again"))
    longer = build_sequences(cfg_for(tmp_path, [path], seq_length=32), tok)
    flat = np.fromfile(stores(tmp_path)[0] / store.TOKENS, dtype=np.uint16)
    rows = longer.train[torch.arange(len(longer.train))]
    assert rows.shape[1] == 32 and rows[:, 1:].reshape(-1).tolist() == flat[:len(rows) * 31].tolist()


# --- faults: what changed, who writes, a killed or full prepare ------------------------------------

def test_a_changed_source_gets_a_new_store_and_says_why(tmp_path, tok):
    path = corpus(tmp_path / "c.jsonl", 30)
    cfg = cfg_for(tmp_path, [path])
    before = build_sequences(cfg, tok)
    st = path.stat()
    path.write_text(path.read_text().replace("Document 3 ", "Docxment 3 "))  # same size, then the same mtime
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    said: list[str] = []
    after = build_sequences(cfg, tok, say=said.append)
    assert len(stores(tmp_path)) == 2 and any("files changed" in s for s in said)
    every = torch.arange(len(before.train))
    assert not torch.equal(before.train[every], after.train[every])  # the new text, never a mix
    assert "Docxment" in tok.decode(after.train[every][:, 1:].reshape(-1))


def test_another_tokenizer_gets_its_own_store(tmp_path, tok, tokenizer_dir):
    from transformers import AutoTokenizer

    path = corpus(tmp_path / "c.jsonl", 30)
    build_sequences(cfg_for(tmp_path, [path]), tok)
    other = AutoTokenizer.from_pretrained(tokenizer_dir)
    other.add_tokens(["word7"])  # tokenises the corpus differently
    said: list[str] = []
    build_sequences(cfg_for(tmp_path, [path]), other, say=said.append)
    assert len(stores(tmp_path)) == 2 and any("tokenizer differs" in s for s in said)
    masked = AutoTokenizer.from_pretrained(tokenizer_dir)
    masked.add_tokens(["<|mask|>"], special_tokens=True)
    masked.mask_token = "<|mask|>"  # training adds its mask token after a store may have been prepared
    build_sequences(cfg_for(tmp_path, [path]), masked)
    assert len(stores(tmp_path)) == 2


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["tokenizer"].update(hash="0" * 16), "made with tokenizer"),
    (lambda m: m.update(version=0), "version 0"),
    (lambda m: m.update(tokens=m["tokens"] + 1), "damaged"),
])
def test_a_store_that_does_not_match_is_refused(tmp_path, tok, edit, needle):
    path = corpus(tmp_path / "c.jsonl", 30)
    build_sequences(cfg_for(tmp_path, [path]), tok)
    manifest = stores(tmp_path)[0] / store.MANIFEST
    m = json.loads(manifest.read_text())
    edit(m)
    manifest.write_text(json.dumps(m))
    with pytest.raises(DataError, match=needle):
        build_sequences(cfg_for(tmp_path, [path]), tok)


def test_a_second_writer_waits_for_the_first(tmp_path, tok):
    path = corpus(tmp_path / "c.jsonl", 30)
    cfg = cfg_for(tmp_path, [path])
    (src,) = resolve_sources(cfg)
    folder = store_folder(src, cfg, tok)
    said: list[str] = []
    with store.cache_lock(folder.with_name(folder.name + ".lock")):  # another process preparing it
        other = threading.Thread(target=build_sequences, args=(cfg, tok), kwargs={"say": said.append})
        other.start()
        time.sleep(1.5)
        assert other.is_alive() and not folder.exists() and not said  # waiting, nothing written
    other.join(60)
    assert not other.is_alive() and (folder / store.MANIFEST).is_file()
    assert sum("preparing token store" in s for s in said) == 1


def _prepare_cmd(tmp_path: Path, model_dir: Path, path: Path, *more: str) -> list[str]:
    from conftest import ROOT

    return [os.sys.executable, "-m", "adapt.prepare", str(ROOT / "recipes" / "debug.yaml"),
            f"model.name_or_path={model_dir}", f"data.train_files=[{path}]", f"data.cache_dir={tmp_path / 'cache'}",
            "data.seq_length=16", "data.heldout_sequences=2", *more]


def test_kill_9_during_prepare_leaves_nothing_used_and_a_rerun_finishes(tmp_path, tok, tiny_model_dir):
    import signal
    import subprocess

    from cli_runner import ROOT, pinned_env

    path = corpus(tmp_path / "c.jsonl", 3000)  # six batches, one every 0.5 s
    proc = subprocess.Popen(_prepare_cmd(tmp_path, tiny_model_dir, path), cwd=ROOT, stderr=subprocess.PIPE,
                            env=pinned_env() | {"ADAPT_FAULT_PREPARE_DELAY_S": "0.5"})
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.stat().st_size for p in (tmp_path / "cache").rglob(store.TOKENS)):
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]  # killed, not ended on its own
    (partial,) = (tmp_path / "cache" / "stores").glob("*.partial-*")
    assert not stores(tmp_path) or stores(tmp_path) == [partial]  # only the partial folder: nothing complete
    said: list[str] = []
    blocks = build_sequences(cfg_for(tmp_path, [path]), tok, say=said.append)
    assert not partial.exists() and any("interrupted prepare" in s for s in said)
    fresh = build_sequences(cfg_for(tmp_path / "fresh", [path]), tok)
    every = torch.arange(len(fresh.train))
    assert len(blocks.train) == len(fresh.train) and torch.equal(blocks.train[every], fresh.train[every])


def test_a_full_disk_during_prepare_is_one_message_and_nothing_kept(tmp_path, tiny_model_dir):
    import resource
    import signal
    import subprocess

    from cli_runner import ROOT, pinned_env

    def small_files():  # every file this process writes stops at 64 KiB, as a full disk would stop it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    path = corpus(tmp_path / "c.jsonl", 6000)  # about 150k tokens: 300 KB of uint16
    out = subprocess.run(_prepare_cmd(tmp_path, tiny_model_dir, path), cwd=ROOT, env=pinned_env(),
                         preexec_fn=small_files, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "no room to write the token store" in out.stderr and "data.cache_dir" in out.stderr
    assert not list((tmp_path / "cache" / "stores").iterdir()) or all(
        p.suffix == ".lock" for p in (tmp_path / "cache" / "stores").iterdir())


# --- mixtures --------------------------------------------------------------------------------------

def test_mixture_draws_by_weight_deterministically(tmp_path, tok):
    a, b = corpus(tmp_path / "a.jsonl", 80, "Alpha"), corpus(tmp_path / "b.jsonl", 40, "Beta")
    cfg = DataConfig(sources=[SourceConfig(path=str(a), weight=3.0), SourceConfig(path=str(b), weight=1.0)],
                     cache_dir=str(tmp_path / "cache"), seq_length=16, heldout_sequences=4)
    blocks = build_sequences(cfg, tok)
    mix, n = blocks.mixture, 8
    assert mix.labels == ["a", "b"] and sorted(blocks.heldout_parts) == ["a", "b"]
    assert [int(p.sum() // 16) for p in blocks.heldout_parts.values()] == [3, 1]  # held-out split by weight
    assert doc_numbers(tok, blocks.heldout[:3], "Alpha") and doc_numbers(tok, blocks.heldout[3:], "Beta")
    size_a = mix.sizes[0]
    for step in range(30):
        idx = mix.draw(step, n, seed=5)
        _PERMS.clear()  # as in a resumed process
        assert torch.equal(idx, mix.draw(step, n, seed=5))
        assert int((idx < size_a).sum()) == 6  # systematic: 3/4 of 8 rows, every step
    assert mix.realised(30, n, 5) == pytest.approx([0.75, 0.25])
    rows_b = torch.cat([i[i >= size_a] for i in (mix.draw(s, n, 5) for s in range(mix.sizes[1] // n))])
    assert len(rows_b) > 10 and len(rows_b) == len(set(rows_b.tolist()))  # distinct within its epoch's window
    text = tok.decode(blocks.train[mix.draw(0, n, 5)][:, 1:].reshape(-1))
    assert "Alpha" in text and "Beta" in text


def test_one_source_draws_as_before():
    mix = Mixture([37], [1.0], ["only"])
    for step in range(5):
        assert torch.equal(mix.draw(step, 6, 3), batch_indices(step, 37, 6, 0, 1, 3))


@pytest.mark.parametrize("sources,needle", [
    ([{"path": "a.jsonl", "weight": -1.0}], r"data.sources\[0\].weight"),
    ([{"path": "a.jsonl", "weight": float("nan")}], r"data.sources\[0\].weight"),
    ([{"path": "a.jsonl", "weight": 0.0}, {"path": "b.jsonl", "weight": 0.0}], "is 0"),
    ([{"path": "a.jsonl", "text_field": "body"}], r"data.sources\[0\].text_field"),
    ([{"path": "empty.jsonl"}], r"data.sources\[0\] holds no text"),
    ([{"path": "a.jsonl", "name": "x"}, {"path": "b.jsonl", "name": "x"}], "named `x`"),
])
def test_bad_sources_are_named(tmp_path, tok, sources, needle):
    corpus(tmp_path / "a.jsonl", 20)
    corpus(tmp_path / "b.jsonl", 20)
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    cfg = DataConfig(sources=[SourceConfig(**{**s, "path": str(tmp_path / s["path"])}) for s in sources],
                     cache_dir=str(tmp_path / "cache"), seq_length=16, heldout_sequences=1)
    with pytest.raises(DataError, match=needle):
        build_sequences(cfg, tok)


def test_a_run_from_before_the_store_is_refused_with_the_way_out(tmp_path):
    import yaml

    from adapt.train import checkpoint
    from adapt.recipe.config import Config, RunConfig, to_dict
    from adapt.train.stages import _layout_problems

    cfg = Config(run=RunConfig(output_dir=str(tmp_path), name="old"))
    tag = checkpoint.ckpt_root(cfg.run_dir) / checkpoint.tag_for(4)
    tag.mkdir(parents=True)
    saved = to_dict(cfg)
    (tag / checkpoint.COMPLETE).write_text("{}")
    checkpoint.config_file(tag).write_text(yaml.safe_dump(saved))
    assert _layout_problems(cfg) == []  # written by this version: resumes
    del saved["data"]["sources"]
    checkpoint.config_file(tag).write_text(yaml.safe_dump(saved))
    (problem,) = _layout_problems(cfg)
    assert "data layout 1" in problem and "run.resume=never" in problem
    cfg.run.resume = "never"
    assert _layout_problems(cfg) == []


def test_the_start_up_log_shows_the_realised_mixture(tmp_path, tok):
    from adapt.recipe.config import Config, TrainConfig
    from adapt.train.stages import _adapt_data

    a, b = corpus(tmp_path / "a.jsonl", 40, "Alpha"), corpus(tmp_path / "b.jsonl", 40, "Beta")
    cfg = Config(data=DataConfig(sources=[SourceConfig(path=str(a), weight=0.7), SourceConfig(path=str(b), weight=0.3)],
                                 cache_dir=str(tmp_path / "cache"), seq_length=16, heldout_sequences=2),
                 train=TrainConfig(max_steps=50, micro_batch_size=4, grad_accum=1))
    summary = _adapt_data(cfg, tok).summary
    shares = re.findall(r"(\w) (0\.\d+) -> (0\.\d+)", summary.split("mixture")[1])
    assert [(s, w) for s, w, _ in shares] == [("a", "0.700"), ("b", "0.300")] and "steps 0-49, 4 rows" in summary
    assert all(abs(float(w) - float(r)) < 0.05 for _, w, r in shares)  # 2 or 3 of 4 rows from a: 0.7 on average


def test_each_status_line_shows_the_realised_mixture(tmp_path, tok, tiny_model_dir, corpus_file):
    """A mixture's training log: every status line and train record carries each source's share of its window's
    rows, the rows the run actually drew (counted from the mixture's draw of each step)."""
    from tests.test_pipeline import launch

    a, b = corpus(tmp_path / "a.jsonl", 60, "Alpha"), corpus(tmp_path / "b.jsonl", 60, "Beta")
    out = launch(tmp_path, tiny_model_dir, corpus_file, "data.train_files=[]", "train.max_steps=4", "train.log_every=2",
                 f"data.sources=[{{path: {a}, weight: 0.6}}, {{path: {b}, weight: 0.4}}]", "data.heldout_sequences=2",
                 "train.eval_every=0", "run.name=mix")
    rows = [json.loads(line) for line in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    blocks = build_sequences(DataConfig(sources=[SourceConfig(path=str(a), weight=0.6),
                                                 SourceConfig(path=str(b), weight=0.4)],
                                        cache_dir=str(tmp_path / "cache"), seq_length=64, heldout_sequences=2), tok)
    for r in train:  # steps 1-2 and 3-4: the draws of steps 0-1 and 2-3
        drawn = torch.cat([blocks.mixture.sources(s, 2, 0) for s in (r["step"] - 2, r["step"] - 1)])
        shares = {"a": float((drawn == 0).float().mean()), "b": float((drawn == 1).float().mean())}
        assert r["mix"] == pytest.approx(shares)
    assert [r["step"] for r in train] == [2, 4]
    assert len(re.findall(r"\| mix a 0\.\d\d b 0\.\d\d \|", out.stderr)) == 2
