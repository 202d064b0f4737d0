"""Valid invocations of the commands, each input mutated one at a time (numbers to extremes, paths to missing /
file-instead-of-folder / symlink loop / unwritable, text to non-UTF-8 and control characters, export parts removed
or corrupted). Every mutated command must exit 0 or 2, print no traceback, finish within its timeout, leave every
file that was there unchanged and write nothing outside the output folder it was given.

CI replays a fixed sample of the cases (MUTATION_CASES, default 24); MUTATION_CASES=all runs every one and
prints the counts (the README's reliability table)."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from cli_runner import CliRunner
from test_eval_fixtures import exported_dir  # noqa: F401
from test_export_safety import _broken

from adapt.export import META_FILE, WEIGHTS_FILE

TIMEOUT = 240
INTS = ["0", "-1", str(2**63), "1e309", "nan", "x", ""]
TEXTS = [b"\xff\xfe".decode("utf-8", "surrogateescape"), "a\x01b", "", "w " * 5000]
EXPORTS = ["missing", "a_file", "loop", "no_tokenizer", "config_garbage", "weights_truncated", "no_meta", "nan",
           "other_type"]
OUTS = ["a_file", "under_a_file", "loop", "unwritable", "users_folder"]
RUNS = ["missing", "a_file", "loop", "the_export"]

# command -> (argv with {slots}, {slot: kind}); kinds: int, text, export (an input folder), out, run
COMMANDS = {
    "adapt.sample": (["-m", "adapt.sample", "{export}", "--prompt", "{prompt}", "--length", "{length}", "--steps",
                      "{steps}", "--seed", "{seed}", "--num-samples", "{samples}"],
                     {"export": "export", "prompt": "text", "length": "int", "steps": "int", "seed": "int",
                      "samples": "int"}),
    "adapt.export": (["-m", "adapt.export", "{run}", "--out", "{out}", "--tag", "{tag}"],
                     {"run": "run", "out": "out", "tag": "text"}),
    "eval.likelihood": (["-m", "eval.likelihood", "{export}", "--out-dir", "{out}", "--blocks", "{blocks}",
                         "--length", "{length}", "--t-samples", "2", "--replicates", "2", "--seed", "{seed}"],
                        {"export": "export", "out": "out", "blocks": "int", "length": "int", "seed": "int"}),
    "eval.generation": (["-m", "eval.generation", "{export}", "--out-dir", "{out}", "--samples", "{samples}",
                         "--length", "{length}", "--steps", "{steps}", "--samplers", "confidence", "--prompt-length",
                         "4", "--gen-length", "4", "--batch-size", "2"],
                        {"export": "export", "out": "out", "samples": "int", "length": "int", "steps": "int"}),
}
VALID = {"prompt": "Once upon", "length": "8", "steps": "2", "seed": "0", "samples": "2", "blocks": "2",
         "tag": "step_0000006"}
MUTATIONS = {"int": INTS, "text": TEXTS, "export": EXPORTS, "out": OUTS, "run": RUNS}


def all_cases() -> list[tuple[str, str, int]]:
    """(command, slot, index of the mutation in its kind's list) for every one-input mutation, plus the valid call."""
    cases = [(name, "", 0) for name in COMMANDS]
    for name, (_, slots) in COMMANDS.items():
        cases += [(name, slot, i) for slot, kind in slots.items() for i in range(len(MUTATIONS[kind]))]
    return cases


def chosen_cases() -> list[tuple[str, str, int]]:
    cases, want = all_cases(), os.environ.get("MUTATION_CASES", "24")
    if want == "all":
        return cases
    valid = [c for c in cases if not c[1]]
    return valid + random.Random(0).sample([c for c in cases if c[1]], int(want))


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    cli = CliRunner(tmp_path_factory.mktemp("cli"))
    yield cli
    cli.close()


def _input_folder(kind: str, which: str, box: Path, export: Path, run: Path) -> str:
    """A path of `box` standing for an input folder mutated as `which` (or the valid one)."""
    target = box / f"{kind}_{which}"
    if which == "missing":
        return str(target)
    if which == "a_file":
        target.write_text("not a folder")
    elif which == "loop":
        os.symlink(target, target)
    elif which == "the_export":
        shutil.copytree(export, target)
    elif which in ("no_meta", "config_garbage", "weights_truncated"):
        shutil.copytree(export, target)
        if which == "no_meta":
            (target / META_FILE).unlink()
        elif which == "config_garbage":
            (target / "config.json").write_bytes(b"\x00{garbage")
        else:
            weights = target / WEIGHTS_FILE
            weights.write_bytes(weights.read_bytes()[:1000])
    else:
        _broken(export, target, which)
    return str(target)


def _out_folder(which: str, box: Path) -> tuple[str, Path]:
    """(the --out argument, the folder the command may write in) for an output mutated as `which`."""
    if which == "a_file":
        (box / "out_file").write_text("mine")
        return str(box / "out_file"), box / "out_file"
    if which == "under_a_file":
        (box / "out_file").write_text("mine")
        return str(box / "out_file" / "out"), box / "out_file" / "out"
    if which == "loop":
        os.symlink(box / "out_loop", box / "out_loop")
        return str(box / "out_loop"), box / "out_loop"
    if which == "unwritable":
        return "/proc/version/out", box / "out"
    if which == "users_folder":
        (box / "out").mkdir()
        (box / "out" / "notes.txt").write_text("my own work")
    return str(box / "out"), box / "out"


def build(case: tuple[str, str, int], box: Path, export: Path, run: Path) -> tuple[list[str], Path]:
    """The argv of `case` in sandbox `box` and the folder it may write in."""
    name, slot, index = case
    argv, slots = COMMANDS[name]
    values, allowed = dict(VALID), box / "out"
    values["out"] = str(allowed)
    values["export"], values["run"] = str(export), str(run)
    if slot:
        kind = slots[slot]
        mutation = MUTATIONS[kind][index]
        if kind in ("int", "text"):
            values[slot] = mutation
        elif kind == "out":
            values[slot], allowed = _out_folder(mutation, box)
        else:
            values[slot] = _input_folder(kind, mutation, box, export, run)
    return [a.format(**values) if a.startswith("{") else a for a in argv], allowed


def snapshot(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for f in files:
            path = Path(dirpath) / f
            if not path.is_symlink():
                out[str(path)] = path.read_bytes()
    return out


def check(result, before: dict, after: dict, allowed: Path) -> list[str]:
    """What the rule finds wrong with one run (empty: nothing)."""
    problems = []
    if result.code not in (0, 2):
        problems.append(f"exit {result.code}" + (" (hang: killed by the timeout)" if result.code == -14 else ""))
    if "Traceback" in result.stderr:
        problems.append("traceback")
    changed = [p for p in before if after.get(p) != before[p]]
    outside = [p for p in after if p not in before and not Path(p).is_relative_to(allowed)]
    problems += [f"changed or removed {p}" for p in changed] + [f"wrote outside {allowed}: {p}" for p in outside]
    return problems


@pytest.fixture(scope="module")
def run_dir(reference, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("mutation_run") / "debug"
    shutil.copytree(reference, dest, ignore=shutil.ignore_patterns("LOCK", "final"))
    return dest


@pytest.mark.parametrize("case", chosen_cases(), ids=lambda c: f"{c[0]}-{c[1] or 'valid'}-{c[2]}")
def test_a_mutated_command_exits_cleanly_and_writes_only_its_output(runner, exported_dir, run_dir, tmp_path,  # noqa: F811
                                                                    case):
    box = tmp_path / "box"
    box.mkdir()
    export, run = box / "export", box / "run"
    shutil.copytree(exported_dir, export)
    shutil.copytree(run_dir, run)
    argv, allowed = build(case, box, export, run)
    (box / "cwd").mkdir()
    before = snapshot(box)
    result = runner.run(argv, timeout=TIMEOUT, cwd=box / "cwd")
    problems = check(result, before, snapshot(box), allowed)
    _record(case, result.code, problems)
    assert not problems, (problems, [ascii(a)[:120] for a in argv], result.stderr[-2000:])
    if not case[1]:
        assert result.code == 0, result.stderr[-2000:]  # the unmutated call works


def _record(case, code: int, problems: list[str]) -> None:
    """Append one line per case to MUTATION_LOG (when set): the counts of the README's reliability table."""
    log = os.environ.get("MUTATION_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"case": list(case), "code": code, "problems": problems}) + "\n")
