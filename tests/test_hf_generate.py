"""Exports in plain transformers (issue 16): custom_generate/generate.py, the decoding defaults, the model card.

The decoder is checked against this library's samplers in a separate virtual environment that has only torch
and transformers (no `adapt`), on tiny random models with the real tokenizer.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, tiny_llama

PLAIN_VENV = ROOT / ".venv-plain"
PROMPT = "The cat sat on the"


def make_export(folder: Path, tokenizer_dir: Path, block_length: int = 0, run_dir: Path | None = None,
                seed: int = 0) -> Path:
    """What adapt.export.export writes, from a random tiny model: weights with the mask token, a config whose
    attention is bidirectional (set_causal, as in training), tokenizer, diffusion.json, recipe, extras."""
    from transformers import AutoTokenizer

    from adapt.recipe.config import EMBEDDED_MODEL, Config, ModelConfig
    from adapt.export.writer import write_hf_extras
    from adapt.model.causal import add_mask_token, set_causal

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_llama(len(tok), seed=seed)
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    meta = asdict(add_mask_token(model, tok, ModelConfig(name_or_path="tiny")))
    meta["parent"] = EMBEDDED_MODEL
    if block_length:
        meta["block_length"] = block_length
    set_causal(model, False)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (folder / "diffusion.json").write_text(json.dumps(meta, indent=2))
    recipe = asdict(Config())
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    write_hf_extras(folder, meta, recipe, run_dir=run_dir)
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder whose metrics.jsonl holds the evaluations a training run writes."""
    run = tmp_path_factory.mktemp("run")
    rows = [{"kind": "train", "step": 1, "loss": 9.1},
            {"kind": "eval", "step": 0, "parent_ppl": 30.04, "before_ppl": 3216.2, "before_ppl_low": 2606.0,
             "before_ppl_high": 3970.0, "before_tokens": 4080},
            {"kind": "eval", "step": 120, "ppl": 297.2, "ppl_low": 247.0, "ppl_high": 358.0, "tokens": 4080}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "ev')
    return run


@pytest.fixture(scope="module")
def export(tmp_path_factory, tokenizer_dir, run_dir) -> Path:
    return make_export(tmp_path_factory.mktemp("export"), tokenizer_dir, run_dir=run_dir)


@pytest.fixture(scope="module")
def block_export(tmp_path_factory, tokenizer_dir) -> Path:
    return make_export(tmp_path_factory.mktemp("block_export"), tokenizer_dir, block_length=4, seed=1)


def remote_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


# --- (a) a fresh environment with torch and transformers only -------------------------------------

def plain_python() -> Path:
    """.venv-plain/bin/python with this environment's torch and transformers versions, made once (git-ignored)."""
    import transformers

    want = f"torch=={torch.__version__.split('+')[0]} transformers=={transformers.__version__}"
    stamp, python = PLAIN_VENV / ".installed", PLAIN_VENV / "bin" / "python"
    if stamp.is_file() and stamp.read_text() == want and python.is_file():
        return python
    base = getattr(sys, "_base_executable", None) or "python3"
    subprocess.run([base, "-m", "venv", "--clear", str(PLAIN_VENV)], check=True, timeout=300)
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *want.split()], capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stamp.write_text(want)
    return python


PLAIN_SCRIPT = r'''
import functools, importlib.util, json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

export, cases = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(export)
ids = torch.tensor([tok(cases["prompt"]).input_ids])
out = {"adapt_importable": importlib.util.find_spec("adapt") is not None,
       "ours": isinstance(model.generate, functools.partial),
       "without_trust": isinstance(AutoModelForCausalLM.from_pretrained(export).generate, functools.partial)}
for name, kw in cases["generate"].items():
    torch.manual_seed(kw.pop("seed", 0))
    out[name] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).tolist()
out["positional"] = model.generate(ids, max_new_tokens=cases["new"], diffusion_block_length=0).tolist()
out["tokenizer_call"] = model.generate(**tok(cases["prompt"], return_tensors="pt"), max_new_tokens=cases["new"],
                                       diffusion_block_length=0).tolist()
pipe = pipeline("text-generation", model=export, trust_remote_code=True)
out["pipeline"] = pipe(cases["prompt"], max_new_tokens=cases["new"], diffusion_block_length=0)[0]["generated_text"]
print(json.dumps(out))
'''


