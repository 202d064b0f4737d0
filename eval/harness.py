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
continuation positions are masked, the export's objective scores them (adapt.train.likelihood, `mc_samples`
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

import argparse
import logging
import math
import os
import re
import sys
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (lm-eval's own lazy model table, registered before ours)
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from adapt import objectives
from adapt.train import rng
from adapt.draft_head import load_draft_head
from adapt.export import load_diffusion_model, read_recipe
from adapt.cli.types import text_problem
from adapt.decode.denoiser import Denoiser
from adapt.train.likelihood import block_estimates
from adapt.model.causal import start_token
from adapt.objectives import Attention, ModelForward
from adapt.decode import generate
from eval.cli import user_errors
from eval.models import stream_step
from eval.model_args import check_gen_kwargs, check_model_args
from eval.options import ESTIMATOR, EvalError, export_check, writable_dir

MODEL_NAME = "diffusion-lm"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
log = logging.getLogger(__name__)


def _default_max_length(model_dir: str, model) -> int:
    """The training block size when the export carries its recipe, else the position limit (<= 2048)."""
    recipe = read_recipe(model_dir) if model_dir else None
    if recipe is not None:
        return recipe.data.seq_length
    return min(int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 2048)


def _positions_check(max_length: int, model) -> None:
    """EvalError when max_length is longer than the model's positions (scores past them are meaningless)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise EvalError(f"--model_args max_length={max_length}: longer than the model's {limit} positions "
                        f"(max_position_embeddings); use at most {limit}, or 0 for the training block size")


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
        given = dict(pretrained=pretrained, device=device, dtype=dtype, mc_samples=mc_samples, estimator=estimator,
                     mc_batch=mc_batch, max_length=max_length, sampler=sampler, steps=steps, gen_length=gen_length,
                     temperature=temperature, seed=seed)
        opts = check_model_args({**{k: v for k, v in given.items() if v is not None}, **unused})
        pretrained, device = opts.get("pretrained", ""), opts.get("device", "cpu")
        if loaded is None and not pretrained:
            raise EvalError("diffusion-lm needs --model_args pretrained=PATH (an exported diffusion folder)")
        if str(device or "cpu").startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s requested but CUDA is not available; using cpu", device)
            device = "cpu"
        loaded = loaded or load_diffusion_model(pretrained, dtype=dtype, device=device or "cpu")
        self.model, self.tokenizer, self.meta = loaded
        self.denoiser = Denoiser(self.model, self.meta)  # the samplers' call (generate_until)
        self.draft_head = load_draft_head(pretrained, self.model) if pretrained else None  # speculative and chain
        backend = getattr(self.model.config, "_attn_implementation", None) or "sdpa"
        self.objective = objectives.for_meta(self.meta, self.denoiser.blocked, backend, dtype)
        self.forward = ModelForward(self.model, self.denoiser.device)  # the bound's call (loglikelihood)
        self.mc_samples, self.estimator, self.sampler = opts["mc_samples"], opts["estimator"], opts["sampler"]
        self.mc_batch = opts["mc_batch"]
        self.max_length = opts["max_length"] or _default_max_length(str(pretrained or ""), self.model)
        _positions_check(self.max_length, self.model)
        self.steps, self.gen_length, self.temperature = opts["steps"], opts["gen_length"], opts["temperature"]
        self.seed = opts["seed"]
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
        kwargs |= check_gen_kwargs(kwargs, "generation_kwargs (--gen_kwargs or the task's)")
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        n = kwargs.pop("max_gen_toks", self.gen_length)
        if n > self.max_length - 1:
            log.warning("max_gen_toks %d does not fit max_length %d; generating %d tokens", n, self.max_length,
                        self.max_length - 1)
            n = self.max_length - 1
        temperature = 0.0 if kwargs.pop("do_sample", None) is False else kwargs.pop("temperature", self.temperature)
        ctx = self.tok_encode(context)
        ctx = ctx[max(0, len(ctx) - (self.max_length - 1 - n)):]
        x = torch.tensor([[self.start_id] + ctx + [self.meta.mask_token_id] * n])
        eos = self.tokenizer.eos_token_id
        ids = generate(self.denoiser, x, sampler=self.sampler, steps=self.steps or n,
                       generator=self._generator(context), eos_id=eos, draft_head=self.draft_head,
                       temperature=temperature).ids[0, 1 + len(ctx):].tolist()
        ids = ids[:ids.index(eos)] if eos in ids else ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in until:
            if stop and stop in text:
                text = text[:text.index(stop)]
        return text


def check_run_args(args) -> None:
    """EvalError before lm-eval starts, for a `run` of `diffusion-lm`: model arguments (names, types,
    ranges), generation options, a folder that is not a loadable export, an output path that cannot be
    written and local tasks whose data is not made yet."""
    if getattr(args, "command", None) != "run" or getattr(args, "model", None) not in (MODEL_NAME, "adapt-diffusion"):
        return
    model_args = args.model_args if isinstance(args.model_args, dict) else lm_utils.simple_parse_args_string(
        args.model_args or "")
    check_model_args(model_args)
    gen_kwargs = args.gen_kwargs if isinstance(args.gen_kwargs, dict) else lm_utils.simple_parse_args_string(
        args.gen_kwargs or "")
    check_gen_kwargs(gen_kwargs)
    pretrained = model_args.get("pretrained")
    if not pretrained:
        raise EvalError(f"--model {args.model} needs --model_args pretrained=PATH (an exported diffusion folder, "
                        f"e.g. checkpoints/<run>/final)")
    export_check(Path(str(pretrained)))
    output_check(getattr(args, "output_path", None))
    task_data_check(getattr(args, "tasks", None) or [], getattr(args, "metadata", None))


def output_check(output_path: str | None) -> None:
    """EvalError when --output_path (a folder, or a .json file in one) cannot be written: found before the
    evaluation runs, not after."""
    if not output_path:
        return
    path = Path(output_path)
    try:
        writable_dir(str(path.parent if path.suffix == ".json" else path))
    except argparse.ArgumentTypeError as err:
        raise EvalError(f"--output_path: {err}") from None


def local_task_files() -> dict[str, str]:
    """Local task (and the `adapt_local` tag) -> the data file its loader reads, from eval/tasks/*.yaml."""
    files = {}
    for yaml_file in TASKS_DIR.glob("*.yaml"):
        found = re.search(r"^task:\s*(\S+).*?^custom_dataset:\s*!function\s+loaders\.(\w+)",
                          yaml_file.read_text(), re.S | re.M)
        if found:
            files[found.group(1)] = f"{found.group(2)}.jsonl"
    return files | {"adapt_local": " ".join(sorted(set(files.values())))}


def task_data_check(tasks: list[str] | str, metadata: dict | None) -> None:
    """EvalError naming the command that makes the data when a local task's data file is missing (lm-eval
    would fail with a traceback from inside its task loading)."""
    from eval.tasks.loaders import data_dir

    tasks = tasks.split(",") if isinstance(tasks, str) else tasks
    files = local_task_files()
    folder = data_dir(metadata if isinstance(metadata, dict) else {})
    missing = sorted({f for t in tasks for f in files.get(t, "").split() if not (folder / f).is_file()})
    if missing:
        raise EvalError(f"--tasks {','.join(tasks)}: the local task data {', '.join(missing)} is not in {folder}; "
                        f"make it first with `python -m eval.tasks.make_data MODEL_DIR --out {folder}` (or point "
                        f"$ADAPT_EVAL_TASK_DATA or --metadata '{{\"data_dir\": ...}}' at a folder that has it)")


def argv_text_check(argv: list[str]) -> None:
    """EvalError naming the option whose value is not UTF-8 text or holds control characters (lm-eval would
    fail with a UnicodeEncodeError traceback when it writes or tokenises it)."""
    for i, token in enumerate(argv):
        problem = text_problem(token)
        if problem:
            option = next((t for t in reversed(argv[:i + 1]) if t.startswith("-")), "an argument")
            raise EvalError(f"{option.split('=')[0]}: {ascii(token)[:80]} {problem}")


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
        argv_text_check(argv)
        try:
            setup_logging()
            parser = HarnessCLI()
            args = parser.parse_args()
            check_run_args(args)
            parser.execute(args)
        except ValueError as err:
            if not _refused_by_lm_eval(err):
                raise
            hint = " (list them with `python -m eval.harness ls tasks`)" if "Tasks not found" in str(err) else ""
            raise EvalError(f"{err}{hint}") from None


if __name__ == "__main__":
    main()
