"""Masked-diffusion decoding of an adapt-diffusion export in plain transformers (torch and transformers only).

An export carries this file as custom_generate/generate.py; with trust_remote_code=True transformers makes it the
model's `generate` (without it, `generate` decodes left to right):

    model = AutoModelForCausalLM.from_pretrained(EXPORT, trust_remote_code=True)
    ids = model.generate(**tok("The cat", return_tensors="pt"), max_new_tokens=64)

diffusion.json beside the weights gives mask_token_id, real_vocab_size (ids >= it and the mask id are never
predicted), shift (logits at i-1 predict token i; position 0, BOS, never is), bidirectional, block_length (> 0: a
block-diffusion export), clean_attention and noised_attention. Options (model.generation_config < generation_config
< kwargs): `OPTIONS`, max_new_tokens / max_length, do_sample (False = greedy, ties to the lowest id), temperature,
top_k, top_p, eos_token_id, pad_token_id, num_return_sequences, return_dict_in_generate. Samplers: confidence
(LLaDA: the most confident positions, n // steps per step, one more in the first n % steps) and threshold
(Fast-dLLM: every position with confidence >= diffusion_tau, and at least that share, so >= 1).
BOS is put in front of rows that lack it; the result is the given input_ids (padded rows compacted by the attention
mask, mask ids in a prompt filled), then the new ids: pad_token_id after a row's first EOS, columns where every row
stopped cut, as in transformers. Block exports decode block by block (`BlockCache`: an exact KV cache of the clean
blocks). Every forward gets an explicit 4D mask (sdpa or eager). `model` is keyword-only: transformers binds it by
name. The primitives it shares with the library (adapt.decode, adapt.model.attention) live beside it in
primitives.py, which an export carries too.
"""
from __future__ import annotations

import inspect
import json
import math
import os

import torch
from transformers import DynamicCache

from .primitives import (CONFIDENCES, DecodeError, TokenFilter, block_spans, block_visible, confidence,
                         draw, split_steps, stop_after_eos, top_ranked, transfer_counts)

OPTIONS = {"diffusion_sampler": "confidence", "diffusion_steps": 0, "diffusion_block_length": 0,
           "diffusion_tau": 0.9, "diffusion_confidence": "prob", "diffusion_cache": True}
"""Diffusion options: sampler (confidence | threshold); steps in total, shared among blocks (0 = one per new
token); semi-AR block length of a whole-sequence export (0 = none; block exports use their own); tau of
the threshold sampler; confidence (prob | margin | entropy); cache (block exports; False recomputes)."""
SAMPLERS = ("confidence", "threshold")
META_FILE, ADAPTER = "diffusion.json", "adapter"
_HARMLESS = {"tokenizer", "use_cache", "synced_gpus", "assistant_tokenizer", "use_model_defaults"}
"""Keyword arguments transformers or its pipeline may pass that decoding does not need."""


