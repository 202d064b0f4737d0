"""The GPU paths in one prepared run: FlexAttention against the dense block mask, the block step, the cached
decoders against the parent's `generate`, batch 1 and a large batch, bf16. One report for a short GPU lease.

    bash scripts/gpu_kit.sh                                   # here: wheels and the parent's shape into .gpu/
    # there (the device tool's `run`, carry [".gpu"], timeout 540):
    pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site
    python3 bench/gpu_check.py --shape .gpu/smollm2-135m --out "$OUT"
    python bench/gpu_check.py --shape FOLDER --out DIR --tiny --device cpu   # the CPU smoke run (CI)

Weights are drawn at random in the parent's shape (`--shape`: a config.json and tokenizer folder), so nothing is
downloaded: step times, memory and decoding at fixed steps do not depend on the weights; the speculative row's
tokens per call and any quality do, so they are not reported from this run. Each check runs in its own process
with a time limit and the others run whatever it does; the report says what failed and why.

Checks: `flex` logits of the [x_t | x_0] block mask as a FlexAttention BlockMask against the dense mask under
sdpa (fp32, max abs difference); `step` bench/adapt_step.py causal vs block step (FlexAttention, then the dense
mask), and the whole-sequence step under flash_attention_2 where flash-attn is installed; `decode` bench/
sampling_speed.py's block-export rows (exact cache) against the parent's cached generate at batch 1 and
--big-batch. Writes DIR/gpu_check.md and DIR/gpu_check.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # name -> (full run, --tiny); the step's blocks are block_length; decoding is at b = decode_b with one
    # step per block (a 25-token prompt and 64 new tokens span 17 blocks of 4)
    "block_length": (16, 4), "step_batch": (16, 2), "step_length": (1024, 16), "steps": (10, 1),
    "decode_length": (64, 4), "decode_steps": (17, 3), "big_batch": (64, 2), "decode_b": (4, 2),
}


def size(args, name: str) -> int:
    full, tiny = SIZES[name]
    return tiny if args.tiny else full


def random_model(shape: Path, folder: Path, seed: int) -> Path:
    """An HF folder with random weights of `shape`'s config, and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(shape)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(shape).save_pretrained(folder)
    return folder


def flex_check(model_dir: Path, device: str, length: int, block: int) -> dict:
    """Max |logits(flex BlockMask) - logits(dense mask, sdpa)| over [x_t | x_0], both clean streams, fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from adapt.model.attention import to_additive
    from adapt.model.causal import set_causal
    from adapt.objectives.block import block_mask_flex, block_visibility

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    set_causal(model, False)
    x = torch.randint(0, model.config.vocab_size, (2, 2 * length), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(length).repeat(2)[None].expand(2, -1).to(device)
    out = {}
    with torch.no_grad():
        for causal in (False, True):
            model.set_attn_implementation("sdpa")
            dense = to_additive(block_visibility(length, block, device, causal), torch.float32).expand(2, -1, -1, -1)
            ref = model(input_ids=x.to(device), attention_mask=dense, position_ids=pos).logits
            model.set_attn_implementation("flex_attention")
            flex = model(input_ids=x.to(device), attention_mask=block_mask_flex(length, block, None, device, causal),
                         position_ids=pos).logits
            out["causal clean" if causal else "block clean"] = float((flex - ref).abs().max())
    return {"max_abs_diff": out, "logit_scale": float(ref.abs().max())}


def commands(args, model_dir: Path, work: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) of every check that runs in its own process, the most wanted first."""
    py, dtype = sys.executable, "fp32" if args.tiny else "bf16"
    step = [py, str(ROOT / "bench" / "adapt_step.py"), "--model", str(model_dir), "--device", args.device,
            "--dtype", dtype, "--batch", str(size(args, "step_batch")), "--length", str(size(args, "step_length")),
            "--steps", str(size(args, "steps")), "--block-length", str(size(args, "block_length"))] + (
        ["--in-process"] if args.tiny else [])  # tiny: the variants in the check's own process
    decode = [py, str(ROOT / "bench" / "sampling_speed.py"), "--model", str(model_dir), "--device", args.device,
              "--dtype", dtype, "--length", str(size(args, "decode_length")), "--steps",
              str(size(args, "decode_steps")), "--bd-block-length", str(size(args, "decode_b")),
              "--prompt-tokens", "24" if not args.tiny else "4", "--repeats", "3" if not args.tiny else "1"]
    gpu = args.device == "cuda"
    out = [("decode_batch1", decode + ["--batch", "1", "--only", "block export",
                                       "--json", str(work / "decode_a.json")]),
           ("step_flex" if gpu else "step_sdpa", step + ["--attn", "flex_attention" if gpu else "sdpa",
                                                          "--only", "block", "--json", str(work / "step_a.json")]),
           ("decode_big", decode + ["--batch", str(size(args, "big_batch")), "--only", "block export",
                                    "--json", str(work / "decode_b.json")])]
    if gpu:
        out.append(("step_sdpa", step + ["--attn", "sdpa", "--only", "block", "bidirectional",
                                         "--json", str(work / "step_b.json")]))
    if gpu and importlib.util.find_spec("flash_attn") is not None:
        out.append(("step_flash", step + ["--attn", "flash_attention_2", "--only", "bidirectional",
                                          "--json", str(work / "step_c.json")]))
    return out


