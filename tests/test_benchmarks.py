"""lm-eval as the benchmark engine: local tasks run for real (offline) on a tiny model, their scores
checked against a plain computation of the same log-likelihoods; retained % by hand; errors."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch

from conftest import MC_DOCS, PPL_DOCS, load
from slice_with_mergekit.benchmarks import TaskOptions, record, retained, run_tasks
from slice_with_mergekit.cli import main as slice_main


@torch.no_grad()
def continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as a whole and split where the context's tokens end."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    assert whole[: len(ctx)] == ctx
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)  # (S, V)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def reference_mc(model, tok) -> dict[str, float]:
    """acc and acc_norm (log-likelihood per character of the choice) of local_mc, one document at a time."""
    acc = norm = 0
    for q, choices, label in MC_DOCS:
        ll = [continuation_logprob(model, tok, q, " " + c) for c in choices]
        acc += max(range(len(ll)), key=ll.__getitem__) == label
        per_char = [x / len(c) for x, c in zip(ll, choices)]
        norm += max(range(len(ll)), key=per_char.__getitem__) == label
    return {"acc": acc / len(MC_DOCS), "acc_norm": norm / len(MC_DOCS)}


@torch.no_grad()
def reference_word_perplexity(model, tok) -> float:
    """exp(-(total log-likelihood) / words) over local_ppl: lm-eval scores every token of the text as the
    tokenizer encodes it by default (here with its BOS), each after a prefix token (the BOS)."""
    nll = 0.0
    for t in PPL_DOCS:
        ids = [tok.bos_token_id] + tok(t)["input_ids"]
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)  # (S, V)
        nll -= sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))
    words = sum(len(re.split(r"\s+", t)) for t in PPL_DOCS)
    return math.exp(nll / words)


def test_local_tasks_score_what_a_plain_computation_scores(tiny_models, local_tasks, tmp_path):
    ckpt = tiny_models["llama"]
    out = tmp_path / "into"
    out.mkdir()
    assert slice_main(["evaluate", str(ckpt), "--dataset_size", "4", "--max_length", "64", "--stride", "64", "--tasks",
                       "local_mc,local_ppl", "--include_path", str(local_tasks), "--num_fewshot", "0",
                       "--output", str(out), "--name", "dense"]) == 0
    rec = json.loads((out / "eval.json").read_text())["dense"]["lm_eval"]
    import lm_eval

    assert rec["lm_eval_version"] == lm_eval.__version__
    assert rec["include_path"] == str(local_tasks) and rec["num_fewshot"] == 0 and rec["limit"] is None
    mc, ppl = rec["tasks"]["local_mc"], rec["tasks"]["local_ppl"]
    assert mc["version"] == 1.0 and mc["num_fewshot"] == 0 and mc["samples"] == len(MC_DOCS)
    assert mc["headline"] == "acc" and mc["higher_is_better"] == {"acc": True, "acc_norm": True}
    assert ppl["headline"] == "word_perplexity" and ppl["higher_is_better"]["word_perplexity"] is False
    model, tok = load(ckpt)
    ref = reference_mc(model, tok)
    assert mc["metrics"]["acc"] == pytest.approx(ref["acc"]) and mc["metrics"]["acc_norm"] == pytest.approx(ref["acc_norm"])
    assert ppl["metrics"]["word_perplexity"] == pytest.approx(reference_word_perplexity(model, tok), rel=1e-4)


def test_limit_scores_only_the_first_documents(tiny_models, local_tasks):
    model, tok = load(tiny_models["llama"])
    rec = run_tasks(model, tok, TaskOptions(tasks=["local_mc"], include_path=str(local_tasks), limit=5))
    assert rec["tasks"]["local_mc"]["samples"] == 5 and rec["limit"] == 5


def test_retained_percent_by_hand():
    def rec(acc: float, ppl: float) -> dict:
        return {"tasks": {"mc": {"metrics": {"acc": acc}, "higher_is_better": {"acc": True}, "headline": "acc"},
                          "ppl": {"metrics": {"word_perplexity": ppl}, "higher_is_better": {"word_perplexity": False},
                                  "headline": "word_perplexity"}}}

    kept = retained(rec(0.8, 10.0), rec(0.6, 20.0))
    assert kept == pytest.approx({"mc": 75.0, "ppl": 50.0, "average": 62.5})
    partial = rec(0.6, 20.0)
    del partial["tasks"]["ppl"]
    assert retained(rec(0.8, 10.0), partial) == pytest.approx({"mc": 75.0, "average": 75.0})


def test_record_leaves_out_what_is_not_a_number():
    res = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "f1,none": float("nan")}},
           "versions": {"t": 2}, "n-shot": {"t": 5}, "n-samples": {"t": {"effective": 10}},
           "higher_is_better": {"t": {"acc": True, "f1": True}}, "lm_eval_version": "x"}
    t = record(res, TaskOptions(tasks=["t"]))["tasks"]["t"]
    assert t["metrics"] == {"acc": 0.5} and t["stderr"] == {"acc": None} and t["num_fewshot"] == 5


def test_an_unknown_task_is_one_line_and_writes_nothing(tiny_models, local_tasks, tmp_path, capsys):
    out = tmp_path / "into"
    out.mkdir()
    assert slice_main(["evaluate", str(tiny_models["llama"]), "--tasks", "local_mc,no_such_task", "--include_path",
                       str(local_tasks), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tasks" in err[0] and "no_such_task" in err[0], err
    assert not (out / "eval.json").exists()
    assert slice_main(["evaluate", str(tiny_models["llama"]), "--tasks", "local_mc", "--include_path",
                       str(tmp_path / "missing")]) == 2
    assert "--include_path" in capsys.readouterr().err


def test_without_lm_eval_tasks_names_the_install(tiny_models, monkeypatch, capsys):
    from slice_with_mergekit import benchmarks

    benchmarks._manager.cache_clear()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    assert slice_main(["evaluate", str(tiny_models["llama"]), "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install" in err[0] and "lm-eval" in err[0], err
    benchmarks._manager.cache_clear()
