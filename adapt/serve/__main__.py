"""Serve an export over HTTP: OpenAI's completions and chat API, batched decoding, streaming, a live page.

    python -m adapt.serve checkpoints/<run>/final [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Then `curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "The river"}'`, any
OpenAI client with base_url http://localhost:8000/v1, or the live page at http://localhost:8000/.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from adapt import objectives  # noqa: E402
from adapt.cli.types import at_least, device, seconds, text  # noqa: E402

KEY_ENV = "ADAPT_SERVE_API_KEY"


class ServeError(ValueError):
    """A server that cannot start as asked; the message names the option and the fix."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m adapt.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=text, help="exported folder (checkpoints/<run>/final)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=at_least(0, 65535), default=8000, help="port (0: any free one, printed at start)")
    p.add_argument("--api-key", default=os.environ.get(KEY_ENV, ""),
                   help=f"require `Authorization: Bearer KEY` on /v1 (default: ${KEY_ENV})")
    p.add_argument("--name", help="model id clients send and see (default: the folder's name)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-tokens", type=at_least(1), default=256, help="tokens one request may ask for")
    lim.add_argument("--max-n", type=at_least(1), default=4, help="choices one request may ask for")
    lim.add_argument("--max-batch", type=at_least(1), default=16, help="rows decoded together")
    lim.add_argument("--max-queue", type=at_least(1), default=64, help="rows waiting or decoding; past it: 429")
    lim.add_argument("--timeout", type=seconds, default=120.0, help="seconds a request may take")
    run = p.add_argument_group("runtime")
    run.add_argument("--device", type=device, default="cpu")
    run.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    run.add_argument("--log", help="also append the server's log to this file")
    return p.parse_args(argv)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a busy port fails at once."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections made before the app is up wait in the backlog instead of being refused
    except OSError as err:
        raise ServeError(f"cannot listen on {host}:{port} ({err.strerror or err}); pick another --port (0 = any "
                         f"free one) or stop what holds it") from None
    return sock


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def defaults(model, meta) -> dict:
    """The export's own decoding defaults (its generation_config.json); a block export with a causal clean stream
    decodes with the exact speculative decoder."""
    gc = getattr(model, "generation_config", None)
    get = (lambda k, d: getattr(gc, k, d)) if gc is not None else (lambda k, d: d)
    decoding = objectives.decoding(meta)
    sampler = "speculative" if decoding.clean_causal else get("diffusion_sampler", "confidence")
    return {"sampler": sampler, "steps": get("diffusion_steps", 0) or None, "threshold": get("diffusion_tau", 0.9),
            "confidence": get("diffusion_confidence", "prob"), "block_length": decoding.block_length or None}


def start(args: argparse.Namespace) -> None:
    import uvicorn

    from adapt.draft_head import load_draft_head
    from adapt.export import load_diffusion_model
    from adapt.export.loader import export_problem
    from adapt.serve.app import Served, create_app
    from adapt.serve.engine import Engine

    if (problem := export_problem(args.model)) is not None:
        raise ServeError(problem)
    if args.log:
        try:
            logging.getLogger().addHandler(logging.FileHandler(args.log))
        except OSError as err:
            raise ServeError(f"--log {args.log}: {err.strerror or err}; pass a writable file") from None
    sock = bind(args.host, args.port)
    if not args.api_key and not loopback(args.host):
        print(f"warning: serving on {args.host} with no API key: anyone who reaches this address can use it; "
              f"pass --api-key or set {KEY_ENV}", file=sys.stderr)
    model, tokenizer, meta = load_diffusion_model(args.model, args.dtype, "sdpa", args.device)
    engine = Engine(model, meta, max_rows=args.max_batch, max_queue=args.max_queue,
                    draft_head=load_draft_head(args.model, model))
    served = Served(args.name or Path(args.model).resolve().name, tokenizer, meta, engine, defaults(model, meta),
                    args.max_tokens, args.max_n, args.timeout, args.api_key)
    host, port = sock.getsockname()[:2]
    print(f"serving {args.model} as {served.name!r} on http://{host}:{port} (page: /, API: /v1)", flush=True)
    config = uvicorn.Config(create_app(served), log_level="warning", timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from adapt.cli.errors import friendly

    with friendly(ServeError):
        start(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
