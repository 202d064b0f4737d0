"""Memory per GPU of a recipe, before launch; reads the model's config, never its weights.

    python -m adapt.estimate RECIPE [key=value ...] [--gpus-per-node 8] [--nodes 1] [--hostfile FILE]
                             [--model-config DIR_OR_CONFIG_JSON]

Parameters are counted on an empty-weight model (accelerate's `init_empty_weights`) built from the
config, with the vocabulary grown by the mask token and padded like `model.pad_vocab_to_multiple_of`.
A hub id needs its config.json: online, from the HF cache, or by `--model-config` (a folder or file).

Model states (bytes per parameter, psi = all parameters, T = trainable ones, N = GPUs):
    compute weights p*psi (p = 2 bf16, 4 fp32), gradients g*T, optimizer k*T (bf16: fp32 master +
    fp32 gradient + Adam m, v = 16; fp32: Adam m, v = 8); ZeRO-1 splits the optimizer over N, ZeRO-2
    also the gradients, ZeRO-3 also the weights (plus a gather buffer of the largest layer).
    Full bf16 training at ZeRO-2/3 uses DeepSpeed's own estimators instead (they count 18 bytes).
Activations (per GPU, one micro batch b of s tokens, Llama-style layer, saved for backward):
    per layer and token p*(6h + 2h_kv + 4i) with flash/sdpa/flex (eager adds heads*s*6 for the
    attention probabilities); with gradient checkpointing only the layer inputs p*h per layer plus
    one layer being recomputed; logits p*V and their gradient, plus up to 3 float32 copies of the
    masked rows (bounded by all rows); a dense annealing mask b*s*s*p for sdpa/eager.
Not included: CUDA context, NCCL buffers and allocator fragmentation (allow 2-4 GB per GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapt import objectives  # noqa: E402
from adapt.cli.types import at_least  # noqa: E402
from adapt.recipe.config import Config  # noqa: E402
from adapt.export import exported_meta  # noqa: E402
from adapt.recipe.load import load_config  # noqa: E402

GB = 1024**3


@dataclass
class Shape:
    """What memory depends on, counted from the config."""

    total: int
    largest_layer: int
    trainable: int
    hidden: int
    kv_hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab_rows: int
    model_type: str


def read_config(cfg: Config, model_config: str = ""):
    """The transformers config of the recipe's model (or of `model_config`), without weights."""
    from transformers import AutoConfig

    from adapt.model.causal import ModelLoadError, resolve_source

    if model_config:
        path = Path(model_config)
        try:
            return AutoConfig.from_pretrained(path.parent if path.is_file() else path)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"--model-config {model_config}: no readable config.json there "
                                 f"({str(err).splitlines()[0]}); pass a model folder or its config.json") from None
    source, gguf = resolve_source(cfg.model.name_or_path, cfg.model.gguf_file)
    try:
        return AutoConfig.from_pretrained(source, gguf_file=gguf, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the config of {cfg.model.name_or_path} ({str(err).splitlines()[0]}); "
                             f"offline, fetch only its config.json (e.g. `hf download {cfg.model.name_or_path} "
                             f"config.json --local-dir DIR`) and pass --model-config DIR") from None


