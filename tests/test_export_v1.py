"""An export written before the package's regrouping (tests/fixtures/export_v1, made by its make.py at commit
acd621d) loads with today's code, and every sampler decodes from it the ids it gave then, greedy and seeded:
the metadata, the recipe and the draft head of old exports are read as they were written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "export_v1"
OUTPUTS = json.loads((FIXTURE / "outputs.json").read_text())
PROMPT = "The cat sat on the"


def old_export(folder: Path, tokenizer_dir: Path, variant: str) -> Path:
    """The fixture's files as an export folder with the `variant` metadata (whole or block)."""
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    for name in ("model.safetensors", "config.json", "recipe.yaml", "draft_head.safetensors"):
        shutil.copy(FIXTURE / name, folder / name)
    shutil.copy(FIXTURE / f"diffusion_{variant}.json", folder / "diffusion.json")
    return folder


@pytest.fixture(scope="module", params=["whole", "block"])
def loaded(request, tmp_path_factory, tokenizer_dir):
    from adapt.export import load_diffusion_model

    folder = old_export(tmp_path_factory.mktemp(f"v1_{request.param}"), tokenizer_dir, request.param)
    from adapt.draft_head import load_draft_head

    model, tok, meta = load_diffusion_model(folder)
    return request.param, (model, tok, meta, load_draft_head(folder, model))  # the head made its outputs


def test_old_export_decodes_the_ids_it_gave(loaded):
    from adapt.decode.denoiser import Denoiser
    from adapt.decode import generate
    from adapt.decode.canvas import prompt_canvas

    variant, (model, tok, meta, head) = loaded
    assert meta.block_length == (4 if variant == "block" else 0)
    prompt = tok(PROMPT, add_special_tokens=False).input_ids
    x = prompt_canvas(tok.bos_token_id, meta.mask_token_id, 12, prefix=prompt, batch=2)
    cases = {k: v for k, v in OUTPUTS.items() if k.startswith(variant + "/")}
    assert len(cases) >= 7
    for key, want in cases.items():
        _, sampler, options = key.split("/", 2)
        gen = torch.Generator().manual_seed(7)
        steps = None if sampler in ("speculative", "chain") else 6
        got = generate(Denoiser(model, meta), x, sampler, steps=steps, generator=gen, draft_head=head,
                       **json.loads(options))
        assert (got.ids.tolist(), got.nfe) == (want["ids"], want["nfe"]), key
