"""The least-squares bridge: the math against plain references, the fold against the in-memory model,
verify's view of a repaired checkpoint, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEXTS, build_tiny, load

from compute_block_similarity.errors import UserError
from compute_block_similarity.ranges import parse_layers
from compute_block_similarity.ranges import runs as contiguous_runs
from slice_with_mergekit.checkpoint import REPAIR_FILE
from slice_with_mergekit.cli import main as slice_main
from slice_with_mergekit.inmemory import removed_layers
from slice_with_mergekit.plan import build_config, write_config
from slice_with_mergekit.repair import apply_to_checkpoint
from slice_with_mergekit.repair_fit import (
    FitOptions,
    RunStats,
    _mse,
    fit_linear,
    fit_repair,
    fit_repairs,
)
from slice_with_mergekit.repair_record import load_repair
from slice_with_mergekit.verify import verify

CALIB = TEXTS * 6  # ~2.4k byte tokens: enough for d = 32


def _plan(src, tmp_path, remove: str):
    model, _ = load(src)
    L = model.config.get_text_config().num_hidden_layers
    plan = tmp_path / "s.yml"
    write_config(build_config(str(src), L, parse_layers(remove), "float32"), plan)
    return plan


def test_contiguous_runs():
    assert contiguous_runs([5, 2, 3, 9, 10]) == [(2, 4), (5, 6), (9, 11)]


def test_solver_recovers_a_linear_map():
    """y = m T* exactly: the fit returns T*, and the closed-form held-out error matches a direct sum."""
    g = torch.Generator().manual_seed(0)
    d, n = 8, 400
    T_star = torch.randn(d, d, generator=g, dtype=torch.float64)
    m = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2)]
    y = [x @ T_star for x in m]
    e = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2)]
    st = RunStats([x.T @ x for x in m], [x.T @ t for x, t in zip(m, y)], [float((t * t).sum()) for t in y],
                  [float((x * x).sum()) for x in e], [n, n])
    _, T_all, _, _, mse = fit_linear(st, d)
    torch.testing.assert_close(T_all, T_star, rtol=1e-4, atol=1e-4)
    assert mse == pytest.approx(0, abs=1e-6)
    T = torch.randn(d, d, generator=g, dtype=torch.float64)
    direct = float(((y[1] - m[1] @ T) ** 2).sum())
    assert _mse(T, st.AtA[1], st.AtY[1], st.YtY[1]) == pytest.approx(direct, rel=1e-9)


def test_identity_block_gives_identity_bridge(tmp_path):
    """Layers whose writers are zeroed leave the stream unchanged: the fitted T is the identity."""
    src = build_tiny("llama", tmp_path / "m", seed=3)
    model, tok = load(src)
    with torch.no_grad():
        for i in (2, 3):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    res = fit_repair(model, tok, CALIB, [2, 3], FitOptions(guard=False, progress=False))
    (b,) = res.bridges
    assert (b.start, b.end, b.writer) == (2, 4, "model.layers.1.mlp.down_proj")
    torch.testing.assert_close(b.T, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-3)
    assert b.heldout_mse_cut == pytest.approx(0, abs=1e-8)


@pytest.mark.parametrize("arch,remove", [("llama", "2-3"), ("llama", "1,3-4"), ("llama", "0-1"), ("gpt2", "2-3"),
                                         ("qwen3", "3-5"), ("gemma3", "3-4"), ("gemma3", "2,5-6"), ("olmo2", "2-3")])
def test_folded_checkpoint_equals_in_memory_bridge(tiny_models, tmp_path, arch, remove):
    """The checkpoint computes exactly what the fitted in-memory bridge computes; on post-norm layers
    (Gemma-3, OLMo-2) both the writer and the norm after it are patched."""
    src = tiny_models[arch] if arch in tiny_models else build_tiny(arch, tmp_path / arch)
    plan = _plan(src, tmp_path, remove)
    assert slice_main(["materialize", str(plan), str(tmp_path / "out")]) == 0
    model, tok = load(src)
    removed = parse_layers(remove)
    res = fit_repair(model, tok, CALIB, removed, FitOptions(guard=False, progress=False))
    assert len(res.bridges) == len(contiguous_runs(removed))
    kept = [i for i in range(model.config.get_text_config().num_hidden_layers) if i not in removed]
    patched = apply_to_checkpoint(tmp_path / "out", src, res, kept)
    # GPT-2's Conv1D has a bias; a post-norm layer's norm weight is refitted with its writer
    assert len(patched) == len(res.bridges) * (2 if arch in ("gpt2", "gemma3", "olmo2") else 1)
    out, _ = load(tmp_path / "out")
    ids = tok(TEXTS[3], return_tensors="pt").input_ids
    with torch.no_grad():
        with removed_layers(model, removed), res.in_memory():
            want = model(ids).logits
        got = out(ids).logits
        plain = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)
    rep = verify(str(tmp_path / "out"), str(plan))
    assert rep.ok, rep.render()
    assert any(n == "repair bridges" and ok for n, ok, _ in rep.checks)


def test_verify_fails_when_a_patched_tensor_is_altered(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    plan = _plan(tiny_llama, tmp_path, "2-3")
    assert slice_main(["materialize", str(plan), str(tmp_path / "out")]) == 0
    model, tok = load(tiny_llama)
    res = fit_repair(model, tok, CALIB, [2, 3], FitOptions(guard=False, progress=False))
    (key,) = apply_to_checkpoint(tmp_path / "out", tiny_llama, res, [0, 1, 4, 5])
    assert key == "model.layers.1.mlp.down_proj.weight"
    assert verify(str(tmp_path / "out"), str(plan)).ok
    f = tmp_path / "out" / "model.safetensors"
    t = load_file(f)
    t[key][0, 0] += 1e-3
    save_file(t, f, metadata={"format": "pt"})
    rep = verify(str(tmp_path / "out"), str(plan))
    assert not rep.ok and any(n == "repair bridges" and not ok for n, ok, _ in rep.checks)


def test_repair_cli_after_plain_mergekit_yaml(tiny_llama, tmp_path):
    """A user who ran mergekit-yaml by hand repairs the result, and reruns do not compound."""
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in CALIB])
    plan = _plan(tiny_llama, tmp_path, "2-3")
    assert slice_main(["materialize", str(plan), str(tmp_path / "out")]) == 0
    args = ["repair", str(tmp_path / "out"), "--plan", str(plan), "--dataset", str(data), "--device", "cpu"]
    assert slice_main(args) == 0
    info = json.loads(__import__("safetensors").safe_open(str(tmp_path / "out" / REPAIR_FILE), "pt").metadata()["repair"])
    assert info["calibration"]["dataset"] == str(data) and info["calibration"]["size"] == len(CALIB)
    assert info["bridges"][0]["decision"]
    rec, _ = load_repair(tmp_path / "out" / REPAIR_FILE)  # the same, read back typed
    assert rec.calibration.size == len(CALIB) and rec.bridges[0].decision == info["bridges"][0]["decision"]
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert slice_main(args) == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first  # folded from the source, not on top
    assert verify(str(tmp_path / "out"), str(plan)).ok


def test_materialize_with_repair_is_atomic_on_failure(tiny_models, tmp_path, capsys):
    """A refused repair (tied embeddings, cut at 0) leaves an earlier checkpoint untouched."""
    src = tiny_models["qwen3"]
    plan = _plan(src, tmp_path, "0-1")
    assert slice_main(["materialize", str(plan), str(tmp_path / "out")]) == 0
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert slice_main(["materialize", str(plan), str(tmp_path / "out"), "--repair", "linear"]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "ties to the LM head" in lines[0] and "Traceback" not in err
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "out" / REPAIR_FILE).exists()


class GatedNorm(torch.nn.Module):
    """A norm followed by a gate on its input: neither fold can absorb it."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.norm, self.weight = norm, norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * torch.sigmoid(x)