def library_ids(folder: Path, prompt: list[int], new: int, sampler: str, steps: int, block_length: int | None,
                seed: int | None = None, eos_id: int | None = None, **options) -> list[int]:
    """This library's sampler on [BOS, prompt, new masks] -> the ids after BOS."""
    from adapt.export import load_diffusion_model
    from adapt.decode.denoiser import Denoiser
    from adapt.decode import generate
    from adapt.decode.canvas import prompt_canvas

    model, tok, meta = load_diffusion_model(folder)
    x = prompt_canvas(tok.bos_token_id, meta.mask_token_id, new, prefix=prompt)
    if seed is not None:
        torch.manual_seed(seed)
    res = generate(Denoiser(model, meta), x, sampler, steps=steps, block_length=block_length, eos_id=eos_id,
                   **options)
    return res.ids[0, 1:].tolist()


def median_confidence(folder: Path, prompt: list[int], new: int) -> float:
    """A tau that the threshold sampler crosses for about half the positions at its first step."""
    from adapt.export import load_diffusion_model
    from adapt.decode.denoiser import Denoiser
    from adapt.decode.canvas import prompt_canvas

    model, tok, meta = load_diffusion_model(folder)
    x = prompt_canvas(tok.bos_token_id, meta.mask_token_id, new, prefix=prompt)
    conf = Denoiser(model, meta)(x)[0, -new:].max(-1).values.exp()
    return float(conf.median())


