"""Supervised fine-tuning of a diffusion LM on prompt/response pairs (LLaDA's SFT recipe).

Each example becomes one sequence of `data.seq_length` tokens:

    [prompt (chat template when the tokenizer has one)] [response] [EOS] [EOS ...]
     given, never masked, no loss                        noised and scored with the masked-diffusion loss

The response is padded to the block with EOS, and the padding counts as response: the model learns
to end its answer (sampling with a long masked tail then fills it with EOS). Examples that do not fit
(prompt + response + one EOS > block size) are dropped and counted. Training reuses `adapt.train.loop`
unchanged (`adapt.train.stages.run_sft`): the examples carry a loss mask that the objective folds into the
maskable positions, and the answer (up to its first EOS) as a named part whose share of the bound is reported.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from adapt.recipe.config import Config, SftConfig
from adapt.data.corpus import Sequences, DataError, embedded_corpus
from adapt.model.causal import start_token


@dataclass
class SftSequences(Sequences):
    """Padded examples; the loss masks mark response positions (True) and prompt positions (False)."""

    dropped: int = 0
    """Examples left out because they do not fit in the block."""


# --- the embedded SFT set ------------------------------------------------------------------------

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def wiki_sft_pairs(corpus: Path, max_pairs: int = 4000) -> list[dict]:
    """Prompt/response pairs from the embedded Wikipedia extract, made offline and deterministically.

    Two tasks, interleaved: "Continue: <sentence>" -> the next sentence of the same paragraph, and
    "Write the first sentence of the Wikipedia article about <title>." -> that sentence.
    """
    pairs: list[dict] = []
    for line in corpus.read_text().splitlines():
        page = json.loads(line)
        paragraphs = [p for p in page["text"].split("\n") if len(p) > 80]
        if not paragraphs:
            continue
        first = _sentences(paragraphs[0])
        if first:
            pairs.append({"prompt": f"Write the first sentence of the Wikipedia article about {page['title']}.",
                          "response": first[0]})
        for para in paragraphs:
            sents = _sentences(para)
            pairs += [{"prompt": f"Continue: {a}", "response": b} for a, b in zip(sents, sents[1:])]
    return pairs[:max_pairs]


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(paragraph) if 20 <= len(s.strip()) <= 240]


def embedded_sft(cache_dir: str | os.PathLike) -> Path:
    """JSONL of `wiki_sft_pairs` under the cache, made once (written then renamed)."""
    out = Path(cache_dir) / "embedded" / "wiki_sft.jsonl"
    if out.is_file():
        return out
    pairs = wiki_sft_pairs(embedded_corpus(cache_dir))
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    try:
        tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# --- reading and encoding ------------------------------------------------------------------------

def sft_files(cfg: Config) -> list[str]:
    if not cfg.data.train_files:
        return [str(embedded_sft(cfg.data.cache_dir))]
    files: list[str] = []
    for pattern in cfg.data.train_files:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise DataError(f"SFT data file `{pattern}` not found; data.train_files takes local .jsonl files")
        files += matches
    bad = [f for f in files if Path(f).suffix.lower() not in (".jsonl", ".json")]
    if bad:
        raise DataError(f"SFT data must be JSON lines (one object per line); got {bad[0]}")
    return files


def read_records(files: list[str]) -> list[dict]:
    records = []
    for f in files:
        for n, line in enumerate(Path(f).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise DataError(f"{f} line {n} is not JSON ({err}); SFT data are JSON lines") from None
    if not records:
        raise DataError(f"no examples in {', '.join(files)}")
    return records


def split_record(record: dict, scfg: SftConfig) -> tuple[list[dict] | str, str]:
    """(prompt: chat turns or plain text, response text) of one record."""
    msgs = record.get(scfg.messages_field)
    if isinstance(msgs, list) and msgs:
        if not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
            raise DataError(f"the last turn of `{scfg.messages_field}` must be the assistant's (the response)")
        return msgs[:-1], str(msgs[-1].get("content", ""))
    if scfg.prompt_field not in record or scfg.response_field not in record:
        raise DataError(f"an SFT record has neither `{scfg.messages_field}` nor `{scfg.prompt_field}`/"
                        f"`{scfg.response_field}` (keys: {', '.join(record)}); set sft.prompt_field, "
                        f"sft.response_field or sft.messages_field")
    return str(record[scfg.prompt_field]), str(record[scfg.response_field])


def encode(tokenizer, prompt: list[dict] | str, response: str, use_template: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids). The prompt starts with the tokenizer's BOS (EOS when it has none),
    the same given first token as in adaptation; a chat-templated prompt keeps the template's first token."""
    start = start_token(tokenizer)
    if use_template and getattr(tokenizer, "chat_template", None):
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template's own first token
    else:
        text = prompt if isinstance(prompt, str) else "\n".join(str(t.get("content", "")) for t in prompt)
        ids = [start] + tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, tokenizer(response, add_special_tokens=False)["input_ids"]


