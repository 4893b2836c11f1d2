"""Progress on every long stage: the race, the bridge fit, evaluate and heal draw a bar, and --no_progress
(any command) hides every one of them."""

from __future__ import annotations

import pytest
from conftest import make_plan, write_jsonl

from slice_with_mergekit.cli import main as slice_main

TEXTS = [f"The {w} sat on the mat while the {v} ran past the old mill in the rain." for w in
         ("cat", "dog", "fox", "owl", "hen", "cow") for v in ("boy", "girl", "car")]


@pytest.fixture(scope="module")
def job(scans, tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    data = write_jsonl(d / "d.jsonl", [{"text": t} for t in TEXTS])
    plan = make_plan(scans["llama"], d, "--remove", "2-3")
    assert slice_main(["materialize", str(plan), str(d / "cut")]) == 0
    return {"dir": d, "data": str(data), "plan": str(plan), "scan": str(scans["llama"]), "model": str(tiny_models["llama"])}


def commands(j: dict, out: str) -> dict[str, list[str]]:
    cut, data = str(j["dir"] / "cut"), j["data"]
    return {
        "race": ["plan", "--scan", j["scan"], "-o", f"{out}/s.yml", "--select", "race"],  # on the scan's texts
        "bridge fit": ["repair", cut, "--plan", j["plan"], "--dataset", data, "--max_length", "32"],
        "evaluate": ["evaluate", j["model"], "--dataset", data, "--dataset_subset", "train", "--dataset_size", "8",
                     "--max_length", "32", "--stride", "32", "--output", out],
        "heal": ["heal", cut, "--dataset", data, "--eval_subset", "train", "--eval_size", "4", "--steps", "2",
                 "--eval_every", "1", "--seq_len", "16", "--batch_size", "2", "--max_length", "32", "--output",
                 f"{out}/healed"],
    }


BAR = {"race": "race round 1", "bridge fit": "repair fit", "evaluate": "perplexity:", "heal": "| 2/2 ["}  # its own bar


@pytest.mark.parametrize("stage", list(BAR))
def test_a_long_stage_draws_a_bar_and_no_progress_hides_it(job, tmp_path, capsys, stage):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert slice_main(commands(job, str(tmp_path / "a"))[stage]) == 0
    shown = capsys.readouterr().err
    assert BAR[stage] in shown, shown[-2000:]
    assert slice_main(commands(job, str(tmp_path / "b"))[stage] + ["--no_progress"]) == 0
    hidden = capsys.readouterr().err
    assert "it/s" not in hidden and "s/it" not in hidden and "%|" not in hidden, hidden[-2000:]
