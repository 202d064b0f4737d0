"""Load on a running `python -m adapt.serve`: latency, time to first token and tokens/s at 1, 4 and 16 concurrent
clients (the official `openai` client, streaming), against the same decoder run directly in this process at batch 1
and at the largest client count, measured in one run; then a soak with clients that disconnect mid-stream.

    python bench/serve_load.py EXPORT [--clients 1 4 16] [--per-client 4] [--max-tokens 32] [--soak 1000]
                               [--sampler NAME] [--json out.json]

Every request sends the prompt of the direct run unless `--mixed` (prompts of several lengths). The server is
started by this script on a free loopback port (`--server-args` pass through). Direct figures use
adapt.decode.generate with the sampler the server would use, on the same canvas; a ratio compares figures of this
one run only. RSS is the server process's resident memory, read from /proc after the first and last hundred soak
requests.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPTS = ["The river", "Once upon a time", "In 1850 the town", "She opened the door and", "The history of",
           "A small bird", "When the war ended", "The museum holds"]


def start_server(export: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "adapt.serve", export, "--port", "0", *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.monotonic() + 300
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if m := re.search(r"http://(127\.0\.0\.1:\d+)", line):
            return proc, f"http://{m.group(1)}"
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("error: the server did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_request(client, prompt: str, args, disconnect: bool = False) -> dict:
    """One streamed completion: latency, time to the first event, completion tokens (from the usage chunk)."""
    t0, first, tokens = time.perf_counter(), None, 0
    stream = client.completions.create(model="m", prompt=prompt, max_tokens=args.max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"sampler": args.sampler} if args.sampler else None)
    for chunk in stream:
        if first is None:
            first = time.perf_counter() - t0
            if disconnect:
                stream.close()
                return {"latency": time.perf_counter() - t0, "ttft": first, "tokens": 0, "disconnected": True}
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"latency": time.perf_counter() - t0, "ttft": first, "tokens": tokens}


def load(url: str, clients: int, args) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    prompts = PROMPTS if args.mixed else PROMPTS[:1]
    jobs = [prompts[(c * args.per_client + i) % len(prompts)] for c in range(clients) for i in range(args.per_client)]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(lambda p: one_request(client, p, args), jobs))
    wall = time.perf_counter() - t0
    lat, ttft = sorted(r["latency"] for r in res), sorted(r["ttft"] for r in res)
    return {"clients": clients, "requests": len(res), "tokens_per_s": sum(r["tokens"] for r in res) / wall,
            "p50_s": statistics.median(lat), "p95_s": lat[int(0.95 * (len(lat) - 1))],
            "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": ttft[int(0.95 * (len(ttft) - 1))]}


def direct(export: str, batch: int, args, sampler: str) -> float:
    """Tokens/s of the decoder run directly on `batch` rows of the same canvas (greedy)."""
    import torch

    from adapt.decode.denoiser import Denoiser
    from adapt.export import load_diffusion_model
    from adapt.decode import generate
    from adapt.decode.canvas import prompt_canvas

    model, tok, meta = load_diffusion_model(export)
    prompt = tok(PROMPTS[0], add_special_tokens=False).input_ids
    x = prompt_canvas(tok.bos_token_id, meta.mask_token_id, args.max_tokens, prefix=prompt, batch=batch)
    options = {"temperature": 0.0}
    generate(Denoiser(model, meta), x[:1], sampler, generator=torch.Generator().manual_seed(0), **options)  # warm
    t0 = time.perf_counter()
    generate(Denoiser(model, meta), x, sampler, generator=torch.Generator().manual_seed(0), **options)
    return batch * args.max_tokens / (time.perf_counter() - t0)


def soak(url: str, pid: int, args) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    lost, errors, rss, done = 0, 0, {}, 0

    def run(i: int) -> str:
        try:
            one_request(client, PROMPTS[i % len(PROMPTS)], args, disconnect=i % 10 == 3)
            return "ok"
        except Exception as err:  # noqa: BLE001 -- counted, and the kind reported
            return "server" if "500" in str(err) else "lost"

    with cf.ThreadPoolExecutor(16) as pool:
        for i, out in enumerate(pool.map(run, range(args.soak))):
            done += 1
            lost, errors = lost + (out == "lost"), errors + (out == "server")
            if done in (100, args.soak):
                rss["first_100" if done == 100 else "last"] = rss_mb(pid)
    growth = rss["last"] / rss["first_100"] - 1 if "first_100" in rss else None
    return {"requests": args.soak, "lost": lost, "server_errors": errors, "rss_mb": rss, "rss_growth": growth}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--sampler", help="the decoder (default: the export's own)")
    p.add_argument("--mixed", action="store_true",
                   help="prompts of different lengths (default: every request the direct run's prompt)")
    p.add_argument("--soak", type=int, default=0, help="requests of the soak (0: none)")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    proc, url = start_server(args.export, ["--max-batch", str(max(args.clients)), *args.server_args])
    try:
        import httpx2

        sampler = args.sampler or httpx2.get(url + "/v1/models").json()["data"][0]["diffusion"]["sampler"]
        load(url, 1, argparse.Namespace(**{**vars(args), "per_client": 1}))  # warm: the first calls pay for setup
        out = {"export": args.export, "sampler": sampler, "max_tokens": args.max_tokens,
               "served": [load(url, c, args) for c in args.clients]}
        if args.soak:
            out["soak"] = soak(url, proc.pid, args)
    finally:
        proc.terminate()
        proc.wait(30)
    out["direct"] = {str(b): direct(args.export, b, args, sampler) for b in sorted({1, max(args.clients)})}
    top = out["served"][-1]
    out["ratios"] = {"served_top_vs_direct_top": top["tokens_per_s"] / out["direct"][str(max(args.clients))],
                     "served_top_vs_served_1": top["tokens_per_s"] / out["served"][0]["tokens_per_s"],
                     "served_1_vs_direct_1": out["served"][0]["tokens_per_s"] / out["direct"]["1"]}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
