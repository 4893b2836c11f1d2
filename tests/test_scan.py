"""The scan against a plain reference: one text at a time, no padding, float64 loops."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TEXTS, load

from compute_block_similarity import METRICS, ScanSettings, scan_model
from compute_block_similarity.model import decoder_layers


def reference_states(model, tok, text: str) -> torch.Tensor:
    """x^0..x^L for one unpadded text: output_hidden_states for x^0..x^(L-1) (layer inputs), and a
    hook on the last layer for x^L, because hidden_states[-1] comes after the final norm."""
    ids = tok(text, return_tensors="pt").input_ids
    last = {}
    layers = decoder_layers(model)
    h = layers[-1].register_forward_hook(lambda m, a, o: last.update(x=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    h.remove()
    L = len(layers)
    return torch.stack([*hs[:L], last["x"]])[:, 0].double()  # (L+1, S, H)


def reference_value(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    """Metric of the pair (x^i, x^j) for one text; a, b: (S, H)."""
    def cos(u, v):
        return max(-1.0, min(1.0, float(u @ v / (u.norm() * v.norm()))))

    if name == "angular_last_token":
        return math.acos(cos(a[-1], b[-1])) / math.pi
    if name == "angular_all_tokens":
        return sum(math.acos(cos(u, v)) / math.pi for u, v in zip(a, b)) / len(a)
    if name == "block_influence":
        return sum(1 - cos(u, v) for u, v in zip(a, b)) / len(a)
    if name == "relative_magnitude":
        return float((b[-1] - a[-1]).norm() / b[-1].norm())
    if name == "euclidean_last_token":
        return float((b[-1] - a[-1]).norm())
    raise KeyError(name)


def reference_positions(n: int, k: int) -> list[int]:
    """k evenly spaced positions of n, first and last included (all of them when k = 0 or n <= k)."""
    if k == 0 or n <= k:
        return list(range(n))
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def reference_scan(model, tok, texts, tokens_per_text: int = 0):
    states = [reference_states(model, tok, t) for t in texts]
    states = [s[:, reference_positions(s.shape[1], tokens_per_text)] for s in states]
    L = states[0].shape[0] - 1
    out = {}
    for name in METRICS:
        m = torch.zeros(L + 1, L + 1, dtype=torch.float64)
        for i in range(L + 1):
            for j in range(i + 1, L + 1):
                m[i, j] = sum(reference_value(name, s[i], s[j]) for s in states) / len(states)
        out[name] = m
    return out


@pytest.mark.parametrize("arch,tokens_per_text", [("llama", 0), ("qwen3", 0), ("gpt2", 0), ("gemma3", 0),
                                                  ("llama", 16), ("gpt2", 7)])
def test_matches_reference(tiny_models, arch, tokens_per_text):
    model, tok = load(tiny_models[arch])
    ref = reference_scan(model, tok, TEXTS, tokens_per_text)
    res = scan_model(model, tok, TEXTS, ScanSettings(batch_size=3, progress=False, tokens_per_text=tokens_per_text))
    L = res.num_layers
    assert L == len(decoder_layers(model))
    for name in METRICS:
        for n in range(1, L + 1):
            got = [float(res.mean[name][l, l + n]) for l in range(L - n + 1)]
            want = [float(ref[name][l, l + n]) for l in range(L - n + 1)]
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (name, n)


def test_gram_byte_budget_does_not_change_the_result(tiny_llama):
    """A budget of one token per chunk gives the same scores as the default chunking."""
    from compute_block_similarity.scan import gram_across_depth

    states = [torch.randn(50, 32) for _ in range(7)]
    torch.testing.assert_close(gram_across_depth(states, max_bytes=1), gram_across_depth(states), rtol=0, atol=0)
    model, tok = load(tiny_llama)
    a = scan_model(model, tok, TEXTS, ScanSettings(progress=False, gram_bytes=1))
    b = scan_model(model, tok, TEXTS, ScanSettings(progress=False))
    for name in METRICS:
        torch.testing.assert_close(a.mean[name], b.mean[name], rtol=0, atol=1e-12)


def test_gram_chunks_stay_within_the_budget(monkeypatch):
    from compute_block_similarity import scan as scan_mod

    seen = []
    real = torch.Tensor.double

    def spy(self):
        out = real(self)
        seen.append(out.numel() * 8)
        return out

    monkeypatch.setattr(torch.Tensor, "double", spy)
    depth, hidden, budget = 7, 32, 10_000
    scan_mod.gram_across_depth([torch.randn(100, hidden) for _ in range(depth)], max_bytes=budget)
    monkeypatch.undo()
    chunk_bytes = [b + b // hidden * depth for b in seen]  # float64 copy + its Gram
    assert len(seen) > 1 and max(chunk_bytes) <= budget


def test_last_state_is_before_final_norm(tiny_llama):
    """PruneMe's last window uses hidden_states[-1], taken after the final norm; ours must not."""
    model, tok = load(tiny_llama)
    res = scan_model(model, tok, TEXTS[:3], ScanSettings(batch_size=3, progress=False))
    L = res.num_layers
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    pre = reference_states(model, tok, TEXTS[0])[L, -1]
    assert not torch.allclose(hs[-1][0, -1].double(), pre)  # the reference really differs from post-norm
    ref = reference_scan(model, tok, TEXTS[:3])["angular_last_token"]
    assert float(res.mean["angular_last_token"][L - 1, L]) == pytest.approx(float(ref[L - 1, L]), rel=1e-5)