def test_refusals(tiny_models):
    model, tok = load(tiny_models["gemma3"])  # a gate after the post-MLP norm: not h + g * rms_norm(m)
    layer = model.model.layers[2]
    layer.post_feedforward_layernorm = GatedNorm(layer.post_feedforward_layernorm)
    with pytest.raises(UserError, match="not added unchanged"):
        fit_repair(model, tok, CALIB, [3, 4], FitOptions(progress=False))
    model, tok = load(tiny_models["llama"])
    with pytest.raises(UserError, match="calibration tokens"):
        fit_repair(model, tok, ["a", "Short text."], [2, 3], FitOptions(progress=False))
    with pytest.raises(UserError, match="no layers"):
        fit_repair(model, tok, CALIB, [], FitOptions(progress=False))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_guard_keeps_a_bridge_only_if_it_lowers_heldout_loss(tiny_models, arch):
    model, tok = load(tiny_models[arch])
    res = fit_repair(model, tok, CALIB, [2, 3], FitOptions(progress=False))
    (b,) = res.bridges
    assert b.heldout_ppl_cut is not None and b.heldout_ppl_bridged is not None
    assert b.applied == (b.heldout_ppl_bridged < b.heldout_ppl_cut)


@pytest.mark.parametrize("arch,zero,dead", [("gemma3", (3, 4), 0), ("olmo2", (2, 3), 0), ("gemma3", (3, 4), 4)])
def test_post_norm_bridge_recovers_an_exactly_representable_block(tmp_path, arch, zero, dead):
    """Layers whose writers are zeroed add N(0) = 0 to the stream: the bridge through the norm is T = I
    with the source's own gain, and the bridged cut computes the dense model. ``dead`` channels of the
    norm have gain 0 (Gemma-3-270M has such): they set no direction, and stay dead."""
    model, tok = load(build_tiny(arch, tmp_path / arch, seed=3))
    with torch.no_grad():
        for i in zero:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
        model.model.layers[zero[0] - 1].post_feedforward_layernorm.weight[:dead] = -1.0  # Gemma: 1 + w = 0
    res = fit_repair(model, tok, CALIB, list(zero), FitOptions(guard=False, progress=False))
    (b,) = res.bridges
    pn = res.writers[zero[0]].norm
    assert b.applied and torch.isfinite(b.T).all() and torch.isfinite(b.gain).all()
    assert (b.gain[:dead] == 0).all()
    assert pn is not None and b.norm == f"model.layers.{zero[0] - 1}.post_feedforward_layernorm"
    assert pn.offset == (1.0 if arch == "gemma3" else 0.0)  # Gemma's (1 + w), OLMo-2's w
    live = slice(dead, None)  # a dead channel's row of T is free: nothing downstream sees it
    torch.testing.assert_close(b.T[:, live], torch.eye(32, dtype=torch.float64)[:, live], rtol=0, atol=1e-3)
    torch.testing.assert_close(b.gain, pn.gain().cpu(), rtol=1e-3, atol=1e-3)
    ids = tok(TEXTS[3], return_tensors="pt").input_ids
    with torch.no_grad():
        dense = model(ids).logits
        with removed_layers(model, list(zero)), res.in_memory():
            bridged = model(ids).logits
    torch.testing.assert_close(bridged, dense, rtol=1e-3, atol=1e-3)


