"""Pictures of a sampling trajectory: the canvas step by step, each token coloured by the step that revealed it
(`python -m adapt.sample ... --trajectory-out FILE.png|FILE.html`).

PNG (matplotlib, imported on use: the `eval` extra): per sample, a step x position map (white = still
masked, grey = given, colour = the step the token was revealed at), so semi-autoregressive blocks show as
a staircase and parallel commits as wide bands; under it the final text with each token on its colour.
HTML (no dependency): per sample, one line of the canvas per step, the tokens revealed at that step
outlined, and the final text coloured the same way.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import torch

FORMATS = (".png", ".html")
MASK_GLYPH = "\u2591"
GIVEN_RGB = (0.82, 0.82, 0.82)


@dataclass
class Frames:
    """One sample's trajectory: tokens and the step at which each generated position was revealed."""

    tokens: list[str]
    """Decoded text of every position (BOS included)."""
    step: list[int]
    """Reveal step per position; -1 for given positions (and EOS filled in after a stop)."""
    generated: list[bool]
    """Positions that were masked at the start."""
    steps: int
    """Steps run (the number of canvas states after the start)."""


def frames(x: torch.Tensor, ids: torch.Tensor, reveal: torch.Tensor, mask_id: int, tokenizer,
           steps: int) -> list[Frames]:
    """x (B, L) the input canvas, ids (B, L) the result, reveal (B, L) the trajectory -> one Frames per row."""
    out = []
    for row in range(ids.shape[0]):
        tokens = [tokenizer.decode([int(t)]) for t in ids[row]]
        out.append(Frames(tokens, reveal[row].tolist(), (x[row] == mask_id).tolist(), max(steps, 1)))
    return out


def check_path(path: str | Path) -> Path:
    """The output path, or ValueError naming the accepted suffixes."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"--trajectory-out must end in {' or '.join(FORMATS)}, got {path.name!r}")
    return path


def render(path: str | Path, samples: list[Frames], title: str = "") -> Path:
    """Write the picture of `samples` to path (.png or .html); returns the path."""
    path = check_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        render_png(path, samples, title)
    else:
        path.write_text(render_html(samples, title), encoding="utf-8")
    return path


def _colour(step: int, steps: int) -> tuple[float, float, float]:
    """Viridis-like ramp from dark blue (first step) to yellow (last), without matplotlib."""
    stops = [(0.267, 0.005, 0.329), (0.231, 0.322, 0.545), (0.129, 0.569, 0.549), (0.369, 0.788, 0.384),
             (0.993, 0.906, 0.144)]
    u = 0.0 if steps <= 1 else min(max(step / (steps - 1), 0.0), 1.0)
    i = min(int(u * (len(stops) - 1)), len(stops) - 2)
    f = u * (len(stops) - 1) - i
    return tuple(a + (b - a) * f for a, b in zip(stops[i], stops[i + 1]))


def _cell(f: Frames, pos: int, at: int) -> tuple[float, float, float] | None:
    """Colour of position `pos` after step `at` (None = still masked)."""
    if f.step[pos] < 0:
        return None if f.generated[pos] and at < f.steps - 1 else GIVEN_RGB
    return _colour(f.step[pos], f.steps) if f.step[pos] <= at else None


def render_png(path: Path, samples: list[Frames], title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap, Normalize
    except ImportError:
        raise ValueError("a .png trajectory needs matplotlib: pip install '.[eval]' (or write .html)") from None
    fig, axes = plt.subplots(2 * len(samples), 1, figsize=(11, 4.2 * len(samples)), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2] * len(samples)})
    steps = max(f.steps for f in samples)
    cmap = LinearSegmentedColormap.from_list("reveal", [_colour(s, 5) for s in range(5)])
    fig.colorbar(plt.cm.ScalarMappable(norm=Normalize(0, max(steps - 1, 1)), cmap=cmap), ax=axes[:, 0].tolist(),
                 label="revealed at step", fraction=0.025)
    for k, f in enumerate(samples):
        grid = [[_cell(f, p, s) or (1.0, 1.0, 1.0) for p in range(len(f.tokens))] for s in range(f.steps)]
        ax = axes[2 * k, 0]
        ax.imshow(grid, aspect="auto", interpolation="nearest", origin="upper")
        ax.set_ylabel("after step")
        ax.set_xlabel("position")
        ax.set_title(f"sample {k + 1}: canvas after each step (white = masked, grey = given)", fontsize=9)
        _text_panel(axes[2 * k + 1, 0], f)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _text_panel(ax, f: Frames, fontsize: float = 8) -> None:
    """The final text, wrapped to the panel, each token on the colour of its reveal step."""
    ax.axis("off")
    inches = ax.get_position().width * ax.figure.get_figwidth()
    width = max(20, int(inches * 72 / (0.6 * fontsize)))  # monospace characters per line
    x = y = 0
    for pos, token in enumerate(f.tokens):
        shown = token.replace("\n", "\u21b5") or " "
        if x + len(shown) > width:
            x, y = 0, y + 1
        colour = _cell(f, pos, f.steps - 1) or (1.0, 1.0, 1.0)
        dark = sum(colour) < 1.6
        ax.text(x / width, 1 - (y + 0.5) / 10, shown, fontsize=fontsize, family="monospace", va="center",
                color="white" if dark else "black", bbox=dict(boxstyle="square,pad=0.1", fc=colour, ec="none"),
                transform=ax.transAxes)
        x += len(shown) + 1


def _css(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def _span(f: Frames, pos: int, at: int) -> str:
    colour = _cell(f, pos, at)
    if colour is None:
        return f'<span class="m">{MASK_GLYPH}</span>'
    text = html.escape(f.tokens[pos].replace("\n", "\u21b5")) or "&nbsp;"
    new = ' class="new"' if f.step[pos] == at else ""
    fg = "#fff" if sum(colour) < 1.6 else "#000"
    return (f'<span{new} style="background:{_css(colour)};color:{fg}" '
            f'title="position {pos}, step {f.step[pos]}">{text}</span>')


def render_html(samples: list[Frames], title: str = "") -> str:
    """A self-contained page: per sample the canvas after every step, then the final text."""
    parts = [f"<h1>{html.escape(title or 'Sampling trajectory')}</h1>",
             "<p>Each token is coloured by the step it was revealed at (dark = early, yellow = late); "
             f"grey = given, {MASK_GLYPH} = still masked; outlined = revealed at this step.</p>"]
    for k, f in enumerate(samples):
        rows = "".join(f'<tr><th>{s}</th><td>{"".join(_span(f, p, s) for p in range(len(f.tokens)))}</td></tr>'
                       for s in range(f.steps))
        final = "".join(_span(f, p, f.steps) for p in range(len(f.tokens)))
        parts.append(f'<h2>sample {k + 1}</h2><table><tr><th>step</th><th>canvas</th></tr>{rows}</table>'
                     f'<p class="final">{final}</p>')
    style = ("body{font-family:sans-serif;margin:1em}td{font-family:monospace;white-space:pre-wrap}"
             "th{text-align:right;padding-right:.5em;color:#555}span{padding:0 1px;margin:0 1px}"
             ".m{color:#999}.new{outline:2px solid #d00}.final{font-family:monospace;white-space:pre-wrap}")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title or "trajectory")}'
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
