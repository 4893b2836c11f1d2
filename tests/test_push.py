"""The model card and the upload."""

from __future__ import annotations

import json

import yaml
from conftest import make_plan

from slice_with_mergekit.cli import main as slice_main


def test_push_dry_run_card_and_file_list(scans, tmp_path, capsys):
    plan = make_plan(scans["llama"], tmp_path, "--remove", "2-3")
    out = tmp_path / "out"
    assert slice_main(["materialize", str(plan), str(out)]) == 0
    (out / "eval.json").write_text(json.dumps({"version": 2, "checkpoint": "pruned", "dataset": {"name": "d", "split": "test"},
                                               "models": {"source": {"perplexity": 10.0}, "pruned": {"perplexity": 12.5}}}))
    (out / ".cache").mkdir(); (out / ".cache" / "x.lock").write_text("")
    (out / "heal").mkdir(); (out / "heal" / "adapter_model.safetensors").write_text("")
    (out / "block_distances.json").write_text("{}"); (out / "foo.tmp").write_text("")
    assert slice_main(["push", str(out), "org/tiny", "--plan", str(plan), "--scan", str(scans["llama"]), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "model.safetensors" in listed and "README.md" in listed and "eval.json" in listed
    for junk in (".cache", "heal", "block_distances.json", "foo.tmp"):
        assert junk not in listed
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and {"mergekit", "pruned"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local path is never a base_model; the source's id is unknown here
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == "# tiny"  # titled after the repository
    assert "**Removed layers:** [2, 4)" in card and "**Kept ranges:** [0, 2), [4, 6)" in card and "angular_last_token" in card
    assert plan.read_text().strip() in card and '"perplexity": 12.5' in card
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 12.5  # the entry this checkpoint is


def test_card_base_model_is_a_hub_id(scans, tiny_models, tmp_path):
    import shutil

    from slice_with_mergekit.card import hub_base_model

    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    assert hub_base_model(str(src)) is None
    cfg = json.loads((src / "config.json").read_text())
    cfg["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (src / "config.json").write_text(json.dumps(cfg))
    assert hub_base_model(str(src)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_model(str(src), "org/override") == "org/override"
    assert hub_base_model("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"


def test_push_uploads_through_the_hub_client(scans, tmp_path, monkeypatch, capsys, caplog):
    from fake_hub import FakeHub

    plan = make_plan(scans["llama"], tmp_path, "--remove", "2")
    out = tmp_path / "out"
    assert slice_main(["materialize", str(plan), str(out)]) == 0
    (out / "scratch.tmp").write_text("x")
    token = "hf_TESTtoken_never_shown_42"
    with FakeHub() as hub, caplog.at_level("DEBUG"):
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", token)
        import huggingface_hub.constants as hc

        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
        assert slice_main(["push", str(out), "org/tiny-pruned", "--plan", str(plan), "--private",
                           "--revision", "v1"]) == 0
    create = next(r for r in hub.requests if r["path"] == "/api/repos/create")
    body = json.loads(create["body"])
    assert (body.get("visibility") == "private" or body.get("private") is True) and create["auth"] == f"Bearer {token}"
    assert any(r["path"].endswith("/branch/v1") for r in hub.requests)
    assert any(r["path"] == "/api/models/org/tiny-pruned/commit/v1" for r in hub.requests)
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= set(hub.files)
    assert "scratch.tmp" not in hub.files
    assert hub.files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    seen = capsys.readouterr()
    assert token not in seen.out + seen.err + caplog.text


def test_push_without_token_is_one_line(scans, tmp_path, monkeypatch, capsys):
    plan = make_plan(scans["llama"], tmp_path, "--remove", "2")
    out = tmp_path / "out"
    assert slice_main(["materialize", str(plan), str(out)]) == 0
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert slice_main(["push", str(out), "org/x", "--plan", str(plan)]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
