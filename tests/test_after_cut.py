"""Evaluation, in-memory cuts, block selection, healing and the one-command pipeline."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slice_with_mergekit.cli import main as slice_main
from slice_with_mergekit.evaluate import perplexity, windows
from slice_with_mergekit.inmemory import removed_layers
from compute_block_similarity.scanfile import ScanFile
from slice_with_mergekit.select import Scorer, exhaustive, select_deepest, select_iterative, select_ppl
from conftest import TEXTS, load


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
    got = perplexity(model, tok, TEXTS, max_length=512, stride=512, batch_size=3)
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
    full = perplexity(model, tok, TEXTS, max_length=512, stride=512)
    slid = perplexity(model, tok, TEXTS, max_length=32, stride=16)
    assert slid.tokens_scored == full.tokens_scored
    assert slid.perplexity == pytest.approx(full.perplexity, rel=0.05)


@pytest.mark.parametrize("arch,remove", [("llama", "1-2"), ("qwen3", "3,6"), ("gemma3", "0"), ("gpt2", "4")])
def test_in_memory_cut_equals_mergekit_checkpoint(tiny_models, tmp_path, arch, remove):
    from compute_block_similarity.ranges import parse_layers
    from slice_with_mergekit.plan import build_config, write_config

    src = tiny_models[arch]
    model, tok = load(src)
    L = model.config.get_text_config().num_hidden_layers
    plan = tmp_path / "s.yml"
    write_config(build_config(str(src), L, parse_layers(remove), "float32"), plan)
    assert slice_main(["materialize", str(plan), str(tmp_path / "out")]) == 0
    cut, _ = load(tmp_path / "out")
    ids = tok(TEXTS[3], return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
        with removed_layers(model, parse_layers(remove)):
            inmem = model(ids).logits
            gen = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=2)
        want = cut(ids).logits
        want_gen = cut.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=2)
        after = model(ids).logits
    torch.testing.assert_close(inmem, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, want_gen)  # KV-cache layer indices renumbered
    torch.testing.assert_close(after, before)  # restored
    assert model.config.get_text_config().num_hidden_layers == L


def test_select_strategies(tiny_llama):
    model, tok = load(tiny_llama)
    score = Scorer(model, tok, TEXTS, max_length=64, stride=64)
    L, n = 6, 2
    ref = exhaustive(L, n, score)
    scan = ScanFile(model="m", num_layers=L, distances={2: [0.5, 0.1, 0.3, 0.2, 0.4]})
    fresh = Scorer(model, tok, TEXTS, max_length=64, stride=64)
    c = select_ppl(scan, n, fresh, top_k=3)
    assert [x["start"] for x in c.candidates] == [1, 3, 2] and c.passes == 3
    assert select_ppl(scan, n, fresh, top_k=4).passes == 1  # cached: only the new candidate costs a pass
    best = min((1, 3, 2), key=lambda s: ref[s])
    assert c.removed == [best, best + 1] and c.perplexity == pytest.approx(ref[best])
    assert select_deepest(scan, n).removed == [3, 4]  # the deepest but the last
    it = select_iterative(scan, 1, score)
    singles = {i: score([i]) for i in range(1, L - 1)}
    assert it.removed == [min(singles, key=singles.get)] and it.passes == L - 2


def test_select_refine_ends_at_a_local_minimum_no_worse_than_ppl(tiny_models):
    from slice_with_mergekit.select import select_refine

    model, tok = load(tiny_models["qwen3"])  # 8 layers
    L = 8
    for n in (1, 2, 3):
        score = Scorer(model, tok, TEXTS, max_length=64, stride=64)
        ref = exhaustive(L, n, score)
        worst_first = sorted(ref, key=ref.get, reverse=True)  # a scan that ranks the blocks backwards
        dist = [0.0] * (L - n + 1)
        for rank, st in enumerate(worst_first):
            dist[st] = rank
        scan = ScanFile(model="m", num_layers=L, distances={n: dist})
        fresh = Scorer(model, tok, TEXTS, max_length=64, stride=64)
        c = select_refine(scan, n, fresh, top_k=1)
        s = c.removed[0]
        assert c.perplexity == pytest.approx(ref[s])
        assert all(ref[s] <= ref[t] for t in (s - 1, s + 1) if t in ref)  # no neighbour is better
        assert ref[s] <= ref[worst_first[0]]
        assert c.passes == len(c.candidates) == fresh.passes


def test_strategy_registry_declares_cost_and_drives_the_cli():
    from slice_with_mergekit.cli import build_parser
    from slice_with_mergekit.select import STRATEGIES, choose

    assert {"angle", "ppl", "refine", "iterative", "deepest"} <= set(STRATEGIES)
    assert all(s.cost and s.help for s in STRATEGIES.values())
    for cmd in (["plan"], ["prune", "m"]):
        action = next(a for a in build_parser()._subparsers._group_actions[0].choices[cmd[0]]._actions
                      if a.dest == "select")
        assert list(action.choices) == list(STRATEGIES)
    with pytest.raises(ValueError, match="--select 'nope'"):
        choose("nope", ScanFile(model="m", num_layers=4, distances={}), 1, None)


def test_select_ppl_cli_writes_details(tiny_llama, tmp_path):
    from compute_block_similarity.cli import main as scan_main
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    assert scan_main(["--model_path", str(tiny_llama), "--dataset", str(data), "--layers_to_skip", "2",
                      "--output_dir", str(tmp_path / "scan"), "--no_progress"]) == 0
    out = tmp_path / "sliced.yml"
    assert slice_main(["--scan", str(tmp_path / "scan" / "block_distances.json"), "-o", str(out),
                       "--select", "ppl", "--top_k", "3"]) == 0
    sel = json.loads(out.with_suffix(".select.json").read_text())
    assert sel["strategy"] == "ppl" and len(sel["candidates"]) == 3
    assert sel["perplexity"] == min(c["perplexity"] for c in sel["candidates"])


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
    assert ev["cut"]["perplexity"] > 0 and ev["source"]["perplexity"] > 0
    assert ev["repaired"]["method"] == "linear" and (w / "n2/model/repair.safetensors").exists()
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
    assert ev["pruned"]["tokens_scored"] == sum(len(tok(t).input_ids) - 1 for t in TEXTS)
    assert ev["pruned"]["max_length"] == 64 and ev["pruned"]["stride"] == 32


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
    assert ev["perplexity"]["speed"]["decode_tokens_per_s"] > 0
    assert "decode" in capsys.readouterr().out


def test_budget_search_never_returns_an_n_over_budget(tiny_models):
    from slice_with_mergekit.select import budget_search

    model, tok = load(tiny_models["qwen3"])  # 8 layers
    L = 8
    dist = {n: [float((s * 7 + n) % 5) for s in range(L - n + 1)] for n in range(1, L)}
    scan = ScanFile(model="m", num_layers=L, distances=dist)
    probe = budget_search(scan, Scorer(model, tok, TEXTS, max_length=64, stride=64), 1e9)
    ratios = [r["ratio"] for r in probe.curve]
    assert probe.n == len(probe.curve) == L - 2 and all(r["within"] for r in probe.curve)
    for budget in sorted({(a + b) / 2 for a, b in zip(sorted(ratios), sorted(ratios)[1:])} | {1.0 + 1e-9}):
        if budget <= 1:
            continue
        fresh = Scorer(model, tok, TEXTS, max_length=64, stride=64)
        b = budget_search(scan, fresh, budget)
        assert all(r["ratio"] <= budget for r in b.curve[: b.n])  # every n up to the answer fits
        assert b.n == len(b.curve) or b.curve[b.n]["ratio"] > budget  # the next one does not
        if b.n:  # the ratio is the model's: an independent scorer agrees
            ref = Scorer(model, tok, TEXTS, max_length=64, stride=64)
            assert ref(b.removed) / ref([]) == pytest.approx(b.curve[b.n - 1]["ratio"], rel=1e-6)
    with pytest.raises(ValueError, match="--max_ppl_ratio"):
        budget_search(scan, Scorer(model, tok, TEXTS, max_length=64, stride=64), 0.9)


def test_prune_budget_mode_and_target_layers(tiny_models, tmp_path):
    base = ["prune", str(tiny_models["qwen3"]), "--dataset_size", "24", "--eval_size", "6", "--max_length", "64",
            "--repair", "none"]
    assert slice_main([*base, "--max_ppl_ratio", "1e6", "--max_layers", "3", "--work_dir", str(tmp_path / "b")]) == 0
    budget = json.loads((tmp_path / "b" / "budget.json").read_text())
    assert budget["n"] == 3 and [r["n"] for r in budget["curve"]] == [1, 2, 3]
    report = (tmp_path / "b" / "report.md").read_text()
    assert "How many layers can go" in report and "**3 of 8 layers**" in report
    assert json.loads((tmp_path / "b" / "n3" / "model" / "config.json").read_text())["num_hidden_layers"] == 5
    assert slice_main([*base, "--target_layers", "6", "--work_dir", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "n2" / "model" / "config.json").exists()
    assert slice_main([*base, "--target_layers", "6", "--max_ppl_ratio", "1.5", "--work_dir", str(tmp_path / "x")]) == 2


FLOAT32_EPS = 2.0**-23


def paired_reference(per_a: list, per_b: list) -> tuple[float, float]:
    """Mean per-token NLL difference of two cuts and its ratio-estimator standard error, in float64
    from each window's (nll sum, tokens) as scored one window at a time."""
    diffs = [x[0] - y[0] for x, y in zip(per_a, per_b)]
    toks = [x[1] for x in per_a]
    T, k = sum(toks), len(diffs)
    mean = sum(diffs) / T
    return mean, math.sqrt(k / (k - 1) * sum((x - t * mean) ** 2 for x, t in zip(diffs, toks)) / T**2)


