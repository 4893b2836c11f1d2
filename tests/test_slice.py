"""sliced.yml -> MergeKit -> a verified checkpoint, on tiny Llama, Qwen3, Gemma-3 and GPT-2 models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mergekit.config import MergeConfiguration

from compute_block_similarity.cli import main as scan_main
from slice_with_mergekit.cli import main as slice_main
from slice_with_mergekit.surgery import slice_per_layer_fields
from slice_with_mergekit.verify import verify
from conftest import TEXTS, write_jsonl

MERGEKIT_YAML = str(Path(sys.executable).with_name("mergekit-yaml"))


@pytest.fixture(scope="session")
def scans(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scans")
    data = write_jsonl(root / "d.jsonl", [{"text": t} for t in TEXTS])
    out = {}
    for arch, path in tiny_models.items():
        assert scan_main(["--model_path", str(path), "--dataset", str(data), "--layers_to_skip", "2",
                          "--output_dir", str(root / arch), "--no_progress"]) == 0
        out[arch] = root / arch / "block_distances.json"
    return out


def make_plan(scan: Path, tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "sliced.yml"
    pick = [] if "--select" in args else ["--select", "angle"]  # the scan's best, no model loaded
    assert slice_main(["--scan", str(scan), "-o", str(out), *pick, *args]) == 0
    return out


def ranges(plan: Path) -> list[list[int]]:
    cfg = MergeConfiguration.model_validate(yaml.safe_load(plan.read_text()))
    assert cfg.merge_method == "passthrough"
    return [list(s.sources[0].layer_range) for s in cfg.slices]


@pytest.mark.parametrize("args,expected", [
    (["--start", "0", "--layers_to_skip", "2"], [[2, 6]]),          # cut at the start: no empty [0, 0]
    (["--start", "2", "--layers_to_skip", "2"], [[0, 2], [4, 6]]),  # middle
    (["--start", "4", "--layers_to_skip", "2"], [[0, 4]]),          # end: no empty [6, 6]
    (["--remove", "1,3-4"], [[0, 1], [2, 3], [5, 6]]),              # non-contiguous
])
def test_plan_ranges(scans, tmp_path, args, expected):
    assert ranges(make_plan(scans["llama"], tmp_path, *args)) == expected


def test_plan_takes_the_best_block_and_source_dtype(scans, tmp_path):
    js = json.loads(scans["llama"].read_text())
    s = js["best_start_per_n"]["3"]
    plan = make_plan(scans["llama"], tmp_path, "--layers_to_skip", "3")
    assert ranges(plan) == [r for r in ([0, s], [s + 3, 6]) if r[0] < r[1]]
    cfg = yaml.safe_load(plan.read_text())
    assert cfg["dtype"] == "float32" and cfg["slices"][0]["sources"][0]["model"] == js["model"]


@pytest.mark.parametrize("args,message", [
    (["--start", "5", "--layers_to_skip", "2"], "need 0 <= start < end <= 6"),
    (["--start", "-1", "--layers_to_skip", "2"], "need 0 <= start < end <= 6"),
    (["--layers_to_skip", "6"], "--layers_to_skip 6 must be in"),
    (["--remove", "0-5"], "removes all 6 layers"),
    (["--remove", "2,9"], "outside"),
    (["--remove", "3-1"], "runs backwards"),
    (["--remove", "1", "--start", "2"], "exclusive"),
])
def test_plan_rejects_bad_ranges_before_reading_weights(scans, tmp_path, capsys, args, message):
    out = tmp_path / "sliced.yml"
    assert slice_main(["--scan", str(scans["llama"]), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and err.startswith("error:")
    assert not out.exists()


def test_plan_checks_model_matches_scan(scans, tiny_models, tmp_path, capsys):
    out = tmp_path / "s.yml"
    assert slice_main(["--scan", str(scans["llama"]), "-o", str(out), "--model", str(tiny_models["qwen3"])]) == 2
    assert "has 8 layers but the scan saw 6" in capsys.readouterr().err
    assert slice_main(["--scan", str(scans["llama"]), "-o", str(out), "--model", str(tmp_path / "gone")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_plan_rejects_unknown_architecture(scans, tiny_models, tmp_path, capsys):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_models["llama"], odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    (odd / "config.json").write_text(json.dumps(cfg))
    assert slice_main(["--scan", str(scans["llama"]), "-o", str(tmp_path / "s.yml"), "--model", str(odd)]) == 2
    assert "MergeKit has no architecture definition" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_plain_mergekit_yaml_runs_the_emitted_file(scans, tmp_path, arch):
    plan = make_plan(scans[arch], tmp_path, "--remove", "1,3")
    out = tmp_path / "out"
    r = subprocess.run([MERGEKIT_YAML, str(plan), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    report = verify(str(out), str(plan))
    assert report.ok, report.render()


@pytest.mark.parametrize("arch,remove", [("qwen3", "0-1"), ("qwen3", "3-4"), ("qwen3", "6-7"), ("gemma3", "2"),
                                         ("llama", "0,5"), ("gpt2", "2-3")])
def test_materialize_and_verify(scans, tiny_models, tmp_path, arch, remove):
    plan = make_plan(scans[arch], tmp_path, "--remove", remove)
    out = tmp_path / "out"
    assert slice_main(["materialize", str(plan), str(out)]) == 0
    report = verify(str(out), str(plan))
    assert report.ok, report.render()
    src = json.loads((tiny_models[arch] / "config.json").read_text())
    got = json.loads((out / "config.json").read_text())
    gone = {int(x) for part in remove.split(",") for x in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)}
    kept = [i for i in range(len(src.get("layer_types", [])) or 0) if i not in gone]
    if "layer_types" in src:
        assert got["layer_types"] == [src["layer_types"][i] for i in kept]
        from transformers import AutoConfig

        AutoConfig.from_pretrained(out).validate()  # transformers accepts the sliced config
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).exists()
    assert not list(tmp_path.glob("*.partial"))


def test_gemma3_pattern_shift_warns(scans, tmp_path, caplog):
    plan = make_plan(scans["gemma3"], tmp_path, "--remove", "2")
    with caplog.at_level("WARNING"):
        assert slice_main(["materialize", str(plan), str(tmp_path / "out")]) == 0
    assert "shifts the alternating layer_types pattern" in caplog.text


def test_plain_mergekit_fails_on_layer_types_that_we_fix(scans, tmp_path):
    """Documents the MergeKit bug materialize works around (if MergeKit fixes it, this tells us)."""
    plan = make_plan(scans["qwen3"], tmp_path, "--remove", "3-4")
    r = subprocess.run([MERGEKIT_YAML, str(plan), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode != 0 and "layer_types" in r.stderr


def test_verify_catches_a_tampered_tensor(scans, tmp_path):
    from safetensors.torch import load_file, save_file

    plan = make_plan(scans["llama"], tmp_path, "--remove", "2")
    out = tmp_path / "out"
    assert slice_main(["materialize", str(plan), str(out)]) == 0
    f = out / "model.safetensors"
    t = load_file(f)
    key = "model.layers.3.mlp.up_proj.weight"
    t[key] = t[key].clone()
    t[key].view(-1)[0] += 1e-3
    save_file(t, f, metadata={"format": "pt"})
    report = verify(str(out), str(plan))
    assert not report.ok
    assert any(name == "bitwise equal to source" and not ok and key in d for name, ok, d in report.checks)
    assert slice_main(["verify", str(out), "--plan", str(plan)]) == 1


def test_verify_catches_a_wrong_layer(scans, tiny_models, tmp_path):
    plan = make_plan(scans["llama"], tmp_path, "--remove", "2")
    (tmp_path / "w").mkdir()
    wrong = make_plan(scans["llama"], tmp_path / "w", "--remove", "3")
    out = tmp_path / "out"
    assert slice_main(["materialize", str(plan), str(out)]) == 0
    assert not verify(str(out), str(wrong)).ok


def test_surgery_remaps_index_lists_and_counts():
    cfg = {"num_hidden_layers": 6, "layer_types": list("ababab"), "mlp_only_layers": [0, 3, 5],
           "max_window_layers": 4, "no_rope_layers": [1, 0, 1, 0, 1, 0], "rope_long_factor": [1.0] * 6}
    out, notes = slice_per_layer_fields(cfg, [0, 1, 4, 5], 6)
    assert out["layer_types"] == list("abab") and out["no_rope_layers"] == [1, 0, 1, 0]
    assert out["mlp_only_layers"] == [0, 3] and out["max_window_layers"] == 2 and out["num_hidden_layers"] == 4
    assert out["rope_long_factor"] == [1.0] * 6  # not a per-layer field


def test_push_dry_run_card_and_file_list(scans, tmp_path, capsys):
    plan = make_plan(scans["llama"], tmp_path, "--remove", "2-3")
    out = tmp_path / "out"
    assert slice_main(["materialize", str(plan), str(out)]) == 0
    (out / "eval.json").write_text(json.dumps({"perplexity": {"source": 10.0, "pruned": 12.5}}))
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
    assert plan.read_text().strip() in card and '"pruned": 12.5' in card


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