def run_check(name: str, argv: list[str], timeout: float) -> dict:
    tic = time.perf_counter()
    try:
        res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                 p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)})
        ok, tail = res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        why = "" if ok else f"exit {res.returncode}"
    except subprocess.TimeoutExpired as err:
        ok, why = False, f"over its {timeout:.0f} s limit"
        tail = ((err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace"))[-4000:]
    print(f"{name}: {'ok' if ok else 'FAILED (' + why + ')'} in {time.perf_counter() - tic:.0f} s", flush=True)
    return {"ok": ok, "why": why, "seconds": time.perf_counter() - tic, "output_tail": tail}


def device_line(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def summary(results: dict) -> list[str]:
    """The figures: step ratios against the causal step, decoding against the parent's generate."""
    lines = ["| check | row | figure |", "|---|---|---|"]
    for key in ("step_a", "step_b", "step_c"):
        for variant, r in results.get(key, {}).get("results", {}).items():
            if variant != "causal":
                lines.append(f"| {key} | {variant} | {r['tokens_per_s']:.0f} tokens/s, {r['speed_ratio']:.3f}x the "
                             f"causal step's speed, {r['memory_ratio']:.3f}x its peak memory |")
    for key in ("decode_a", "decode_b"):
        run = results.get(key)
        if run:
            batch = run["args"]["batch"]
            parent = run["parent_tokens"] * batch / run["parent_seconds"]
            lines.append(f"| {key} | parent `generate`, batch {batch} | {parent:.0f} tokens/s |")
            lines += [f"| {key} | {r['label']} | {r['tok_s']:.0f} tokens/s = {r['tok_s'] / parent:.2f}x, "
                      f"NFE {r['nfe']}, {r['seconds'] / r['nfe'] * 1000:.1f} ms per call"
                      + (" (tokens per call depend on the weights: not a figure here)" if "speculative" in r["label"]
                         else "") + " |" for r in run["samplers"]]
    return lines


def report(results: dict) -> str:
    lines = [f"# GPU paths: {results['device']}", "", f"model shape {results['shape']}, random weights; "
             f"sizes {json.dumps(results['sizes'])}", "", *summary(results), "",
             "## FlexAttention block mask vs the dense mask (fp32 logits)", "", json.dumps(results["flex"]), ""]
    for name, res in results["checks"].items():
        lines += [f"## {name}: {'ok' if res['ok'] else 'FAILED: ' + res['why']} ({res['seconds']:.0f} s)", "", "```",
                  res["output_tail"].strip()[-2500:], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True, help="a folder with the parent's config.json and tokenizer")
    p.add_argument("--out", required=True, help="where gpu_check.md and gpu_check.json go")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="the smallest sizes (a smoke run of the script)")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds each check may run")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (the lease's call is "
                   "600 s at most); checks that would start later are reported as not run")
    args = p.parse_args(argv)
    if not (Path(args.shape) / "config.json").is_file():
        print(f"error: {args.shape} has no config.json; run `bash scripts/gpu_kit.sh` (it writes .gpu/smollm2-135m) "
              f"or pass a folder that has one", file=sys.stderr)
        return 2
    start, out = time.perf_counter(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = random_model(Path(args.shape), work / "model", seed=0)
        results = {"device": device_line(args.device), "shape": str(args.shape),
                   "sizes": {k: size(args, k) for k in SIZES}, "checks": {}}
        try:
            results["flex"] = flex_check(model_dir, args.device, 64 if not args.tiny else 8, size(args, "block_length")
                                         if not args.tiny else 2) if args.device == "cuda" else \
                {"skipped": "FlexAttention's block mask is checked on CUDA (CPU: tests/test_fast_kernels.py)"}
        except Exception as err:  # noqa: BLE001 -- a failed check is a result: the other checks still run
            results["flex"] = {"failed": f"{type(err).__name__}: {err}"[:500]}
        for name, argv_ in commands(args, model_dir, work):
            left = args.budget - (time.perf_counter() - start)
            results["checks"][name] = run_check(name, argv_, min(args.timeout, left)) if left > 10 else {
                "ok": False, "why": f"not run: the {args.budget:.0f} s budget was spent", "seconds": 0.0,
                "output_tail": ""}
        for f in sorted(work.glob("*.json")):
            results[f.stem] = json.loads(f.read_text())
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
        (out / "gpu_check.md").write_text(report(results))
    print(f"wrote {out / 'gpu_check.md'} and gpu_check.json")
    return 0 if all(r["ok"] for r in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
