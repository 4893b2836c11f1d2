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
