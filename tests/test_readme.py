"""The README's commands work as shown, and the README stays a short guide.

Every command in a fenced code block that starts a project entry point (`python -m adapt.*`, `python -m eval.*`,
`deepspeed adapt/run.py`, `python adapt/run.py`, `python bench/*.py`) must name a module or script that exists
and answers `--help` with exit 0; every recipe such a command names must exist; every relative link must
resolve; the test command must be the one `.ci/run` runs. Each distinct entry point runs once, forked from one
process that imported the libraries once (tests/cli_runner.py), so the whole file takes seconds, not minutes.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from cli_runner import CliRunner

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 360
TEST_COMMAND = "bash scripts/setup.sh && .venv/bin/python -m pytest"
"""The README's test command; `.ci/run` runs the same line."""

MODULE = re.compile(r"(?:^|[\s/])python3?\s+-m\s+((?:adapt|eval)(?:\.\w+)+)")
SCRIPT = re.compile(r"(?:^|[\s/])python3?\s+((?:adapt|bench|eval)/[\w/]+\.py)\b")
LAUNCHED = re.compile(r"(?:^|[\s/])deepspeed\b[^|;&]*?\s((?:adapt|bench|eval)/[\w/]+\.py)\b")
RECIPE = re.compile(r"\brecipes/[\w./-]+\.yaml\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")
TEAM_WORDS = re.compile(r"\b(sessions?|helpers?|agents?|issue #|we were told)\b", re.IGNORECASE)

HELP_EXIT_NOT_ZERO = {
}
"""Entry points whose `--help` is known to exit non-zero: expected to fail (strict), so the fix shows here."""


def command_lines(text: str) -> list[str]:
    """The lines of the fenced code blocks, a backslash continuation joined to its line."""
    lines, fenced, joined = [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced, joined = not fenced, ""
            continue
        if fenced:
            joined += line.rstrip()
            if joined.endswith("\\"):
                joined = joined[:-1] + " "
                continue
            lines.append(joined)
            joined = ""
    return lines


def started(line: str) -> list[str]:
    """The entry points one command line starts, in order: "-m adapt.sample" or "bench/adapt_step.py"."""
    hits = [(m.start(1), "-m " + m.group(1)) for m in MODULE.finditer(line)]
    hits += [(m.start(1), m.group(1)) for pattern in (SCRIPT, LAUNCHED) for m in pattern.finditer(line)]
    return [entry for _, entry in sorted(hits)]


def entry_points(text: str) -> list[str]:
    """Distinct entry points the text's commands start, in order of first appearance."""
    found: list[str] = []
    for line in command_lines(text):
        found += [entry for entry in started(line) if entry not in found]
    return found


def recipes(text: str) -> list[str]:
    """Recipe files named in commands that start an entry point."""
    lines = [line for line in command_lines(text) if started(line)]
    return sorted({m.group(0) for line in lines for m in RECIPE.finditer(line)})


def exists(entry: str, root: Path = ROOT) -> bool:
    """Whether the module (`-m a.b`: a/b.py or a/b/ as a package) or script the entry point names is there."""
    if entry.startswith("-m "):
        path = root / entry[3:].replace(".", "/")
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()
    return (root / entry).is_file()


def missing(text: str, root: Path = ROOT) -> list[str]:
    """The entry points and recipes the text's commands name that are not in `root`."""
    return [e for e in entry_points(text) if not exists(e, root)] + [r for r in recipes(text)
                                                                       if not (root / r).is_file()]


def broken_links(text: str, base: Path = ROOT) -> list[str]:
    """Relative link targets (anchors dropped) that are no file or folder under `base`."""
    targets = [m.group(1).split("#")[0] for m in LINK.finditer(text)]
    return [t for t in targets if t and not re.match(r"[a-z]+:", t) and not (base / t).exists()]


TEXT = README.read_text()
ENTRIES = entry_points(TEXT)


def test_the_readme_shows_the_main_commands():
    assert "adapt/run.py" in ENTRIES and "-m adapt.sample" in ENTRIES, ENTRIES
    assert TEST_COMMAND in command_lines(TEXT)
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(), "the README's test command is not the one CI runs"


@pytest.mark.parametrize("entry", ENTRIES)
def test_each_entry_point_exists(entry):
    assert exists(entry), f"the README runs {entry}, which does not exist"


def test_named_recipes_exist():
    assert "recipes/llama_to_mdlm.yaml" in recipes(TEXT)
    assert [r for r in recipes(TEXT) if not (ROOT / r).is_file()] == []


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    cli = CliRunner(tmp_path_factory.mktemp("readme_cli"))
    yield cli
    cli.close()


@pytest.mark.parametrize("entry", [
    pytest.param(e, marks=pytest.mark.xfail(strict=True, reason=HELP_EXIT_NOT_ZERO[e])) if e in HELP_EXIT_NOT_ZERO
    else e for e in ENTRIES])
def test_each_entry_point_answers_help(entry, runner):
    result = runner.run([*entry.split(), "--help"], timeout=120)
    assert result.code == 0, f"{entry} --help exited {result.code}:\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr


def test_relative_links_resolve():
    assert "docs/results.md" in TEXT and "docs/decisions.md" in TEXT
    assert broken_links(TEXT) == []


def test_the_readme_is_a_short_guide_about_the_project():
    assert len(TEXT.splitlines()) <= MAX_LINES
    assert TEAM_WORDS.findall(TEXT) == []


def test_the_checks_catch_a_renamed_entry_point(tmp_path):
    """A README naming a module, script, recipe or link that is not there fails each check."""
    text = "\n".join([
        "See [the log](docs/nowhere.md) and [the site](https://example.org/x).",
        "```bash",
        "python -m adapt.no_such_command FOLDER --steps 4",
        ".venv/bin/deepspeed --num_gpus 8 adapt/no_run.py recipes/no_such.yaml \\",
        "    train.max_steps=3",
        "python bench/no_bench.py --steps 4   # python -m eval.renamed in a comment is still a command",
        ".venv/bin/python -m pytest",
        "```",
    ])
    assert entry_points(text) == ["-m adapt.no_such_command", "adapt/no_run.py", "bench/no_bench.py",
                                  "-m eval.renamed"]
    assert missing(text) == [*entry_points(text), "recipes/no_such.yaml"]
    assert broken_links(text) == ["docs/nowhere.md"]
    (tmp_path / "adapt").mkdir()
    (tmp_path / "adapt" / "no_such_command.py").write_text("")
    assert not exists("-m adapt.sample", tmp_path) and exists("-m adapt.no_such_command", tmp_path)
