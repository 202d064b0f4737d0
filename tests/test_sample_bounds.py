"""adapt.sample over inputs a user can push to extremes: every loop bounded by the work it has, canvases the model has
no positions for refused with both numbers, seeds and prompts checked at parse time (exit 2, no traceback)."""
from __future__ import annotations

import pytest
import torch
from cli_runner import CliRunner
from test_eval_fixtures import exported_dir  # noqa: F401

from adapt.decode import capped_steps, generate
from test_sampling import ExactPairDenoiser, canvas


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    cli = CliRunner(tmp_path_factory.mktemp("cli"))
    yield cli
    cli.close()


def test_steps_are_capped_at_what_the_positions_need():
    generated = torch.tensor([[False, True, True], [True, False, False]])
    assert capped_steps(None, generated, "ancestral") == 2
    assert capped_steps(10**9, generated, "confidence") == 2
    assert capped_steps(10**9, generated, "ancestral") == 2 * 256
    assert capped_steps(3, generated, "ancestral") == 3


def test_a_committing_sampler_gives_the_same_output_with_any_number_of_steps_past_the_positions():
    joint = torch.full((5, 5), 1 / 25)
    outs = [generate(ExactPairDenoiser(joint), canvas(8, 3), "confidence", steps=steps,
                     generator=torch.Generator().manual_seed(0)).ids for steps in (2, 10**12)]
    assert torch.equal(*outs)


def test_an_enormous_step_count_finishes(runner, exported_dir):  # noqa: F811
    result = runner.run(["-m", "adapt.sample", str(exported_dir), "--length", "4", "--steps", "1000000000"],
                        timeout=120)
    assert result.code == 0, result.stderr[-2000:]
    assert "steps_run=" in result.stderr and "=== sample 1/1 ===" in result.stdout


@pytest.mark.parametrize("argv,named", [
    (["--length", "100000"], ["--length 100000", "512 positions"]),
    (["--prompt", "word " * 600, "--length", "4"], ["512 positions", "the canvas is"]),
    (["--infill", "a <mask:99999999999999999999> b"], ["<mask:99999999999999999999>", "512 positions"]),
    (["--seed", str(2**63)], ["--seed", "2**63"]),
    (["--seed", "-1"], ["--seed"]),
    (["--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")], ["--prompt", "UTF-8"]),
    (["--prompt", "a\x07b"], ["--prompt", "control character"]),
    (["--num-samples", str(10**9), "--length", "4"], ["--num-samples", "GiB"]),
])
def test_an_input_beyond_what_the_model_or_machine_can_take_is_refused(runner, exported_dir, argv, named):  # noqa: F811
    result = runner.run(["-m", "adapt.sample", str(exported_dir), *argv], timeout=120)
    assert result.code == 2, (result.code, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    for text in named:
        assert text in result.stderr, (text, result.stderr[-2000:])
