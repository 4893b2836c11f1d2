"""eval.json, typed: one shape from both writers, validated on load, a bad file one line."""

from __future__ import annotations

import json

import pytest

from compute_block_similarity.errors import UserError
from slice_with_mergekit.evaluate import Perplexity, write_eval
from slice_with_mergekit.records import EvalFile, HeldOut, ModelEval, load_eval


def test_evaluate_adds_entries_and_the_file_round_trips(tmp_path):
    held = HeldOut(name="d", split="test", texts=3)
    write_eval(tmp_path, "pruned", Perplexity(12.5, 30.0, 12, 3, 64, 64), held)
    write_eval(tmp_path, "dense", Perplexity(10.0, 27.6, 12, 3, 64, 64), held, speed={"decode_tokens_per_s": 5.0})
    ev = load_eval(tmp_path / "eval.json")
    assert set(ev.models) == {"pruned", "dense"} and ev.models["dense"].speed == {"decode_tokens_per_s": 5.0}
    assert ev.own() == "pruned" and ev.dense().perplexity == 10.0 and ev.dataset == held
    assert load_eval(ev.save(tmp_path / "again.json")) == ev


def test_own_entry_is_the_named_one_else_the_most_processed():
    ev = EvalFile(models={k: ModelEval(perplexity=1.0) for k in ("source", "cut", "repaired")})
    assert ev.own() == "repaired"
    assert ev.model_copy(update={"checkpoint": "cut"}).own() == "cut"
    assert EvalFile(models={"source": ModelEval(perplexity=1.0)}).own() is None


@pytest.mark.parametrize("text,needle", [
    ("{not json", "not JSON"),
    (json.dumps({"version": 2, "models": {"cut": {"perplexity": "high"}}}), "models.cut.perplexity"),
    (json.dumps({"version": 2, "models": {"cut": {"perplexity": 3.0, "nope": 1}}}), "models.cut.nope"),
    (json.dumps({"version": 3}), "version"),
])
def test_a_malformed_eval_json_is_one_line_naming_the_field(tmp_path, text, needle):
    (tmp_path / "eval.json").write_text(text)
    with pytest.raises(UserError) as e:
        load_eval(tmp_path / "eval.json")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_an_older_eval_json_is_not_read_and_a_new_entry_replaces_it(tmp_path, caplog):
    (tmp_path / "eval.json").write_text(json.dumps({"perplexity": {"perplexity": 3.0}}))
    with caplog.at_level("WARNING"):
        assert load_eval(tmp_path / "eval.json") == EvalFile()
    assert "older format" in caplog.text
    write_eval(tmp_path, "pruned", Perplexity(12.5, 30.0, 12, 3, 64, 64), HeldOut(name="d", split="test"))
    assert list(load_eval(tmp_path / "eval.json").models) == ["pruned"]


def records_of_each_kind():
    from slice_with_mergekit.records import (
        BudgetPoint, BudgetRecord, HealLedger, HealRecord, HealStart, HealStep, PerplexityRecord, Selection, TasksRecord,
        TaskScore)

    steps = [HealStep(step=0, perplexity=30.0), HealStep(step=2, perplexity=25.0)]
    ledger = HealLedger(optimizer_steps=2, training_tokens=128, tokens_per_step=64, wall_s=1.0, device="cpu", world_size=1,
                        precision="float32", method="LoRA rank 8", loss="lm", data="d", held_out_texts=4, history=steps)
    return [
        TasksRecord(lm_eval_version="0.4", tasks={"t": TaskScore(metrics={"acc": 0.5}, headline="acc")}),
        HealRecord(after_cut=30.0, after_heal=25.0, best_step=2, history=steps, config={}, tokens_per_step=64,
                   ledger=ledger),
        Selection(strategy="race", removed=[3, 4], passes=1.5, candidates=[{"start": 3, "perplexity": 20.0}]),
        BudgetRecord(max_ratio=1.5, dense=10.0, n=1, curve=[BudgetPoint(n=1, removed=[3], perplexity=12.0, ratio=1.2,
                                                                           within=True)]),
        PerplexityRecord(perplexity=10.0, tokens_scored=100),
        HealStart(after_cut=30.0, config={"steps": 2}),
    ]


@pytest.mark.parametrize("rec", records_of_each_kind(), ids=lambda r: type(r).__name__)
def test_every_record_round_trips_and_a_tampered_file_is_one_line(tmp_path, rec):
    path = rec.save(tmp_path / "r.json")
    assert type(rec).load(path) == rec
    raw = json.loads(path.read_text())
    field = next(k for k, v in raw.items() if isinstance(v, (int, float, dict, list)) and not isinstance(v, bool)
                 and k != "version")
    raw[field] = "tampered"
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError) as e:
        type(rec).load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and field in msg, msg
    path.write_text("{cut off")
    with pytest.raises(UserError, match="not JSON"):
        type(rec).load(path)


def test_a_selection_of_another_version_is_one_line(tmp_path):
    from slice_with_mergekit.records import Selection

    path = Selection(strategy="angle", removed=[1], passes=0.0).save(tmp_path / "sliced.select.json")
    path.write_text(path.read_text().replace('"version": 1', '"version": 0'))
    with pytest.raises(UserError, match="version"):
        Selection.load(path)


def test_a_stage_stamp_is_typed_and_an_unreadable_one_reruns_its_stage(tmp_path, caplog):
    from slice_with_mergekit.stage_cache import StageStamp, stage, stage_costs

    runs = []
    out = tmp_path / "out.txt"

    def work() -> None:
        runs.append(1)
        out.write_text("done")

    fp = stage(tmp_path, "s", {"a": 1}, [out], work)
    assert StageStamp.load(tmp_path / ".stage-s.json").fingerprint == fp and len(runs) == 1
    assert stage(tmp_path, "s", {"a": 1}, [out], work) == fp and len(runs) == 1  # unchanged: skipped
    assert [c.stage for c in stage_costs(tmp_path)] == ["s"]
    (tmp_path / ".stage-s.json").write_text('{"fingerprint": 3')  # cut off by a kill
    with caplog.at_level("WARNING"):
        stage(tmp_path, "s", {"a": 1}, [out], work)
    assert len(runs) == 2 and "not JSON" in caplog.text
