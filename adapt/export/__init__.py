"""The export: a self-describing HF folder made from one checkpoint of a training run.

    <export>/model*.safetensors, config.json, tokenizer   the weights (LoRA merged unless lora.export=adapter)
    <export>/adapter/                                    the peft adapter kept apart (lora.export=adapter only)
    <export>/diffusion.json                              mask token, attention, objective: what makes it a diffusion LM
    <export>/recipe.yaml                                 the resolved training recipe
    <export>/generation_config.json, custom_generate/    decoding defaults and the decoder plain transformers runs
    <export>/README.md                                   the model card

    contract.py     the file names and the checks of a folder (the only module that spells them)
    writer.py       export(): written by `python -m adapt.export` and by the end of each training stage
    loader.py       read by sampling, evaluation, benchmarks and a next stage (load_diffusion_model, load_weights)
    card.py         the model card
    hf_generate/    the decoder shipped as custom_generate/generate.py (runs without this package)

This package reads the run folder (its base/ and checkpoints, laid out by adapt.train.checkpoint) and writes base/ at
the start of a run; resumable checkpoints are adapt.train.checkpoint's. Its names load on first use, so importing the
shipped decoder (adapt.export.hf_generate.generate, which the library's attention masks and samplers share) loads
nothing else.
"""
from __future__ import annotations

import importlib

_HOME = {**dict.fromkeys(("ADAPTER_DIR", "META_FILE", "RECIPE_FILE", "WEIGHTS_FILE", "exported_meta", "read_meta",
                          "read_recipe", "save_meta"), "contract"),
         **dict.fromkeys(("export_problem", "load_diffusion_model", "load_weights"), "loader"),
         **dict.fromkeys(("export", "export_tag", "save_base", "write_hf_extras"), "writer")}
"""Each public name -> the module that defines it."""

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