@pytest.mark.slow  # makes .venv-plain on first use (about a minute), then ~20 s
def test_plain_transformers_matches_the_library(export, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    prompt, new = tok(PROMPT).input_ids, 12
    assert prompt[0] != tok.bos_token_id  # generate.py must add BOS itself, as the library does
    tau = median_confidence(export, prompt, new)
    sampled = dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.95)
    cases = {
        "greedy": dict(max_new_tokens=new, diffusion_steps=12, diffusion_block_length=0),
        "blocks": dict(max_new_tokens=new, diffusion_steps=6, diffusion_block_length=4),
        "threshold": dict(max_new_tokens=new, diffusion_sampler="threshold", diffusion_tau=tau, diffusion_steps=12,
                          diffusion_block_length=6),
        "margin": dict(max_new_tokens=new, diffusion_confidence="margin", diffusion_steps=4),
        "sampled": dict(max_new_tokens=new, diffusion_steps=6, diffusion_block_length=4, seed=3, **sampled),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONNOUSERSITE="1")
    proc = subprocess.run([str(plain_python()), "-c", PLAIN_SCRIPT, str(export),
                           json.dumps({"prompt": PROMPT, "new": new, "generate": cases})],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["adapt_importable"] and got["ours"] and not got["without_trust"]
    expect = {
        "greedy": library_ids(export, prompt, new, "confidence", 12, None, temperature=0),
        "blocks": library_ids(export, prompt, new, "confidence", 6, 4, temperature=0),
        "threshold": library_ids(export, prompt, new, "threshold", 12, 6, tau=tau, temperature=0),
        "margin": library_ids(export, prompt, new, "confidence", 4, None, confidence="margin", temperature=0),
        "sampled": library_ids(export, prompt, new, "confidence", 6, 4, seed=3, temperature=0.9, top_k=50,
                               top_p=0.95),
    }
    for name, ids in expect.items():
        assert got[name] == [ids], name
    assert got["positional"] == got["tokenizer_call"] == [expect["greedy"]]
    assert expect["threshold"] != expect["greedy"]  # the threshold case commits several tokens in a step
    assert got["pipeline"].startswith(PROMPT) and len(got["pipeline"]) > len(PROMPT)
    assert got["pipeline"] == tok.decode(expect["greedy"], skip_special_tokens=True)


def test_eos_stops_and_pads_like_transformers(export):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    model = remote_model(export)
    prompt, new = tok(PROMPT).input_ids, 10
    free = library_ids(export, prompt, new, "confidence", 10, None, temperature=0)
    stop = free[len(prompt) + 3]  # call this token EOS: the row stops after it
    expect = library_ids(export, prompt, new, "confidence", 10, None, temperature=0, eos_id=stop)
    got = model.generate(torch.tensor([prompt]), max_new_tokens=new, diffusion_steps=10, diffusion_block_length=0,
                         eos_token_id=stop, pad_token_id=7)
    first = len(prompt) + expect[len(prompt):].index(stop)
    assert got[0].tolist() == expect[:first + 1]  # columns after every row stopped are cut
    two = model.generate(torch.tensor([prompt, prompt[:-1] + [9]]), max_new_tokens=new, diffusion_steps=10,
                         diffusion_block_length=0, eos_token_id=stop, pad_token_id=7)
    row = two[0].tolist()
    assert row[:first + 1] == expect[:first + 1] and set(row[first + 1:]) <= {7}


# --- (b) the card, the decoding defaults, the files ----------------------------------------------

def front_matter(card: Path) -> dict:
    text = card.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---", 4)])


def test_card_metadata_and_body(export, tmp_path, tokenizer_dir):
    head = front_matter(export / "README.md")
    assert head["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and head["license"] == "apache-2.0"
    assert head["library_name"] == "transformers" and "diffusion" in head["tags"]
    assert head["training_data_license"] == "cc-by-sa-3.0"
    body = (export / "README.md").read_text()
    assert f"120 steps x 4 sequences (4 x 1 accumulation) x 256 tokens = {120 * 4 * 256:,} tokens" in body
    assert "| parent causal LM, exact perplexity | 0 | 30.04 |" in body
    assert "<= 297.20 (95% CI 247.0-358.0)" in body and "CC BY-SA 3.0" in body
    assert "trust_remote_code=True" in body and "python -m eval.harness --model diffusion-lm" in body
    assert "silently decodes left to right" in body and "load_diffusion_model" in body
    assert "load_adapter" not in body  # said only by an export that keeps its adapter apart
    bare = make_export(tmp_path / "bare", tokenizer_dir, block_length=8)  # no run metrics; a block export
    assert "Not measured" in (bare / "README.md").read_text()
    assert "block-diffusion" in front_matter(bare / "README.md")["tags"]
    assert "is not its diffusion forward" in (bare / "README.md").read_text()


def test_generation_config_and_files(export):
    from transformers import GenerationConfig

    from adapt.export import load_diffusion_model
    from adapt.export.writer import SHIPPED

    gc = GenerationConfig.from_pretrained(export)
    assert gc.do_sample is False and gc.max_new_tokens == 64 and gc.diffusion_sampler == "confidence"
    assert gc.bos_token_id == 1 and gc.eos_token_id == 2 and gc.temperature is None
    for source in SHIPPED:
        assert (export / "custom_generate" / source.name).read_bytes() == source.read_bytes()
    assert "transformers>=5.0" in (export / "custom_generate" / "requirements.txt").read_text()
    model, _, meta = load_diffusion_model(export)  # the library still loads the export
    assert meta.mask_token_id == json.loads((export / "diffusion.json").read_text())["mask_token_id"]
    imports = set()
    for node in (n for source in SHIPPED for n in ast.walk(ast.parse(source.read_text()))):
        if isinstance(node, ast.Import):
            imports |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:  # a relative import: the file beside it
            imports.add((node.module or "").split(".")[0])
    assert imports - set(sys.stdlib_module_names) == {"torch", "transformers"}  # never `adapt`


# --- (c) the block cache is exact --------------------------------------------------------------------

def block_causal_logits(model, x: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, b: int,
                        causal: bool = False, noised_causal: bool = False) -> torch.Tensor:
    """One uncached forward under the block-causal mask, built here pair by pair (the reference); `causal`: the
    clean blocks (all but the last) causal inside; `noised_causal`: the last (noised) block causal inside."""
    B, L = x.shape
    mask = torch.full((B, 1, L, L), torch.finfo(torch.float32).min)
    for r in range(B):
        for i in range(L):
            for j in range(L):
                last = i // b == (L - 1) // b
                inside = noised_causal if last else causal
                if i == j or (valid[r, j] and (j <= i if inside else j // b <= i // b)):
                    mask[r, 0, i, j] = 0.0
    return model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=False).logits


@pytest.mark.parametrize("clean,noised", [("block", "bidirectional"), ("causal", "bidirectional"),
                                          ("causal", "causal")])
def test_block_cache_equals_uncached_forward(block_export, clean, noised):
    from adapt.export.hf_generate import generate as hg

    model, b = remote_model(block_export).eval(), 4
    meta = hg.load_meta(model) | {"clean_attention": clean, "noised_attention": noised}
    rows = [torch.tensor([1, *range(50, 59)]), torch.tensor([1, 60, 61])]  # 2 full blocks + 2; 3 tokens
    x, valid, pos, starts = hg.layout(rows, 9, meta["mask_token_id"], 1, b)
    assert x.shape[1] % b == 0 and starts == [0, 8]  # the short row is padded by whole blocks
    den = hg.CanvasModel(model, meta, valid, pos)
    state = hg.BlockCache(den, x, b)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        state.commit(x, 2)  # the prompts' complete blocks: they run with block 2's first call
        for k in range(2, x.shape[1] // b):
            a, e = k * b, (k + 1) * b
            ref = block_causal_logits(model, x[:, :e], valid[:, :e], pos[:, :e], b, clean == "causal",
                                      noised == "causal")
            # with the shift, column c of the block is predicted by the logits at c - 1
            torch.testing.assert_close(state.predictions(x, k), ref[:, a - 1:e - 1], atol=1e-5, rtol=0)
            # commit random tokens into the block, as decoding would, and extend the cache
            x[:, a:e] = torch.where(valid[:, a:e] & (x[:, a:e] == den.mask_id),
                                    torch.randint(100, 1000, (2, b), generator=gen), x[:, a:e])
            state.commit(x, k + 1)
    assert den.calls == x.shape[1] // b - 2  # one call per block: each commit rides on the next block's call
    # a later block never changes an earlier block's logits (block-causal), but moves its own
    with torch.no_grad():
        y = x.clone()
        y[:, -1] = 999
        base, moved = (block_causal_logits(model, z, valid, pos, b) for z in (x, y))
    assert torch.equal(base[:, :-b], moved[:, :-b]) and not torch.allclose(base[:, -b:-1], moved[:, -b:-1])


def test_block_decoding_cached_equals_uncached(block_export):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(block_export, padding_side="left")
    model = remote_model(block_export)
    enc = tok([PROMPT, "Hi", "A b c d e f g"], return_tensors="pt", padding=True)
    for sampler in ("confidence", "threshold"):
        kw = dict(max_new_tokens=10, diffusion_steps=6, diffusion_sampler=sampler, diffusion_tau=3e-5)
        cached = model.generate(**enc, **kw)
        assert torch.equal(cached, model.generate(**enc, diffusion_cache=False, **kw))
        assert cached.shape == (3, enc.input_ids.shape[1] + 10) and not (cached == 49152).any()


# --- (d) left-padded batches equal each prompt alone ----------------------------------------------

@pytest.mark.parametrize("which", ["export", "block_export"])
def test_left_padded_batch_rows_equal_each_prompt_alone(which, request):
    from transformers import AutoTokenizer

    folder = request.getfixturevalue(which)
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = remote_model(folder)
    prompts = [PROMPT, "Hi", "One two three four five six seven"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()
    kw = dict(max_new_tokens=9, diffusion_steps=5, diffusion_block_length=3, eos_token_id=None)
    batch = model.generate(**enc, **kw)
    P = enc.input_ids.shape[1]
    assert torch.equal(batch[:, :P], enc.input_ids)
    for i, text in enumerate(prompts):
        alone = model.generate(**tok(text, return_tensors="pt"), **kw)[0]
        n = len(tok(text).input_ids)
        assert batch[i, P:].tolist() == alone[n:].tolist(), text
    sampled = model.generate(**enc, num_return_sequences=2, do_sample=True, **kw)
    assert sampled.shape[0] == 6 and torch.equal(sampled[::2, :P], enc.input_ids)


# --- bad requests ---------------------------------------------------------------------------------

def test_bad_requests_say_what_to_change(export, tmp_path):
    from adapt.export.hf_generate.generate import generate

    model = remote_model(export)
    ids = torch.tensor([[504, 2644]])
    cases = [(dict(diffusion_sampler="ancestral"), "diffusion_sampler must be one of"),
             (dict(diffusion_steps=2, diffusion_block_length=2), "cannot cover 4 blocks"),
             (dict(max_new_tokens=0), "nothing to generate"),
             (dict(num_beams=4), "beam search"),
             (dict(foo=1), "does not use foo")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            model.generate(ids, **{"max_new_tokens": 8, **kw})
    plain = remote_model(export)
    plain.name_or_path = plain.config._name_or_path = str(tmp_path)
    with pytest.raises(ValueError, match="no diffusion.json"):
        generate(model=plain, input_ids=ids, max_new_tokens=4)


def test_card_figures_come_from_the_runs_evaluations(tmp_path):
    from adapt.export.writer import run_figures

    assert run_figures(tmp_path / "metrics.jsonl") == {}
    rows = [{"kind": "eval", "step": 0, "parent_ppl": 30.0, "before_ppl": 3000.0},
            {"kind": "eval", "step": 50, "ppl": 400.0}, {"kind": "eval", "step": 100, "ppl": 350.0},
            {"kind": "summary", "step": 120, "parent_ppl": 30.0, "before_ppl": 3000.0, "after_ppl": 297.0,
             "after_ppl_low": 250.0, "after_ppl_high": 350.0, "export": "final", "sample": "text"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [(label.split(",")[0], step) for label, step, _ in run_figures(tmp_path / "metrics.jsonl")["rows"]]
    assert got == [("parent causal LM", 0), ("diffusion bound before training", 0),
                   ("diffusion bound during training", 100), ("diffusion bound after training", 120)]


@pytest.mark.parametrize("block", [0, 4])
def test_an_adapter_export_decodes_only_with_its_adapter(tmp_path, tokenizer_dir, block):
    """A `lora.export=adapter` export holds the base weights: decoding it without the adapter would be the model
    before its adaptation, so generate refuses and names model.load_adapter; with the adapter loaded (peft through
    transformers) it decodes as the library, which merges the adapter."""
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from adapt.export import ADAPTER_DIR
    from adapt.recipe.config import LoraConfig
    from adapt.export.writer import write_hf_extras
    from adapt.model.lora import peft_config

    export = make_export(tmp_path / "export", tokenizer_dir, block_length=block)
    meta = json.loads((export / "diffusion.json").read_text())
    wrapped = get_peft_model(remote_model(export), peft_config(LoraConfig(enabled=True, r=4, alpha=8.0),
                                                               meta["mask_token_id"]))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    wrapped.save_pretrained(export / ADAPTER_DIR)
    write_hf_extras(export, meta, adapter=ADAPTER_DIR)  # as adapt.export.export does for such a run
    assert f'model.load_adapter("THIS_FOLDER/{ADAPTER_DIR}")' in (export / "README.md").read_text()
    tok = AutoTokenizer.from_pretrained(export)
    prompt, new = tok(PROMPT).input_ids, 8
    ids, opts = torch.tensor([prompt]), dict(max_new_tokens=new, diffusion_steps=8, do_sample=False)
    model = remote_model(export)
    with pytest.raises(ValueError, match="keeps its LoRA adapter apart"):
        model.generate(ids, **opts)
    model.load_adapter(str(export / ADAPTER_DIR))
    got = model.generate(ids, **opts)[0].tolist()  # the prompt (no BOS given, none returned), then the new ids
    assert got == library_ids(export, prompt, new, "confidence", 8, None, temperature=0)
    shutil.rmtree(export / ADAPTER_DIR)  # the base weights alone decode otherwise: the check can fail
    assert remote_model(export).generate(ids, **opts)[0].tolist() != got
