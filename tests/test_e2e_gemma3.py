"""End to end on the real Gemma-3-270M (18 layers, 262k vocabulary, sliding/full attention, post-norm
layers): scan, choose by real loss with the post-norm bridge, materialize, repair, verify, evaluate.
Few, short texts keep it within CI's budget; the figures that matter are in bench/repair_gemma3.txt."""

from __future__ import annotations

import json

import pytest

from slice_with_mergekit.cli import main as slice_main

pytestmark = pytest.mark.slow


def test_prune_repairs_gemma3_by_default(gemma3_dir, tmp_path):
    work = tmp_path / "w"
    assert slice_main(["prune", gemma3_dir, "--layers_to_skip", "4", "--dataset_size", "24", "--eval_size", "6",
                       "--max_length", "64", "--top_k", "3", "--work_dir", str(work)]) == 0
    ev = json.loads((work / "n4" / "model" / "eval.json").read_text())
    dense, cut, repaired = ev["models"]["source"]["perplexity"], ev["models"]["cut"]["perplexity"], ev["models"]["repaired"]["perplexity"]
    assert 1 < dense < cut and repaired < cut  # the bridge through the post-MLP norm undoes part of the cut
    checks = (work / "n4" / "verify.txt").read_text()
    assert "verification passed" in checks and "2/2 patched tensors equal source x recorded T" in checks
    cfg = json.loads((work / "n4" / "model" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 14 and len(cfg["layer_types"]) == 14
    report = (work / "report.md").read_text()
    assert "| perplexity dense | cut | repaired |" in report
    sel = json.loads((work / "n4" / "sliced.select.json").read_text())
    assert sel["strategy"] == "race" and len(sel["candidates"]) >= 2