def paired_tolerance(per_a: list, per_b: list, ulps: float = 8) -> tuple[float, float]:
    """Absolute tolerances on (difference, SE) that follow from float32: each window's NLL sum is off
    by at most ``ulps`` float32 roundings of its magnitude (batched and padded vs one window alone),
    so a window's difference is off by delta_i = ulps * eps * (|A_i| + |B_i|); the difference of means by
    sum(delta_i) / T and the SE by sqrt(k / (k - 1)) * ||delta|| / T. Never relative to the small difference."""
    delta = [ulps * FLOAT32_EPS * (abs(x[0]) + abs(y[0])) for x, y in zip(per_a, per_b)]
    T, k = sum(x[1] for x in per_a), len(delta)
    return sum(delta) / T, math.sqrt(k / (k - 1)) * math.sqrt(sum(e * e for e in delta)) / T


def test_paired_standard_error_against_a_window_by_window_reference(tiny_models):
    from slice_with_mergekit.evaluate import perplexity as ppl_of

    model, tok = load(tiny_models["qwen3"])
    score = Scorer(model, tok, TEXTS, max_length=16, stride=16)
    a, b = [2, 3], [5, 6]
    pa, pb = score(a), score(b)
    d, se = score.paired(a, b)
    assert d == pytest.approx(math.log(pa) - math.log(pb), rel=1e-9)  # the same float64 sums: the log ratio
    per = {}
    for cut in (a, b):  # every window alone, as its own perplexity call
        with removed_layers(model, cut):
            per[tuple(cut)] = [ppl_of(model, tok, [], max_length=16, stride=16, _windows=[w]) for w in score.wins]
    pa_w = [(x.nll_sum, x.tokens_scored) for x in per[tuple(a)]]
    pb_w = [(x.nll_sum, x.tokens_scored) for x in per[tuple(b)]]
    assert len(pa_w) > 5
    tol_d, tol_se = paired_tolerance(pa_w, pb_w)
    mean, ref_se = paired_reference(pa_w, pb_w)
    assert abs(d - mean) <= tol_d and abs(se - ref_se) <= tol_se, (d - mean, tol_d, se - ref_se, tol_se)
    # The check can fail: each of these wrong references is outside the tolerance.
    k = len(pa_w)
    wrong = {
        "k windows instead of k - 1": (mean, ref_se * math.sqrt((k - 1) / k)),
        "a window counted twice": paired_reference(pa_w + pa_w[:1], pb_w + pb_w[:1]),
        "a window left out": paired_reference(pa_w[1:], pb_w[1:]),
        "unpaired (independent) SE": (mean, math.hypot(*(paired_reference(w, [(0.0, t) for _, t in w])[1]
                                                         for w in (pa_w, pb_w)))),
        "windows mismatched": paired_reference(pa_w, pb_w[1:] + pb_w[:1]),
    }
    for why, (m, s) in wrong.items():
        assert abs(d - m) > tol_d or abs(se - s) > tol_se, why
