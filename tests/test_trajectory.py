"""`python -m adapt.sample ... --trajectory-out FILE.png|FILE.html`: the decoding order drawn step by step."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from adapt import sample
from test_hf_generate import make_export

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def export(tmp_path_factory, tokenizer_dir) -> Path:
    return make_export(tmp_path_factory.mktemp("traj_export"), tokenizer_dir)


def draw(export: Path, out: Path, *extra: str) -> None:
    assert sample.main([str(export), "--prompt", "The cat", "--length", "8", "--steps", "4", "--sampler",
                        "confidence", "--block-length", "4", "--device", "cpu", "--trajectory-out", str(out),
                        *extra]) == 0


def test_png_shows_every_step(export, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "pics" / "order.png"
    draw(export, out, "--num-samples", "2")
    assert f"trajectory -> {out}" in capsys.readouterr().err
    image = Image.open(out).convert("RGB")
    assert image.width > 600 and image.height > 600
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 20  # step colours, grey given tokens, white masks, text


def test_html_reveals_each_generated_token_once(export, tmp_path, capsys):
    out = tmp_path / "order.html"
    draw(export, out)
    page = out.read_text()
    rows = re.findall(r"<tr><th>(\d+)</th><td>(.*?)</td></tr>", page)
    assert [int(s) for s, _ in rows] == [0, 1, 2, 3]
    assert sum(line.count('class="new"') for _, line in rows) == 8  # 8 generated positions, each revealed once
    masked = [line.count('class="m"') for _, line in rows]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0  # masks only go away
    assert "<script" not in page and page.startswith("<!DOCTYPE html>")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium to render the HTML")
def test_html_renders_in_headless_chromium(export, tmp_path):
    from PIL import Image

    out, shot = tmp_path / "order.html", tmp_path / "shot.png"
    draw(export, out)
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,800", out.as_uri()], capture_output=True, timeout=120, check=True)
    assert len(Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)) > 10


def test_bad_trajectory_path_exits_2_with_one_message(export, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        sample.main([str(export), "--length", "2", "--trajectory-out", str(tmp_path / "order.svg")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --trajectory-out must end in .png or .html, got 'order.svg'"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_:  # the parent "folder" is a file
        draw(export, blocker / "order.html")
    assert exit_.value.code == 2 and "cannot write" in capsys.readouterr().err
