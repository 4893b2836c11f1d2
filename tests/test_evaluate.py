"""Held-out perplexity against a plain one-text-at-a-time reference, its windows, `evaluate` and its speed figures."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TEXTS, load

from slice_with_mergekit.cli import main as slice_main
from slice_with_mergekit.evaluate import WindowSettings, perplexity, windows


def reference_ppl(model, tok, texts) -> float:
    """One text at a time, no windows, transformers' own loss."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt").input_ids
            if ids.shape[1] < 2:
                continue
            nll += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    return math.exp(nll / n)


def test_perplexity_matches_reference(tiny_models):
    model, tok = load(tiny_models["qwen3"])
    got = perplexity(model, tok, TEXTS, WindowSettings(max_length=512, stride=512), batch_size=3)
    assert got.perplexity == pytest.approx(reference_ppl(model, tok, TEXTS), rel=1e-5)
    assert got.tokens_scored == sum(len(tok(t).input_ids) - 1 for t in TEXTS)


@pytest.mark.parametrize("length,max_length,stride", [(10, 4, 2), (10, 4, 4), (3, 8, 4), (17, 5, 3)])
def test_windows_score_every_token_once(length, max_length, stride):
    scored = []
    for w, ctx in windows(list(range(length)), max_length, stride):
        assert len(w) <= max_length
        scored += w[ctx:]
    assert scored == list(range(1, length))


def test_sliding_windows_give_nearly_the_full_context_result(tiny_llama):
    model, tok = load(tiny_llama)
    full = perplexity(model, tok, TEXTS, WindowSettings(max_length=512, stride=512))
    slid = perplexity(model, tok, TEXTS, WindowSettings(max_length=32, stride=16))
    assert slid.tokens_scored == full.tokens_scored
    assert slid.perplexity == pytest.approx(full.perplexity, rel=0.05)


def test_evaluate_cli_writes_eval_json(tiny_models, tmp_path, capsys):
    import shutil

    from conftest import write_jsonl

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_models["llama"], ckpt)
    data = write_jsonl(tmp_path / "held.jsonl", [{"text": t} for t in TEXTS])
    assert slice_main(["evaluate", str(ckpt), "--dataset", str(data), "--dataset_subset", "train",
                       "--max_length", "64", "--stride", "32", "--name", "pruned"]) == 0
    assert "perplexity" in capsys.readouterr().out
    ev = json.loads((ckpt / "eval.json").read_text())
    model, tok = load(ckpt)
    assert ev["models"]["pruned"]["tokens_scored"] == sum(len(tok(t).input_ids) - 1 for t in TEXTS)
    assert ev["models"]["pruned"]["max_length"] == 64 and ev["models"]["pruned"]["stride"] == 32


def test_evaluate_tasks_without_lm_eval_is_one_line(tiny_llama, tmp_path, capsys, monkeypatch):
    import builtins

    from conftest import write_jsonl

    real_import = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name == "lm_eval":
            raise ImportError("no lm_eval")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    data = write_jsonl(tmp_path / "held.jsonl", [{"text": t} for t in TEXTS])
    assert slice_main(["evaluate", str(tiny_llama), "--dataset", str(data), "--dataset_subset", "train",
                       "--tasks", "arc_easy", "--into", str(tmp_path)]) == 2
    assert "pip install lm-eval" in capsys.readouterr().err


def test_speed_measurement_fields(tiny_llama, tmp_path, capsys):
    from slice_with_mergekit.evaluate import measure_speed

    model, tok = load(tiny_llama)
    sp = measure_speed(model, tok, TEXTS * 2, batch_size=2, prompt_tokens=16, new_tokens=4, repeats=3)
    assert sp.prefill_tokens_per_s > 0 and sp.decode_tokens_per_s > 0 and sp.repeats == 3
    assert sp.weights_mib == pytest.approx(sum(p.numel() * 4 for p in model.parameters()) / 2**20, rel=0.01)
    cfg = model.config  # K and V of every layer, batch 2, 16 prompt + 4 decoded positions, float32
    per_position = cfg.num_hidden_layers * 2 * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert sp.kv_cache_mib * 2**20 == per_position * (16 + 4)
    assert sp.peak_mib is None and sp.device == "cpu"
    assert slice_main(["evaluate", str(tiny_llama), "--dataset", "python-stdlib-docs", "--dataset_size", "4",
                       "--max_length", "64", "--stride", "64", "--speed", "--speed_prompt_tokens", "16", "--speed_new_tokens", "2",
                       "--speed_repeats", "2", "--into", str(tmp_path)]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["models"]["perplexity"]["speed"]["decode_tokens_per_s"] > 0
    assert "decode" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "gpt2"])
@pytest.mark.parametrize("rows_per_chunk", [1, 3, None])  # None: every scored position in one chunk
def test_chunked_nll_equals_the_plain_log_softmax(tiny_models, arch, rows_per_chunk):
    """Batched, padded, the LM head in chunks that split texts: each window's NLL equals the plain
    full-logits log_softmax of that window alone (to float32 rounding of its magnitude)."""
    from slice_with_mergekit.evaluate import tokenize_windows, vocab_of

    model, tok = load(tiny_models[arch])
    wins = tokenize_windows(tok, TEXTS * 2, 16, 8)
    budget = 10**12 if rows_per_chunk is None else 8 * vocab_of(model) * rows_per_chunk
    per: list = []
    perplexity(model, tok, [], batch_size=3, _windows=wins, per_window=per, logits_bytes=budget)
    assert len(per) == len(wins) > 10
    with torch.no_grad():
        for (w, ctx), (got, n) in zip(wins, per):
            logp = torch.log_softmax(model(torch.tensor([w])).logits.float()[0, :-1], -1)  # (S-1, V)
            ref = -logp[torch.arange(ctx - 1, len(w) - 1), torch.tensor(w[ctx:])].double()
            assert n == len(w) - ctx == len(ref)
            assert abs(got - float(ref.sum())) <= 64 * 2.0**-23 * float(ref.abs().sum()) + 1e-6, (got, float(ref.sum()))


def test_chunked_nll_applies_the_final_soft_capping(tiny_models):
    """Gemma-2's final_logit_softcapping is part of the model's logits: the chunked head applies it."""
    model, tok = load(tiny_models["gemma3"])
    model.config.final_logit_softcapping = 0.5  # strong enough to change every loss
    ids = torch.tensor([tok(TEXTS[3])["input_ids"]])
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:], reduction="sum")
    got = perplexity(model, tok, [TEXTS[3]], WindowSettings(max_length=512, stride=512))
    assert got.nll_sum == pytest.approx(float(ref), rel=1e-5)
