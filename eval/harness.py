"""lm-evaluation-harness adapter: harness tasks run unchanged on an exported diffusion model.

    python -m eval.harness --model diffusion-lm --model_args pretrained=checkpoints/<run>/final \
        --tasks adapt_local --device cpu --output_path eval_out/harness

`python -m eval.harness` (and the installed `adapt-lm-eval`) is lm-eval's own command line (same
arguments) with the `diffusion-lm` model registered and `--include_path eval/tasks` added when none is
given; a folder that is not a loadable export, a model that does not load or an argument lm-eval refuses
(an unknown task) prints one message and exits 2. lm-eval 0.4.13 has no plugin entry point for models, so
a bare `lm_eval --model diffusion-lm` only works in a process that imported this module (e.g.
`lm_eval.simple_evaluate` after `import eval.harness`).

loglikelihood(context, continuation) = minus the ELBO bound of the continuation given the context: only
continuation positions are masked, the export's objective scores them (adapt.likelihood, `mc_samples`
draws of `estimator`, the masked-count one by default, exact for one-token continuations), so it is a
lower bound on log p. The whole continuation is always scored: the context is left-truncated to fit
`max_length` (with the start token); a continuation longer than max_length - 1 tokens is scored in
consecutive pieces of (max_length - 1) // 2 tokens, each given the text before it (context and the
earlier pieces) left-truncated to fill the window, and the pieces' bounds are summed (the chain rule,
as loglikelihood_rolling does). is_greedy: every continuation token is the argmax of p_theta when the
whole piece is masked. loglikelihood_rolling sums that bound over lm-eval's disjoint rolling windows.
generate_until fills `max_gen_toks` masks after the context with `sampler` and cuts the text at the
first stop string.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import sys
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (lm-eval's own lazy model table, registered before ours)
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from adapt import objectives, rng
from adapt.checkpoint import load_diffusion_model, read_recipe
from adapt.denoiser import Denoiser
from adapt.likelihood import METHODS, block_estimates
from adapt.model import DTYPES, start_token
from adapt.objectives import Attention, ModelForward
from adapt.sampling import SAMPLER_NAMES, generate
from eval.cli import user_errors
from eval.models import stream_step
from eval.options import ESTIMATOR, EvalError, export_check

MODEL_NAME = "diffusion-lm"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
log = logging.getLogger(__name__)


def _default_max_length(model_dir: str, model) -> int:
    """The training block size when the export carries its recipe, else the position limit (<= 2048)."""
    recipe = read_recipe(model_dir) if model_dir else None
    if recipe is not None:
        return recipe.data.block_size
    return min(int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 2048)


def _check_options(estimator: str, sampler: str, dtype: str, mc_samples: int, mc_batch: int,
                   max_length: int) -> None:
    problems = [] if dtype in DTYPES else [f"dtype={dtype!r} (use one of {', '.join(DTYPES)})"]
    if estimator not in METHODS:
        problems.append(f"estimator={estimator!r} (use one of {', '.join(METHODS)})")
    if sampler not in SAMPLER_NAMES:
        problems.append(f"sampler={sampler!r} (use one of {', '.join(SAMPLER_NAMES)})")
    if mc_samples < 1 or mc_batch < 1:
        problems.append(f"mc_samples={mc_samples}, mc_batch={mc_batch} (both must be >= 1)")
    if max_length == 1 or max_length < 0:
        problems.append(f"max_length={max_length} (0 = the training block size, else >= 2)")
    if problems:
        raise EvalError(f"diffusion-lm model_args: {'; '.join(problems)}")


@register_model(MODEL_NAME, "adapt-diffusion")
class DiffusionLM(LM):
    """An exported diffusion model as an lm-eval LM (one process; batches are MC draws of one request)."""

    def __init__(self, pretrained: str = "", device: str = "cpu", dtype: str = "fp32", mc_samples: int = 32,
                 estimator: str = ESTIMATOR, mc_batch: int = 16, max_length: int = 0,
                 sampler: str = "confidence", steps: int = 0, gen_length: int = 64, temperature: float = 0.0,
                 seed: int = 0, loaded: tuple | None = None, batch_size=None, max_batch_size=None, **unused):
        """`loaded` = (model, tokenizer, meta) already in memory (then `pretrained` only locates the recipe).

        lm-eval's --batch_size is accepted and ignored: requests are scored one at a time (no padding
        under bidirectional attention) and the `mc_samples` draws of a request go `mc_batch` rows per call.
        """
        super().__init__()
        if unused:
            log.warning("diffusion-lm ignores model_args %s", ", ".join(sorted(unused)))
        _check_options(estimator, sampler, dtype, int(mc_samples), int(mc_batch), int(max_length))
        if loaded is None and not pretrained:
            raise EvalError("diffusion-lm needs --model_args pretrained=PATH (an exported diffusion folder)")
        if str(device or "cpu").startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s requested but CUDA is not available; using cpu", device)
            device = "cpu"
        loaded = loaded or load_diffusion_model(pretrained, dtype=dtype, device=device or "cpu")
        self.model, self.tokenizer, self.meta = loaded
        self.denoiser = Denoiser(self.model, self.meta)  # the samplers' call (generate_until)
        backend = getattr(self.model.config, "_attn_implementation", None) or "sdpa"
        self.objective = objectives.for_meta(self.meta, self.denoiser.blocked, backend, dtype)
        self.forward = ModelForward(self.model, self.denoiser.device)  # the bound's call (loglikelihood)
        self.mc_samples, self.estimator, self.sampler = int(mc_samples), estimator, sampler
        self.mc_batch = int(mc_batch)
        self.max_length = int(max_length) or _default_max_length(str(pretrained or ""), self.model)
        self.steps, self.gen_length, self.temperature, self.seed = int(steps), int(gen_length), float(temperature), int(seed)
        self.start_id = start_token(self.tokenizer)

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
        """The "estimate" stream of the request's text, so a request gets the same draws in any order or batch."""
        return torch.Generator().manual_seed(rng.seed_for(self.seed, "estimate", stream_step("\x00".join(texts))))

    def pieces(self, ctx: list[int], cont: list[int]) -> list[tuple[list[int], list[int]]]:
        """(context, piece) pairs that each fit max_length after the start token and together hold the whole
        continuation: one piece when it fits (the context left-truncated), else pieces of half a window."""
        room = self.max_length - 1
        size = len(cont) if len(cont) <= room else max(1, room // 2)
        out = []
        for start in range(0, len(cont), size):
            piece, before = cont[start:start + size], ctx + cont[:start]
            out.append((before[max(0, len(before) - (room - len(piece))):] if room > len(piece) else [], piece))
        return out

    def _layout(self, ctx: list[int], cont: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 = [start] + ctx + cont (they fit max_length) -> (x0 (1, T), the continuation's positions (1, T))."""
        x0 = torch.tensor([[self.start_id] + ctx + cont])
        maskable = torch.zeros_like(x0, dtype=torch.bool)
        maskable[0, 1 + len(ctx):] = True
        return x0, maskable

    def _is_greedy(self, x0: torch.Tensor, maskable: torch.Tensor) -> bool:
        """Every masked token is the argmax of p_theta with all of them masked (one model call)."""
        logits = self.objective.aligned_logits(self.forward, x0, maskable, Attention())
        logits = logits[0].float().masked_fill(self.objective.blocked, -math.inf)
        return bool((logits.argmax(-1).cpu()[maskable[0]] == x0[0][maskable[0]]).all())

    # --- lm-eval API -----------------------------------------------------------------------------
    @torch.no_grad()
    def score_tokens(self, ctx: list[int], cont: list[int], generator: torch.Generator,
                     greedy: bool = True) -> tuple[float, bool]:
        """(lower bound on log p(cont | ctx), is_greedy) for token ids, summed over the `pieces`."""
        total, is_greedy = 0.0, True
        for before, piece in self.pieces(ctx, cont):
            x0, maskable = self._layout(before, piece)
            bound = block_estimates(self.objective, self.forward, x0, maskable, self.mc_samples, self.estimator,
                                    generator, self.mc_batch)
            total -= float(bound[0, 0])
            is_greedy = is_greedy and (not greedy or self._is_greedy(x0, maskable))
        return total, is_greedy

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
        if n > self.max_length - 1:
            log.warning("max_gen_toks %d does not fit max_length %d; generating %d tokens", n, self.max_length,
                        self.max_length - 1)
            n = self.max_length - 1
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


def check_model_args(args) -> None:
    """EvalError before lm-eval starts when `diffusion-lm` is asked for without a loadable export."""
    if getattr(args, "command", None) != "run" or getattr(args, "model", None) not in (MODEL_NAME, "adapt-diffusion"):
        return
    model_args = args.model_args if isinstance(args.model_args, dict) else {}
    pretrained = model_args.get("pretrained")
    if not pretrained:
        raise EvalError(f"--model {args.model} needs --model_args pretrained=PATH (an exported diffusion folder, "
                        f"e.g. checkpoints/<run>/final)")
    export_check(Path(str(pretrained)))
    given = {k: model_args.get(k, v.default) for k, v in inspect.signature(DiffusionLM.__init__).parameters.items()
             if k in ("estimator", "sampler", "dtype", "mc_samples", "mc_batch", "max_length")}
    try:
        _check_options(**{k: v if isinstance(v, str) else int(v) for k, v in given.items()})
    except (TypeError, ValueError) as err:
        raise EvalError(f"diffusion-lm model_args: {err}") from None


def _refused_by_lm_eval(err: ValueError) -> bool:
    """True for a ValueError of lm-eval's own check of its arguments (an unknown task, a bad option)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and frames[-1].filename.endswith(os.path.join("lm_eval", "config", "evaluate_config.py"))


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with `diffusion-lm` registered and the local tasks on the include path."""
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("ls", "validate", "-h", "--help") and "--include_path" not in argv:
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *argv]
    with user_errors():
        try:
            setup_logging()
            parser = HarnessCLI()
            args = parser.parse_args()
            check_model_args(args)
            parser.execute(args)
        except ValueError as err:
            if not _refused_by_lm_eval(err):
                raise
            hint = " (list them with `python -m eval.harness ls tasks`)" if "Tasks not found" in str(err) else ""
            raise EvalError(f"{err}{hint}") from None


if __name__ == "__main__":
    main()
