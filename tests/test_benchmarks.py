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

from slice_with_mergekit.benchmarks import TaskOptions, record, retained, run_tasks, task_batch
from slice_with_mergekit.records import TasksRecord
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
    rec = json.loads((out / "eval.json").read_text())["models"]["dense"]["lm_eval"]
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
    assert rec.tasks["local_mc"].samples == 5 and rec.limit == 5


def test_a_large_vocabulary_shrinks_the_lm_eval_batch():
    # 16 rows x 512 tokens x 262,144 x 4 bytes x 4 copies = 32 GiB: killed on a 24 GiB machine; 4 rows fit 8 GiB
    assert task_batch(16, 262_144) == 4 and task_batch(16, 49_152) == 16 and task_batch(2, 262_144) == 2
    assert task_batch(16, 10**9) == 1


def test_retained_percent_by_hand():
    def rec(acc: float, ppl: float) -> TasksRecord:
        return TasksRecord.model_validate(
            {"tasks": {"mc": {"metrics": {"acc": acc}, "higher_is_better": {"acc": True}, "headline": "acc"},
                       "ppl": {"metrics": {"word_perplexity": ppl}, "higher_is_better": {"word_perplexity": False},
                               "headline": "word_perplexity"}}})

    kept = retained(rec(0.8, 10.0), rec(0.6, 20.0))
    assert kept == pytest.approx({"mc": 75.0, "ppl": 50.0, "average": 62.5})
    partial = rec(0.6, 20.0)
    del partial.tasks["ppl"]
    assert retained(rec(0.8, 10.0), partial) == pytest.approx({"mc": 75.0, "average": 75.0})


def test_record_leaves_out_what_is_not_a_number():
    res = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "f1,none": float("nan")}},
           "versions": {"t": 2}, "n-shot": {"t": 5}, "n-samples": {"t": {"effective": 10}},
           "higher_is_better": {"t": {"acc": True, "f1": True}}, "lm_eval_version": "x"}
    t = record(res, TaskOptions(tasks=["t"])).tasks["t"]
    assert t.metrics == {"acc": 0.5} and t.stderr == {"acc": None} and t.num_fewshot == 5
    assert t.subtask_of is None


def test_a_groups_subtasks_do_not_count_twice_in_retained():
    def res(group: float, a: float, b: float) -> dict:
        r = {n: {"acc,none": v} for n, v in (("mmlu", group), ("mmlu_a", a), ("mmlu_b", b))}
        return {"results": r, "group_subtasks": {"mmlu": ["mmlu_a", "mmlu_b"]},
                "higher_is_better": {n: {"acc": True} for n in r}}

    dense, pruned = (record(res(*v), TaskOptions(tasks=["mmlu"])) for v in ((0.5, 0.4, 0.6), (0.25, 0.1, 0.4)))
    assert pruned.tasks["mmlu_a"].subtask_of == "mmlu"
    assert retained(dense, pruned) == pytest.approx({"mmlu": 50.0, "average": 50.0})


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


def front_matter(card: str) -> dict:
    import yaml

    return yaml.safe_load(card.split("---")[1])


