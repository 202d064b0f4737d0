"""The OpenAI shapes the server speaks: requests (validated by pydantic, strict types, unknown fields refused),
responses, stream chunks and error bodies. The diffusion options ride as extra body fields (`sampler`, `steps`,
`block_length`, `threshold`, `confidence`); each defaults to the export's own choice (adapt.serve.engine)."""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class Request(BaseModel):
    """What completions and chat requests share."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate (the server caps it)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = Field(None, max_length=4)
    user: str | None = None
    # accepted at the values that change nothing; anything else is refused by `unsupported`
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None
    # the diffusion options
    sampler: str | None = None
    steps: int | None = Field(None, ge=1, le=2**20)
    block_length: int | None = Field(None, ge=1, le=2**20)
    threshold: float | None = Field(None, gt=0.0, le=1.0)
    confidence: Literal["prob", "margin", "entropy"] | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) of an OpenAI option set to a value this server does not implement, or None."""
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty", "penalties are not implemented by the diffusion decoders; leave them at 0"
        if self.logprobs:
            return "logprobs", "log-probabilities are not returned; leave logprobs unset"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not implemented; leave it unset"
        return None


class CompletionRequest(Request):
    prompt: str | list[int] = Field(..., description="one prompt, as text or token ids; `n` draws several")
    suffix: str | None = None
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Request):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    """OpenAI's error object: the message names the field and the fix."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, calls: int) -> dict:
    """OpenAI's usage counts plus the decoder's model calls and tokens per call (extra fields)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "model_calls": calls,
            "tokens_per_call": round(completion_tokens / calls, 4) if calls else 0.0}


def completion(rid: str, model: str, chat: bool, choices: list[dict], use: dict) -> dict:
    """A whole response; `choices` are {"text", "finish_reason"} in order."""
    out = []
    for i, c in enumerate(choices):
        body = ({"message": {"role": "assistant", "content": c["text"]}} if chat
                else {"text": c["text"], "logprobs": None})
        out.append({"index": i, **body, "finish_reason": c["finish_reason"]})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": out, "usage": use}


def chunk(rid: str, model: str, chat: bool, index: int, text: str | None, finish: str | None,
          canvas: dict | None = None, role: bool = False) -> dict:
    """One streamed chunk: `text` is the newly settled left-to-right text; `canvas` (an extra field) holds the
    positions decided by this model call and their token ids, for a client that draws the canvas."""
    if chat:
        delta = {"role": "assistant"} if role else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    if canvas is not None:
        choice["canvas"] = canvas
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}
