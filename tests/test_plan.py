"""A scan -> sliced.yml: ranges, checks before any weight is read, plain mergekit-yaml runs it."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from conftest import MERGEKIT_YAML, make_plan, ranges

from slice_with_mergekit.cli import main as slice_main
from slice_with_mergekit.verify import verify


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