def pad_example(prompt_ids: list[int], response_ids: list[int], length: int,
                eos_id: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(ids (L,), loss_mask (L,) bool) with the response padded by EOS to `length`; None if it does not fit.

    loss_mask is False on the prompt and True on the response, its EOS and all EOS padding.
    """
    body = list(response_ids) + [eos_id]
    if len(prompt_ids) + len(body) > length or not prompt_ids:
        return None
    ids = torch.full((length,), eos_id, dtype=torch.long)
    ids[:len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
    ids[len(prompt_ids):len(prompt_ids) + len(body)] = torch.tensor(body, dtype=torch.long)
    loss_mask = torch.zeros(length, dtype=torch.bool)
    loss_mask[len(prompt_ids):] = True
    return ids, loss_mask


def build_examples(cfg: Config, tokenizer) -> SftSequences:
    """Encoded, padded SFT examples, cached under data.cache_dir; held-out = the last data.heldout_sequences."""
    files = sft_files(cfg)
    stamp = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]
    vocab = hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    key = hashlib.sha1(json.dumps([stamp, vocab, cfg.data.seq_length, vars(cfg.sft)]).encode()).hexdigest()[:16]
    cache = Path(cfg.data.cache_dir) / f"sft-{key}.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
    else:
        rows, dropped = [], 0
        for record in read_records(files):
            prompt, response = split_record(record, cfg.sft)
            row = pad_example(*encode(tokenizer, prompt, response, cfg.sft.chat_template), cfg.data.seq_length,
                              tokenizer.eos_token_id)
            dropped += row is None
            rows += [row] if row is not None else []
        if not rows:
            raise DataError(f"no SFT example fits in data.seq_length={cfg.data.seq_length} tokens "
                            f"(prompt + response + EOS); raise data.seq_length")
        saved = {"ids": torch.stack([r[0] for r in rows]), "loss_mask": torch.stack([r[1] for r in rows]),
                 "dropped": torch.tensor(dropped)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save(saved, tmp)
        os.replace(tmp, cache)
    ids, loss_mask = saved["ids"], saved["loss_mask"]
    if len(ids) <= cfg.data.heldout_sequences:
        raise DataError(f"{len(ids)} SFT examples fit, not more than data.heldout_sequences="
                        f"{cfg.data.heldout_sequences}; add examples or lower data.heldout_sequences")
    n = len(ids) - cfg.data.heldout_sequences
    docs = torch.zeros_like(ids)
    dropped = int(saved["dropped"])
    summary = (f"sft: {n} train / {len(ids) - n} held-out examples of {cfg.data.seq_length} tokens, {dropped} "
               f"dropped (too long); response tokens per example {loss_mask[:n].sum(1).float().mean():.1f} "
               f"(EOS padding included)")
    answer = answer_positions(ids[n:], loss_mask[n:], tokenizer.eos_token_id)
    return SftSequences(ids[:n], docs[:n], ids[n:], docs[n:], loss_mask[:n], loss_mask[n:], {"answer": answer},
                     summary, dropped=dropped)


# --- evaluation and the report ---------------------------------------------------------------------

def answer_positions(ids: torch.Tensor, loss_mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Response positions up to and including the EOS that ends the answer (bool, like `loss_mask`);
    the response positions after it are EOS padding."""
    pos = torch.arange(ids.shape[-1])
    text = loss_mask & (ids != eos_id)
    first = loss_mask.int().argmax(-1)  # where the response starts
    last = torch.where(text.any(-1), torch.where(text, pos, -1).amax(-1), first - 1)
    return loss_mask & (pos <= (last + 1)[..., None])


def report(summary: dict) -> None:
    lines = ["", "=" * 72, f"exported diffusion model: {summary.get('export')}"]
    for key, label in (("before_", "response bound before SFT"), ("after_", "response bound after SFT")):
        lines.append(f"{label + ':':<32}<= {summary[key + 'ppl']:.2f} (95% CI {summary[key + 'ppl_low']:.2f}-"
                     f"{summary[key + 'ppl_high']:.2f}) over {summary[key + 'tokens']} response tokens"
                     if key + "ppl" in summary else f"{label}: not measured (resumed run)")
        if key + "answer_ppl" in summary:
            lines.append(f"{'  its share on the answers:':<32}   {summary[key + 'answer_ppl']:.2f} (95% CI "
                         f"{summary[key + 'answer_ppl_low']:.2f}-{summary[key + 'answer_ppl_high']:.2f}) per "
                         f"token over {summary[key + 'answer_tokens']} answer tokens (EOS padding excluded)")
    if "curve" in summary:
        lines.append(f"held-out bound vs training tokens: {summary['curve']}")
    for key in ("prompt", "sample", "reference"):
        if key in summary:
            lines.append(f"{key}: {summary[key]!r}")
    print("\n".join(lines + ["=" * 72]), flush=True)


def until_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids[:ids.index(eos)] if eos in ids else ids
