"""Evaluation suite for exported diffusion models: one script per question, one entry for all (eval.cli).

    python -m eval.likelihood MODEL_DIR   ELBO perplexity bound vs the parent's exact perplexity
    python -m eval.generation MODEL_DIR   generative perplexity and diversity vs sampling steps
    python -m eval.infill MODEL_DIR       filling held-out spans vs left-to-right continuation
    python -m eval.speed MODEL_DIR        latency and tokens/s of each sampler vs the parent
    python -m eval.compare A B [C ...]    paired held-out bounds of several exports on the same masks
    python -m eval.local_tasks MODEL_DIR  the local lm-eval tasks, the diffusion model next to its parent
    python -m eval.mauve_score [SAMPLES]  MAUVE (skipped when mauve-text or its featurizer is missing)
    python -m eval.suite MODEL_DIR        all of the above at a budget, then a Markdown report (eval.report)
    python -m eval.harness ...            lm-evaluation-harness with the `diffusion-lm` model

Importing this package has no side effects (it loads no model).
"""