def test_start_zero_is_a_candidate(tiny_llama):
    model, tok = load(tiny_llama)
    res = scan_model(model, tok, TEXTS, ScanSettings(progress=False))
    for n in range(1, res.num_layers):
        assert len(res.scores(n)) == res.num_layers - n + 1
    assert res.scores(2)[0] > 0


@pytest.mark.parametrize("batch_size,padding_side", [(1, "right"), (2, "left"), (4, "right"), (7, "left"), (16, "left")])
def test_batch_size_padding_side_and_order_invariance(tiny_models, batch_size, padding_side):
    model, tok = load(tiny_models["qwen3"])
    base = scan_model(model, tok, TEXTS, ScanSettings(batch_size=1, padding_side="right", progress=False))
    other = scan_model(model, tok, TEXTS[::-1], ScanSettings(batch_size=batch_size, padding_side=padding_side, progress=False))
    for name in METRICS:
        torch.testing.assert_close(other.mean[name], base.mean[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(other.stderr[name], base.stderr[name], rtol=1e-3, atol=1e-7)
    assert (other.num_samples, other.num_tokens) == (base.num_samples, base.num_tokens)


def test_dataset_smaller_than_one_batch_uses_every_sample(tiny_llama):
    model, tok = load(tiny_llama)
    res = scan_model(model, tok, TEXTS[:2], ScanSettings(batch_size=8, progress=False))
    assert res.num_samples == 2
    assert res.num_tokens == sum(len(tok(t).input_ids) for t in TEXTS[:2])
    for name in METRICS:
        assert torch.isfinite(res.mean[name]).all() and torch.isfinite(res.stderr[name]).all()


def test_empty_texts_are_skipped_and_counted(tiny_llama, caplog):
    model, tok = load(tiny_llama)
    tok.add_bos_token = False
    res = scan_model(model, tok, ["", TEXTS[0], "   ", TEXTS[1]], ScanSettings(progress=False))
    assert res.num_samples == 2 and res.num_skipped == 2
    assert "skipped 2 empty" in caplog.text


def test_standard_error_matches_sample_std(tiny_llama):
    model, tok = load(tiny_llama)
    res = scan_model(model, tok, TEXTS, ScanSettings(progress=False))
    per_text = [scan_model(model, tok, [t], ScanSettings(progress=False)).mean["angular_last_token"][1, 4].item() for t in TEXTS]
    x = torch.tensor(per_text, dtype=torch.float64)
    k = len(TEXTS)
    want = x.std() / math.sqrt(k)
    # Each text's distance, batched vs alone, is off by float32 rounding of the states: delta <= 64 eps |x_i|;
    # the sample SE then moves by at most ||delta|| / sqrt(k (k - 1)). Absolute, never relative to the small SE.
    tol = 64 * 2.0**-23 * float(x.norm()) / math.sqrt(k * (k - 1))
    assert abs(res.stderrs(3)[1] - float(want)) <= tol
    assert abs(res.stderrs(3)[1] - float(x.std(correction=0) / math.sqrt(k))) > tol  # k, not k - 1: caught


def test_ranking_direction_and_best_start(tiny_llama):
    model, tok = load(tiny_llama)
    res = scan_model(model, tok, TEXTS, ScanSettings(progress=False))
    sc = res.scores(2)
    assert res.best_start(2) == min(range(len(sc)), key=sc.__getitem__)
    assert res.ranking(2)[0] == res.best_start(2)


def test_bfloat16_model_scores_in_float64(tiny_llama):
    """States are upcast before normalising: a bf16 model's scores are close to the fp32 ones."""
    model, tok = load(tiny_llama)
    fp32 = scan_model(model, tok, TEXTS, ScanSettings(progress=False))
    bf16 = scan_model(model.to(torch.bfloat16), tok, TEXTS, ScanSettings(progress=False))
    assert fp32.mean["angular_last_token"].dtype == torch.float64
    torch.testing.assert_close(bf16.mean["angular_last_token"], fp32.mean["angular_last_token"], atol=0.03, rtol=0.1)


def test_nan_hidden_state_names_the_layer(tiny_llama):
    from compute_block_similarity import UserError

    model, tok = load(tiny_llama)
    with torch.no_grad():
        decoder_layers(model)[2].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(UserError, match="output of decoder layer 2"):
        scan_model(model, tok, TEXTS, ScanSettings(progress=False))


def test_unknown_metric_lists_valid_ones(tiny_llama):
    model, tok = load(tiny_llama)
    with pytest.raises(ValueError, match="angular_last_token.*block_influence"):
        scan_model(model, tok, TEXTS, ScanSettings(metric="cosine_typo", progress=False))
