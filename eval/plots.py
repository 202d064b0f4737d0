"""PNG figures of the eval results (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REF_STYLES = {"heldout": ("black", "-"), "parent": ("tab:gray", "--")}


def _ref_style(source: str) -> tuple[str, str]:
    return REF_STYLES.get(source, ("tab:gray", ":"))


def frontier_plot(result: dict, path: Path) -> Path:
    """Steps/quality frontier: generative perplexity (top) and unique-unigram fraction (bottom) vs
    sampling steps, one line per sampler, references as horizontal lines; one column per mode."""
    modes = sorted({r["mode"] for r in result["runs"]}, reverse=True)
    fig, axes = plt.subplots(2, len(modes), figsize=(5.5 * len(modes), 7), squeeze=False)
    for col, mode in enumerate(modes):
        runs = [r for r in result["runs"] if r["mode"] == mode]
        for row, (key, label) in enumerate((("gen_ppl", "generative perplexity"),
                                            ("diversity", "fraction of unique unigrams"))):
            ax = axes[row][col]
            for sampler in dict.fromkeys(r["sampler"] for r in runs):
                pts = sorted((r["steps"], _value(r, key)) for r in runs if r["sampler"] == sampler)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sampler)
            for ref in (r for r in result["references"] if r["mode"] == mode):
                color, style = _ref_style(ref["source"])
                ax.axhline(_value(ref, key), color=color, linestyle=style, linewidth=1, label=ref["source"])
            ax.set_xscale("log", base=2)
            if key == "gen_ppl":
                ax.set_yscale("log")
            ax.set_xlabel("sampling steps")
            ax.set_ylabel(label)
            ax.set_title(f"{mode}")
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _value(row: dict, key: str) -> float:
    return row["gen_ppl"]["ppl"] if key == "gen_ppl" else row["diversity"]["unique_unigrams"]


def speed_plot(rows: list[dict], path: Path) -> Path:
    """Latency (left) and generated tokens/s (right) vs output length, one line per method."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["length"], r["latency_s"], r["tokens_per_s"]) for r in rows if r["method"] == name)
        style = "--" if name.startswith("parent") else "-"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=name)
    for ax, label in zip(axes, ("latency (s)", "generated tokens / s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("output length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
