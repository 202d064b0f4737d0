"""Two CPU ranks under the DeepSpeed launcher on one empty cache (issue 30): the token store is written once
(one rank prepares it while the other waits on its lock), both ranks train from it, and a resumed run replays
the uninterrupted one bit for bit."""
from __future__ import annotations

import json

import pytest

from test_pipeline import launch, losses

pytestmark = pytest.mark.slow

RUN = ("train.save_every=2", "attention.anneal_steps=2", "optim.warmup_steps=0", "optim.lr=1e-3",
       "optim.min_lr_ratio=1.0", "run.sample_length=0", "train.micro_batch_size=2")


def test_two_ranks_prepare_once_train_and_resume_bit_identically(tmp_path, tiny_model_dir, corpus_file):
    full = launch(tmp_path / "full", tiny_model_dir, corpus_file, *RUN, "train.max_steps=4", ranks=2)
    said = full.stdout + full.stderr
    assert said.count("preparing token store") == 1, said[-4000:]
    stores = sorted((tmp_path / "full" / "cache" / "stores").iterdir())
    manifests = [p / "manifest.json" for p in stores if p.is_dir()]
    assert len(manifests) == 1 and not [p for p in stores if ".partial-" in p.name]
    assert json.loads(manifests[0].read_text())["tokens"] > 0
    assert "world 2" in said and list(losses(tmp_path / "full" / "debug")) == [1, 2, 3, 4]

    part = tmp_path / "part"
    launch(part, tiny_model_dir, corpus_file, *RUN, "train.max_steps=2",
           f"data.cache_dir={tmp_path / 'full' / 'cache'}", ranks=2)
    again = launch(part, tiny_model_dir, corpus_file, *RUN, "train.max_steps=4",
                   f"data.cache_dir={tmp_path / 'full' / 'cache'}", ranks=2)
    assert "resumed from" in again.stderr + again.stdout and "preparing token store" not in again.stderr
    a, b = losses(tmp_path / "full" / "debug"), losses(part / "debug")
    for key in ("loss", "grad_norm", "masked_tokens"):
        a, b = losses(tmp_path / "full" / "debug", key), losses(part / "debug", key)
        assert [a[s] for s in (3, 4)] == [b[s] for s in (3, 4)], key
