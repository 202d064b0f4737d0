"""`python -m adapt.sample` end to end on a tiny exported model (random weights, real tokenizer)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from adapt.export import save_meta
from adapt import sample
from conftest import ROOT


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """What an export holds: weights with the mask token added, tokenizer, diffusion.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapt.recipe.config import ModelConfig
    from adapt.model.causal import add_mask_token

    out = tmp_path_factory.mktemp("exported")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    meta = add_mask_token(model, tok, ModelConfig(name_or_path=str(tiny_model_dir)))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    save_meta(out, meta)
    return out


def run(capsys, *argv: str) -> tuple[str, str]:
    assert sample.main([*map(str, argv), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def samples(out: str) -> list[str]:
    """The text of each sample block (without trajectory lines)."""
    blocks = re.split(r"=== sample \d+/\d+ ===\n", out)[1:]
    return [b.split("\n  step")[0].rstrip("\n") for b in blocks]


def test_prefix_prompt_batch_and_trajectory(capsys, exported_dir):
    out, err = run(capsys, exported_dir, "--prompt", "The cat sat", "--length", 6, "--steps", 3,
                   "--sampler", "analytic", "--num-samples", 3, "--trajectory")
    texts = samples(out)
    assert len(texts) == 3 and all(t.startswith("The cat sat") for t in texts)
    steps = re.findall(r"^  step +(\d+): (.*)$", out, flags=re.M)
    revealed = [p for _, line in steps for p in re.findall(r"(\d+):'", line)]
    assert len(revealed) == 3 * 6  # every generated position revealed exactly once
    assert all(int(s) < 3 for s, _ in steps)
    assert re.search(r"nfe=[123] ", err)


def test_suffix_and_infill_keep_the_given_text(capsys, exported_dir):
    out, _ = run(capsys, exported_dir, "--prompt", "Hello", "--suffix", " the end.", "--length", 5,
                 "--steps", 5, "--sampler", "confidence", "--seed", 3)
    (text,) = samples(out)
    assert text.startswith("Hello") and text.endswith(" the end.")
    out, _ = run(capsys, exported_dir, "--infill", "One <mask:3> two <mask> three", "--span-length", 2,
                 "--sampler", "threshold", "--tau", 0.5)
    (text,) = samples(out)
    assert re.fullmatch(r"One.* two.* three", text, flags=re.S)


def test_mask_range_block_mode_and_prefix_cache(capsys, exported_dir):
    out, err = run(capsys, exported_dir, "--text", "a b c d e f g h", "--mask-range", "2:5",
                   "--sampler", "ancestral", "--steps", 4, "--block-length", 2, "--prefix-cache")
    (text,) = samples(out)
    assert text.startswith("a b") and text.endswith(" f g h")
    assert "steps_run=" in err


def test_unconditional_with_eos_stop(capsys, exported_dir):
    out, _ = run(capsys, exported_dir, "--length", 8, "--sampler", "euler", "--noise", "geometric",
                 "--stop-at-eos", "--top-k", 5, "--temperature", 0.8)
    assert len(samples(out)) == 1


def test_bad_requests_fail_with_a_message(capsys, exported_dir):
    for argv, words in (([str(exported_dir), "--infill", "no markers"], "has no <mask>"),
                        ([str(exported_dir), "--sampler", "ancestral", "--tau", "0.5", "--length", "2"],
                         "takes no option tau"),
                        ([str(exported_dir), "--text", "a b", "--mask-range", "1:9"], "not inside")):
        with pytest.raises(SystemExit) as exit_info:
            sample.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and words in err and "\nerror: " in "\n" + err, err


def test_module_entry_point(exported_dir):
    proc = subprocess.run([sys.executable, "-m", "adapt.sample", str(exported_dir), "--prompt", "Hi",
                           "--length", "3", "--steps", "2", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("=== sample 1/1 ===\nHi") and "nfe=" in proc.stderr
