"""Typed recipe schema: defaults < recipe YAML < command-line dotlist.

Every problem in a recipe (unknown key, wrong type, value out of range, incompatible options) is
collected and reported in one `ConfigError`, so a mistyped recipe fails in the first second.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from adapt.recipe.keys import check_tree, renamed
from adapt.recipe.limits import BATCH_MAX, SEED_MAX, SIZE_MAX, STEPS_MAX, ranged
from adapt.model.causal import EMBEDDED_MODEL, ModelConfig
from adapt import objectives
from adapt.objectives.block import BlockConfig
from adapt.objectives.distill import DistillConfig

__all__ = ["EMBEDDED_MODEL", "Config", "ConfigError", "ModelConfig", "check_tree", "from_dict", "load_yaml", "renamed",
           "schema", "to_dict", "to_yaml", "values"]


class ConfigError(ValueError):
    """A recipe problem; the message lists every problem found and how to fix it."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid recipe:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class DiffusionConfig:
    objective: str = "auto"
    """The training objective by name (adapt.objectives.OBJECTIVES): mdlm (masked diffusion over the whole sequence) or
    block (block diffusion, BD3-LM); auto = block when diffusion.block.length > 0, else mdlm."""
    eps: float = ranged(1e-3, 1e-8, 0.5)
    """Smallest diffusion time; t ~ U(eps, 1)."""
    t_sampling: Literal["uniform", "stratified", "antithetic"] = "stratified"
    """How a batch draws t: uniform (i.i.d.), stratified (one per stratum) or antithetic (t, 1-t pairs)."""
    shift: bool = True
    """Read the prediction for position i from logits at i-1 (keeps the causal head useful)."""
    loss_norm: Literal["token", "masked", "sequence"] = "token"
    """Normalise the summed loss by: token (all loss-eligible tokens = ELBO per token), masked, or sequence."""
    position_masking: float = ranged(0.0, 0.0, 4.0)
    """Position-dependent masking strength lambda (Efficient-DLM): token i is masked w.p. t ** a_i, a_i = exp(-lambda
    (2u_i - 1)), u_i its place in its block in [0, 1]; lambda > 0 masks later tokens more, each weighted a_i / t (still
    an ELBO); 0 = rate t everywhere. Training only: held-out bounds use the uniform rate."""
    t_min: float = ranged(0.0, 0.0, 1.0)
    """Training draws of t lie in [max(eps, t_min), t_max] (BD3-LM's clipped schedule, a variance lever). Other than [0,
    1] the training loss covers only those times, so it is no longer the whole bound; held-out bounds always cover [eps,
    1]."""
    t_max: float = ranged(1.0, 0.0, 1.0)
    """Largest diffusion time of the training draws (see t_min)."""
    t_per_block: bool = False
    """Block diffusion: one t per block (stratified over all blocks of the batch) instead of one per sequence; each
    block's bound is then its own single-t estimate. No effect at diffusion.block.length 0 (one block)."""
    complementary_masks: bool = False
    """Fast-dLLM v2's complementary masks: each step trains half as many distinct sequences, each twice, the second copy
    masked exactly where the first is not (t' = 1 - t), so every maskable token carries loss once per pair. Needs an
    even number of sequences per step."""
    full_mask_share: float = ranged(0.0, 0.0, 1.0)
    """Share of the training draws (one per row, or per block with t_per_block) taken at t = 1: fully masked, the
    state a block decoder drafts from in one step. It changes only the training times' distribution (like t_min /
    t_max); the held-out bound is the objective's ELBO as always. 0 = off."""
    ar_loss_weight: float = ranged(0.0, 0.0)
    """Joint causal loss weight alpha (Nemotron-Labs-Diffusion, I-DLM): adds alpha x the clean sequence's next-token CE
    under causal attention (nats per scored token, its own token mean; one more forward); 0 = off."""
    block: BlockConfig = field(default_factory=BlockConfig)
    """Block diffusion's own keys (adapt.objectives.block.BlockConfig)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The distillation term's keys (adapt.objectives.distill.DistillConfig)."""

@dataclass
class AttentionConfig:
    anneal_steps: int = ranged(100, 0, STEPS_MAX)
    """Optimizer steps over which attention goes from causal to bidirectional; 0 = bidirectional at once."""
    anneal_schedule: Literal["random", "window", "blocks"] = "random"
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
    seq_length: int = ranged(256, 8, SIZE_MAX)
    """Tokens per packed training sequence (sft: prompt + response + EOS padding)."""
    heldout_sequences: int = ranged(16, 1, SIZE_MAX)
    """Sequences (sft: examples) kept out of training for the likelihood bound; whole documents, split over sources by
    weight."""
    num_proc: int = ranged(1, 1, 1024)
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
    r: int = ranged(16, 1, BATCH_MAX)
    """Adapter rank."""
    alpha: float = ranged(32.0, 1e-8)
    """Adapter scale: the update is (alpha / r) * B @ A."""
    dropout: float = ranged(0.05, 0.0, 0.99)
    """Dropout on the adapter input (probability)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    """Names (suffixes) of the linear layers that get adapters; default: Llama/Qwen/Mistral projections."""
    export: Literal["merged", "adapter"] = "merged"
    """merged: fold the adapter into the exported weights; adapter: export the base weights and the peft adapter beside
    them."""


@dataclass
class OptimConfig:
    lr: float = ranged(5e-5, 0.0, 1.0)
    """Peak learning rate."""
    weight_decay: float = ranged(0.0, 0.0)
    """AdamW decoupled weight decay."""
    beta1: float = ranged(0.9, 0.0, 1.0)
    """AdamW beta1."""
    beta2: float = ranged(0.95, 0.0, 1.0)
    """AdamW beta2."""
    warmup_steps: int = ranged(10, 0, STEPS_MAX)
    """Linear warmup steps."""
    min_lr_ratio: float = ranged(0.1, 0.0, 1.0)
    """Cosine decays to lr * min_lr_ratio at max_steps."""
    grad_clip: float = ranged(1.0, 0.0)
    """Global gradient-norm clip; 0 disables."""
    layer_lr_decay: float = ranged(1.0, 0.0, 1.0, open_below=True)
    """Layer-wise rate decay in (0, 1]: decoder layer l of N trains at lr * decay^(N-1-l) (top layer fastest, RND1); 1 =
    off."""
    embedding_lr_scale: float = ranged(1.0, 0.0, open_below=True)
    """Factor (> 0) on lr for the input embeddings and output head, the mask token's row included; 1 = off."""