def test_prune_reports_every_model_and_baseline_with_retained_percent(tiny_models, local_tasks, tmp_path):
    w = tmp_path / "w"
    assert slice_main(["prune", str(tiny_models["llama"]), "--layers_to_skip", "2", "--dataset_size", "24",
                       "--eval_size", "6", "--max_length", "64", "--tasks", "local_mc,local_ppl", "--include_path",
                       str(local_tasks), "--baselines", "deepest,deepest+bridge,angle", "--heal", "--heal_steps", "2",
                       "--heal_eval_every", "1", "--heal_seq_len", "32", "--heal_batch_size", "2",
                       "--work_dir", str(w)]) == 0
    report = (w / "report.md").read_text()
    dense = TasksRecord.load(w / "source_tasks.json")
    assert (w / "n2-deepest" / "sliced.yml").exists() and (w / "n2-deepest+bridge" / "sliced.yml").exists()
    assert "| deepest | 2 | [3, 5) | [0, 3), [5, 6) | none |" in report  # 6 layers: the two before the last, plain
    assert "| deepest+bridge | 2 | [3, 5) | [0, 3), [5, 6) | linear |" in report  # the same, with our bridge
    table = report.split("## Models side by side")[1].split("\n## ")[0]
    assert table.count("| dense |") == 1
    rows = [line for line in table.splitlines() if line.startswith("| ours") or line.startswith("| deepest")]
    # cut, repaired, healed for ours; repaired, healed for deepest+bridge (its cut is deepest's, printed once); cut,
    # healed for deepest
    assert len(rows) == 7, table
    assert not (w / "n2-deepest" / "tasks_repaired.json").exists()
    for name, d, forms in (("ours", w / "n2", ("cut", "repaired", "healed")),
                           ("deepest+bridge", w / "n2-deepest+bridge", ("cut", "repaired", "healed")),
                           ("deepest", w / "n2-deepest", ("cut", "healed"))):
        for form in forms:
            rec = TasksRecord.load(d / f"tasks_{form}.json")
            kept = retained(dense, rec)
            if (name, form) == ("deepest+bridge", "cut"):  # the same layers as deepest's cut: one row
                assert not any(r.startswith("| deepest+bridge n=2, cut |") for r in rows)
                continue
            line = next(r for r in rows if r.startswith(f"| {name} n=2, {form} |"))
            acc = rec.tasks["local_mc"].metrics["acc"]
            assert f"{acc:.4f}" in line and f"{kept['average']:.1f} %" in line, (line, kept)
    # every artifact the job wrote reads back through its typed record
    from slice_with_mergekit.records import HealRecord, PerplexityRecord, Selection, load_eval
    from slice_with_mergekit.repair_record import load_repair

    assert PerplexityRecord.load(w / "source_eval.json").tokens_scored > 0
    sel = Selection.load(Selection.beside(w / "n2" / "sliced.yml"))
    assert len(sel.removed) == 2 and sel.candidates
    assert HealRecord.load(w / "n2" / "healed" / "heal.json").ledger.optimizer_steps == 2
    assert load_eval(w / "n2" / "model" / "eval.json", missing_ok=False).models["repaired"].lm_eval == \
        TasksRecord.load(w / "n2" / "tasks_repaired.json")
    assert load_repair(w / "n2" / "model" / "repair.safetensors")[0].bridges
    # the in-memory cut scores what the plain checkpoint of the same plan would; the repaired one differs
    cut = json.loads((w / "n2" / "tasks_cut.json").read_text())["tasks"]["local_ppl"]["metrics"]["word_perplexity"]
    rep = json.loads((w / "n2" / "tasks_repaired.json").read_text())["tasks"]["local_ppl"]["metrics"]["word_perplexity"]
    assert cut != rep
    # the healing ledger: heal.json, the report, the card
    g = json.loads((w / "n2" / "healed" / "heal.json").read_text())["ledger"]
    assert g["optimizer_steps"] == 2 and g["training_tokens"] == 2 * 2 * 32 and g["wall_s"] > 0
    assert g["device"] == "cpu" and g["precision"] == "float32" and "split train" in g["data"]
    assert [h["step"] for h in g["history"]] == [0, 1, 2]
    assert "## Healing ledger" in report and f"| ours n=2 | 2 | {2 * 2 * 32:,} |" in report
    # the card: the healed checkpoint's own figures in model-index, beside the human tables
    card = (w / "n2" / "healed" / "README.md").read_text()
    assert "## Healing" in card and "retained %" in card
    results = front_matter(card)["model-index"][0]["results"]
    got = {(r["dataset"]["name"], m["type"]): m["value"] for r in results for m in r["metrics"]}
    healed = json.loads((w / "n2" / "healed" / "eval.json").read_text())
    rec = json.loads((w / "n2" / "tasks_healed.json").read_text())
    assert got[("local_mc", "acc")] == pytest.approx(rec["tasks"]["local_mc"]["metrics"]["acc"])
    assert got[("local_ppl", "word_perplexity")] == pytest.approx(rec["tasks"]["local_ppl"]["metrics"]["word_perplexity"])
    ppl = next(v for (ds, m), v in got.items() if m == "perplexity")
    assert ppl == pytest.approx(healed["models"]["healed"]["perplexity"])
    repaired_card = front_matter((w / "n2" / "model" / "README.md").read_text())["model-index"][0]["results"]
    ppl = next(m["value"] for r in repaired_card for m in r["metrics"] if m["type"] == "perplexity")
    assert ppl == pytest.approx(healed["models"]["repaired"]["perplexity"])


def test_baselines_are_checked_by_name(tiny_models, tmp_path, capsys):
    assert slice_main(["prune", str(tiny_models["llama"]), "--baselines", "deepest,shallowest",
                       "--work_dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "--baselines" in err and "shallowest" in err and not (tmp_path / "w").exists()


def test_a_hub_task_offline_is_one_line_naming_include_path(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "into"
    out.mkdir()
    assert slice_main(["evaluate", str(tiny_models["llama"]), "--tasks", "arc_easy", "--dataset_size", "2",
                       "--max_length", "64", "--stride", "64", "--output", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "--include_path" in err[0], err
    assert not (out / "eval.json").exists()