def model_shape(cfg: Config, config) -> Shape:
    """Parameter counts of the model a recipe trains: mask token row added, LoRA if enabled."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    exported = exported_meta(cfg.model.name_or_path) is not None
    if cfg.model.mask_token_id < 0 and not exported:  # assumes the mask token needs a new row
        multiple = cfg.model.pad_vocab_to_multiple_of
        config.vocab_size = math.ceil((config.vocab_size + 1) / multiple) * multiple
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    model.tie_weights()
    params = {id(p): p for p in model.parameters()}.values()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    total = sum(p.numel() for p in params)
    trainable = total
    if cfg.lora.enabled:
        trainable = config.hidden_size + sum(  # the mask token's row, and r * (in + out) per adapted linear
            cfg.lora.r * (m.in_features + m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in cfg.lora.target_modules)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return Shape(total, largest, trainable, config.hidden_size, kv * head_dim,
                 getattr(config, "intermediate_size", 4 * config.hidden_size), config.num_hidden_layers, heads,
                 model.get_input_embeddings().weight.shape[0], config.model_type)


def model_states(shape: Shape, dtype: str, stage: int, world: int, offload_opt: bool,
                 offload_param: bool) -> tuple[float, float]:
    """(GPU bytes per GPU, offloaded CPU bytes for all of a node's GPUs / gpus) by the formula above."""
    p, g, k = (2, 2, 16) if dtype == "bf16" else (4, 4, 8)
    psi, t, n = shape.total, shape.trainable, world
    weights = p * psi / n + 4 * shape.largest_layer if stage == 3 else p * psi
    grads = g * t / n if stage >= 2 else g * t
    optim = k * t / n if stage >= 1 else k * t
    cpu = 0.0
    if offload_opt:
        cpu += optim + (grads if stage >= 2 else 0)
        optim, grads = 0.0, (0.0 if stage >= 2 else grads)
    if offload_param:
        cpu += p * psi / n
        weights = 4 * shape.largest_layer
    return weights + grads + optim, cpu


def activations(shape: Shape, cfg: Config, checkpointing: bool) -> dict[str, float]:
    """Activation bytes per GPU for one micro batch (see the module docstring)."""
    p = 2 if cfg.model.dtype == "bf16" else 4
    b, s = cfg.train.micro_batch_size, cfg.data.seq_length
    logit_rows = s  # block diffusion runs [x_t | x_0] (2L positions) but computes logits for L rows only
    spec = objectives.spec_for(cfg)
    s = spec.forward_positions(cfg, s)
    per_token = p * (6 * shape.hidden + 2 * shape.kv_hidden + 4 * shape.intermediate)
    if cfg.model.attn_implementation == "eager":
        per_token += shape.heads * s * 6
    layer = b * s * per_token
    out = {"layers": (shape.layers * b * s * p * shape.hidden + layer) if checkpointing else shape.layers * layer,
           "logits": b * logit_rows * shape.vocab_rows * (2 * p + 3 * 4)}
    dense_mask = (cfg.attention.anneal_steps > 0 or spec.always_masked(cfg)) \
        and cfg.model.attn_implementation in ("sdpa", "eager") \
        or cfg.attention.document_mask and cfg.model.attn_implementation != "flash_attention_2"
    out["mask"] = b * s * s * p if dense_mask else 0
    return out


def estimate(cfg: Config, gpus_per_node: int = 8, nodes: int = 1, model_config: str = "") -> dict:
    """Every number the report prints, in bytes (GPU: per GPU; CPU: per node)."""
    shape = model_shape(cfg, read_config(cfg, model_config))
    rows = [_states_row(shape, cfg, stage, off_opt, off_par, gpus_per_node, nodes)
            for stage, off_opt, off_par in ((0, False, False), (1, False, False), (2, False, False), (2, True, False),
                                            (3, False, False), (3, True, False), (3, True, True))]
    act = {gc: activations(shape, cfg, gc) for gc in (False, True)}
    d = cfg.dist  # parameter offload implies optimizer offload, as in DeepSpeed's estimator
    mine = _states_row(shape, cfg, d.zero_stage, d.offload_optimizer or d.offload_param, d.offload_param,
                       gpus_per_node, nodes)
    world = gpus_per_node * nodes
    p = 2 if cfg.model.dtype == "bf16" else 4
    return {"shape": asdict(shape), "world": world, "gpus_per_node": gpus_per_node, "nodes": nodes, "rows": rows,
            "activations": {"no_checkpointing": act[False], "checkpointing": act[True]},
            "recipe": {"model_states": mine["gpu"], "activations": sum(act[cfg.model.gradient_checkpointing].values()),
                       "total": mine["gpu"] + sum(act[cfg.model.gradient_checkpointing].values()),
                       "host_ram_per_node": p * shape.total * gpus_per_node + mine["cpu_offload_per_node"]}}


def _states_row(shape: Shape, cfg: Config, stage: int, off_opt: bool, off_par: bool, gpus_per_node: int,
                nodes: int) -> dict:
    from adapt.train import distributed

    gpu, cpu = model_states(shape, cfg.model.dtype, stage, gpus_per_node * nodes, off_opt, off_par)
    source = "formula"
    if cfg.model.dtype == "bf16" and not cfg.lora.enabled:  # DeepSpeed's estimators assume full bf16 training
        ds = distributed.zero_estimate(shape.total, shape.largest_layer, stage, gpus_per_node, nodes, off_opt, off_par)
        if ds is not None:
            gpu, source = ds[1], "deepspeed"
    return {"stage": stage, "offload_optimizer": off_opt, "offload_param": off_par, "gpu": gpu,
            "cpu_offload_per_node": cpu * gpus_per_node, "source": source}


def report(cfg: Config, est: dict) -> str:
    s, r = est["shape"], est["recipe"]
    lora = f", LoRA r={cfg.lora.r}: {s['trainable'] / 1e6:.1f} M trainable" if cfg.lora.enabled else ""
    lines = [f"model {cfg.model.name_or_path} ({s['model_type']}): {s['total'] / 1e9:.3f} B parameters, vocab rows "
             f"{s['vocab_rows']}, largest layer {s['largest_layer'] / 1e6:.1f} M{lora}; {cfg.model.dtype}",
             f"world: {est['nodes']} node(s) x {est['gpus_per_node']} GPUs = {est['world']}",
             "", f"{'model states':<38}{'GPU GiB/GPU':>12}{'offloaded CPU GiB/node':>25}   source"]
    for row in est["rows"]:
        name = f"ZeRO-{row['stage']}" + (" + offload optimizer" if row["offload_optimizer"] else "") + (
            " + params" if row["offload_param"] else "")
        lines.append(f"  {name:<36}{row['gpu'] / GB:>12.2f}{row['cpu_offload_per_node'] / GB:>25.2f}   {row['source']}")
    b, L = cfg.train.micro_batch_size, cfg.data.seq_length
    lines += ["", f"activations per GPU, micro batch {b} x {L} tokens, {cfg.model.attn_implementation}:"]
    for key, label in (("no_checkpointing", "without gradient checkpointing"),
                       ("checkpointing", "with gradient checkpointing")):
        a = est["activations"][key]
        lines.append(f"  {label:<36}{sum(a.values()) / GB:>7.2f} GiB (layers {a['layers'] / GB:.2f}, logits "
                     f"{a['logits'] / GB:.2f}, mask {a['mask'] / GB:.2f})")
    gc = "on" if cfg.model.gradient_checkpointing else "off"
    off = " + offload optimizer" if cfg.dist.offload_optimizer else ""
    off += " + offload params" if cfg.dist.offload_param else ""
    lines += ["", f"this recipe (ZeRO-{cfg.dist.zero_stage}{off}, gradient checkpointing {gc}): "
              f"~{r['total'] / GB:.1f} GiB per GPU (states {r['model_states'] / GB:.1f} + activations "
              f"{r['activations'] / GB:.1f}) + 2-4 GiB CUDA/NCCL overhead",
              f"host RAM per node: ~{r['host_ram_per_node'] / GB:.1f} GiB (every rank loads the full weights before "
              f"ZeRO partitions them, plus offloaded states)"]
    return "\n".join(lines)


def hostfile_size(path: str) -> tuple[int, int]:
    """(nodes, GPUs per node) of a DeepSpeed hostfile (`host slots=N` per line)."""
    slots = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            part = [w for w in line.split() if w.startswith("slots=")]
            slots.append(int(part[0].split("=", 1)[1]) if part else 1)
    if not slots:
        raise SystemExit(f"{path} lists no hosts")
    return len(slots), max(slots)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapt.estimate", description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for adapt/run.py")
    parser.add_argument("--gpus-per-node", type=at_least(1), default=8)
    parser.add_argument("--nodes", type=at_least(1), default=1)
    parser.add_argument("--hostfile", default="", help="take nodes and GPUs per node from a DeepSpeed hostfile")
    parser.add_argument("--model-config", default="", help="folder or config.json to use instead of the recipe's model")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    from adapt.cli.errors import friendly

    with friendly():
        cfg = load_config(args.recipe, args.overrides)
        nodes, gpus = hostfile_size(args.hostfile) if args.hostfile else (args.nodes, args.gpus_per_node)
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout; keep stdout for the report
            est = estimate(cfg, gpus, nodes, args.model_config)
        print(json.dumps(est, indent=2) if args.json else report(cfg, est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
