"""The HTTP face of the engine (FastAPI): OpenAI's completions, chat completions, models and a health check, the
live page, bearer-key checks. FastAPI parses and validates the bodies (adapt.serve.protocol) and frames the
server-sent events; this module turns a request into engine rows and their events into OpenAI's shapes."""
from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapt.serve import protocol as P
from adapt.serve.engine import Engine
from adapt.serve.jobs import Busy, Event, Job
from adapt.serve.rows import Refused, RowText, plan_rows

PAGE = Path(__file__).resolve().parent / "page.html"


@dataclass
class Served:
    """What the app serves and its limits."""

    name: str
    tokenizer: object
    meta: object
    engine: Engine
    defaults: dict
    max_tokens: int = 256
    max_n: int = 4
    timeout_s: float = 120.0
    api_key: str = ""


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid" or not loc and first.get("type") in ("model_attributes_type", "missing"):
        return "the body is not a JSON object; send Content-Type: application/json with a UTF-8 JSON body", None
    if first.get("type") == "extra_forbidden":
        return f"unknown field {param!r}; see GET /v1/models and the README's Serving section for the fields", param
    return f"{param}: {first.get('msg')} (got {first.get('input')!r}); fix this field and send again", param


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="adapt-diffusion server", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError):
        return JSONResponse(P.error_body(err.message, err.param, err.kind), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError):
        message, param = _validation_message(err)
        return JSONResponse(P.error_body(message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException):
        return JSONResponse(P.error_body(str(err.detail), None, "not_found_error" if err.status_code == 404
                                         else "invalid_request_error"), status_code=err.status_code)

    def authorised(request: Request) -> None:
        if not served.api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), served.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>` with the "
                           "key the server was started with (--api-key or ADAPT_SERVE_API_KEY)", None,
                           "authentication_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "rows": served.engine.admitted,
                "model_calls": served.engine.calls}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "adapt-diffusion", "diffusion": served.defaults}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text()

    @app.post("/v1/completions", dependencies=[Depends(authorised)])
    async def completions(body: P.CompletionRequest, request: Request):
        return await _respond(served, body, request, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    async def chat(body: P.ChatRequest, request: Request):
        return await _respond(served, body, request, chat=True)

    return app


def _jobs(served: Served, body, chat: bool, emit_for) -> tuple[list[Job], list[RowText], int]:
    try:
        plan = plan_rows(served, body, chat)
    except Refused as err:
        raise ApiError(400, str(err), err.param) from None
    seed = body.seed if body.seed is not None else secrets.randbits(62)
    deadline = time.monotonic() + served.timeout_s
    jobs = [Job(plan.canvas, plan.sampler, plan.steps, plan.options, seed + i, plan.eos_id, emit_for(i), deadline)
            for i in range(body.n)]
    texts = [RowText(served.tokenizer, plan.start, plan.end, plan.eos_id, body.stops()) for _ in range(body.n)]
    return jobs, texts, plan.prompt_tokens


async def _respond(served: Served, body, request: Request, chat: bool):
    if (why := body.unsupported()) is not None:
        raise ApiError(400, why[1], why[0])
    if body.n > served.max_n:
        raise ApiError(400, f"n={body.n} is above this server's cap of {served.max_n} (--max-n); ask for fewer", "n")
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit_for(i: int):
        return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (i, ev))

    jobs, texts, prompt_tokens = _jobs(served, body, chat, emit_for)
    try:
        for job in jobs:
            served.engine.submit(job)
    except Busy as err:
        for job in jobs:
            job.cancelled.set()
        raise ApiError(429, f"the server is busy: {err}; retry after a moment", None, "rate_limit_error") from None
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        return EventSourceResponse(_framed(_stream(served, body, chat, rid, jobs, texts, events, prompt_tokens)))
    try:
        async for _ in _updates(jobs, texts, events):
            pass
    finally:
        for job in jobs:
            job.cancelled.set()
    use = _usage(jobs, texts, prompt_tokens)
    return P.completion(rid, served.name, chat, [{"text": t.text, "finish_reason": t.finish} for t in texts], use)


def _check_done(job: Job, ev: Event) -> None:
    if ev.error == "gone" and not job.cancelled.is_set():
        raise ApiError(504, "the request ran past the server's time limit (--timeout); ask for fewer tokens or "
                       "steps", None, "timeout_error")
    if ev.error and ev.error != "gone":
        raise ApiError(400 if ev.error.startswith("ValueError") else 500, ev.error.split(": ", 1)[-1])


async def _updates(jobs: list[Job], texts: list[RowText], events: asyncio.Queue):
    """(row, event, newly settled text) until every row is done; ApiError for a row that failed or timed out. A row
    that ends (its decoder done, EOS or a stop string) is cancelled so that it leaves at its next model call."""
    open_rows = set(range(len(jobs)))
    while open_rows:
        i, ev = await events.get()
        if i not in open_rows:
            continue
        if ev.done:
            _check_done(jobs[i], ev)
        delta = texts[i].absorb(ev)
        if ev.done or texts[i].finish is not None:
            jobs[i].cancelled.set()
            delta += texts[i].close()
            open_rows.discard(i)
        yield i, ev, delta


def _usage(jobs: list[Job], texts: list[RowText], prompt_tokens: int) -> dict:
    return P.usage(prompt_tokens * len(jobs), sum(t.completion_tokens for t in texts), max(job.calls for job in jobs))


async def _framed(items):
    """Server-sent events (FastAPI's framing) of the chunks, JSON-encoded; the closing "[DONE]" as it is."""
    async for item in items:
        yield format_sse_event(data_str=item if isinstance(item, str) else json.dumps(item))


async def _stream(served: Served, body, chat: bool, rid: str, jobs: list[Job], texts: list[RowText],
                  events: asyncio.Queue, prompt_tokens: int):
    try:
        if chat:
            for i in range(len(jobs)):
                yield P.chunk(rid, served.name, chat, i, None, None, role=True)
        try:
            async for i, ev, delta in _updates(jobs, texts, events):
                if delta or ev.positions or texts[i].finish is not None:
                    yield P.chunk(rid, served.name, chat, i, delta, texts[i].finish, texts[i].canvas(ev))
        except ApiError as err:
            yield P.error_body(err.message, err.param, err.kind)
            return
        if body.stream_options is not None and body.stream_options.include_usage:
            use = _usage(jobs, texts, prompt_tokens)
            yield {**P.chunk(rid, served.name, chat, 0, None, None), "choices": [], "usage": use}
        yield "[DONE]"
    finally:  # a client that went away: its rows leave at their next model call
        for job in jobs:
            job.cancelled.set()
