"""Progress lines with an ETA for the long evaluations: a line every tenth and every 30 s (on a fake clock),
none for a quick loop or on other ranks, and the estimators' numbers unchanged when they report progress."""
from __future__ import annotations

import io
import re

import torch
from conftest import tiny_llama

from adapt.objectives.diffusion import blocked_vocab
from adapt.train.likelihood import batch_count, causal_nll, heldout_bound, replicate_estimates
from adapt.train.metrics import Progress
from adapt.objectives import MaskedDiffusion, ModelForward

TIME = r"\d+h\d\dm|\d+m\d\ds"
LINE = re.compile(rf"^(?P<label>[\w ()]+): (?P<done>\d+)/(?P<total>\d+) batches, (?:{TIME}) elapsed, "
                  rf"ETA (?P<eta>{TIME})$")


class Clock:
    """A clock that moves `step` seconds at every reading."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def parsed(text: str) -> list[re.Match]:
    lines = text.splitlines()
    matches = [LINE.match(line) for line in lines]
    assert lines and all(matches), lines
    return matches


def test_a_line_every_tenth_with_an_eta():
    out = io.StringIO()
    bar = Progress("eval bound", 20, stream=out, delay_s=0, clock=Clock(1.0))
    for _ in range(20):
        bar.update()
    lines = parsed(out.getvalue())
    assert [int(m["done"]) for m in lines] == list(range(2, 21, 2))
    etas = [int(m["eta"][:-4]) * 60 + int(m["eta"][-3:-1]) for m in lines]  # "0m18s"
    assert etas[0] == 18 and etas[-1] == 0 and etas == sorted(etas, reverse=True)  # 1 s a batch, 18 to go


def test_a_line_at_least_every_30_seconds():
    out = io.StringIO()
    bar = Progress("parent perplexity", 1000, stream=out, delay_s=0, clock=Clock(10.0))
    for _ in range(60):
        bar.update()
    done = [int(m["done"]) for m in parsed(out.getvalue())]
    assert done == list(range(3, 61, 3))  # every third 10-s batch, long before the first tenth (100)


def test_quiet_when_quick_or_not_rank_zero():
    out = io.StringIO()
    for bar in (Progress("x", 10, stream=out, clock=Clock(0.01)), Progress("x", 10, stream=out, enabled=False,
                                                                          delay_s=0, clock=Clock(100.0))):
        for _ in range(10):
            bar.update()
    assert out.getvalue() == ""


def test_estimators_report_progress_and_keep_their_numbers():
    V = 40
    model = tiny_llama(V)
    blocked = blocked_vocab(V, V - 1, V - 1)
    objective = MaskedDiffusion(V - 1, True, blocked)
    forward = ModelForward(model, "cpu")
    x0 = torch.randint(3, V - 1, (5, 12), generator=torch.Generator().manual_seed(0))
    scored = objective.scored(x0)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    out = io.StringIO()
    bar = Progress("eval bound", batch_count(5, 4, 3, split=True), stream=out, delay_s=0)
    with_lines = heldout_bound(objective, forward, x0, scored, 4, "count", gen(), 3, progress=bar)
    assert with_lines == heldout_bound(objective, forward, x0, scored, 4, "count", gen(), 3)
    lines = parsed(out.getvalue())
    assert [int(m["done"]) for m in lines] == list(range(1, 8)) and {int(m["total"]) for m in lines} == {7}
    out = io.StringIO()
    bar = Progress("ELBO replicates", 2 * batch_count(5, 4, 3), stream=out, delay_s=0)
    est = replicate_estimates(objective, forward, x0, scored, 4, "stratified", 2, gen(), 3, bar)
    assert torch.equal(est, replicate_estimates(objective, forward, x0, scored, 4, "stratified", 2, gen(), 3))
    assert int(parsed(out.getvalue())[-1]["done"]) == 14
    out = io.StringIO()
    causal = lambda x, mask=None: model(input_ids=x).logits  # noqa: E731 - the tiny Llama is causal as built
    nll = causal_nll(causal, x0, blocked, 2, progress=Progress("parent perplexity", 3, stream=out, delay_s=0))
    assert torch.equal(nll, causal_nll(causal, x0, blocked, 2))
    assert [int(m["done"]) for m in parsed(out.getvalue())] == [1, 2, 3]
