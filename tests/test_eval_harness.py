"""The lm-eval adapter: registration, the bound it returns, and local tasks end to end."""
from __future__ import annotations

import math
import re

import pytest
import torch
from test_eval_fixtures import AlignedForward, TableDenoiser, exported_dir  # noqa: F401


@pytest.fixture(scope="module")
def lm(exported_dir):  # noqa: F811
    from eval.harness import DiffusionLM

    return DiffusionLM(pretrained=str(exported_dir), mc_samples=4, mc_batch=8, gen_length=4)


@pytest.fixture(scope="module")
def task_data(exported_dir, tmp_path_factory):  # noqa: F811
    from eval.tasks.make_data import main

    out = tmp_path_factory.mktemp("task_data")
    counts = main([str(exported_dir), "--out", str(out), "--docs", "20"])
    assert all(n > 0 for n in counts.values())
    return out


def test_registered_with_lm_eval():
    import eval.harness  # noqa: F401
    from lm_eval.api.registry import get_model

    assert get_model("diffusion-lm").__name__ == "DiffusionLM"
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models stay available


def test_loglikelihood_is_the_exact_log_prob_for_a_product_denoiser(lm):
    """With a product-distribution denoiser the bound is exact; one-token continuations have no noise."""
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    logits = torch.randn(lm.max_length, vocab, generator=torch.Generator().manual_seed(0))
    table = torch.log_softmax(logits.masked_fill(lm.objective.blocked, -1e9), -1)  # never the mask or padding ids
    real = lm.forward
    lm.forward = AlignedForward(TableDenoiser(table, lm.meta.mask_token_id))
    try:
        ctx, cont = lm._split("The cat sat on the", " mat")
        ll, _ = lm.score_tokens(ctx, cont, torch.Generator().manual_seed(0), greedy=False)
        start = 1 + len(ctx)
        exact = sum(float(table[start + j, tok]) for j, tok in enumerate(cont))
        assert len(cont) == 1 and math.isclose(ll, exact, rel_tol=1e-5)
        ctx, cont = lm._split("The cat sat on the", " mat by the door")
        lls = [lm.score_tokens(ctx, cont, torch.Generator().manual_seed(s), greedy=False)[0] for s in range(8)]
        exact = sum(float(table[1 + len(ctx) + j, tok]) for j, tok in enumerate(cont))
        mean = sum(lls) / len(lls)
        se = (sum((v - mean) ** 2 for v in lls) / (len(lls) - 1) / len(lls)) ** 0.5
        assert len(cont) > 1 and abs(mean - exact) < 4 * se + 1e-6
    finally:
        lm.forward = real


def test_a_continuation_longer_than_max_length_is_scored_whole(lm):
    """Every continuation token is scored, however long: under a uniform model each costs log(allowed ids)
    whatever its context, so the bound is exactly len(cont) * log(allowed). (The adapter used to keep only
    the last max_length - 1 tokens of the continuation.)"""
    allowed = int((~lm.objective.blocked).sum())
    rows = len(lm.objective.blocked)
    real, saved = lm.forward, lm.max_length
    lm.forward = lambda ids, mask=None: torch.zeros(ids.shape[0], ids.shape[1], rows)
    lm.max_length = 8
    try:
        ctx, cont = list(range(100, 110)), list(range(200, 220))  # 20 continuation tokens, 7 fit after BOS
        ll, _ = lm.score_tokens(ctx, cont, torch.Generator().manual_seed(0), greedy=False)
        assert ll == pytest.approx(-len(cont) * math.log(allowed), rel=1e-6)
        pieces = lm.pieces(ctx, cont)
        assert [t for _, piece in pieces for t in piece] == cont  # the whole continuation, in order
        assert all(1 + len(before) + len(piece) <= lm.max_length for before, piece in pieces)
        for before, piece in pieces:  # each piece is given the text right before it
            start = len(ctx) + cont.index(piece[0])
            assert before == (ctx + cont)[start - len(before):start] and len(before) == 7 - len(piece)
        assert lm.pieces(ctx, cont[:5]) == [(ctx[-2:], cont[:5])]  # it fits: one piece, the context cut
    finally:
        lm.forward, lm.max_length = real, saved


def test_split_moves_trailing_space_to_continuation(lm):
    ctx, cont = lm._split("Paris is the capital of ", "France")
    assert lm.tokenizer.decode(ctx) == "Paris is the capital of"
    assert lm.tokenizer.decode(cont) == " France"


def test_local_tasks_end_to_end(lm, task_data, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from eval.harness import TASKS_DIR

    monkeypatch.setenv("ADAPT_EVAL_TASK_DATA", str(task_data))
    tasks = ["adapt_cloze", "adapt_choice", "adapt_documents", "adapt_cloze_gen"]
    out = simple_evaluate(model=lm, tasks=tasks, limit=3,
                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                          log_samples=False, bootstrap_iters=0)
    res = out["results"]
    assert 0.0 <= res["adapt_choice"]["acc,none"] <= 1.0
    assert 0.0 <= res["adapt_cloze"]["acc,none"] <= 1.0 and res["adapt_cloze"]["perplexity,none"] > 1.0
    assert res["adapt_documents"]["word_perplexity,none"] > 1.0
    assert 0.0 <= res["adapt_cloze_gen"]["exact_match,first_word"] <= 1.0


def test_command_line_runs_a_local_task(exported_dir, task_data, monkeypatch, tmp_path, capsys):  # noqa: F811
    """`python -m eval.harness` is lm-eval's CLI with diffusion-lm registered and eval/tasks included."""
    import sys

    from eval.harness import main

    monkeypatch.setenv("ADAPT_EVAL_TASK_DATA", str(task_data))
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() rewrites sys.argv for lm-eval's parser
    main(["--model", "diffusion-lm", "--model_args", f"pretrained={exported_dir},mc_samples=2,mc_batch=4",
          "--tasks", "adapt_cloze", "--limit", "2", "--output_path", str(tmp_path / "res")])
    out = capsys.readouterr().out
    assert "adapt_cloze" in out and "acc" in out
    assert list((tmp_path / "res").rglob("results_*.json"))


@pytest.mark.parametrize("kwargs,named", [({"max_gen_toks": 0}, "max_gen_toks=0"),
                                          ({"max_gen_toks": -3}, "max_gen_toks=-3"),
                                          ({"temperature": -1.0}, "temperature=-1.0"),
                                          ({"until": [3]}, "until=[3]")])
def test_a_task_generation_option_out_of_range_is_refused_by_name(lm, kwargs, named):
    """A task's generation_kwargs reach the model only per request: refused by name, not a sampler traceback."""
    from eval.options import EvalError

    with pytest.raises(EvalError, match=re.escape(named)):
        lm._generate_one("The cat", dict(kwargs))


def test_max_length_beyond_the_model_positions_is_refused(lm):
    from eval.harness import DiffusionLM
    from eval.options import EvalError

    positions = lm.model.config.max_position_embeddings
    with pytest.raises(EvalError, match=f"max_length={positions + 1}"):
        DiffusionLM(loaded=(lm.model, lm.tokenizer, lm.meta), max_length=positions + 1)
