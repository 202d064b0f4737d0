"""Bad input the eval scripts and the harness met only after the work (or as a traceback): an output folder
that cannot be written, text that is not UTF-8, seeds and lengths out of range, harness model arguments
misspelled or of the wrong type, local tasks without their data. Each is one message and exit code 2,
before any model loads (issue 15).
"""
from __future__ import annotations

import argparse
import re
import os

import pytest
from test_eval_errors import runner  # noqa: F401 (one command runner per module)
from test_eval_fixtures import exported_dir  # noqa: F401

from adapt.cli import types as cli_types

NOT_UTF8 = b"a\xff\xfeb".decode("utf-8", "surrogateescape")
"""What Python makes of argv bytes that are not UTF-8 (on Linux: lone surrogates)."""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    (root / "a_file").write_text("not a folder\n")
    return root


def refused(result, *names: str) -> None:
    """Exit 2, no traceback, one `error:` line (or argparse's usage + error) naming each of `names`, and
    nothing loaded."""
    assert result.code == 2, (result.code, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len([ln for ln in result.stderr.splitlines() if "error:" in ln]) == 1, result.stderr[-2000:]
    for name in names:
        assert name in result.stderr, (name, result.stderr[-2000:])
    assert "loading" not in result.stderr


def out_commands(export: str, out: str) -> dict[str, list[str]]:
    """Every eval command with its output option set to `out`, and the option's name."""
    commands = {name: (["-m", f"eval.{name}", export, "--out-dir", out], "--out-dir")
                for name in ("likelihood", "generation", "infill", "speed", "local_tasks", "suite")}
    commands["compare"] = (["-m", "eval.compare", export, export, "--out-dir", out], "--out-dir")
    commands["mauve_score"] = (["-m", "eval.mauve_score", "--out-dir", out], "--out-dir")
    commands["make_data"] = (["-m", "eval.tasks.make_data", export, "--out", out], "--out")
    commands["harness"] = (["-m", "eval.harness", "--model", "diffusion-lm", "--model_args", f"pretrained={export}",
                            "--tasks", "adapt_cloze", "--output_path", out], "--output_path")
    return commands


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_work(runner, root, exported_dir, where):  # noqa: F811
    out = root / "a_file" if where == "a file" else root / "a_file" / "results"
    for name, (argv, option) in out_commands(str(exported_dir), str(out)).items():
        result = runner.run(argv)
        refused(result, option, str(root / "a_file"), "is a file, not a folder")
    assert (root / "a_file").read_text() == "not a folder\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_output_folder_is_refused(runner, root, exported_dir):  # noqa: F811
    locked = root / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused(runner.run(["-m", "eval.likelihood", str(exported_dir), "--out-dir", str(locked / "out")]),
                "--out-dir", "Permission denied")
    finally:
        locked.chmod(0o700)


def test_the_writability_check_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "new" / "deeper"
    assert cli_types.writable_dir(str(out)) == out
    assert not (tmp_path / "new").exists()


def test_text_refuses_bytes_that_are_not_utf8_and_control_characters():
    assert cli_types.text("héllo\twörld\n") == "héllo\twörld\n"
    for bad, said in ((NOT_UTF8, "byte 0xff"), ("a\x07b", "U+0007"), ("a\rb", "U+000D")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(said)):
            cli_types.text(bad)


TEXT_CASES = [  # argv (NOT_UTF8 put in) -> the option named
    (["-m", "eval.likelihood", "EXPORT", "--parent", NOT_UTF8], "--parent"),
    (["-m", "eval.generation", "EXPORT", "--judge", NOT_UTF8], "--judge"),
    (["-m", "eval.likelihood", "EXPORT", "--parent", "gpt\x1b[2J"], "--parent"),
    (["-m", "eval.mauve_score", "--featurizer", NOT_UTF8], "--featurizer"),
    (["-m", "eval.suite", "EXPORT", "--mauve-featurizer", NOT_UTF8], "--mauve-featurizer"),
    (["-m", "eval.harness", "--model", "diffusion-lm", "--model_args", "pretrained=EXPORT", "--tasks", "adapt_cloze",
      "--gen_kwargs", f"until={NOT_UTF8}"], "--gen_kwargs"),
    (["-m", "eval.harness", "--model", "diffusion-lm", "--model_args", f"pretrained={NOT_UTF8}", "--tasks",
      "adapt_cloze"], "--model_args"),
]


@pytest.mark.parametrize("argv,option", TEXT_CASES, ids=[c[1] + " " + c[0][1] for c in TEXT_CASES])
def test_text_that_is_not_utf8_is_refused_by_name(runner, root, exported_dir, argv, option):  # noqa: F811
    argv = [a.replace("EXPORT", str(exported_dir)) for a in argv]
    out = ["--output_path" if "eval.harness" in argv else "--out-dir", str(root / "out_text")]
    refused(runner.run([*argv, *out]), option)
    assert not (root / "out_text").exists()


def test_seed_is_a_signed_64_bit_integer_at_least_zero():
    assert cli_types.seed(str(2**63 - 1)) == 2**63 - 1 and cli_types.seed("0") == 0
    for bad in ("-1", str(2**63), "1e3", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli_types.seed(bad)


NUMBER_CASES = [  # (command after the module, text the message must hold)
    (["eval.likelihood", "EXPORT", "--seed", str(2**63)], "--seed"),
    (["eval.generation", "EXPORT", "--seed", "-1"], "--seed"),
    (["eval.tasks.make_data", "EXPORT", "--seed", "-1"], "--seed"),
    (["eval.generation", "EXPORT", "--length", "600"], "--length"),  # the tiny model has 512 positions
    (["eval.generation", "EXPORT", "--prompt-length", "500", "--gen-length", "100"], "--prompt-length + --gen-length"),
    (["eval.generation", "EXPORT", "--samples", str(10**9)], "--samples"),
    (["eval.likelihood", "EXPORT", "--length", str(10**9)], "--length"),
    (["eval.speed", "EXPORT", "--lengths", "16", "1000"], "--prompt-length + --lengths"),
    (["eval.infill", "EXPORT", "--left", "400", "--right", "200"], "--left + --span-length + --right"),
    (["eval.local_tasks", "EXPORT", "--limit", str(10**9)], "--limit"),
    (["eval.likelihood", "EXPORT", "--threads", str(10**20)], "--threads"),
]


@pytest.mark.parametrize("argv,named", NUMBER_CASES, ids=[" ".join(c[0][::2]) for c in NUMBER_CASES])
def test_numbers_out_of_range_are_refused_by_name(runner, root, exported_dir, argv, named):  # noqa: F811
    argv = [a.replace("EXPORT", str(exported_dir)) for a in argv]
    out = ["--out", str(root / "out_numbers")] if "make_data" in argv[0] else ["--out-dir", str(root / "out_numbers")]
    refused(runner.run(["-m", *argv, *out]), named)
    assert not (root / "out_numbers").exists()


HARNESS_CASES = [  # (--model_args beyond pretrained, --gen_kwargs, texts the message must hold)
    ("mc_sample=2", None, ["'mc_sample'", "did you mean mc_samples"]),
    ("mc_samples=abc", None, ["mc_samples='abc'", "expected int"]),
    ("mc_samples=2.5", None, ["mc_samples=2.5", "expected int"]),
    ("temperature=-1", None, ["temperature=-1"]),
    ("steps=-1", None, ["steps=-1"]),
    ("seed=-1", None, ["seed=-1"]),
    (f"seed={2**63}", None, [f"seed={2**63}"]),
    ("gen_length=0", None, ["gen_length=0"]),
    ("max_length=1", None, ["max_length=1"]),
    ("mc_batch=0,samplr=confidence", None, ["mc_batch=0", "did you mean sampler"]),
    ("", "max_gen_toks=-1", ["--gen_kwargs max_gen_toks=-1"]),
    ("", "max_gen_toks=0", ["--gen_kwargs max_gen_toks=0"]),
    ("", "temperature=-0.5", ["--gen_kwargs temperature=-0.5"]),
    ("", "max_gen_toks=abc", ["max_gen_toks='abc'", "expected int"]),
]


@pytest.mark.parametrize("model_args,gen_kwargs,named", HARNESS_CASES,
                         ids=[c[0] or c[1] for c in HARNESS_CASES])
def test_harness_model_and_generation_arguments_are_checked(runner, root, exported_dir, model_args, gen_kwargs,  # noqa: F811
                                                            named):
    argv = ["-m", "eval.harness", "--model", "diffusion-lm", "--model_args",
            ",".join(filter(None, [f"pretrained={exported_dir}", model_args])), "--tasks", "adapt_cloze",
            "--output_path", str(root / "out_harness")]
    result = runner.run(argv + (["--gen_kwargs", gen_kwargs] if gen_kwargs else []))
    refused(result, *named)
    assert "not supported between" not in result.stderr
    assert not (root / "out_harness").exists()


def test_diffusion_lm_refuses_an_unknown_argument_before_loading():
    from eval.harness import DiffusionLM
    from eval.options import EvalError

    with pytest.raises(EvalError, match="did you mean mc_samples"):
        DiffusionLM(pretrained="no_such_folder", mc_sample=2)


@pytest.mark.parametrize("tasks,file", [("adapt_cloze", "cloze.jsonl"), ("adapt_local", "documents.jsonl")])
def test_local_tasks_without_their_data_name_the_command_that_makes_it(runner, root, exported_dir, tasks, file):  # noqa: F811
    empty = root / "no_task_data"
    empty.mkdir(exist_ok=True)
    argv = ["-m", "eval.harness", "--model", "diffusion-lm", "--model_args", f"pretrained={exported_dir}",
            "--tasks", tasks, "--output_path", str(root / "out_data")]
    refused(runner.run(argv, env={"ADAPT_EVAL_TASK_DATA": str(empty)}), file, str(empty),
            f"python -m eval.tasks.make_data MODEL_DIR --out {empty}")
    assert not (root / "out_data").exists()
