"""prune's stage fingerprints come from the option groups that feed each stage: every field that can
change a stage's result changes its fingerprint."""

from __future__ import annotations

import json

import pytest

from slice_with_mergekit.cli import main as slice_main
from slice_with_mergekit.pipeline import PruneArgs, fingerprints

CHANGES = {  # group -> field -> another valid value
    "load": {"dtype": "bfloat16", "device": "cpu", "trust_remote_code": True},
    "data": {"dataset": "other.jsonl", "dataset_column": "body", "dataset_subset": "validation", "dataset_size": 128,
             "dataset_config": "en", "batch_size": 4, "max_length": 128},
    "scan": {"metric": "angular_mean_token", "metrics": "last_token", "tokens_per_text": 0, "gram_bytes": 2**20,
             "padding_side": "left"},
    "choice": {"select": "ppl", "top_k": 4, "select_texts": 32, "logits_bytes": 2**20, "score_share": 0.5,
               "plain_weight": 0.5, "max_bridge_gain": 3.0, "tie_break": "scan", "tie_margin": 1.0},
    "fix": {"repair": "none"},
    "bench": {"tasks": ["arc_easy"], "include_path": ".", "num_fewshot": 5, "limit": 10, "task_batch_size": 2},
}
FEEDS = {"scan": ["load", "data", "scan"], "select": ["load", "choice", "fix"], "materialize": ["fix", "data"],
         "eval": ["load", "data"], "tasks": ["load", "bench"]}


def changed(group: str, field: str) -> PruneArgs:
    a = PruneArgs(model="m")
    return a.model_copy(update={group: getattr(a, group).model_copy(update={field: CHANGES[group][field]})})


@pytest.mark.parametrize("stage,group,field", [(s, g, f) for s, gs in FEEDS.items() for g in gs for f in CHANGES[g]])
def test_every_input_of_a_stage_changes_its_fingerprint(stage, group, field):
    assert getattr(fingerprints(changed(group, field)), stage) != getattr(fingerprints(PruneArgs(model="m")), stage), \
        (group, field)


def test_a_group_that_does_not_feed_a_stage_leaves_it_alone():
    base = fingerprints(PruneArgs(model="m"))
    assert fingerprints(changed("choice", "top_k")).scan == base.scan
    assert fingerprints(changed("scan", "metric")).materialize == base.materialize


def test_every_field_of_the_groups_is_covered():
    a = PruneArgs(model="m")
    skip = {"scan": {"layers_to_skip", "output_dir", "no_progress", "checkpoint_every", "resume"},
            "load": {"model_path", "device_map", "max_memory", "offload_folder", "gguf_file", "load_in_4bit"},
            "data": {"streaming"}}  # placement (device_map, ...) changes where a model runs, not what it computes
    for group, values in CHANGES.items():
        fields = set(type(getattr(a, group)).model_fields) - skip.get(group, set())
        assert fields == set(values), (group, fields ^ set(values))


def test_prune_pipeline_reruns_only_changed_stages(tiny_models, tmp_path, caplog):
    args = ["prune", str(tiny_models["qwen3"]), "--layers_to_skip", "1,2", "--dataset_size", "24", "--eval_size", "6",
            "--max_length", "64", "--work_dir", str(tmp_path / "w")]
    assert slice_main(args) == 0
    w = tmp_path / "w"
    for f in ("report.md", "heatmap.png", "perplexity_vs_layers.png", "n1/model/config.json", "n2/verify.txt",
              "n2/model/eval.json", "scan/block_distances.json"):
        assert (w / f).exists(), f
    report = (w / "report.md").read_text()
    assert "| 1 |" in report and "| 2 |" in report
    ev = json.loads((w / "n2/model/eval.json").read_text())
    assert ev["models"]["cut"]["perplexity"] > 0 and ev["models"]["source"]["perplexity"] > 0
    assert ev["models"]["repaired"]["repair"] == "linear" and (w / "n2/model/repair.safetensors").exists()
    assert "| perplexity dense | cut | repaired |" in report
    caplog.clear()
    with caplog.at_level("INFO"):
        assert slice_main(args) == 0
    assert caplog.text.count("inputs unchanged, skipped") == 12 and "stage scan: running" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        assert slice_main(args[:3] + ["1,2", *args[4:], "--select", "deepest"]) == 0
    assert "stage scan: inputs unchanged" in caplog.text and "stage plan-n1: running" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):  # another precision is another scan (it once reused the float32 one)
        assert slice_main(args[:3] + ["1,2", *args[4:], "--select", "deepest", "--dtype", "float32"]) == 0
    assert "stage scan: running" in caplog.text and "stage materialize-n1: running" in caplog.text


