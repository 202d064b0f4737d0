"""From a request to engine rows and back: the canvas, the decoder and its options (refused with the field and the
fix when they do not fit the export), and each row's text as its positions are decided (settled left to right,
cut at EOS and at stop strings)."""
from __future__ import annotations

from dataclasses import dataclass

from adapt import objectives
from adapt.decode import CHAIN, SAMPLER_NAMES, SPECULATIVE, sampler_options
from adapt.decode.speculative import check_speculative

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for completions when max_tokens is not given."""


class Refused(ValueError):
    """A request this export cannot answer as asked; the message names the field and the fix."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


@dataclass
class Plan:
    canvas: list[int]
    start: int
    """First generated position of the canvas."""
    end: int
    """One past the last generated position (the suffix follows)."""
    sampler: str
    steps: int | None
    options: dict
    eos_id: int | None
    prompt_tokens: int


def _prompt_ids(tokenizer, body, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise Refused("this export's tokenizer has no chat template; send the text to /v1/completions instead",
                          "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    if isinstance(body.prompt, str):
        return tokenizer(body.prompt, add_special_tokens=False).input_ids if body.prompt else []
    bad = [t for t in body.prompt if not 0 <= t < len(tokenizer)]
    if bad:
        raise Refused(f"prompt holds token ids outside the vocabulary (0..{len(tokenizer) - 1}): {bad[:4]}", "prompt")
    return list(body.prompt)


def _sampler(served, body) -> tuple[str, dict]:
    meta, name = served.meta, body.sampler or served.defaults["sampler"]
    block = objectives.decoding(meta).block_length
    if name not in SAMPLER_NAMES:
        raise Refused(f"unknown sampler {name!r}; use one of {', '.join(SAMPLER_NAMES)}", "sampler")
    if name in (SPECULATIVE, CHAIN):
        try:
            check_speculative(meta, getattr(served.engine.model.config, "_attn_implementation", "sdpa"))
        except ValueError as err:
            raise Refused(str(err), "sampler") from None
    if block and body.block_length not in (None, block):
        raise Refused(f"this block-diffusion export decodes in its own blocks of {block} tokens; "
                      f"leave block_length unset", "block_length")
    accepts = sampler_options(name)
    options = {"temperature": body.temperature, "top_p": body.top_p}
    for field, key, value in (("threshold", "tau", body.threshold), ("confidence", "confidence", body.confidence)):
        if value is None:
            continue
        if key not in accepts:
            raise Refused(f"{field} does not apply to the {name} sampler; leave it unset or choose a sampler that "
                          f"takes it (threshold: threshold; confidence: confidence, threshold)", field)
        options[key] = value
    for key, value in (("tau", served.defaults.get("threshold")), ("confidence", served.defaults.get("confidence"))):
        if key in accepts and key not in options and value is not None:
            options[key] = value
    return name, options


def plan_rows(served, body, chat: bool) -> Plan:
    """The rows' shared plan (each row differs only by its seed)."""
    tok, meta = served.tokenizer, served.meta
    block = objectives.decoding(meta).block_length
    prompt = _prompt_ids(tok, body, chat)
    suffix_text = None if chat else body.suffix
    if suffix_text and block:
        raise Refused("this is a block-diffusion export: it decodes left to right and cannot fill a span between a "
                      "prompt and a suffix; send no suffix, or serve a whole-sequence export", "suffix")
    suffix = tok(suffix_text, add_special_tokens=False).input_ids if suffix_text else []
    want = body.max_tokens or (body.max_completion_tokens if chat else None) or DEFAULT_MAX_TOKENS
    field = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
    if want > served.max_tokens:
        raise Refused(f"{field}={want} is above this server's cap of {served.max_tokens} tokens per request "
                      f"(--max-tokens); ask for at most {served.max_tokens}", field)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    canvas = [bos, *prompt, *([meta.mask_token_id] * want), *suffix]
    limit = getattr(served.engine.model.config, "max_position_embeddings", None)
    if limit and len(canvas) > limit:
        raise Refused(f"the prompt ({len(prompt)} tokens){' and suffix' if suffix else ''} plus {field}={want} "
                      f"need {len(canvas)} positions; the model takes {limit}: shorten the prompt or lower {field}",
                      "prompt" if len(prompt) + len(suffix) + 1 >= limit else field)
    name, options = _sampler(served, body)
    if body.steps is not None and name in (SPECULATIVE, CHAIN):
        raise Refused(f"steps does not apply to the {name} decoder (it decides tokens as its checks allow); "
                      f"leave steps unset", "steps")
    steps = body.steps or served.defaults.get("steps") or None
    if body.block_length and not block:
        options["block_length"] = body.block_length
    start = 1 + len(prompt)
    return Plan(canvas, start, start + want, name, steps, options, tok.eos_token_id, len(prompt))


class RowText:
    """One row's generated text, settled left to right as its positions are decided."""

    def __init__(self, tokenizer, start: int, end: int, eos_id: int | None, stops: list[str]):
        self.tok, self.start, self.end, self.eos_id, self.stops = tokenizer, start, end, eos_id, stops
        self.ids: list[int | None] = [None] * (end - start)
        self.sent, self.text, self.finish, self.completion_tokens = "", "", None, 0

    def _settled(self) -> tuple[list[int], bool]:
        """The decided prefix of the span, cut before EOS; whether EOS ended it."""
        out = []
        for t in self.ids:
            if t is None:
                return out, False
            if t == self.eos_id:
                return out, True
            out.append(t)
        return out, False

    def absorb(self, ev) -> str:
        """Take an event's decisions; -> the text newly settled (held back: a partial character)."""
        if self.finish is not None:
            return ""
        for p, t in zip(ev.positions, ev.tokens):
            if self.start <= p < self.end:
                self.ids[p - self.start] = t
        if ev.ids is not None:
            self.ids = list(ev.ids[self.start:self.end])
        ids, eos = self._settled()
        text = self.tok.decode(ids, skip_special_tokens=False)
        for s in self.stops:
            if s in text:
                text, eos = text[:text.index(s)], True
        self.completion_tokens = len(ids)
        if eos:
            self.finish = "stop"
        elif text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        delta, self.sent, self.text = text[len(self.sent):] if text.startswith(self.sent) else "", text, text
        return delta

    def close(self) -> str:
        """The row is done: what is left of its text; finish "length" unless EOS or a stop string ended it."""
        if self.finish is None:
            self.finish = "length"
            ids, _ = self._settled()
            self.completion_tokens = len(ids)
            full = self.tok.decode(ids, skip_special_tokens=False)
            delta, self.sent, self.text = full[len(self.sent):], full, full
            return delta
        return ""

    def canvas(self, ev) -> dict:
        """The event's positions within the generated span, their ids and text pieces, and the row's calls."""
        pairs = [(p - self.start, t) for p, t in zip(ev.positions, ev.tokens) if self.start <= p < self.end]
        return {"positions": [p for p, _ in pairs], "token_ids": [t for _, t in pairs],
                "pieces": [self.tok.decode([t]) for _, t in pairs], "calls": ev.calls, "length": len(self.ids)}