def test_verify_fails_when_a_post_norm_weight_is_altered(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_models["gemma3"]
    plan = _plan(src, tmp_path, "3-4")
    assert slice_main(["materialize", str(plan), str(tmp_path / "out")]) == 0
    model, tok = load(src)
    res = fit_repair(model, tok, CALIB, [3, 4], FitOptions(guard=False, progress=False))
    keys = apply_to_checkpoint(tmp_path / "out", src, res, [0, 1, 2, 5, 6, 7])
    assert sorted(keys) == ["model.layers.2.mlp.down_proj.weight", "model.layers.2.post_feedforward_layernorm.weight"]
    assert verify(str(tmp_path / "out"), str(plan)).ok
    f = tmp_path / "out" / "model.safetensors"
    t = load_file(f)
    t["model.layers.2.post_feedforward_layernorm.weight"][0] += 1e-3
    save_file(t, f, metadata={"format": "pt"})
    rep = verify(str(tmp_path / "out"), str(plan))
    assert not rep.ok and any(n == "repair bridges" and not ok for n, ok, _ in rep.checks)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_one_shared_pass_gives_each_cut_its_own_bridges(tiny_models, arch):
    """fit_repairs collects every cut's statistics in shared passes (here also split over several passes
    by a small stats budget); each cut's bridges and guard decisions equal fit_repair's for it alone."""
    model, tok = load(tiny_models[arch])
    cuts = [[2, 3], [3, 4], [5], [1, 2, 3], [3, 4]]
    for budget in (2**40, 4 * 32 * 32 * 8 * 2):  # one pass; two runs per pass
        shared = fit_repairs(model, tok, CALIB, cuts, FitOptions(progress=False), stats_bytes=budget)
        assert set(shared) == {tuple(c) for c in cuts}
        for c in cuts:
            alone = fit_repair(model, tok, CALIB, c, FitOptions(progress=False))
            got = shared[tuple(c)]
            assert [(b.start, b.end, b.applied, b.decision) for b in got.bridges] == \
                   [(b.start, b.end, b.applied, b.decision) for b in alone.bridges]
            for a, b in zip(alone.bridges, got.bridges):
                torch.testing.assert_close(b.T, a.T, rtol=1e-9, atol=1e-12)
                if a.gain is not None:
                    torch.testing.assert_close(b.gain, a.gain, rtol=1e-9, atol=1e-12)