def test_prune_budget_mode_and_target_layers(tiny_models, tmp_path):
    base = ["prune", str(tiny_models["qwen3"]), "--dataset_size", "24", "--eval_size", "6", "--max_length", "64",
            "--repair", "none"]
    assert slice_main([*base, "--max_ppl_ratio", "1e6", "--max_layers", "3", "--work_dir", str(tmp_path / "b")]) == 0
    budget = json.loads((tmp_path / "b" / "budget.json").read_text())
    assert budget["n"] == 3 and [r["n"] for r in budget["curve"]] == [1, 2, 3]
    from slice_with_mergekit.records import BudgetRecord

    assert BudgetRecord.load(tmp_path / "b" / "budget.json").removed == budget["curve"][2]["removed"]  # typed, the same
    report = (tmp_path / "b" / "report.md").read_text()
    assert "How many layers can go" in report and "**3 of 8 layers**" in report
    assert json.loads((tmp_path / "b" / "n3" / "model" / "config.json").read_text())["num_hidden_layers"] == 5
    assert slice_main([*base, "--target_layers", "6", "--work_dir", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "n2" / "model" / "config.json").exists()
    assert slice_main([*base, "--target_layers", "6", "--max_ppl_ratio", "1.5", "--work_dir", str(tmp_path / "x")]) == 2


def test_prune_reports_every_model_on_a_second_corpus(tiny_models, tmp_path):
    """--eval_dataset: dense, cut, repaired and healed perplexity on text of another kind, in eval.json,
    report.md and the card's model-index, each equal to a direct computation."""
    import yaml
    from conftest import load

    from compute_block_similarity.data import READMES_DATASET, load_texts
    from slice_with_mergekit.evaluate import WindowSettings, perplexity

    w = tmp_path / "w"
    assert slice_main(["prune", str(tiny_models["llama"]), "--layers_to_skip", "2", "--dataset_size", "24",
                       "--eval_size", "6", "--max_length", "64", "--eval_dataset", READMES_DATASET, "--heal",
                       "--heal_steps", "2", "--heal_seq_len", "32", "--heal_batch_size", "2", "--work_dir", str(w)]) == 0
    ev = json.loads((w / "n2" / "healed" / "eval.json").read_text())
    s = {**ev["second_corpus"]["perplexity"], "dataset": ev["second_corpus"]["dataset"]}
    texts = load_texts(READMES_DATASET, split="test", size=6)
    for key, path in (("source", tiny_models["llama"]), ("repaired", w / "n2" / "model"), ("healed", w / "n2" / "healed")):
        m, tok = load(path)
        assert s[key] == pytest.approx(perplexity(m, tok, texts, WindowSettings(max_length=64, stride=64)).perplexity, rel=1e-6), key
    assert s["cut"] > s["source"] and s["dataset"]["name"] == READMES_DATASET
    # healing picks its step on held-out texts of its own; the healed figure is on the texts every row uses
    held = load_texts(split="test", size=12)
    m, tok = load(w / "n2" / "healed")
    assert ev["models"]["healed"]["perplexity"] == pytest.approx(perplexity(m, tok, held[:6], WindowSettings(max_length=64, stride=64)).perplexity,
                                                       rel=1e-6)
    h = json.loads((w / "n2" / "healed" / "heal.json").read_text())
    assert h["after_heal"] == pytest.approx(perplexity(m, tok, held[6:], WindowSettings(max_length=64, stride=64)).perplexity, rel=1e-6)
    report = (w / "report.md").read_text()
    assert f"## On another corpus: `{READMES_DATASET}`" in report and f"{s['repaired']:.2f}" in report
    card = (w / "n2" / "healed" / "README.md").read_text()
    index = yaml.safe_load(card.split("---")[1])["model-index"][0]["results"]
    second = [m["value"] for r in index for m in r["metrics"] if r["dataset"]["type"] == READMES_DATASET]
    assert second == [pytest.approx(s["healed"])]
    sel = json.loads((w / "n2" / "sliced.select.json").read_text())
    assert sel["bridge"]["plain_perplexity"] > 0 and "calibration windows" in report


def test_prune_heals_on_another_corpus(tiny_models, tmp_path, caplog):
    """--heal_dataset: healing trains on that corpus, minus its last --eval_size texts read, which pick the best
    step (heal.json's after_heal is the healed model's perplexity on exactly those); the healed row is still
    judged on the calibration corpus's held-out texts; another healing corpus reruns healing, not the cut."""
    from conftest import load

    from compute_block_similarity.data import READMES_DATASET, load_texts
    from slice_with_mergekit.evaluate import WindowSettings, perplexity
    from slice_with_mergekit.pipeline import HEAL_TEXTS, heal_texts

    w = tmp_path / "w"
    args = ["prune", str(tiny_models["llama"]), "--layers_to_skip", "2", "--dataset_size", "24", "--eval_size", "6",
            "--max_length", "64", "--heal", "--heal_steps", "2", "--heal_seq_len", "32", "--heal_batch_size", "2",
            "--work_dir", str(w)]
    assert slice_main([*args, "--heal_dataset", READMES_DATASET]) == 0
    readmes = load_texts(READMES_DATASET, split="train")[:HEAL_TEXTS + 6]
    train, pick = heal_texts(PruneArgs(model="m", heal=True, heal_dataset=READMES_DATASET, eval_size=6))
    assert pick == readmes[-6:] and train == readmes[:-6]  # held out of training, in the order read
    h = json.loads((w / "n2" / "healed" / "heal.json").read_text())
    assert h["ledger"]["data"].startswith(f"{READMES_DATASET} (split train)") and h["ledger"]["held_out_texts"] == 6
    m, tok = load(w / "n2" / "healed")
    win = WindowSettings(max_length=64, stride=64)
    assert h["after_heal"] == pytest.approx(perplexity(m, tok, pick, win).perplexity, rel=1e-6)
    ev = json.loads((w / "n2" / "healed" / "eval.json").read_text())
    assert ev["models"]["healed"]["perplexity"] == pytest.approx(
        perplexity(m, tok, load_texts(split="test", size=6), win).perplexity, rel=1e-6)
    caplog.clear()
    with caplog.at_level("INFO"):  # back to the calibration text: healing again, nothing before it
        assert slice_main(args) == 0
    assert "stage heal-n2: running" in caplog.text and "stage materialize-n2: inputs unchanged" in caplog.text
    assert json.loads((w / "n2" / "healed" / "heal.json").read_text())["ledger"]["data"].startswith(
        "python-stdlib-docs (split train)")


def test_heal_dataset_needs_heal_and_enough_text(tiny_models, tmp_path, capsys):
    assert slice_main(["prune", "m", "--heal_dataset", "x.jsonl", "--work_dir", str(tmp_path / "a")]) == 2
    assert "--heal_dataset x.jsonl is the healing text: add --heal" in capsys.readouterr().err
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(6)))
    from compute_block_similarity.errors import UserError
    from slice_with_mergekit.pipeline import heal_texts

    with pytest.raises(UserError, match="has 6 texts, and healing holds out --eval_size 6"):
        heal_texts(PruneArgs(model="m", heal=True, heal_dataset=str(small), eval_size=6))
    w = tmp_path / "w"  # before the scan: no stage has run, nothing is written
    assert slice_main(["prune", str(tiny_models["llama"]), "--heal", "--heal_dataset", str(small), "--eval_size", "6",
                       "--work_dir", str(w)]) != 0
    err = capsys.readouterr().err
    assert "has 6 texts" in err and "Traceback" not in err and not (w / "scan").exists()
