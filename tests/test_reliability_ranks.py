"""Faults of one rank among two (the DeepSpeed launcher, two CPU ranks on gloo): a non-finite loss and a full disk
on rank 1 only, agreed on by both ranks; a rank that hangs, noticed by the other within dist.timeout_s."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import FAULT_RUN
from test_pipeline import launch, losses
from test_reliability import complete

pytestmark = pytest.mark.slow


def test_a_nan_and_a_full_disk_on_one_rank_are_agreed_on_by_both(tmp_path, tiny_model_dir, corpus_file, monkeypatch):
    from adapt.train import checkpoint
    from adapt.train.distributed import consolidated_state_dict

    monkeypatch.setenv("ADAPT_FAULT_NAN_STEPS", "2@1")  # step 3's loss is NaN on rank 1 only
    monkeypatch.setenv("ADAPT_FAULT_ENOSPC_IN_SAVE", "4@1")  # rank 1's shard of step 4 hits a full disk
    out = launch(tmp_path, tiny_model_dir, corpus_file, *FAULT_RUN, "train.save_every=1", "train.keep_last=10",
                 ranks=2, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "Traceback" not in text, text[-4000:]
    assert "saving step_0000004 failed on rank 1" in text and "No space left on device" in text, text[-4000:]
    run = tmp_path / "debug"
    ckpts = checkpoint.ckpt_root(run)
    assert not (ckpts / "step_0000004").exists()  # the partial folder was removed
    assert [checkpoint.damage(ckpts / checkpoint.tag_for(s)) for s in (1, 2, 3)] == [None] * 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["skipped"] for r in rows if r["kind"] == "train"} == {1: 0, 2: 0, 3: 1, 4: 0}
    w2, w3 = consolidated_state_dict(ckpts, "step_0000002"), consolidated_state_dict(ckpts, "step_0000003")
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # neither rank applied the NaN step
    monkeypatch.delenv("ADAPT_FAULT_NAN_STEPS")
    monkeypatch.delenv("ADAPT_FAULT_ENOSPC_IN_SAVE")
    out = launch(tmp_path, tiny_model_dir, corpus_file, *FAULT_RUN, "train.save_every=1", "train.keep_last=10",
                 ranks=2)
    assert "step_0000003 at step 3" in out.stdout + out.stderr
    assert sorted(losses(run)) == list(range(1, 7)) and (run / "final" / "model.safetensors").is_file()


def test_a_hung_rank_is_noticed_within_the_timeout(tmp_path, tiny_model_dir, corpus_file, monkeypatch):
    monkeypatch.setenv("ADAPT_FAULT_STALL_STEPS", "3@1")  # rank 1 hangs at the start of step 4
    out = launch(tmp_path, tiny_model_dir, corpus_file, *FAULT_RUN, "dist.timeout_s=10", ranks=2, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "another rank stopped answering" in text and "Traceback" not in text, text[-4000:]
    run = tmp_path / "debug"
    assert complete(run, 2) and not complete(run, 4)
    monkeypatch.delenv("ADAPT_FAULT_STALL_STEPS")
    out = launch(tmp_path, tiny_model_dir, corpus_file, *FAULT_RUN, "dist.timeout_s=120", ranks=2)
    assert "step_0000002 at step 2" in out.stdout + out.stderr
    assert sorted(losses(run)) == list(range(1, 7))