@dataclass
class TrainConfig:
    max_steps: int = ranged(120, 1, STEPS_MAX)
    """Optimizer steps."""
    micro_batch_size: int = ranged(4, 1, BATCH_MAX)
    """Sequences per rank per forward."""
    grad_accum: int = ranged(1, 1, BATCH_MAX)
    """Micro-batches per optimizer step."""
    seed: int = ranged(0, 0, SEED_MAX)
    """Seed for data order, noise and attention patterns, in [0, 2**32 - 1]."""
    log_every: int = ranged(5, 1, STEPS_MAX)
    """Steps between status lines."""
    eval_every: int = ranged(0, 0, STEPS_MAX)
    """Steps between held-out evaluations; 0 = only before and after (the last step's is the one after)."""
    eval_t_samples: int = ranged(8, 1, BATCH_MAX)
    """Monte Carlo draws per held-out block for the likelihood bound."""
    eval_before: Literal["both", "causal", "bidirectional", "none"] = "both"
    """Held-out bounds of the unadapted model (adapt stage): both, causal (the parent's attention), bidirectional, or
    none; the parent's exact perplexity is always measured."""
    eval_method: Literal["count", "stratified", "uniform", "antithetic"] = "count"
    """How held-out draws are made (adapt.train.likelihood): count (masked-count, lowest variance), stratified, uniform
    or antithetic t."""
    save_every: int = ranged(50, 0, STEPS_MAX)
    """Steps between resumable checkpoints; 0 = only at the end."""
    keep_last: int = ranged(2, 1, STEPS_MAX)
    """Resumable checkpoints kept on disk."""
    max_bad_steps: int = ranged(5, 1, STEPS_MAX)
    """Stop after this many consecutive non-finite steps."""


@dataclass
class DistConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    offload_optimizer: bool = False
    """ZeRO-offload the optimizer state to CPU (stage >= 1)."""
    offload_param: bool = False
    """Offload parameters to CPU (stage 3)."""
    deepspeed_config: str = ""
    """Optional DeepSpeed JSON merged over the generated config (e.g. recipes/deepspeed/*.json)."""
    timeout_s: float = ranged(1800.0, 1, 7 * 24 * 3600.0)  # a week; timedelta overflows near 1e14 s
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
    sample_length: int = ranged(48, 0, SIZE_MAX)
    """Tokens in the sample printed at the end (0 = none); sft answers a held-out prompt instead when > 0."""
    sample_steps: int = ranged(24, 1, SIZE_MAX)
    """Ancestral sampling steps for that sample."""


@dataclass
class Config:
    stage: Literal["adapt", "sft"] = "adapt"
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


def schema(*trees: Any) -> Config:
    """The schema recipe trees (renamed, later ones over earlier ones) are read with: the defaults, the sections
    under `diffusion` being those the trees' objective declares (`sections`: an objective may extend a section
    with keys of its own). An unknown objective gets the plain schema; validation names it."""
    name, block = objectives.AUTO, 0
    for tree in trees:
        d = tree.get("diffusion") if isinstance(tree, dict) else None
        name = d.get("objective", name) if isinstance(d, dict) else name
        b = d.get("block") if isinstance(d, dict) else None
        block = b.get("length", block) if isinstance(b, dict) else block
    cls = objectives.OBJECTIVES.get(objectives.objective_name(block if isinstance(block, int) else 0, str(name)))
    if cls is None:
        return Config()
    sections = objectives.spec_of(cls).sections
    return Config(diffusion=DiffusionConfig(**{key: section() for key, section in sections.items()}))


def from_dict(tree: dict) -> Config:
    """Rebuild a saved resolved config (from a checkpoint) without re-validating file paths; old key names are read
    under their new ones (adapt.recipe.keys.RENAMED) without a note, as the user did not write them."""
    problems: list[str] = []
    tree = renamed(tree, problems)
    base = schema(tree)
    check_tree(base, tree, "", problems)
    if problems:  # e.g. a checkpoint written by another version of the schema
        raise ConfigError(problems)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(base), tree))
    except (OmegaConfBaseException, ValueError, TypeError, OverflowError) as err:
        raise ConfigError([str(err).splitlines()[0]]) from None
