"""lm-evaluation-harness adapter: harness tasks run unchanged on an exported diffusion model.

    python -m eval.harness --model diffusion-lm --model_args pretrained=checkpoints/<run>/final \
        --tasks adapt_local --device cpu --output_path eval_out/harness

`python -m eval.harness` is lm-eval's own command line (same arguments) with the `diffusion-lm`
model registered and `--include_path eval/tasks` added when none is given. lm-eval 0.4.13 has no
plugin entry point for models, so a bare `lm_eval --model diffusion-lm` only works in a process
that imported this module (e.g. `lm_eval.simple_evaluate` after `import eval.harness`).

loglikelihood(context, continuation) = minus the ELBO bound of the continuation given the context
(only continuation positions are masked; Monte Carlo over `mc_samples` draws, eval.elbo), so it is
a lower bound on log p. is_greedy: every continuation token is the argmax of p_theta when the whole
continuation is masked (exact for one-token continuations). loglikelihood_rolling sums that bound
over lm-eval's disjoint rolling windows. generate_until fills `max_gen_toks` masks after the context
with `sampler` and cuts the text at the first stop string.
"""
from __future__ import annotations

import logging
import sys
import zlib
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (lm-eval's own lazy model table, registered before ours)
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from adapt.checkpoint import load_diffusion_model
from adapt.config import from_dict
from adapt.denoiser import Denoiser
from adapt.sampling import SAMPLERS, generate
from eval.elbo import METHODS, elbo_estimates

MODEL_NAME = "diffusion-lm"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
log = logging.getLogger(__name__)


def _default_max_length(model_dir: Path, model) -> int:
    """The training block size when the export carries its recipe, else the position limit (<= 2048)."""
    recipe = Path(model_dir) / "recipe.yaml"
    if recipe.is_file():
        return from_dict(yaml.safe_load(recipe.read_text())).data.block_size
    return min(int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 2048)


@register_model(MODEL_NAME, "adapt-diffusion")
class DiffusionLM(LM):
    """An exported diffusion model as an lm-eval LM (one process; batches are MC draws of one request)."""

    def __init__(self, pretrained: str = "", device: str = "cpu", dtype: str = "fp32", mc_samples: int = 32,
                 estimator: str = "count", mc_batch: int = 16, max_length: int = 0,
                 sampler: str = "confidence", steps: int = 0, gen_length: int = 64, temperature: float = 0.0,
                 seed: int = 0, loaded: tuple | None = None, batch_size=None, max_batch_size=None, **unused):
        """`loaded` = (model, tokenizer, meta) already in memory (then `pretrained` only locates recipe.yaml).

        lm-eval's --batch_size is accepted and ignored: requests are scored one at a time (no padding
        under bidirectional attention) and the `mc_samples` draws of a request go `mc_batch` rows per call.
        """
        super().__init__()
        if unused:
            log.warning("diffusion-lm ignores model_args %s", ", ".join(sorted(unused)))
        if estimator not in METHODS or sampler not in SAMPLERS:
            raise ValueError(f"estimator must be one of {METHODS} and sampler one of {tuple(SAMPLERS)}; "
                             f"got estimator={estimator!r}, sampler={sampler!r}")
        if loaded is None and not pretrained:
            raise ValueError("diffusion-lm needs --model_args pretrained=PATH (an exported diffusion folder)")
        if str(device or "cpu").startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s requested but CUDA is not available; using cpu", device)
            device = "cpu"
        loaded = loaded or load_diffusion_model(pretrained, dtype=dtype, device=device or "cpu")
        self.model, self.tokenizer, self.meta = loaded
        self.denoiser = Denoiser(self.model, self.meta)
        self.mc_samples, self.estimator, self.sampler = int(mc_samples), estimator, sampler
        self.mc_batch = int(mc_batch)
        self.max_length = int(max_length) or _default_max_length(Path(pretrained), self.model)
        self.steps, self.gen_length, self.temperature, self.seed = int(steps), int(gen_length), float(temperature), int(seed)
        bos = self.tokenizer.bos_token_id
        self.start_id = bos if bos is not None else self.tokenizer.eos_token_id
        self._device = self.denoiser.device

    # --- tokens --------------------------------------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, tokenised together so merges across the boundary
        match how the text would be read (trailing spaces of the context move to the continuation)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        n_ctx = len(self.tok_encode(context)) if context else 0
        return whole[:n_ctx], whole[n_ctx:]

    def _generator(self, *texts: str) -> torch.Generator:
        """Seeded by the request's text, so a request gets the same draws in any order or batch."""
        return torch.Generator().manual_seed(zlib.crc32("\x00".join(texts).encode()) + self.seed)

    def _layout(self, ctx: list[int], cont: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 = [BOS] + context (left-truncated to fit max_length) + continuation -> (x0 (1, T), cont mask (1, T))."""
        cont = cont[-(self.max_length - 1):]
        ctx = ctx[max(0, len(ctx) - (self.max_length - 1 - len(cont))):]
        x0 = torch.tensor([[self.start_id] + ctx + cont])
        maskable = torch.zeros_like(x0, dtype=torch.bool)
        maskable[0, 1 + len(ctx):] = True
        return x0, maskable

    # --- lm-eval API -----------------------------------------------------------------------------
    @torch.no_grad()
    def score_tokens(self, ctx: list[int], cont: list[int], generator: torch.Generator,
                     greedy: bool = True) -> tuple[float, bool]:
        """(lower bound on log p(cont | ctx), is_greedy) for token ids."""
        if not cont:
            return 0.0, True
        x0, maskable = self._layout(ctx, cont)
        bound = elbo_estimates(self.denoiser, x0, maskable, self.mc_samples, self.estimator, self.meta.eps,
                               generator, self.mc_batch)
        is_greedy = True
        if greedy:
            logp = self.denoiser(x0.masked_fill(maskable, self.meta.mask_token_id))
            is_greedy = bool((logp[0].argmax(-1).cpu()[maskable[0]] == x0[0][maskable[0]]).all())
        return -float(bound[0]), is_greedy

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, desc="diffusion-lm loglikelihood", disable=disable_tqdm):
            context, continuation = req.args
            ctx, cont = self._split(context, continuation)
            result = self.score_tokens(ctx, cont, self._generator(context, continuation))
            self.cache_hook.add_partial("loglikelihood", req.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, desc="diffusion-lm rolling", disable=disable_tqdm):
            (text,) = req.args
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.start_id, max_seq_len=self.max_length - 1,
                context_len=1))
            total, gen = 0.0, self._generator(text)
            for i, (ctx, pred) in enumerate(windows):
                total += self.score_tokens(ctx[1:] if i == 0 else ctx, pred, gen, greedy=False)[0]
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, desc="diffusion-lm generate", disable=disable_tqdm):
            context, kwargs = req.args
            text = self._generate_one(context, dict(kwargs or {}))
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def _generate_one(self, context: str, kwargs: dict) -> str:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        n = int(kwargs.pop("max_gen_toks", self.gen_length))
        temperature = 0.0 if kwargs.pop("do_sample", None) is False else float(kwargs.pop("temperature", self.temperature))
        ctx = self.tok_encode(context)
        ctx = ctx[max(0, len(ctx) - (self.max_length - 1 - n)):]
        x = torch.tensor([[self.start_id] + ctx + [self.meta.mask_token_id] * n])
        eos = self.tokenizer.eos_token_id
        ids = generate(self.denoiser, x, sampler=self.sampler, steps=self.steps or n, generator=self._generator(context),
                       eos_id=eos, temperature=temperature).ids[0, 1 + len(ctx):].tolist()
        ids = ids[:ids.index(eos)] if eos in ids else ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in until:
            if stop and stop in text:
                text = text[:text.index(stop)]
        return text


def _metrics(task_results: dict) -> dict[str, float]:
    """lm-eval's {"acc,none": 0.5, "acc_stderr,none": ...} -> {"acc": 0.5, "acc_stderr": ...} (numbers only)."""
    out = {}
    for key, value in task_results.items():
        if isinstance(value, (int, float)) and "," in key:
            metric, filt = key.split(",", 1)
            out[metric if filt == "none" else f"{metric} ({filt})"] = float(value)
    return out


def evaluate_local(models: dict[str, LM], tasks: list[str], limit: int | None, data_dir: Path,
                   num_fewshot: int | None = None) -> dict:
    """Run lm-eval tasks from eval/tasks on each model -> {label: {task: {metric: value}}}."""
    import os

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    previous = os.environ.get("ADAPT_EVAL_TASK_DATA")
    os.environ["ADAPT_EVAL_TASK_DATA"] = str(data_dir)
    try:
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        results = {}
        for label, lm in models.items():
            out = simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                                  log_samples=False, bootstrap_iters=0)
            results[label] = {task: _metrics(r) for task, r in out["results"].items()}
    finally:
        if previous is None:
            os.environ.pop("ADAPT_EVAL_TASK_DATA", None)
        else:
            os.environ["ADAPT_EVAL_TASK_DATA"] = previous
    return {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot, "results": results}


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with `diffusion-lm` registered and the local tasks on the include path."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("ls", "validate", "-h", "--help") and "--include_path" not in argv:
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
