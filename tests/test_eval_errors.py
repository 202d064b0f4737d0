"""Every eval script and the harness wrapper over bad inputs: exit code 2, one message naming the input,
no traceback, nothing written (issue 15, part 1).

Each command runs in its own process (tests/cli_runner.py: forked from one that imported the libraries
once); two run in a fresh interpreter as well, the harness through the installed `adapt-lm-eval`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_runner import CliRunner, run_fresh
from test_eval_fixtures import exported_dir  # noqa: F401

MODEL_SCRIPTS = ["likelihood", "generation", "infill", "speed", "local_tasks", "suite"]
"""Scripts of the shape `python -m eval.<name> MODEL_DIR [options]`."""


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    cli = CliRunner(tmp_path_factory.mktemp("cli"))
    yield cli
    cli.close()


@pytest.fixture(scope="module")
def inputs(exported_dir, tiny_model_dir, tmp_path_factory):  # noqa: F811
    """Named bad inputs: folders a user will try that are not exports, and an empty data file."""
    from adapt.train import checkpoint
    from adapt.export import META_FILE

    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    (run / "base").mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", META_FILE):
        shutil.copy(exported_dir / name, run / "base" / name)
    step = run / "checkpoints" / checkpoint.tag_for(10)
    step.mkdir(parents=True)
    (step / checkpoint.COMPLETE).write_text("10\n")
    (root / "empty.txt").write_text("")
    return {"missing": str(root / "no_such_model"), "parent": str(tiny_model_dir), "base": str(run / "base"),
            "checkpoint": str(step), "export": str(exported_dir), "empty": str(root / "empty.txt"),
            "root": root, **damaged_exports(exported_dir, root)}


def damaged_exports(export: Path, root: Path) -> dict[str, str]:
    """Copies of a good export, each broken one way: weights truncated or overwritten, diffusion.json or
    config.json disagreeing with the weights."""
    import json

    from adapt.export import META_FILE, WEIGHTS_FILE

    out = {}
    for name in ("truncated", "corrupt", "mask_id", "vocab"):
        shutil.copytree(export, root / name)
        out[name] = str(root / name)
    weights = root / "truncated" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    weights = root / "corrupt" / WEIGHTS_FILE
    weights.write_bytes(b"\xff" * 64 + weights.read_bytes()[64:])
    meta = json.loads((export / META_FILE).read_text())
    (root / "mask_id" / META_FILE).write_text(json.dumps(meta | {"mask_token_id": 10**6}))
    config = json.loads((export / "config.json").read_text())
    (root / "vocab" / "config.json").write_text(json.dumps(config | {"vocab_size": config["vocab_size"] + 64}))
    return out


PATH_CASES = {  # bad folder -> what the message must say beyond naming it
    "missing": "not found",
    "parent": "not an exported diffusion model",
    "base": "python -m adapt.export",
    "checkpoint": "python -m adapt.export",
    "truncated": "corrupt or truncated",
    "corrupt": "corrupt or truncated",
    "mask_id": "mask_token_id=1000000",
    "vocab": "vocab_size",
}


def _path_commands(bad: str, export: str, out: Path) -> dict[str, list[str]]:
    commands = {name: ["-m", f"eval.{name}", bad, "--out-dir", str(out)] for name in MODEL_SCRIPTS}
    commands["compare (first)"] = ["-m", "eval.compare", bad, export, "--out-dir", str(out)]
    commands["compare (second)"] = ["-m", "eval.compare", export, bad, "--out-dir", str(out)]
    commands["make_data"] = ["-m", "eval.tasks.make_data", bad, "--out", str(out)]
    commands["adapt.sample"] = ["-m", "adapt.sample", bad, "--prompt", "hi", "--length", "4"]
    commands["harness"] = ["-m", "eval.harness", "--model", "diffusion-lm", "--model_args", f"pretrained={bad}",
                           "--tasks", "adapt_cloze", "--output_path", str(out)]
    return commands


FLAG_CASES = [  # (script, options, text the message must hold)
    ("generation", ["--samplers", "nosuch"], "nosuch"),
    ("infill", ["--samplers", "ancestral", "nosuch"], "nosuch"),
    ("speed", ["--samplers", "nosuch"], "nosuch"),
    ("generation", ["--steps", "4", "0"], "--steps"),
    ("infill", ["--steps", "-1"], "--steps"),
    ("speed", ["--steps", "-1"], "--steps"),
    ("likelihood", ["--length", "0"], "--length"),
    ("generation", ["--length", "0"], "--length"),
    ("likelihood", ["--t-samples", "0"], "--t-samples"),
    ("likelihood", ["--replicates", "1"], "--replicates"),
    ("likelihood", ["--blocks", "0"], "--blocks"),
    ("likelihood", ["--methods", "nosuch"], "nosuch"),
    ("generation", ["--top-p", "1.5"], "--top-p"),
    ("generation", ["--temperature", "-1"], "--temperature"),
    ("infill", ["--span-length", "0"], "--span-length"),
    ("speed", ["--lengths", "0"], "--lengths"),
    ("speed", ["--repeats", "x"], "--repeats"),
    ("local_tasks", ["--tasks", "nosuch"], "nosuch"),
    ("local_tasks", ["--limit", "0"], "--limit"),
    ("suite", ["--budget", "nosuch"], "nosuch"),
    ("suite", ["--skip", "nosuch"], "nosuch"),
    ("likelihood", ["--device", "tpu"], "tpu"),
    ("likelihood", ["--device", "cuda:7"], "cuda:7"),
    ("likelihood", ["--dtype", "fp8"], "fp8"),
]


def _assert_refused(result, names: list[str], out: Path) -> None:
    assert result.code == 2, (result.code, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for name in names:
        assert name in result.stderr, (name, result.stderr[-2000:])
    assert not out.exists(), f"{out} was written"


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_a_folder_that_is_not_an_export_is_refused_by_every_command(runner, inputs, case):
    for command, argv in _path_commands(inputs[case], inputs["export"], inputs["root"] / f"out_{case}").items():
        result = runner.run(argv)
        _assert_refused(result, [inputs[case], PATH_CASES[case]], inputs["root"] / f"out_{case}")
        assert len([ln for ln in result.stderr.splitlines() if ln.startswith("error:")]) == 1, command


@pytest.mark.parametrize("script,options,named", FLAG_CASES, ids=[f"{s} {' '.join(o)}" for s, o, _ in FLAG_CASES])
def test_an_option_out_of_range_is_refused_before_loading(runner, inputs, script, options, named):
    out = inputs["root"] / "out_flags"
    result = runner.run(["-m", f"eval.{script}", inputs["export"], "--out-dir", str(out), *options])
    _assert_refused(result, [named], out)
    assert "loading" not in result.stderr  # refused at parse time


@pytest.mark.parametrize("command", ["likelihood", "generation", "infill", "speed", "local_tasks", "suite",
                                     "compare", "make_data"])
def test_an_empty_data_file_is_refused(runner, inputs, command):
    out = inputs["root"] / "out_empty"
    if command == "make_data":
        argv = ["-m", "eval.tasks.make_data", inputs["export"], "--out", str(out)]
    else:
        argv = ["-m", f"eval.{command}", inputs["export"], *([inputs["export"]] if command == "compare" else []),
                "--out-dir", str(out)]
    _assert_refused(runner.run([*argv, "--data-files", inputs["empty"]]), [inputs["empty"]], out)


def test_other_bad_inputs_of_the_harness_and_the_text_scripts(runner, inputs):
    root, export = inputs["root"], inputs["export"]
    harness = ["-m", "eval.harness", "--model", "diffusion-lm", "--output_path", str(root / "out_h")]
    cases = [
        ([*harness, "--model_args", f"pretrained={export},sampler=nosuch", "--tasks", "adapt_cloze"], ["nosuch"]),
        ([*harness, "--model_args", f"pretrained={export},mc_samples=0", "--tasks", "adapt_cloze"], ["mc_samples"]),
        ([*harness, "--tasks", "adapt_cloze"], ["pretrained=PATH"]),
        ([*harness, "--model_args", f"pretrained={export}", "--tasks", "no_such_task"], ["no_such_task"]),
        (["-m", "eval.mauve_score", str(root / "no_samples.jsonl"), "--out-dir", str(root / "out_h")],
         [str(root / "no_samples.jsonl")]),
        (["-m", "eval.mauve_score", "--seeds", "0", "--out-dir", str(root / "out_h")], ["--seeds"]),
        (["-m", "eval.report", str(root / "no_results")], [str(root / "no_results")]),
    ]
    for argv, names in cases:
        _assert_refused(runner.run(argv), names, root / "out_h")


def test_a_fresh_interpreter_gives_the_same_answer(inputs, tmp_path):
    """The real start-up: `python -m eval.generation` and the installed `adapt-lm-eval` (issue 15's examples)."""
    for argv in (["-m", "eval.generation", inputs["missing"], "--out-dir", str(tmp_path / "out")],
                 ["adapt-lm-eval", "--model", "diffusion-lm", "--model_args", f"pretrained={inputs['missing']}",
                  "--tasks", "adapt_local", "--output_path", str(tmp_path / "out")]):
        _assert_refused(run_fresh(argv), [inputs["missing"], "not found"], tmp_path / "out")


SAMPLE_CASES = [  # adapt.sample options -> text the message must hold
    (["--length", "-1"], "--length"),
    (["--steps", "0"], "--steps"),
    (["--block-length", "0"], "--block-length"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--tau", "1.5"], "--tau"),
    (["--top-k", "0"], "--top-k"),
    (["--num-samples", "0"], "--num-samples"),
    (["--sampler", "nosuch"], "nosuch"),
    (["--device", "tpu"], "tpu"),
    (["--length", "0"], "--length"),
    (["--infill", "no marker here"], "no marker here"),
    (["--text", "The cat sat.", "--mask-range", "1:99"], "1:99"),
    (["--text", "The cat sat.", "--mask-range", "a:b"], "a:b"),
    (["--text", "The cat sat."], "--mask-range"),
    (["--infill", "The <mask>.", "--prompt", "x"], "--infill"),
    (["--trajectory-out", "order.gif"], "order.gif"),
    (["--sampler", "speculative"], "block-diffusion export"),  # a whole-sequence export has no causal stream
    (["--sampler", "chain"], "block-diffusion export"),  # nor drafts to chain
]


@pytest.mark.parametrize("options,named", SAMPLE_CASES, ids=[" ".join(o) for o, _ in SAMPLE_CASES])
def test_adapt_sample_refuses_bad_options(runner, inputs, options, named):
    result = runner.run(["-m", "adapt.sample", inputs["export"], *options])
    _assert_refused(result, [named], inputs["root"] / "no_output_expected")
    assert "===" not in result.stdout  # no sample was printed


def test_adapt_run_export_and_estimate_refuse_bad_inputs(runner, inputs):
    root, recipe = inputs["root"], str(Path(__file__).resolve().parent.parent / "recipes" / "debug.yaml")
    runs = f"run.output_dir={root / 'no_output_expected'}"
    cases = [
        (["adapt/run.py", str(root / "no_such.yaml")], [str(root / "no_such.yaml")]),
        (["adapt/run.py", recipe, "train.max_stpes=3", runs], ["train.max_steps"]),
        (["adapt/run.py", recipe, f"model.name_or_path={inputs['missing']}", runs], [inputs["missing"]]),
        (["adapt/run.py", recipe, f"model.name_or_path={inputs['base']}", runs], ["model.name_or_path"]),
        (["adapt/run.py", recipe, "dist.timeout_s=0", runs], ["dist.timeout_s"]),
        (["adapt/run.py", recipe, f"data.train_files=[{inputs['empty']}]", runs], [inputs["empty"]]),
        (["-m", "adapt.export", inputs["missing"]], [inputs["missing"]]),
        (["-m", "adapt.export", inputs["export"]], [inputs["export"], "no complete checkpoint"]),
        (["-m", "adapt.export", str(Path(inputs["checkpoint"]).parent.parent), "--tag", "step_9"], ["step_9"]),
        (["-m", "adapt.estimate", str(root / "no_such.yaml")], [str(root / "no_such.yaml")]),
        (["-m", "adapt.estimate", recipe, "train.max_stpes=3"], ["train.max_steps"]),
        (["-m", "adapt.estimate", recipe, "--model-config", inputs["missing"]], [inputs["missing"]]),
        (["-m", "adapt.estimate", recipe, "--nodes", "0"], ["--nodes"]),
    ]
    for argv, names in cases:
        _assert_refused(runner.run(argv), names, root / "no_output_expected")
