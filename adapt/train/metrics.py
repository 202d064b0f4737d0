"""One logging path: a status line per interval on rank 0, metrics to JSONL (and TensorBoard), progress lines
with an ETA for long loops (evaluation)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from adapt.train.checkpoint import metrics_file, tensorboard_dir


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Progress of a long loop as plain lines, e.g. `eval bound: 12/64 batches, 0m41s elapsed, ETA 2m59s`.

    A line at every tenth of `total` and at least every `interval_s`, so a captured log shows it as well as a
    terminal (a tqdm bar rewrites one line with carriage returns); nothing for a loop done within `delay_s`,
    and nothing when not `enabled` (ranks other than 0). `stream` defaults to sys.stderr at each line."""

    def __init__(self, label: str, total: int, unit: str = "batches", stream=None, enabled: bool = True,
                 interval_s: float = 30.0, delay_s: float = 5.0, clock=time.monotonic):
        self.label, self.total, self.unit, self.stream, self.enabled = label, max(1, total), unit, stream, enabled
        self.interval_s, self.delay_s, self.clock = interval_s, delay_s, clock
        self.done, self._tenth, self._printed = 0, 0, False
        self._t0 = self._last = clock()

    def update(self, n: int = 1) -> None:
        """Count `n` more items done; print a line when one is due."""
        self.done += n
        if not self.enabled:
            return
        now = self.clock()
        elapsed, tenth = now - self._t0, min(10, self.done * 10 // self.total)
        due = tenth > self._tenth or now - self._last >= self.interval_s or self.done >= self.total
        if due and (elapsed >= self.delay_s or self._printed):
            eta = elapsed / self.done * max(0, self.total - self.done)
            print(f"{self.label}: {self.done}/{self.total} {self.unit}, {_duration(elapsed)} elapsed, "
                  f"ETA {_duration(eta)}", file=self.stream or sys.stderr, flush=True)
            self._tenth, self._last, self._printed = tenth, now, True


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (empty when the file is missing), skipping a line cut by an interrupted write."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class MetricsLog:
    """Status lines (step, loss, masked tokens, lr, tokens/s, ETA) and run_dir/metrics.jsonl, rank 0 only; a train
    record's `tokens` is the tokens of one optimizer step (all ranks)."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = metrics_file(run_dir)
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir(run_dir)))
        self._t0 = time.perf_counter()
        self._first = 0
        self._total = 0

    def info(self, text: str) -> None:
        if self.enabled:
            print(f"[adapt] {text}", file=sys.stderr, flush=True)

    def start(self, step: int, total: int) -> None:
        self._t0, self._first, self._total = time.perf_counter(), step, total

    def record(self, step: int, values: dict, kind: str) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        if kind == "eval":
            shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if k.endswith(("ppl", "nll")))
            self.info(f"eval @ step {step}: {shown}")

    def status(self, step: int, window: list[dict]) -> None:
        if not self.enabled or not window:
            return
        secs = sum(w["seconds"] for w in window)
        good = [w for w in window if not w.get("skipped")]
        row = {"loss": sum(w["loss"] for w in good) / len(good) if good else float("nan"),
               "skipped": len(window) - len(good),
               "masked_tokens": window[-1]["masked_tokens"], "lr": window[-1]["lr"],
               "anneal_ratio": window[-1]["anneal_ratio"], "grad_norm": window[-1]["grad_norm"],
               "tokens_per_s": sum(w["tokens"] for w in window) / max(secs, 1e-9), "tokens": window[-1]["tokens"],
               "step_seconds": secs / len(window)}
        for key in ("ar_loss", "distill"):  # the joint causal term, the distillation term (when on)
            if key in window[-1]:
                row[key] = sum(w[key] for w in good) / len(good) if good else float("nan")
        done = step - self._first
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(done, 1) * (self._total - step)
        if "rows" in window[-1]:  # a mixture: each source's share of the rows of this window's steps
            rows = {k: sum(w["rows"][k] for w in window) for k in window[-1]["rows"]}
            row["mix"] = {k: v / max(1, sum(rows.values())) for k, v in rows.items()}
        ar = f" | ar {row['ar_loss']:.4f}" if "ar_loss" in row else ""
        ar += f" | kd {row['distill']:.4f}" if "distill" in row else ""
        ar += " | mix " + " ".join(f"{k} {v:.2f}" for k, v in row["mix"].items()) if "mix" in row else ""
        self.info(f"step {step}/{self._total} | loss {row['loss']:.4f}{ar} | masked {row['masked_tokens']} | "
                  f"lr {row['lr']:.2e} | gnorm {row['grad_norm']:.2f} | attn r {row['anneal_ratio']:.2f} | "
                  f"{row['tokens_per_s']:.0f} tok/s | "
                  f"ETA {_duration(eta)}")
        self.record(step, row, "train")

    def final(self, summary: dict) -> None:
        if not self.enabled:
            return
        lines = ["", "=" * 72, f"exported diffusion model: {summary.get('export')}"]
        if "parent_ppl" in summary:
            lines.append(f"parent causal LM, exact held-out perplexity:      {summary['parent_ppl']:.2f}")
        for key, label in (("before_causal_", "bound before adaptation, causal attention"),
                           ("before_", "bound before adaptation, objective's attention"),
                           ("after_", "bound after adaptation")):
            if f"{key}ppl" in summary:
                lines.append(f"{label + ':':<50}<= {summary[f'{key}ppl']:.2f} "
                             f"(95% CI {summary[f'{key}ppl_low']:.2f}-{summary[f'{key}ppl_high']:.2f})")
        if "curve" in summary:
            lines.append(f"held-out bound vs training tokens: {summary['curve']}")
        if "sample" in summary:
            lines.append(f"ancestral sample: {summary['sample']!r}")
        lines.append("=" * 72)
        print("\n".join(lines), flush=True)
