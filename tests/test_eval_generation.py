"""Diversity statistics, judge perplexity and eval.generation on known answers."""
from __future__ import annotations

import json
import math

import pytest
import torch
from test_eval_fixtures import common_args, ctx, exported_dir  # noqa: F401

from eval.diversity import diversity, repetition_rate, unigram_entropy, unique_unigram_fraction
from eval.judge import perplexity_summary


def test_diversity_on_hand_made_lists():
    assert unique_unigram_fraction([1, 2, 3, 4]) == 1.0
    assert unique_unigram_fraction([5, 5, 5, 5]) == 0.25
    assert unigram_entropy([7, 7, 7]) == 0.0
    assert math.isclose(unigram_entropy([1, 2, 3, 4]), math.log(4))
    assert math.isclose(unigram_entropy([1, 1, 2, 3]), -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert repetition_rate([1, 2, 3, 4]) == 0.0
    assert repetition_rate([9, 9, 9, 9]) == 0.75  # every token but the first repeats
    # window 2: the second 1 is 3 tokens after the first (out of the window); the 3 repeats within it
    assert repetition_rate([1, 2, 3, 3, 1], window=2) == 0.2
    assert repetition_rate([1, 2, 3, 3, 1], window=100) == 0.4
    stats = diversity([[1, 2, 3, 4], [5, 5, 5, 5]])
    assert stats["sequences"] == 2 and math.isclose(stats["unique_unigrams"], 0.625)
    assert math.isclose(stats["unique_unigrams_std"], math.sqrt(2 * 0.375 ** 2))
    with pytest.raises(ValueError):
        diversity([])


def test_perplexity_is_exp_of_mean_token_nll():
    """001 appendix A.1: exp(mean NLL) over all tokens, not the mean of per-sequence perplexities."""
    nlls = [torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0, 2.0, 2.0])]
    s = perplexity_summary(nlls)
    assert math.isclose(s["ppl"], math.exp(12 / 6)) and s["tokens"] == 6
    assert math.isclose(s["ppl_seq_mean"], (math.exp(2.0) + math.exp(2.0)) / 2)


def test_judge_scores_known_text_at_its_exact_perplexity(ctx):  # noqa: F811
    """Generative perplexity of held-out text under the judge = the judge's exact perplexity of it."""
    from eval.heldout import heldout_sequences

    blocks = heldout_sequences(ctx.data, ctx.tokenizer, 24, 3)
    judge = ctx.judge()
    summary = judge.perplexity(blocks[:, :1].tolist(), blocks[:, 1:].tolist(), batch_size=2)
    with torch.no_grad():
        loss = judge.model(input_ids=blocks, labels=blocks).loss
    assert math.isclose(summary["ppl"], math.exp(float(loss)), rel_tol=1e-4)
    # a prompt moves tokens from the scored part to the context: the scored count follows
    part = judge.perplexity(blocks[:, :8].tolist(), blocks[:, 8:].tolist())
    assert part["tokens"] == 3 * 16
    # ragged lengths in one batch (right padding) give the same numbers as one at a time
    ragged = [blocks[0, 1:].tolist(), blocks[1, 1:10].tolist()]
    together = judge.token_nll([[blocks[0, 0].item()]] * 2, ragged, batch_size=2)
    alone = [judge.token_nll([[blocks[0, 0].item()]], [r], batch_size=1)[0] for r in ragged]
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(together, alone))


def test_generation_script_runs_and_plots(ctx, tmp_path):  # noqa: F811
    from eval import generation

    args = common_args(ctx.model_dir, tmp_path, samplers=["ancestral", "confidence"], steps=[2, 4], samples=2,
                       length=12, prompt_length=6, gen_length=8, modes=["unconditional", "prompted"],
                       temperature=1.0, top_p=0.95, batch_size=2, window=100)
    from eval.cli import execute

    result = execute(generation.SCRIPT, ctx, args)
    assert len(result["runs"]) == 2 * 2 * 2
    assert {r["source"] for r in result["references"]} == {"heldout", "parent", "parent_top_p_0.95"}
    for row in result["runs"]:
        assert row["gen_ppl"]["tokens"] == 2 * (12 if row["mode"] == "unconditional" else 8)
        assert 0 < row["nfe_per_batch"] <= row["steps"]
    saved = json.loads((tmp_path / "generation.json").read_text())
    assert saved["runs"][0]["examples"] and (tmp_path / "generation.png").stat().st_size > 1000
    lines = (tmp_path / "generation_samples.jsonl").read_text().splitlines()
    assert len(lines) == (8 + 6) * 2


def test_the_parents_reference_samples_share_the_temperature(ctx, tmp_path):  # noqa: F811
    """At --temperature 0 the parent's reference samples are its greedy continuations (both references alike:
    nucleus filtering does not move an argmax), as the diffusion samplers' are greedy."""
    from eval import generation
    from eval.cli import execute
    from eval.models import parent_sample

    args = common_args(ctx.model_dir, tmp_path, samplers=["confidence"], steps=[4], samples=2, length=12,
                       prompt_length=6, gen_length=8, modes=["prompted"], temperature=0.0, top_p=0.95,
                       batch_size=2, window=100)
    result = execute(generation.SCRIPT, ctx, args)
    prefix, real = generation.prefixes(ctx, "prompted", args)
    greedy = parent_sample(ctx.parent(), prefix, real.shape[1], seed=5, temperature=0.0)[:, prefix.shape[1]:]
    texts = {r["source"]: r["examples"] for r in result["references"]}
    want = [ctx.tokenizer.decode(row) for row in greedy]
    assert texts["parent"] == texts["parent_top_p_0.95"] == want
    assert all(r["temperature"] == 0.0 for r in result["references"] if r["source"] != "heldout")


def test_parent_sample_length_and_greedy(ctx):  # noqa: F811
    """Exactly new_tokens tokens even when the model's generation config would stop at any token;
    temperature 0 is the argmax chain."""
    from eval.heldout import heldout_sequences
    from eval.models import parent_sample

    parent = ctx.parent()
    prompt = heldout_sequences(ctx.data, ctx.tokenizer, 5, 2)
    saved = parent.generation_config.eos_token_id
    parent.generation_config.eos_token_id = list(range(parent.config.vocab_size))  # every token ends a row
    try:
        out = parent_sample(parent, prompt, 6, seed=0, top_p=0.95)
    finally:
        parent.generation_config.eos_token_id = saved
    assert out.shape == (2, 5 + 6) and torch.equal(out[:, :5], prompt)
    greedy = parent_sample(parent, prompt, 3, seed=0, temperature=0.0)
    x = prompt
    with torch.no_grad():
        for _ in range(3):
            x = torch.cat([x, parent(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, x)
