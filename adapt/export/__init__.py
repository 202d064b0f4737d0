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

This package reads the run folder (its base/ and checkpoints, laid out by adapt.checkpoint) and writes base/ at the
start of a run; resumable checkpoints are adapt.checkpoint's.
"""
from adapt.export.contract import (ADAPTER_DIR, META_FILE, RECIPE_FILE, WEIGHTS_FILE, exported_meta, read_meta,
                                   read_recipe, save_meta)
from adapt.export.loader import export_problem, load_diffusion_model, load_weights
from adapt.export.writer import export, export_tag, save_base, write_hf_extras

__all__ = ["ADAPTER_DIR", "META_FILE", "RECIPE_FILE", "WEIGHTS_FILE", "export", "export_problem", "export_tag",
           "exported_meta", "load_diffusion_model", "load_weights", "read_meta", "read_recipe", "save_base",
           "save_meta", "write_hf_extras"]
