"""verify catches what is wrong with a checkpoint."""

from __future__ import annotations

from conftest import make_plan

from slice_with_mergekit.cli import main as slice_main
from slice_with_mergekit.verify import verify


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
