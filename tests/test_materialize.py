"""materialize: a loadable checkpoint on tiny Llama, Qwen3, Gemma-3 and GPT-2, per-layer lists sliced."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import MERGEKIT_YAML, make_plan

from slice_with_mergekit.cli import main as slice_main
from slice_with_mergekit.surgery import slice_per_layer_fields
from slice_with_mergekit.verify import verify


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


def test_surgery_remaps_index_lists_and_counts():
    cfg = {"num_hidden_layers": 6, "layer_types": list("ababab"), "mlp_only_layers": [0, 3, 5],
           "max_window_layers": 4, "no_rope_layers": [1, 0, 1, 0, 1, 0], "rope_long_factor": [1.0] * 6}
    out, notes = slice_per_layer_fields(cfg, [0, 1, 4, 5], 6)
    assert out["layer_types"] == list("abab") and out["no_rope_layers"] == [1, 0, 1, 0]
    assert out["mlp_only_layers"] == [0, 3] and out["max_window_layers"] == 2 and out["num_hidden_layers"] == 4
    assert out["rope_long_factor"] == [1.0] * 6  # not a per-layer field


def test_every_checkpoint_written_carries_our_card(scans, tmp_path):
    """materialize and repair leave the project's card (what was removed, the bridge), not MergeKit's generic one."""
    from conftest import write_jsonl

    plan = make_plan(scans["llama"], tmp_path, "--remove", "2-3")
    out = tmp_path / "out"
    assert slice_main(["materialize", str(plan), str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "Untitled" not in card and "# out" in card and "**Removed layers:** [2, 4)" in card
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"text number {i} " * 20} for i in range(12)])
    assert slice_main(["repair", str(out), "--plan", str(plan), "--dataset", str(data)]) == 0
    assert "## Repair (no training)" in (out / "README.md").read_text()
