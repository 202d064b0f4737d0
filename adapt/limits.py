"""The values each recipe key may take: the choices of the string keys and the ranges of the numbers
(adapt.recipe.validate checks every loaded recipe against them)."""
from __future__ import annotations

CHOICES: dict[str, tuple] = {
    "stage": ("adapt", "sft"),
    "lora.export": ("merged", "adapter"),
    "model.dtype": ("bf16", "fp32"),
    "model.mask_init": ("mean", "normal", "eos"),
    "model.attn_implementation": ("eager", "sdpa", "flash_attention_2", "flex_attention"),
    "diffusion.t_sampling": ("uniform", "stratified", "antithetic"),
    "diffusion.loss_norm": ("token", "masked", "sequence"),
    "diffusion.clean_attention": ("block", "causal"),
    "diffusion.noised_attention": ("bidirectional", "causal"),
    "diffusion.distill_positions": ("frontier", "masked", "context"),
    "diffusion.distill_teacher": ("clean", "parent"),
    "diffusion.distill_schedule": ("constant", "linear"),
    "train.eval_before": ("both", "causal", "bidirectional", "none"),
    "train.eval_method": ("count", "stratified", "uniform", "antithetic"),
    "attention.anneal_schedule": ("random", "window", "blocks"),
    "dist.zero_stage": (0, 1, 2, 3),
}

STEPS_MAX = 10**9
"""Upper bound of every count of optimizer steps: far beyond any run, far below what torch's int64 holds."""
SIZE_MAX = 2**20
"""Upper bound of sequence lengths (tokens) and of sampling steps."""
BATCH_MAX = 2**16
"""Upper bound of per-forward counts (sequences, micro-batches, draws, adapter rank, vocabulary multiple)."""
SEED_MAX = 2**32 - 1
"""Largest seed: the data order hashes seed * 100003 + epoch into torch's 64-bit seed, which a larger one overflows."""

# (key, lower bound, upper bound or None); bounds inclusive. None only for floats (which must then be finite);
# every integer has an upper bound, so none reaches torch as an overflow or sizes an allocation absurdly.
RANGES: list[tuple[str, float, float | None]] = [
    ("diffusion.eps", 1e-8, 0.5),
    ("diffusion.block_length", 0, SIZE_MAX),
    ("diffusion.ar_loss_weight", 0.0, None),
    ("diffusion.distill_weight", 0.0, None),
    ("diffusion.distill_top_k", 0, SIZE_MAX),
    ("diffusion.distill_onpolicy", 0.0, 1.0),
    ("diffusion.distill_temperature", 0.0, 100.0),
    ("diffusion.t_min", 0.0, 1.0),
    ("diffusion.t_max", 0.0, 1.0),
    ("diffusion.full_mask_share", 0.0, 1.0),
    ("attention.anneal_steps", 0, STEPS_MAX),
    ("data.seq_length", 8, SIZE_MAX),
    ("data.heldout_sequences", 1, SIZE_MAX),
    ("data.num_proc", 1, 1024),
    ("diffusion.position_masking", 0.0, 4.0),
    ("optim.lr", 0.0, 1.0),
    ("optim.weight_decay", 0.0, None),
    ("optim.beta1", 0.0, 1.0),
    ("optim.beta2", 0.0, 1.0),
    ("optim.warmup_steps", 0, STEPS_MAX),
    ("optim.min_lr_ratio", 0.0, 1.0),
    ("optim.grad_clip", 0.0, None),
    ("optim.layer_lr_decay", 0.0, 1.0),
    ("optim.embedding_lr_scale", 0.0, None),
    ("train.max_steps", 1, STEPS_MAX),
    ("train.micro_batch_size", 1, BATCH_MAX),
    ("train.grad_accum", 1, BATCH_MAX),
    ("train.seed", 0, SEED_MAX),
    ("train.log_every", 1, STEPS_MAX),
    ("train.eval_every", 0, STEPS_MAX),
    ("train.eval_t_samples", 1, BATCH_MAX),
    ("train.save_every", 0, STEPS_MAX),
    ("train.keep_last", 1, STEPS_MAX),
    ("train.max_bad_steps", 1, STEPS_MAX),
    ("dist.timeout_s", 1, 7 * 24 * 3600.0),  # a week; timedelta itself overflows near 1e14 s
    ("model.pad_vocab_to_multiple_of", 1, BATCH_MAX),
    ("model.mask_token_id", -1, 2**31 - 1),
    ("run.sample_length", 0, SIZE_MAX),
    ("run.sample_steps", 1, SIZE_MAX),
    ("lora.r", 1, BATCH_MAX),
    ("lora.alpha", 1e-8, None),
    ("lora.dropout", 0.0, 0.99),
]

OPEN_BELOW = {"optim.layer_lr_decay", "optim.embedding_lr_scale", "diffusion.distill_temperature"}
"""Keys of RANGES whose lower bound is excluded (a rate factor of 0 would freeze what it scales)."""
