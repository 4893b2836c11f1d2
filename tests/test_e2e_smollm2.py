"""End to end on the real SmolLM2-135M-Instruct (30 layers): scan, slice, plain mergekit-yaml, verify."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compute_block_similarity.cli import main as scan_main
from slice_with_mergekit import suite
from slice_with_mergekit.benchmarks import above_chance, retained
from slice_with_mergekit.cli import main as slice_main
from slice_with_mergekit.records import TasksRecord
from slice_with_mergekit.verify import verify

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_scan(smollm2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol_scan")
    assert scan_main(["--model_path", smollm2_dir, "--dataset", "python-stdlib-docs", "--dataset_size", "48",
                      "--max_length", "128", "--batch_size", "16", "--layers_to_skip", "4",
                      "--output_dir", str(out), "--no_progress"]) == 0
    return out / "block_distances.json"


def test_scan_on_smollm2(smol_scan):
    js = json.loads(smol_scan.read_text())
    assert js["num_layers"] == 30 and js["num_samples"] == 48
    assert len(js["distances"]["4"]) == 27 and len(js["distances"]["1"]) == 30
    best = js["best_start"]
    assert js["distances"]["4"][best] == min(js["distances"]["4"])
    # removing the first layer changes the state far more than any middle block: layer 0 is scored, and high
    assert js["distances"]["1"][0] > 2 * min(js["distances"]["1"])
    assert all(0 <= v <= 1 for row in js["distances"].values() for v in row)


def test_slice_mergekit_yaml_verify(smol_scan, tmp_path):
    plan = tmp_path / "sliced.yml"
    assert slice_main(["--scan", str(smol_scan), "-o", str(plan)]) == 0
    out = tmp_path / "out"
    mk = str(Path(sys.executable).with_name("mergekit-yaml"))
    r = subprocess.run([mk, str(plan), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    report = verify(str(out), str(plan))
    assert report.ok, report.render()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 26
    # the user's own mergekit-yaml output, bridged afterwards: one tensor changes, verify still passes
    assert slice_main(["repair", str(out), "--plan", str(plan), "--dataset_size", "48", "--max_length", "128"]) == 0
    report = verify(str(out), str(plan))
    assert report.ok, report.render()
    assert "1/1 patched tensors equal source x recorded T" in report.render()


def test_prune_with_healing_and_the_field_on_the_standard_suite_on_smollm2(smollm2_dir, tmp_path):
    """The one command on the real model, offline: scan, choose by perplexity, cut, verify, evaluate, heal a few
    steps; the standard zero-shot suite (a few documents per task) on every model, and the field's methods as
    their papers run them (ShortGPT, Gromov et al., ReplaceMe, deepest), each row with retained % above chance
    and its paired SE."""
    work = tmp_path / "w"
    assert slice_main(["prune", smollm2_dir, "--layers_to_skip", "4", "--dataset_size", "32", "--eval_size", "8",
                       "--max_length", "128", "--select", "ppl", "--top_k", "2", "--heal", "--heal_steps", "3",
                       "--tasks", "zero-shot", "--limit", "6", "--baselines", "shortgpt,angle,replaceme,deepest",
                       "--work_dir", str(work)]) == 0
    report = (work / "report.md").read_text()
    assert "| ours | 4 |" in report and "| deepest | 4 | [25, 29) | [0, 25), [29, 30) | none |" in report
    assert "| replaceme | 4 |" in report and "| cosine |" in report and "| shortgpt | 4 |" in report
    dense = json.loads((work / "source_tasks.json").read_text())
    assert [t for t in dense["tasks"]] == [t.name for t in suite.ZERO_SHOT]
    for t in suite.ZERO_SHOT:
        d = dense["tasks"][t.name]
        assert d["samples"] == 6 and d["split"]["split"] == t.split and len(d["per_doc"]["values"]) == 6
    table = report.split("## Models side by side")[1].split("\n## ")[0]
    assert "Documents: `arc_easy_offline` test (2376" in table
    forms = {"ours": ("cut", "repaired", "healed"), "replaceme": ("cut", "repaired", "healed"),
             "shortgpt": ("cut", "healed"), "deepest": ("cut", "healed")}
    for name, fs in forms.items():
        d = work / ("n4" if name == "ours" else f"n4-{name}")
        assert sorted(p.stem.removeprefix("tasks_") for p in d.glob("tasks_*.json")) == sorted(fs), name
        for form in fs:
            rec = TasksRecord.load(d / f"tasks_{form}.json")
            line = next((x for x in table.splitlines() if x.startswith(f"| {name} n=4, {form} |")), None)
            if line is None and form == "cut":  # the same cut printed once, by the row before that removes the same layers
                continue
            assert line is not None, (name, form)
            above = above_chance(TasksRecord.model_validate(dense), rec)
            assert f"{retained(TasksRecord.model_validate(dense), rec)['average']:.1f} %" in line and "nan" not in line.lower()
            assert all(se is None or math.isfinite(se) for _, se in above.values())
    assert "### Ours against each method" in report and "ours repaired vs shortgpt cut" in report
    ev = json.loads((work / "n4" / "model" / "eval.json").read_text())
    assert {k for k, m in ev["models"].items() if m.get("retained")} == {"cut", "repaired", "healed"}
    assert "average" in ev["models"]["repaired"]["retained"]
    card = (work / "n4" / "healed" / "README.md").read_text()
    index = yaml.safe_load(card.split("---")[1])["model-index"][0]["results"]
    acc = next(m["value"] for r in index for m in r["metrics"]
               if r["dataset"]["name"] == "piqa_offline" and m["type"] == "acc")
    assert acc == pytest.approx(json.loads((work / "n4" / "tasks_healed.json").read_text())
                                ["tasks"]["piqa_offline"]["metrics"]["acc"])
    assert "per_doc" not in card and "Retained above chance" in card
    assert "## Healing ledger" in report and "## Healing" in card
    src, cut = ev["models"]["source"]["perplexity"], ev["models"]["cut"]["perplexity"]
    repaired, healed = ev["models"]["repaired"]["perplexity"], ev["models"]["healed"]["perplexity"]
    assert 1 < src < cut  # removing 4 of 30 layers costs something
    assert repaired < cut  # the bridge undoes part of it
    assert healed < cut
    heal = json.loads((work / "n4" / "healed" / "heal.json").read_text())
    assert heal["after_heal"] <= heal["after_cut"]  # the best step, on the texts that pick it, is no worse than the start
    assert heal["after_cut"] != pytest.approx(repaired, rel=1e-4)  # ... which are not the texts the report is on
    assert "repair bridges" in (work / "n4" / "verify.txt").read_text()
    assert "verification passed" in (work / "n4" / "verify.txt").read_text()


def test_scan_straight_from_the_gguf(tmp_path):
    import importlib.util

    from compute_block_similarity.model import DEFAULT_GGUF_FILE, DEFAULT_GGUF_PACKAGE

    folder = list(importlib.util.find_spec(DEFAULT_GGUF_PACKAGE).submodule_search_locations)[0]
    assert scan_main(["--model_path", folder, "--gguf_file", DEFAULT_GGUF_FILE, "--dataset_size", "8",
                      "--max_length", "64", "--layers_to_skip", "4", "--metrics", "last_token",
                      "--output_dir", str(tmp_path), "--no_progress"]) == 0
    js = json.loads((tmp_path / "block_distances.json").read_text())
    assert js["num_layers"] == 30 and js["gguf_file"] == DEFAULT_GGUF_FILE


def test_sampled_all_token_metrics_agree_with_full(smollm2_dir):
    """The default --tokens_per_text sample gives every all-token score within one standard error
    of the computation over every token (texts of up to 256 tokens)."""
    from compute_block_similarity.data import load_texts
    from compute_block_similarity.model import load_model
    from compute_block_similarity.options import TOKENS_PER_TEXT
    from compute_block_similarity.scan import ScanSettings, scan_model

    model, tok = load_model(smollm2_dir, device="cpu")
    texts = load_texts(size=48)
    assert sum(len(tok(t).input_ids) > TOKENS_PER_TEXT for t in texts) >= 4  # the sample really is a sample
    full = scan_model(model, tok, texts, ScanSettings(batch_size=16, max_length=256, progress=False, tokens_per_text=0))
    sampled = scan_model(model, tok, texts, ScanSettings(batch_size=16, max_length=256, progress=False))
    for name in ("angular_all_tokens", "block_influence"):
        for n in range(1, 30):
            for a, b, se in zip(sampled.scores(n, name), full.scores(n, name), full.stderrs(n, name)):
                assert abs(a - b) <= se, (name, n)


def test_chunked_nll_equals_the_plain_log_softmax_on_smollm2(smollm2_dir):
    """The NLL every stage uses (the decoder, then the LM head on the scored positions in chunks that split
    windows) equals the full logits' log_softmax of the same padded batch on the real 49k-vocabulary model.
    (Batched against alone differs by the decoder's own float32 rounding over 30 layers; that is not the NLL's.)"""
    import torch

    from compute_block_similarity.data import load_texts
    from compute_block_similarity.model import load_model
    from slice_with_mergekit.evaluate import tokenize_windows, vocab_of, window_nll

    model, tok = load_model(smollm2_dir, device="cpu")
    wins = tokenize_windows(tok, load_texts(size=6), 96, 64)[:4]
    width = max(len(w) for w, _ in wins)
    ids = torch.zeros((len(wins), width), dtype=torch.long)
    mask, score = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for b, (w, ctx) in enumerate(wins):
        ids[b, : len(w)], mask[b, : len(w)], score[b, ctx : len(w)] = torch.tensor(w), 1, True
    with torch.no_grad():
        sums, counts = window_nll(model, ids, mask, score, logits_bytes=8 * vocab_of(model) * 7)  # 7 rows a chunk
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1], -1)
    tok_nll = -logp.gather(-1, ids[:, 1:, None])[..., 0].double() * score[:, 1:]  # (B, S-1)
    ref = tok_nll.sum(1)
    assert counts.tolist() == score[:, 1:].sum(1).tolist()
    assert torch.all((sums - ref).abs() <= 64 * 2.0**-23 * tok_nll.abs().sum(1)), (sums - ref)