def load_meta(model, given=None) -> dict:
    """diffusion.json of the model's folder (or hub repo), or `given` (a dict, a folder, or a file path)."""
    if isinstance(given, dict):
        meta, where = dict(given), "diffusion_meta"
    else:
        source = str(given or getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", ""))
        where = source if os.path.isfile(source) else os.path.join(source, META_FILE)
        if not os.path.isfile(where) and source and not os.path.isdir(source):
            try:  # a hub id: the file from the hub cache
                from transformers.utils import cached_file

                where = cached_file(source, META_FILE) or ""
            except (OSError, ValueError):
                where = ""
        if not where or not os.path.isfile(where):
            raise DecodeError(f"no {META_FILE} found for {source or 'this model'}: not an adapt-diffusion export; "
                              f"load the export folder itself or pass diffusion_meta=<folder or dict>")
        with open(where, encoding="utf-8") as f:
            meta = json.load(f)
        lora = os.path.join(os.path.dirname(where), ADAPTER)  # a lora.export=adapter export: base weights + adapter
        if os.path.isdir(lora) and not getattr(model, "_hf_peft_config_loaded", False):
            raise DecodeError(f"this export keeps its LoRA adapter apart, in {lora}, and the model was loaded without "
                              f"it (it would decode the model before its adaptation): call model.load_adapter("
                              f"{lora!r}) first (needs peft), or export with lora.export=merged")
    block = meta.get("block_length") or 0
    if not all(isinstance(meta.get(k), int) for k in ("mask_token_id", "real_vocab_size")) or \
            not isinstance(block, int) or block < 0:
        raise DecodeError(f"{where}: needs integer mask_token_id and real_vocab_size, and block_length >= 0")
    return {"shift": True, "bidirectional": True, **meta, "block_length": block}


def merged_options(model, generation_config=None, kwargs: dict | None = None) -> dict:
    """model.generation_config < a passed generation_config (its set values) < keyword arguments."""
    from transformers import GenerationConfig

    o = dict(OPTIONS)
    for config in (getattr(model, "generation_config", None), generation_config):
        if config is not None:
            o.update({k: v for k, v in config.to_diff_dict().items() if v is not None})
    fields, unused = set(vars(GenerationConfig())) | set(OPTIONS), []
    for key, value in (kwargs or {}).items():
        if key in fields and value is not None:
            o[key] = value
        elif key not in fields and value is not None and key not in _HARMLESS and value != []:
            unused.append(key)
    problems = [f"generate() of a diffusion export does not use {', '.join(sorted(unused))}"] if unused else []
    if o["diffusion_sampler"] not in SAMPLERS or o["diffusion_confidence"] not in CONFIDENCES:
        problems.append(f"diffusion_sampler must be one of {', '.join(SAMPLERS)} and diffusion_confidence one of "
                        f"{', '.join(CONFIDENCES)}, got {o['diffusion_sampler']!r}, {o['diffusion_confidence']!r}")
    for key in ("diffusion_steps", "diffusion_block_length"):
        if not isinstance(o[key], int) or o[key] < 0:
            problems.append(f"{key} must be an integer >= 0, got {o[key]!r}")
    if (o.get("num_beams") or 1) > 1:
        problems.append("beam search (num_beams > 1) does not apply to diffusion decoding")
    sampling = bool(o.get("do_sample"))  # greedy = temperature 0, no filter
    try:
        o["filter"] = TokenFilter(float(o["temperature"]) if sampling and o.get("temperature") is not None
                                  else float(sampling), int(o.get("top_k") or 0) if sampling else 0,
                                  float(o["top_p"]) if sampling and o.get("top_p") is not None else 1.0)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise DecodeError("; ".join(problems))
    return o


class CanvasModel:
    """Model calls on a canvas x (B, W) with explicit masks; `calls` counts them."""

    def __init__(self, model, meta: dict, valid: torch.Tensor, pos: torch.Tensor):
        backend = getattr(model.config, "_attn_implementation", "sdpa")
        if backend not in ("sdpa", "eager"):
            raise DecodeError(f"diffusion decoding passes 4D attention masks, which attn_implementation={backend!r} "
                              f"cannot take; load the model with attn_implementation='sdpa'")
        self.model, self.meta, self.valid, self.pos = model, meta, valid, pos
        self.mask_id, self.shift, self.calls = meta["mask_token_id"], bool(meta["shift"]), 0
        blocked = torch.arange(model.get_output_embeddings().weight.shape[0]) >= meta["real_vocab_size"]
        blocked[self.mask_id] = True
        self.blocked_ids = blocked.nonzero().flatten().to(valid.device)
        # transformers renamed forward's `past_key_values` to `cache` (5.2x); use whichever this version takes
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def additive(self, visible: torch.Tensor) -> torch.Tensor:
        """(B, q, k) bool visibility -> (B, 1, q, k) float: 0 where visible, dtype-min elsewhere."""
        mask = torch.zeros(visible.shape, dtype=self.model.dtype, device=visible.device)
        return mask.masked_fill_(~visible, torch.finfo(self.model.dtype).min)[:, None]

    def forward(self, ids: torch.Tensor, start: int, mask: torch.Tensor, cache=None, keep: int = 0) -> torch.Tensor:
        """Logits (B, q, V) of canvas columns start .. start+q, attending what `mask` (B, 1, q, k) allows."""
        self.calls += 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=self.pos[:, start:start + ids.shape[1]],
                         use_cache=cache is not None, logits_to_keep=keep, **{self.cache_arg: cache})
        return out.logits

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, V) logits -> float32 log-probabilities with the never-predicted ids at -inf."""
        logits = logits.float().index_fill(-1, self.blocked_ids, -math.inf)
        return torch.log_softmax(logits, dim=-1)


def denoise(den: CanvasModel, rows_of, x: torch.Tensor, fill: torch.Tensor, steps: int, o: dict) -> torch.Tensor:
    """Fill positions `fill` (B, W) of x (B, W) in `steps` steps -> new x; other positions never change.

    rows_of(x, masked) -> (N, V) logits predicting the masked positions (one model call). The
    output is reused while no position was revealed (the input is then unchanged).
    """
    x, initial, rows = x.clone(), fill.sum(1), None
    for k in range(steps):
        masked = fill & (x == den.mask_id)
        if not masked.any():
            break
        if rows is None:
            rows = den.log_probs(rows_of(x, masked))
        score = torch.full(masked.shape, -torch.inf, device=x.device)
        score[masked] = confidence(o["filter"].apply(rows), o["diffusion_confidence"]).float()
        count = transfer_counts(initial, steps)[:, k]
        if o["diffusion_sampler"] == "threshold":
            reveal = ((score >= o["diffusion_tau"]) & masked) | top_ranked(score, masked, count.clamp_min(1))
        else:
            reveal = top_ranked(score, masked, count)
        reveal &= masked
        if reveal.any():
            x[reveal] = draw(rows[reveal[masked]], None, o["filter"])
            rows = None
    return x


def decode_whole(den: CanvasModel, x: torch.Tensor, o: dict, eos: list[int]) -> torch.Tensor:
    """A whole-sequence export: every step is one forward over the canvas; optional semi-AR blocks."""
    visible = den.valid[:, None, :].expand(-1, x.shape[1], -1)
    if not den.meta["bidirectional"]:  # an export taken mid-anneal was trained causal
        visible = visible.tril()
    mask = den.additive(visible | torch.eye(x.shape[1], dtype=torch.bool, device=x.device))

    def rows_of(xx, masked):  # with the shift column c is predicted by c - 1 (column 0 never is)
        logits = den.forward(xx, 0, mask)
        return logits[:, :-1][masked[:, 1:]] if den.shift else logits[masked]

    generated = (x == den.mask_id) & den.valid
    spans = block_spans(generated, o["diffusion_block_length"])
    steps = o["diffusion_steps"] or max(1, int(generated.sum(1).max()))
    for (a, b), n in zip(spans, split_steps(steps, len(spans)) if spans else []):
        fill = generated & (x == den.mask_id)
        fill[:, :a] = fill[:, b:] = False
        if fill.any():
            x = denoise(den, rows_of, x, fill, n, o)
        if eos:
            x = stop_after_eos(x, generated, eos)
    return x


class BlockCache:
    """Block-causal state of a block export: the clean keys/values of blocks < `done`; column c is in block c // b."""

    def __init__(self, den: CanvasModel, x: torch.Tensor, b: int, cached: bool = True):
        self.den, self.b, self.cached, self.causal = den, b, cached, den.meta.get("clean_attention") == "causal"
        self.noised_causal = den.meta.get("noised_attention") == "causal"
        self.blk = torch.arange(x.shape[1], device=x.device) // b
        self.cache = DynamicCache(config=den.model.config) if cached else None
        self.done, self.pending, self.last = 0, 0, None  # blocks cached; blocks clean; (B, V) last cached logits

    def mask(self, q0: int, q1: int, k1: int) -> torch.Tensor:
        """(B, 1, q1 - q0, k1) additive: query c sees itself and the valid keys `block_visible` allows (the last
        query's block is the noised one being filled, the blocks before it clean)."""
        q, j = torch.arange(q0, q1, device=self.blk.device)[:, None], torch.arange(k1, device=self.blk.device)[None, :]
        current = self.blk[q1 - 1]  # the block being filled is noised; the blocks before it are clean
        see = block_visible(q, j, self.blk[q] < current, self.blk[j] < current, self.b, self.causal, self.noised_causal)
        return self.den.additive((self.den.valid[:, None, :k1] & see) | (q == j))

    def commit(self, x: torch.Tensor, upto: int) -> None:
        """Sequences done .. upto-1 are clean: they run with the next `predictions` call (no call of their own)."""
        self.pending = max(self.pending, upto)

    def predictions(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Logits (B, b, V) predicting each column of block k of x given the clean blocks < k (all committed).
        A pending commit rides along: rows [clean blocks done..k-1 | block k] under the block-causal mask,
        where the clean rows never see block k, so their keys/values are those of a call of their own."""
        a, e = k * self.b, (k + 1) * self.b
        if self.cached:
            s = self.done * self.b  # == a unless a commit is pending
            assert k in (self.done, self.pending), f"block {k} predicted with blocks committed up to {self.pending}"
            logits = self.den.forward(x[:, s:e], s, self.mask(s, e, e), self.cache, keep=self.b + (s < a))
            if s < a:  # the last clean row predicts block k's first column
                self.last, self.done = logits[:, 0], k
            out, before = logits[:, -self.b:], self.last
            self.cache.crop(-self.b)
        else:  # one forward over [blocks < k | block k]
            full = self.den.forward(x[:, :e], 0, self.mask(0, e, e))
            out, before = full[:, a:], full[:, a - 1] if k else None
        if not self.den.shift:
            return out
        before = out[:, 0] if before is None else before  # block 0's column 0 (BOS) is never predicted
        return torch.cat([before[:, None].to(out.dtype), out[:, :-1]], 1)


def decode_blocks(den: CanvasModel, x: torch.Tensor, o: dict, eos: list[int]) -> torch.Tensor:
    """A block-diffusion export: block by block, committed blocks in an exact KV cache."""
    b = den.meta["block_length"]
    state = BlockCache(den, x, b, cached=bool(o["diffusion_cache"]))
    generated = (x == den.mask_id) & den.valid
    todo = generated.any(0).view(-1, b).any(1).nonzero().flatten().tolist()
    if not todo:
        return x
    steps = o["diffusion_steps"] or max(1, int(generated.sum(1).max()))
    state.commit(x, todo[0])
    for k, n in zip(range(todo[0], todo[-1] + 1), split_steps(steps, todo[-1] + 1 - todo[0])):
        a, e = k * b, (k + 1) * b
        fill = generated[:, a:e] & (x[:, a:e] == den.mask_id)
        if fill.any():
            def rows_of(xb, masked, k=k, prefix=x[:, :a]):
                return state.predictions(torch.cat([prefix, xb], 1), k)[masked]

            x = x.clone()
            x[:, a:e] = denoise(den, rows_of, x[:, a:e], fill, n, o)
            if eos:
                x = stop_after_eos(x, generated, eos)
        if k == todo[-1] or not ((x == den.mask_id) & generated)[:, e:].any():
            break
        state.commit(x, k + 1)
    return x


def layout(rows: list[torch.Tensor], new: int, mask_id: int, fill_id: int, block: int):
    """Canvas (B, W) of [BOS, prompt, new masks] rows, its valid (B, W) and position ids, and each row's start.

    Whole-sequence exports: rows are left padded to one width. Block exports: each row is padded
    on the left by whole blocks so that every row's last (partial) prompt block sits in the same
    column block, and on the right up to a multiple of the block length.
    """
    lengths = [len(r) + new for r in rows]
    if block:
        full = [len(r) // block for r in rows]
        starts = [block * (max(full) - f) for f in full]
        width = -(-max(s + n for s, n in zip(starts, lengths)) // block) * block
    else:
        width = max(lengths)
        starts = [width - n for n in lengths]
    x = torch.full((len(rows), width), fill_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, s) in enumerate(zip(rows, starts)):
        x[i, s:s + len(r)] = r
        x[i, s + len(r):s + lengths[i]] = mask_id
        valid[i, s:s + lengths[i]] = True
    pos = (torch.arange(width)[None, :] - torch.tensor(starts)[:, None]).clamp_min(0).masked_fill(~valid, 0)
    return x, valid, pos, starts


def _prompts(input_ids, attention_mask, bos: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Per row: BOS + the unpadded tokens, the input columns they came from, and 1 if BOS was added."""
    cols = [keep.nonzero().flatten() for keep in attention_mask.bool()]
    added = [int(len(c) == 0 or int(ids[c[0]]) != bos) for ids, c in zip(input_ids, cols)]
    rows = [torch.cat([torch.tensor([bos] * lead, dtype=torch.long), ids[c].long()])
            for ids, c, lead in zip(input_ids, cols, added)]
    return rows, cols, added


@torch.no_grad()
def generate(*args, model=None, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
    """Diffusion decoding in transformers' calling convention -> (B * num_return_sequences, P + new) ids; takes
    generate(model=m, input_ids=ids), m.generate(ids) (transformers binds model=m), generate(m, ids) and `inputs=`."""
    args = list(args)
    model = model if model is not None or not args or not isinstance(args[0], torch.nn.Module) else args.pop(0)
    input_ids = input_ids if input_ids is not None or not args else args.pop(0)
    generation_config = generation_config if generation_config is not None or not args else args.pop(0)
    if args or model is None:
        raise TypeError("call generate(model=..., input_ids=..., attention_mask=..., generation_config=..., **options)")
    inputs = kwargs.pop("inputs", None)
    input_ids = input_ids if input_ids is not None else inputs
    meta = load_meta(model, kwargs.pop("diffusion_meta", None))
    o = merged_options(model, generation_config, kwargs)
    bos = next((v for v in (o.get("bos_token_id"), getattr(model.config, "bos_token_id", None)) if isinstance(v, int)),
               None)
    if bos is None:
        raise DecodeError("no bos_token_id in the generation config or model config: pass bos_token_id=...")
    eos = o.get("eos_token_id")
    eos = [] if eos is None else [int(v) for v in (eos if isinstance(eos, (list, tuple)) else [eos])]
    n_seq, device = int(o.get("num_return_sequences") or 1), next(model.parameters()).device
    ids = torch.atleast_2d(torch.as_tensor(input_ids if input_ids is not None else [[bos]]))
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
    input_ids, attention_mask = (t.view(-1, t.shape[-1]).cpu().repeat_interleave(n_seq, 0) for t in (ids, mask))
    new = (o["max_new_tokens"] if o.get("max_new_tokens") is not None
           else (o.get("max_length") or 0) - input_ids.shape[1])
    if new < 1:
        raise DecodeError(f"nothing to generate: set max_new_tokens >= 1 (got {new} new tokens)")
    rows, cols, added = _prompts(input_ids, attention_mask, bos)
    x, valid, pos, starts = layout(rows, new, meta["mask_token_id"], bos, meta["block_length"])
    den = CanvasModel(model, meta, valid.to(device), pos.to(device))
    x = (decode_blocks if meta["block_length"] else decode_whole)(den, x.to(device), o, eos).cpu()
    out = _assemble(x, input_ids, rows, cols, added, starts, new, eos, o.get("pad_token_id")).to(device)
    if o.get("return_dict_in_generate"):
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=out)
    return out


def _assemble(x, input_ids, rows, cols, added, starts, new, eos, pad) -> torch.Tensor:
    """The given input_ids (their mask ids filled) then the new ids; pad after EOS, stopped columns cut."""
    prompt, tail = input_ids.clone(), torch.empty((len(rows), new), dtype=torch.long)
    for i, (r, c, lead, s) in enumerate(zip(rows, cols, added, starts)):
        prompt[i, c] = x[i, s + lead:s + len(r)]
        tail[i] = x[i, s + len(r):s + len(r) + new]
    if eos:
        is_eos = torch.isin(tail, torch.tensor(eos))
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        tail = tail.masked_fill(after, eos[0] if pad is None else int(pad))
        tail = tail[:, :int((~after).any(0).nonzero().flatten()[-1]) + 1]  # column 0 is never after an EOS
    return torch.cat([prompt, tail], 1)
