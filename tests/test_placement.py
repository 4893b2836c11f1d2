"""A model bigger than one device: every stage that loads a model takes --device_map / --max_memory /
--offload_folder, and gives what the single-device run gives. On this CPU machine "several devices" is
accelerate's CPU + disk offload (weights on "meta" between forwards), the hardest case for code that
reads or edits weights in memory."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEXTS, load
from safetensors.torch import load_file

from slice_with_mergekit.cli import main as slice_main
from slice_with_mergekit.evaluate import WindowSettings, perplexity
from slice_with_mergekit.inmemory import read_weight
from slice_with_mergekit.repair_fit import FitOptions, bridged, fit_repair


def offloaded(path, tmp_path, cpu: str = "150KB"):
    from compute_block_similarity.options import ModelOptions

    model, tok = ModelOptions(dtype="float32", device_map="auto", max_memory=f"cpu={cpu}",
                              offload_folder=str(tmp_path / "offload")).load(str(path))
    assert any(p.device.type == "meta" for p in model.parameters())  # some weights really are on disk
    return model, tok


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bridge_on_an_offloaded_model_equals_the_one_device_bridge(tiny_models, tmp_path, arch):
    """The fit, the in-memory fold (writer and post-norm gain) and its undo, where the weights live on disk."""
    one, tok = load(tiny_models[arch])
    off, _ = offloaded(tiny_models[arch], tmp_path)
    texts = TEXTS * 4
    r1 = fit_repair(one, tok, texts, [2, 3], FitOptions(max_length=64))
    r2 = fit_repair(off, tok, texts, [2, 3], FitOptions(max_length=64))
    b1, b2 = r1.bridges[0], r2.bridges[0]
    assert b1.writer == b2.writer and b1.decision == b2.decision
    assert torch.allclose(b1.T, b2.T, atol=1e-9)
    if arch == "gemma3":
        assert b2.norm is not None and torch.allclose(b1.gain, b2.gain, atol=1e-9)
    w = r2.writers[2]
    before = read_weight(w.module).clone()
    with bridged([r1.writers[2]], [b1.T], [b1.gain]), bridged([w], [b2.T], [b2.gain]):
        p1 = perplexity(one, tok, TEXTS, WindowSettings(max_length=64, stride=64)).perplexity
        p2 = perplexity(off, tok, TEXTS, WindowSettings(max_length=64, stride=64)).perplexity
        assert not torch.equal(read_weight(w.module), before)
    assert p2 == pytest.approx(p1, rel=1e-6)
    assert torch.equal(read_weight(w.module), before)  # restored where accelerate loads it from
    assert perplexity(off, tok, TEXTS, WindowSettings(max_length=64, stride=64)).perplexity == \
        pytest.approx(perplexity(one, tok, TEXTS, WindowSettings(max_length=64, stride=64)).perplexity, rel=1e-6)


def test_prune_offloaded_gives_the_one_device_result(tiny_models, tmp_path, caplog):
    """The whole job (scan, race with bridged candidates, materialize + repair, verify, perplexities)."""
    import logging

    caplog.set_level(logging.INFO)
    base = ["prune", str(tiny_models["gemma3"]), "--layers_to_skip", "2", "--dataset_size", "24", "--eval_size", "6",
            "--max_length", "64"]
    assert slice_main([*base, "--work_dir", str(tmp_path / "one")]) == 0
    assert slice_main([*base, "--work_dir", str(tmp_path / "off"), "--device_map", "auto", "--max_memory", "cpu=150KB",
                       "--offload_folder", str(tmp_path / "offload")]) == 0
    one, off = tmp_path / "one", tmp_path / "off"
    assert "module(s) on disk" in caplog.text
    assert (one / "n2" / "sliced.yml").read_text() == (off / "n2" / "sliced.yml").read_text()
    c1, c2 = (json.loads((d / "n2" / "sliced.select.json").read_text()) for d in (one, off))
    assert c1["removed"] == c2["removed"]
    for x, y in zip(c1["candidates"], c2["candidates"]):
        assert x.get("perplexity") == pytest.approx(y.get("perplexity"), rel=1e-6)
    t1, t2 = (load_file(d / "n2" / "model" / "model.safetensors") for d in (one, off))
    assert t1.keys() == t2.keys()
    assert all(torch.allclose(t1[k], t2[k], atol=1e-6) for k in t1)
    for f in ("source_eval.json", "n2/cut_eval.json", "n2/pruned_eval.json"):
        p1, p2 = (json.loads((d / f).read_text())["perplexity"] for d in (one, off))
        assert p2 == pytest.approx(p1, rel=1e-6), f
    assert "verification passed" in (off / "n2" / "verify.txt").read_text()


def test_placement_flags_are_checked(tiny_models, capsys):
    assert slice_main(["evaluate", str(tiny_models["llama"]), "--max_memory", "cpu=1GiB"]) == 2
    err = capsys.readouterr().err
    assert "--max_memory" in err and "--device_map" in err
    assert slice_main(["evaluate", str(tiny_models["llama"]), "--device_map", "auto", "--max_memory", "lots"]) == 2
    assert "DEVICE=SIZE" in capsys.readouterr().err


def test_evaluate_with_tasks_offloaded_scores_what_one_device_scores(tiny_models, local_tasks, tmp_path):
    runs = {}
    for name, extra in (("one", []), ("off", ["--device_map", "auto", "--max_memory", "cpu=60KB",
                                              "--offload_folder", str(tmp_path / "offload")])):
        (tmp_path / name).mkdir()
        assert slice_main(["evaluate", str(tiny_models["llama"]), "--dataset_size", "4", "--max_length", "64",
                           "--stride", "64", "--tasks", "local_mc,local_ppl", "--include_path", str(local_tasks),
                           "--output", str(tmp_path / name), *extra]) == 0
        runs[name] = json.loads((tmp_path / name / "eval.json").read_text())["models"]["perplexity"]
    assert runs["off"]["perplexity"] == pytest.approx(runs["one"]["perplexity"], rel=1e-6)
    for task, t in runs["one"]["lm_eval"]["tasks"].items():
        for m, v in t["metrics"].items():
            assert runs["off"]["lm_eval"]["tasks"][task]["metrics"][m] == pytest.approx(v, rel=1e-6), (task, m)
