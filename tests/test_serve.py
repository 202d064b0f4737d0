"""`python -m adapt.serve`: a real server on a free loopback port, driven by the official `openai` client and by raw
HTTP (httpx) for what a client library would not send. Two servers from the tiny export of tests/fixtures/export_v1:
a whole-sequence one (chat template kept), and a block one with an API key, a small queue and no chat template."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from conftest import ROOT
from test_export_v1 import old_export

KEY = "s3cret-key"
START_TIMEOUT_S = 120


class Server:
    def __init__(self, folder: Path, *args: str):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("ADAPT_SERVE_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "adapt.serve", str(folder), "--port", "0", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        end, lines = time.monotonic() + START_TIMEOUT_S, []
        while time.monotonic() < end:
            line = self.proc.stdout.readline()
            lines.append(line)
            if m := re.search(r"http://(127\.0\.0\.1:\d+)", line):
                self.url = f"http://{m.group(1)}"
                return
            if not line and self.proc.poll() is not None:
                break
        self.proc.kill()
        raise AssertionError("server did not start:\n" + "".join(lines))

    def post(self, path: str, body=None, content: bytes | None = None, key: str | None = None) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = content if content is not None else json.dumps(body).encode()
        return httpx.post(self.url + path, content=data, headers=headers, timeout=60)

    def client(self, key: str = "unused"):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tokenizer_dir):
    server = Server(old_export(tmp_path_factory.mktemp("serve_whole"), tokenizer_dir, "whole"), "--max-n", "3")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def block(tmp_path_factory, tokenizer_dir):
    folder = old_export(tmp_path_factory.mktemp("serve_block"), tokenizer_dir, "block")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    server = Server(folder, "--api-key", KEY, "--max-queue", "4", "--max-batch", "2", "--max-tokens", "24")
    yield server
    server.stop()


def test_completion_and_usage(whole):
    r = whole.client().completions.create(model="x", prompt="The river", max_tokens=6, temperature=0, seed=1)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("length", "stop") and r.choices[0].text
    assert r.usage.prompt_tokens == 2 and 1 <= r.usage.completion_tokens <= 6
    extra = r.usage.model_extra
    assert extra["model_calls"] >= 1 and extra["tokens_per_call"] == pytest.approx(
        r.usage.completion_tokens / extra["model_calls"], abs=1e-3)
    assert whole.client().models.list().data[0].id == whole.client().models.list().data[0].id


def test_stream_joins_to_the_whole_response(whole):
    c = whole.client()
    ask = dict(model="x", prompt="Once upon", max_tokens=8, temperature=0, seed=5)
    full = c.completions.create(**ask).choices[0]
    chunks = list(c.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.finish_reason
    assert chunks[-1].usage is not None and not chunks[-1].choices
    decided = [p for ch in chunks if ch.choices for p in ch.choices[0].model_extra["canvas"]["positions"]]
    assert sorted(decided) == list(range(8))  # every position of the span decided exactly once


def test_chat_and_n(whole):
    r = whole.client().chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=5, temperature=1.0, seed=3, n=2)
    assert r.object == "chat.completion" and [c.index for c in r.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in r.choices)
    assert r.usage.prompt_tokens > 2 * 3  # the chat template's tokens, for both choices


def test_infilling_between_prompt_and_suffix(whole):
    r = whole.post("/v1/completions", {"prompt": "The cat", "suffix": " on the mat.", "max_tokens": 4,
                                       "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]


def _alone_and_together(server, asks: list[dict], key: str | None = None) -> tuple[list, list, int]:
    alone = [server.post("/v1/completions", a, key=key).json()["choices"][0]["text"] for a in asks]
    before = httpx.get(server.url + "/health").json()["model_calls"]
    with cf.ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(lambda a: server.post("/v1/completions", a, key=key).json(), asks))
    shared = httpx.get(server.url + "/health").json()["model_calls"] - before
    return alone, together, shared


def test_batched_rows_equal_each_request_alone(whole):
    asks = [{"prompt": p, "max_tokens": n, "temperature": t, "seed": s, "sampler": sampler}
            for p, n, t, s, sampler in [("The river", 8, 0.0, 0, "confidence"), ("A cat", 8, 1.0, 11, "confidence"),
                                        ("The river", 8, 1.0, 12, "ancestral"), ("Seven", 6, 0.0, 0, "threshold"),
                                        ("It was", 8, 1.0, 13, "analytic"), ("One", 8, 0.7, 14, "confidence")]]
    alone, together, shared = _alone_and_together(whole, asks)
    assert [t["choices"][0]["text"] for t in together] == alone
    own = sum(t["usage"]["model_calls"] for t in together)
    assert shared < own  # rows shared model calls: fewer batched calls than the rows made


def test_auth(block):
    ask = {"prompt": "The river", "max_tokens": 4, "temperature": 0}
    for key in (None, "wrong", KEY + "x"):
        r = block.post("/v1/completions", ask, key=key)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
    assert block.post("/v1/completions", ask, key=KEY).status_code == 200
    assert block.client(KEY).completions.create(model="x", prompt="A", max_tokens=4).choices[0].text is not None
    assert httpx.get(block.url + "/health").status_code == 200  # health needs no key


def test_block_export_defaults_to_the_speculative_decoder(block):
    model = block.client(KEY).models.list().data[0]
    assert model.model_extra["diffusion"]["sampler"] == "speculative"
    asks = [{"prompt": p, "max_tokens": n, "temperature": t, "seed": s, "sampler": sampler}
            for p, n, t, s, sampler in [("The", 8, 0.0, 4, "speculative"), ("A dog ran", 12, 1.0, 5, "speculative"),
                                        ("Seven", 6, 0.8, 6, "chain"), ("It was", 10, 1.0, 7, "speculative")]]
    alone, together, shared = _alone_and_together(block, asks, key=KEY)
    assert [t["choices"][0]["text"] for t in together] == alone  # rows joined and left a batch of at most 2
    assert shared < sum(t["usage"]["model_calls"] for t in together)


BAD = [  # (body or raw bytes, status, param named, words of the message)
    (b"{not json", 400, None, "not a JSON object"),
    (b"\xff\xfe{}", 400, None, "not a JSON object"),
    ({"prompt": "a", "max_tokens": "8"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "a", "max_tokens": -3}, 400, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "a", "max_tokens": 100000}, 400, "max_tokens", "cap"),
    ({"prompt": "a", "sampler": "nope"}, 400, "sampler", "unknown sampler"),
    ({"prompt": "a", "n": 9}, 400, "n", "cap"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"prompt": "a", "max_tokenz": 3}, 400, "max_tokenz", "unknown field"),
    ({"prompt": "a", "steps": 4, "sampler": "speculative"}, 400, "sampler", "speculative decoding needs"),
    ({"prompt": "a", "threshold": 0.5, "sampler": "ancestral"}, 400, "threshold", "does not apply"),
    ({"prompt": "a", "presence_penalty": 1.0}, 400, "presence_penalty", "not implemented"),
    ({"prompt": [1, 10**9]}, 400, "prompt", "outside the vocabulary"),
    ({"max_tokens": 3}, 400, "prompt", "Field required"),
]


@pytest.mark.parametrize("body,status,param,words", BAD)
def test_bad_input_is_a_4xx_naming_the_field(whole, body, status, param, words):
    r = whole.post("/v1/completions", content=body) if isinstance(body, bytes) else whole.post("/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert whole.post("/v1/completions", {"prompt": "a", "max_tokens": 2}).status_code == 200  # still serving


def test_chat_bad_input(whole, block):
    r = whole.post("/v1/chat/completions", {"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = block.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, key=KEY)
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    r = block.post("/v1/completions", {"prompt": "a", "suffix": "b"}, key=KEY)
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix" and "left to right" in r.text


def test_prompt_past_the_models_positions(whole):
    r = whole.post("/v1/completions", {"prompt": list(range(5, 200)), "max_tokens": 4})
    assert r.status_code == 400 and "positions" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"


def test_disconnect_mid_stream_frees_the_row(whole):
    body = {"prompt": "The river", "max_tokens": 64, "stream": True, "sampler": "ancestral", "steps": 64}
    with httpx.stream("POST", whole.url + "/v1/completions", json=body, timeout=60) as r:
        first = next(r.iter_lines())
        assert first.startswith("data:")
    end = time.monotonic() + 30
    while httpx.get(whole.url + "/health").json()["rows"] and time.monotonic() < end:
        time.sleep(0.2)
    assert httpx.get(whole.url + "/health").json()["rows"] == 0
    assert whole.post("/v1/completions", {"prompt": "a", "max_tokens": 2}).status_code == 200


def test_past_the_queue_bound_is_429(block):
    ask = {"prompt": "The river", "max_tokens": 24, "temperature": 1.0}
    with cf.ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(lambda _: block.post("/v1/completions", ask, key=KEY), range(24)))
    statuses = {r.status_code for r in codes}
    assert statuses <= {200, 429} and 429 in statuses and 200 in statuses
    busy = next(r for r in codes if r.status_code == 429).json()["error"]
    assert busy["type"] == "rate_limit_error" and "--max-queue" in busy["message"]
    assert block.post("/v1/completions", {"prompt": "a", "max_tokens": 2}, key=KEY).status_code == 200


def _start_fails(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapt.serve", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_start_errors_are_one_line_and_exit_2(tmp_path, whole):
    missing = _start_fails([str(tmp_path / "nope")])
    empty = _start_fails([str(tmp_path)])
    for out, words in ((missing, "not found"), (empty, "not an exported")):
        assert out.returncode == 2 and out.stderr.startswith("error:") and words in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        held = s.getsockname()[1]
        export = Path(whole.proc.args[3])
        out = _start_fails([str(export), "--port", str(held)])
        assert out.returncode == 2 and "cannot listen" in out.stderr and "Traceback" not in out.stderr
    out = _start_fails([str(export), "--log", str(tmp_path / "no" / "such" / "dir" / "log.txt")])
    assert out.returncode == 2 and "--log" in out.stderr and "Traceback" not in out.stderr


CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DOCS_SHOT = ROOT / "docs" / "serve_page.png"


def test_live_page_in_a_browser(whole, tmp_path):
    """The page loads, a prompt is submitted, every position of the canvas fills as the stream arrives."""
    from playwright.sync_api import sync_playwright

    exe = next((p for p in CHROMIUM if Path(p).exists()), None)
    if exe is None:
        pytest.fail("no chromium: scripts/setup.sh installs Debian's chromium for the page test")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 520})
        page.goto(whole.url + "/")
        page.fill("#prompt", "The river")
        page.fill("#tokens", "24")
        page.select_option("#sampler", "confidence")
        page.fill("#steps", "6")
        page.click("#go")
        page.wait_for_selector("body[data-finished='1']", timeout=60_000)
        cells = page.locator("#canvas .cell")
        assert cells.count() == 24
        assert page.locator("#canvas .cell.done").count() == 24
        assert "\u00b7" not in "".join(cells.all_text_contents())  # no masked position left
        stats = page.text_content("#stats")
        assert "model calls: 6" in stats and "tokens/s" in stats, stats
        assert page.text_content("#error") == ""
        page.screenshot(path=str(tmp_path / "page.png"))
        if os.environ.get("ADAPT_WRITE_DOCS_SHOT"):
            page.screenshot(path=str(DOCS_SHOT))
        browser.close()
