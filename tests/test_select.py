"""The default selection: the candidate picker, the race (successive halving, early stopping) and
scoring on growing shares of the calibration windows."""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import replace

import pytest
import torch
from conftest import TEXTS, load

from compute_block_similarity.scanfile import ScanFile
from slice_with_mergekit.cli import main as slice_main
from slice_with_mergekit.inmemory import removed_layers
from slice_with_mergekit.race import Race, pick_candidates, race, settle_ties
from slice_with_mergekit.scoring import ScoreSettings, Scorer
from slice_with_mergekit.select import exhaustive, select_deepest, select_iterative, select_ppl, select_race


def in_range(scores: list[float]) -> list[float]:
    """Ranks kept, values scaled into every metric's range (a scan file is validated by meaning)."""
    lo = min(scores + [0.0])
    top = max(x - lo for x in scores) + 1.0
    return [(x - lo) / (2 * top) for x in scores]


def scan_of(L: int, n: int, primary: list[float], **others: list[float]) -> ScanFile:
    return ScanFile(model="m", num_layers=L, distances={n: in_range(primary)},
                    all_metrics={m: {"distances": {n: in_range(d)}} for m, d in others.items()})


def overlaps(a: int, b: int, n: int) -> bool:
    return abs(a - b) < n


@pytest.mark.parametrize("n,k", [(2, 4), (3, 6), (4, 8), (1, 5)])
def test_picker_takes_no_overlapping_near_duplicate_while_a_distinct_region_remains(n, k):
    L = 16
    rng = random.Random(n * 100 + k)
    for _ in range(20):
        scan = scan_of(L, n, [rng.random() for _ in range(L - n + 1)], block_influence=[rng.random()
                                                                                        for _ in range(L - n + 1)])
        picked = pick_candidates(scan, n, k)
        assert len(picked) == len(set(picked)) == min(k, L - n + 1)
        for i, s in enumerate(picked):
            if any(overlaps(s, p, n) for p in picked[:i]):  # a near-duplicate only once no distinct block is left
                assert all(any(overlaps(t, p, n) for p in picked[:i]) for t in range(L - n + 1))


def test_picker_prefers_distinct_regions_over_the_angle_shifts_and_lets_every_metric_vote():
    L, n = 13, 3
    angle = [9, 8, 7, 1.0, 0.1, 0.2, 0.3, 5, 6, 4, 3]  # its top four are shifts of one block: 4, 5, 6, 3
    other = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0.5, 0.0]  # another metric's best: the last block, 10
    picked = pick_candidates(scan_of(L, n, angle, block_influence=other), n, 4)
    assert picked[:2] == [4, 10]  # the angle's best, then the other metric's best, a distinct region
    assert all(not overlaps(a, b, n) for i, a in enumerate(picked[:3]) for b in picked[:i])
    assert pick_candidates(scan_of(L, n, angle), n, 2) == [4, 10]  # the angle alone: 5, 6, 3 overlap 4
    assert pick_candidates(scan_of(L, n, angle), n, 6) == [4, 10, 7, 1, 5, 6]  # then filled by rank


class TableScorer(Scorer):
    """A Scorer whose per-window losses come from a table: the race's logic, with known answers."""

    def __init__(self, table: dict[tuple[int, ...], list[float]], seed: int = 0):
        W = len(next(iter(table.values())))
        self.table, self.wins = table, [([0] * 10, 1)] * W
        self.order = list(range(W))
        random.Random(seed).shuffle(self.order)
        self.total_tokens, self.tokens_run, self.windows, self.repair = 10 * W, 0, {}, "none"

    def score_on(self, removed, idx):
        key = tuple(sorted(removed))
        have = self.windows.setdefault(key, {})
        for i in idx:
            if i not in have:
                have[i] = (self.table[key][i] * 9, 9)
                self.tokens_run += 10
        return sum(have[i][0] for i in idx) / sum(have[i][1] for i in idx)


def raced(sc: Scorer, cuts: list, cfg: Race, prior: dict) -> tuple:
    """The race, then its ties settled, as select_race runs them (without the shift)."""
    return settle_ties(sc, *race(sc, cuts, cfg), prior, cfg)


def noisy(mean: float, W: int, seed: int, sd: float = 0.3) -> list[float]:
    rng = random.Random(seed)
    return [mean + rng.gauss(0, sd) for _ in range(W)]


def test_race_stops_early_when_the_leader_is_clearly_ahead():
    W = 256
    table = {(0,): noisy(2.0, W, 0), (1,): noisy(4.0, W, 1), (2,): noisy(5.0, W, 2), (3,): noisy(6.0, W, 3)}
    sc = TableScorer(table)
    win, dropped = race(sc, list(table), Race(first_share=1 / 8))
    assert win == (0,)
    assert all(sc.scored(c) == 32 for c in dropped)  # decided on the first share
    assert sc.passes == pytest.approx(4 * 32 / W)


def test_race_halves_and_the_last_two_meet_on_every_window():
    W = 256
    means = [2.0, 2.01, 2.02, 2.03, 2.5, 2.6, 2.7, 2.8]  # four close ones, four clearly worse
    table = {(i,): noisy(m, W, i, sd=0.5) for i, m in enumerate(means)}
    sc = TableScorer(table)
    win, dropped = race(sc, list(table), Race(first_share=1 / 8, z=50))  # z huge: only halving drops
    seen = {c: sc.scored(c) for c in dropped}
    assert sorted(seen.values()) == [32, 32, 32, 32, 64, 64, 256, 256]  # 8 -> 4 -> 2, the final two on all
    finalists = [c for c, w in seen.items() if w == W]
    assert win == min(finalists, key=lambda c: sum(table[c]))  # the better of the two on every window
    assert sc.passes == pytest.approx((8 * 32 + 4 * 32 + 2 * 192) / W)


def test_scoring_on_growing_shares_equals_one_full_pass(tiny_models):
    model, tok = load(tiny_models["qwen3"])
    sc = Scorer(model, tok, TEXTS, ScoreSettings(max_length=16, stride=16))
    W = sc.num_windows
    cut = [2, 3]
    part = sc.score_on(cut, sc.share(W // 3))
    assert sc.scored(cut) == W // 3 and sc.passes < 0.5
    full = sc(cut)
    assert sc.passes == pytest.approx(1.0)  # the first share was not run twice
    ref = Scorer(model, tok, TEXTS, ScoreSettings(max_length=16, stride=16))(cut)
    assert full == pytest.approx(ref, rel=1e-5) and math.isfinite(part)
    assert sorted(sc.order) == list(range(W)) and set(sc.share(W // 3)) <= set(sc.share(W // 2))  # nested shares


def test_select_race_on_a_tiny_model_reports_its_candidates_and_cost(tiny_models):
    model, tok = load(tiny_models["qwen3"])  # 8 layers
    L, n = 8, 2
    ref = exhaustive(L, n, Scorer(model, tok, TEXTS, ScoreSettings(max_length=16, stride=16)))
    scan = scan_of(L, n, [float(i) for i in range(L - n + 1)])
    sc = Scorer(model, tok, TEXTS, ScoreSettings(max_length=16, stride=16))
    c = select_race(scan, n, sc, top_k=L - n + 1)
    assert c.passes == pytest.approx(sc.passes) and c.passes < L - n + 1
    assert {x["start"] for x in c.candidates} == set(range(L - n + 1))  # every block, at some share
    s = c.removed[0]
    assert c.perplexity == pytest.approx(math.exp(sc.score_on(c.removed, sorted(sc.windows[tuple(c.removed)]))))
    assert all(x["se"] is None or x["nll_minus_chosen"] >= -3 * x["se"] for x in c.candidates)  # none clearly better
    assert ref[s] <= sorted(ref.values())[2]  # among the three best blocks on the whole text


def cross_fit_reference(model, tok, texts, cut):
    """Perplexity of the bridged cut, cross-fitted by hand: the even texts scored under a bridge fitted on
    the odd ones, the odd texts under one fitted on the even ones; and the bridges."""
    from slice_with_mergekit.evaluate import WindowSettings, perplexity
    from slice_with_mergekit.inmemory import removed_layers
    from slice_with_mergekit.repair_fit import FitOptions, fit_repair

    nll = tokens = 0.0
    fits = []
    for scored, fitted in ((texts[0::2], texts[1::2]), (texts[1::2], texts[0::2])):
        fit = fit_repair(model, tok, fitted, cut, FitOptions(max_length=64, skip_unfoldable=True, progress=False))
        with removed_layers(model, cut), fit.in_memory():
            r = perplexity(model, tok, scored, WindowSettings(max_length=64, stride=64))
        nll, tokens, fits = nll + r.nll_sum, tokens + r.tokens_scored, fits + [fit]
    return math.exp(nll / tokens), fits


def test_repair_aware_scoring_scores_each_window_under_a_bridge_fitted_without_it(tiny_models):
    """Cross-fitting: a window is never scored under a bridge fitted on its own text."""
    model, tok = load(tiny_models["qwen3"])
    texts = [f"{a} {b}" for a in TEXTS for b in TEXTS[:4]]  # enough tokens for the guard to apply the bridge
    cut = [2, 3]
    sc = Scorer(model, tok, texts, ScoreSettings(max_length=64, stride=64, repair="linear"))
    got = sc(cut)
    ref, fits = cross_fit_reference(model, tok, texts, cut)
    assert got == pytest.approx(ref, rel=1e-5)
    assert all(f.applied for f in fits) and got < Scorer(model, tok, texts, ScoreSettings(max_length=64, stride=64))(cut)
    for f in range(2):  # the texts behind each fold's bridge are the other fold's, never its own
        assert sc.bridge_texts(f) and all(j % 2 != f for j in sc.bridge_texts(f))
    # in-sample (a bridge fitted on every text, scoring every text) is a different, flattering figure
    from slice_with_mergekit.evaluate import WindowSettings, perplexity
    from slice_with_mergekit.inmemory import removed_layers
    from slice_with_mergekit.repair_fit import FitOptions, fit_repair

    both = fit_repair(model, tok, texts, cut, FitOptions(max_length=64, skip_unfoldable=True, progress=False))
    with removed_layers(model, cut), both.in_memory():
        in_sample = perplexity(model, tok, texts, WindowSettings(max_length=64, stride=64)).perplexity
    assert in_sample < got and got != pytest.approx(in_sample, rel=1e-4)
    # a race's candidates are bridged from one shared pass per fold over its bridge texts, counted once
    sc = Scorer(model, tok, texts, ScoreSettings(max_length=64, stride=64, repair="linear"))
    cuts = [(1, 2), (2, 3), (3, 4), (5, 6)]
    sc.prepare(cuts)
    assert set(sc.bridges) == {(c, f) for c in cuts for f in range(2)}
    assert sc.passes == pytest.approx(sum(len(sc.bridge_texts(f)) for f in range(2)) / len(texts))
    assert math.exp(sc.score_on(cut, range(sc.num_windows))) == pytest.approx(ref, rel=1e-5)


def test_a_candidates_bridge_runs_no_guard_so_every_forward_it_costs_is_counted(tiny_models, monkeypatch):
    """The guard's held-out perplexities (two per cut and fold) are left to the final repair: the
    candidates' scored windows, out of sample, are that test. The bridges are the guarded fit's."""
    import slice_with_mergekit.repair_fit as repair_fit

    model, tok = load(tiny_models["qwen3"])
    texts = [f"{a} {b}" for a in TEXTS for b in TEXTS[:4]]  # enough tokens for the guard to apply the bridges
    cuts = [(2, 3), (5, 6), (6, 7)]  # bridges the guard keeps on this text, in both folds
    real = repair_fit.fit_repairs
    monkeypatch.setattr("slice_with_mergekit.scoring.fit_repairs",
                        lambda m, t, x, c, fit, *a, **k: real(m, t, x, c, replace(fit, guard=True), *a, **k))
    guarded = Scorer(model, tok, texts, ScoreSettings(max_length=64, stride=64, repair="linear"))
    guarded.prepare(cuts)
    assert all(b.applied for f in range(2) for c in cuts for b in guarded.bridges[(c, f)].bridges)
    want = {c: guarded(c) for c in cuts}
    monkeypatch.undo()
    monkeypatch.setattr(repair_fit, "_guard", lambda *a, **k: pytest.fail("a candidate's bridge was guarded"))
    sc = Scorer(model, tok, texts, ScoreSettings(max_length=64, stride=64, repair="linear"))
    sc.prepare(cuts)
    assert sc.passes == pytest.approx(sum(len(sc.bridge_texts(f)) for f in range(2)) / len(texts))  # the fit pass only
    assert {c: sc(c) for c in cuts} == pytest.approx(want, rel=1e-6)


def test_a_folds_bridges_take_up_to_bridge_texts_of_the_other_folds_texts_or_all_of_them(tiny_models):
    model, tok = load(tiny_models["qwen3"])
    texts = [f"{a} {i}" for i in range(50) for a in TEXTS[:4]]  # 200 texts, only tokenized
    for cap, want in ((64, 64), (10, 50), (None, 100)):  # at least a quarter of the texts; None: the whole fold
        sc = Scorer(model, tok, texts, ScoreSettings(max_length=64, stride=64, repair="linear", bridge_texts=cap))
        for f in range(2):
            got = sc.bridge_texts(f)
            assert len(got) == want and all(j % 2 != f for j in got) and got == sorted(set(got))


@pytest.mark.parametrize("repair,tie_break,want", [("linear", "auto", "scan"), ("none", "auto", "loss"),
                                                    ("linear", "loss", "loss"), ("none", "scan", "scan")])
def test_tie_break_auto_is_the_scan_under_a_bridge_and_the_loss_for_plain_cuts(repair, tie_break, want):
    assert Race(tie_break=tie_break).scan_breaks_ties(repair) == (want == "scan")


def test_the_race_rules_are_the_select_options_and_bad_ones_name_their_flag():
    from slice_with_mergekit.select import SelectOptions

    assert SelectOptions().race() == Race()  # prune's defaults, one source
    o = SelectOptions(max_bridge_gain=3.0, tie_break="loss", tie_margin=1.1)
    assert (o.race().max_gain, o.race().tie_break, o.race().tie_margin) == (3.0, "loss", 1.1)
    with pytest.raises(ValueError, match="--tie_break"):
        Race(tie_break="nope")
    with pytest.raises(ValueError, match="--tie_margin"):
        Race(tie_margin=0.9)


def test_confidence_names_the_rival_beaten_least_clearly():
    from slice_with_mergekit.select import Choice, with_confidence

    W = 64
    table = {(0,): noisy(2.0, W, 0), (1,): noisy(2.5, W, 1, sd=0.05), (2,): noisy(2.3, W, 2, sd=2.0)}
    sc = TableScorer(table)
    for c in table:
        sc.score_on(c, range(W))
    c = with_confidence(Choice("x", [0], 0, None, [{"start": s} for s in range(3)]), sc, 1)
    z = {s: sc.paired([s], [0])[0] / sc.paired([s], [0])[1] for s in (1, 2)}
    assert c.confidence["runner_up"] == min(z, key=z.get) == 2  # smaller gap-to-noise, though 1 is further behind
    assert c.confidence["z"] == pytest.approx(z[2])
    assert c.candidates[1]["nll_minus_chosen"] == pytest.approx(0.5, abs=0.05)


def test_a_choice_behind_its_runner_up_is_logged_as_a_tie_the_scan_broke(caplog):
    from slice_with_mergekit.select import Choice, with_confidence

    W = 64
    table = {(0,): noisy(2.0, W, 0), (1,): noisy(2.01, W, 1)}
    sc = TableScorer(table)
    for c in table:
        sc.score_on(c, range(W))
    with caplog.at_level(logging.INFO, logger="slice_with_mergekit.select"):
        c = with_confidence(Choice("race", [1], 0, None, [{"start": s} for s in range(2)]), sc, 1)
    assert c.confidence["runner_up"] == 0 and c.confidence["nll_gap"] < 0
    assert "[1, 2) trails [0, 1)" in caplog.text and "which the scan breaks" in caplog.text and "beats" not in caplog.text


def test_select_strategies(tiny_llama):
    model, tok = load(tiny_llama)
    score = Scorer(model, tok, TEXTS, ScoreSettings(max_length=64, stride=64))
    L, n = 6, 2
    ref = exhaustive(L, n, score)
    scan = ScanFile(model="m", num_layers=L, distances={2: [0.5, 0.1, 0.3, 0.2, 0.4]})
    fresh = Scorer(model, tok, TEXTS, ScoreSettings(max_length=64, stride=64))
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
        score = Scorer(model, tok, TEXTS, ScoreSettings(max_length=64, stride=64))
        ref = exhaustive(L, n, score)
        worst_first = sorted(ref, key=ref.get, reverse=True)  # a scan that ranks the blocks backwards
        dist = [0.0] * (L - n + 1)
        for rank, st in enumerate(worst_first):
            dist[st] = rank / 10
        scan = ScanFile(model="m", num_layers=L, distances={n: dist})
        fresh = Scorer(model, tok, TEXTS, ScoreSettings(max_length=64, stride=64))
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
    from conftest import write_jsonl

    from compute_block_similarity.cli import main as scan_main

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    assert scan_main(["--model_path", str(tiny_llama), "--dataset", str(data), "--layers_to_skip", "2",
                      "--output_dir", str(tmp_path / "scan"), "--no_progress"]) == 0
    out = tmp_path / "sliced.yml"
    assert slice_main(["--scan", str(tmp_path / "scan" / "block_distances.json"), "-o", str(out),
                       "--select", "ppl", "--top_k", "3"]) == 0
    sel = json.loads(out.with_suffix(".select.json").read_text())
    assert sel["strategy"] == "ppl" and len(sel["candidates"]) == 3
    assert sel["perplexity"] == min(c["perplexity"] for c in sel["candidates"])


def test_budget_search_never_returns_an_n_over_budget(tiny_models):
    from slice_with_mergekit.select import budget_search

    model, tok = load(tiny_models["qwen3"])  # 8 layers
    L = 8
    dist = {n: [float((s * 7 + n) % 5) / 5 for s in range(L - n + 1)] for n in range(1, L)}
    scan = ScanFile(model="m", num_layers=L, distances=dist)
    probe = budget_search(scan, Scorer(model, tok, TEXTS, ScoreSettings(max_length=64, stride=64)), 1e9)
    ratios = [r["ratio"] for r in probe.curve]
    assert probe.n == len(probe.curve) == L - 2 and all(r["within"] for r in probe.curve)
    for budget in sorted({(a + b) / 2 for a, b in zip(sorted(ratios), sorted(ratios)[1:])} | {1.0 + 1e-9}):
        if budget <= 1:
            continue
        fresh = Scorer(model, tok, TEXTS, ScoreSettings(max_length=64, stride=64))
        b = budget_search(scan, fresh, budget)
        assert all(r["ratio"] <= budget for r in b.curve[: b.n])  # every n up to the answer fits
        assert b.n == len(b.curve) or b.curve[b.n]["ratio"] > budget  # the next one does not
        if b.n:  # the ratio is the model's: an independent scorer agrees
            ref = Scorer(model, tok, TEXTS, ScoreSettings(max_length=64, stride=64))
            assert ref(b.removed) / ref([]) == pytest.approx(b.curve[b.n - 1]["ratio"], rel=1e-6)
    with pytest.raises(ValueError, match="--max_ppl_ratio"):
        budget_search(scan, Scorer(model, tok, TEXTS, ScoreSettings(max_length=64, stride=64)), 0.9)


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
    from slice_with_mergekit.evaluate import WindowSettings
    from slice_with_mergekit.evaluate import perplexity as ppl_of

    model, tok = load(tiny_models["qwen3"])
    score = Scorer(model, tok, TEXTS, ScoreSettings(max_length=16, stride=16))
    a, b = [2, 3], [5, 6]
    pa, pb = score(a), score(b)
    d, se = score.paired(a, b)
    assert d == pytest.approx(math.log(pa) - math.log(pb), rel=1e-9)  # the same float64 sums: the log ratio
    per = {}
    for cut in (a, b):  # every window alone, as its own perplexity call
        with removed_layers(model, cut):
            per[tuple(cut)] = [ppl_of(model, tok, [], WindowSettings(16, 16), _windows=[w]) for w in score.wins]
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


def test_scorer_on_a_share_of_positions_scores_exactly_those(tiny_models):
    """With score_share, each window is scored at that share of its next-token positions (evenly spaced,
    its last one in); the loss equals a plain log_softmax over exactly those positions, cut in memory."""
    model, tok = load(tiny_models["qwen3"])
    full = Scorer(model, tok, TEXTS, ScoreSettings(max_length=16, stride=16))
    half = Scorer(model, tok, TEXTS, ScoreSettings(max_length=16, stride=16, score_share=0.5))
    assert full.score_share == 1.0  # a tiny vocabulary: the LM head is cheaper than the decoder, all positions
    cut = [2, 3]
    got = half.score_on(cut, range(half.num_windows))
    nll, n = 0.0, 0
    with torch.no_grad(), removed_layers(model, cut):
        for (w, ctx, picks), (w2, ctx2) in zip(half.wins, full.wins):
            assert (w, ctx) == (w2, ctx2) and picks[-1] == len(w) - 1
            assert len(picks) == math.ceil(0.5 * (len(w) - ctx)) and all(ctx <= p < len(w) for p in picks)
            logp = torch.log_softmax(model(torch.tensor([w])).logits.float()[0], -1)  # (S, V)
            nll -= sum(float(logp[p - 1, w[p]]) for p in picks)
            n += len(picks)
    assert got == pytest.approx(nll / n, rel=1e-5)
    half.score_on([5, 6], range(half.num_windows))
    d, se = half.paired(cut, [5, 6])
    assert d == pytest.approx(got - half.score_on([5, 6], range(half.num_windows)), rel=1e-9) and se > 0


def test_the_choice_says_how_much_it_leans_on_its_bridge(tiny_models, scans, monkeypatch, caplog):
    import logging

    from compute_block_similarity import scanfile
    from slice_with_mergekit import select
    from slice_with_mergekit.select import choose

    model, tok = load(tiny_models["qwen3"])
    texts = [f"{a} {b}" for a in TEXTS for b in TEXTS[:4]]
    bridged = lambda: Scorer(model, tok, texts, ScoreSettings(max_length=64, stride=64, repair="linear"))  # noqa: E731
    scan = scanfile.load(scans["qwen3"])
    monkeypatch.setattr(select, "BRIDGE_DEPENDENT", 1.0)  # every bridge that helps at all "carries" the cut here
    with caplog.at_level(logging.WARNING):
        c = choose("ppl", scan, 2, bridged, top_k=3)
    b = c.bridge
    idx = bridged().share(b["windows"])  # the race's first share, as bridge_dependence() takes it
    assert b["windows"] == select.Race().first(bridged().num_windows) < bridged().num_windows
    plain, ref = (math.exp(s.score_on(c.removed, idx)) for s in (Scorer(model, tok, texts, ScoreSettings(max_length=64, stride=64)),
                                                                   bridged()))
    assert b["plain_perplexity"] == pytest.approx(plain, rel=1e-6) and b["bridged_perplexity"] == pytest.approx(ref, rel=1e-6)
    assert b["ratio"] == pytest.approx(plain / ref) and b["dependent"] == (plain / ref > 1.0)
    assert ("bridge-dependent" in caplog.text) == b["dependent"]
    assert choose("ppl", scan, 2, lambda: Scorer(model, tok, texts, ScoreSettings(max_length=64, stride=64)), top_k=3).bridge is None
    sc = bridged()
    sc.score_on(c.removed, sc.share(2))  # a cut seen on fewer windows than the first share: the rest are run
    again = select.bridge_dependence(sc, select.Choice("x", list(c.removed), 0)).bridge
    assert again["windows"] == b["windows"] and again["ratio"] == pytest.approx(b["ratio"], rel=1e-6)


def test_too_little_text_to_cross_fit_falls_back_in_sample_and_says_so(tiny_models, caplog):
    import logging

    from slice_with_mergekit.evaluate import WindowSettings, perplexity
    from slice_with_mergekit.repair_fit import FitOptions, fit_repair

    model, tok = load(tiny_models["qwen3"])  # d = 32 unknowns per output: one fold's 2 x 12 tokens are too few
    texts = ["Short text.", "Depth layer", "Fox jumps a", "Merge a kit"]  # 12 byte tokens each, BOS included
    cut = [2, 3]
    with caplog.at_level(logging.WARNING):
        got = Scorer(model, tok, texts, ScoreSettings(max_length=64, stride=64, repair="linear"))(cut)
    assert "too little calibration text to cross-fit" in caplog.text
    fit = fit_repair(model, tok, texts, cut, FitOptions(max_length=64, skip_unfoldable=True, progress=False))
    with removed_layers(model, cut), fit.in_memory():
        assert got == pytest.approx(perplexity(model, tok, texts, WindowSettings(max_length=64, stride=64)).perplexity, rel=1e-5)


def test_plain_weight_ranks_by_a_blend_of_bridged_and_plain_loss(tiny_models):
    model, tok = load(tiny_models["qwen3"])
    texts = [f"{a} {b}" for a in TEXTS for b in TEXTS[:4]]
    cut = (2, 3)
    mk = lambda **kw: Scorer(model, tok, texts, ScoreSettings(max_length=64, stride=64, **kw))  # noqa: E731
    bridged = mk(repair="linear").score_on(cut, range(mk().num_windows))
    plain = mk().score_on(cut, range(mk().num_windows))
    w = 0.25
    sc = mk(repair="linear", plain_weight=w)
    assert sc.score_on(cut, range(sc.num_windows)) == pytest.approx((1 - w) * bridged + w * plain, rel=1e-9)
    assert bridged < plain  # the blend sits between them, so a cut that leans on its bridge loses ground
    from slice_with_mergekit.select import Choice, bridge_dependence

    c = bridge_dependence(sc, Choice("x", list(cut), 0))  # still reports the bridged loss alone against the plain
    idx = sc.share(c.bridge["windows"])  # on the race's first share
    assert c.bridge["bridged_perplexity"] == pytest.approx(math.exp(mk(repair="linear").score_on(cut, idx))) and \
        c.bridge["plain_perplexity"] == pytest.approx(math.exp(mk().score_on(cut, idx)))


def test_gain_is_the_plain_over_the_bridged_perplexity_on_the_same_windows(tiny_models):
    model, tok = load(tiny_models["qwen3"])
    texts = [f"{a} {b}" for a in TEXTS for b in TEXTS[:4]]
    mk = lambda **kw: Scorer(model, tok, texts, ScoreSettings(max_length=64, stride=64, **kw))  # noqa: E731
    sc = mk(repair="linear")
    cut, idx = (2, 3), sc.share(sc.num_windows // 2)
    g = math.exp(sc.log_gain(cut, idx)[0])
    bridged, plain = mk(repair="linear").score_on(cut, idx), mk().score_on(cut, idx)
    assert g == pytest.approx(math.exp(plain - bridged), rel=1e-6)
    assert g > 1  # the bridge helps this cut
    ref = mk(repair="linear")
    ref.score_on(cut, idx)
    assert sc.passes == pytest.approx(ref.passes + sum(len(sc.wins[i][0]) for i in idx) / sc.total_tokens)  # plain ones counted
    before = sc.passes
    sc.log_gain(cut, idx)
    assert sc.passes == before  # nothing run twice


class GainTable(TableScorer):
    """A TableScorer with a repair, whose cuts' bridge gains come from a table."""

    def __init__(self, table, gains):
        super().__init__(table)
        self.repair, self.gains = "linear", gains

    def prepare(self, cuts):
        pass

    se = 0.0  # the log gain's paired SE: every gate decided on its first windows

    def log_gain(self, removed, idx):
        self.score_on(removed, idx)
        return math.log(self.gains[tuple(sorted(removed))]), self.se


def test_the_race_sets_aside_a_cut_its_bridge_carries_unless_every_cut_is():
    W = 256
    table = {(0,): noisy(2.0, W, 0), (1,): noisy(2.5, W, 1), (2,): noisy(3.0, W, 2)}
    gains = {(0,): 17.5, (1,): 1.5, (2,): 3.0}  # the best bridged cut leans on its bridge
    win, dropped = race(GainTable(table, gains), list(table), Race(first_share=1 / 8, max_gain=5.0))
    assert win == (1,) and dropped[(0,)] == -1 and dropped[(2,)] is not None
    assert race(GainTable(table, gains), list(table), Race(first_share=1 / 8, max_gain=None))[0] == (0,)
    win, dropped = race(GainTable(table, gains), list(table), Race(first_share=1 / 8, max_gain=1.2))
    assert win == (0,) and -1 not in dropped.values()  # every cut over the limit: none set aside


class CountingGains(GainTable):
    """A GainTable that records which cuts log_gain() was asked about (each a plain forward, live),
    and on how many windows."""

    def log_gain(self, removed, idx):
        self.asked = [*getattr(self, "asked", []), tuple(sorted(removed))]
        self.sizes = [*getattr(self, "sizes", []), len(idx)]
        return super().log_gain(removed, idx)


def test_a_cut_is_tested_for_its_bridge_on_a_few_windows_and_on_more_only_when_near_the_limit():
    from slice_with_mergekit.race import carried

    table = {(0,): noisy(2.0, 256, 0), (1,): noisy(2.0, 256, 1), (2,): noisy(2.0, 256, 2)}
    sc = CountingGains(table, {(0,): 1.5, (1,): 4.5, (2,): 6.0})
    sc.se, first = 0.06, sc.share(32)  # log 4.5 and log 6 are 0.105 and 0.182 from log 5; 2 SE = 0.12
    cfg = Race(first_share=1 / 8, min_windows=8, max_gain=5.0)
    assert [carried(sc, c, first, cfg) for c in table] == [False, False, True]
    assert sc.sizes == [8, 8, 32, 8]  # (0,): far under on 8 windows; (1,): near, so on the first share; (2,): over
    sc.se, sc.asked, sc.sizes = 0.1, [], []
    assert carried(sc, (2,), first, cfg) and sc.sizes == [8, 32]
    cfg.max_gain = None
    assert not carried(sc, (2,), first, cfg) and sc.sizes == [8, 32]  # no limit: no test


def test_the_first_round_tests_only_the_cuts_that_could_survive_it_for_their_bridge():
    W = 256
    means = [1.9, 2.07, 2.06, 2.05, 2.04, 2.03, 2.02, 2.01]  # within 50 SE: only halving drops
    table = {(i,): noisy(m, W, i, sd=0.01) for i, m in enumerate(means)}
    gains = {(i,): 1.5 for i in range(8)} | {(0,): 17.5}  # the best bridged cut leans on its bridge
    sc = CountingGains(table, gains)
    win, dropped = race(sc, list(table), Race(first_share=1 / 8, z=50, max_gain=5.0))
    ranked = [(0,), (7,), (6,), (5,), (4,), (3,), (2,), (1,)]  # by loss on the first share
    survivors = ranked[1:5]  # the best half of 8, the carried cut skipped
    assert dropped[(0,)] == -1 and sorted(sc.asked) == sorted([(0,), *survivors])  # the other 3: no plain forward
    assert all(dropped[c] == 0 for c in ranked if c not in survivors and c != (0,))
    assert all(dropped[c] != 0 for c in survivors) and win in survivors
    ref = GainTable(table, gains)
    ref.log_gain = lambda removed, idx: (math.log(gains[tuple(sorted(removed))]), 0.0)  # for free: the same race
    assert race(ref, list(table), Race(first_share=1 / 8, z=50, max_gain=5.0)) == (win, dropped)


def test_with_tie_break_scan_a_tied_rival_its_bridge_carries_is_passed_over():
    W = 256
    means = {(0,): 2.0, (1,): 2.005, (3,): 2.01, (2,): 2.02}  # all within a 1.03x margin of (0,)
    table = {c: noisy(m, W, c[0], sd=0.01) for c, m in means.items()}
    prior = {(0,): 0.3, (1,): 0.2, (2,): 0.1, (3,): 0.5}  # the scan prefers (2,), then (1,)
    for g2, want in ((1.5, (2,)), (17.5, (1,))):
        sc = CountingGains(table, {c: 1.5 for c in table} | {(2,): g2})
        cfg = Race(first_share=1 / 8, max_gain=5.0, tie_break="scan", tie_margin=1.03)
        win, dropped = raced(sc, list(table), cfg, prior)
        assert win == want and sc.asked[:2] == [(0,), (1,)]  # (3,), (2,): out in the first round, untested
        assert (dropped[(2,)] == -1) == (g2 > 5.0)  # tested when challenging: carried, passed over


def test_with_tie_break_scan_the_scan_decides_only_among_cuts_the_loss_cannot_separate():
    W = 256
    tied = {(0,): noisy(2.0, W, 0, sd=0.5), (1,): noisy(2.01, W, 1, sd=0.5), (2,): noisy(3.0, W, 2)}
    prior = {(0,): 0.3, (1,): 0.2, (2,): 0.1}  # the scan's favourite is clearly worse by loss
    sc = TableScorer(tied)
    leader = min(tied, key=lambda c: sum(tied[c]))
    assert leader == (0,)
    loss, scan = Race(first_share=1 / 8, tie_break="loss"), Race(first_share=1 / 8, tie_break="scan", tie_margin=1)
    assert raced(sc, list(tied), loss, prior)[0] == leader  # the lowest loss
    d, se = sc.paired((0,), (1,))
    assert abs(d) < 2 * se and sc.scored((2,)) < W  # a tie; (2,) dropped early
    sc = TableScorer(tied)
    assert raced(sc, list(tied), scan, prior)[0] == (1,)  # the tied cut the scan prefers
    apart = {**tied, (1,): noisy(2.5, W, 1, sd=0.5)}  # no tie: the loss decides whatever the scan says
    sc = TableScorer(apart)
    assert raced(sc, list(apart), scan, prior)[0] == (0,)


def test_with_tie_break_scan_a_cut_halved_out_early_but_tied_on_every_window_is_the_scans_to_take():
    W = 256
    first = TableScorer({(0,): [0.0] * W}).share(16)  # the race's first share (1/16), same order
    sign = {i: (-1) ** (first.index(i) if i in first else i) for i in range(W)}  # balanced on the first share
    base = noisy(2.0, W, 0)

    def off(i: int, on_first: float, later: float) -> float:  # a cut's per-window loss minus base's
        return on_first + 0.2 * sign[i] if i in first else later + 0.05 * sign[i]

    tied = [b + off(i, 0.08, -0.08 * 16 / 240) for i, b in enumerate(base)]  # unlucky at first, even overall
    table = {(0,): base, (1,): tied, **{(k,): [b + off(i, 0.01 * k, 0.01 * k) for i, b in enumerate(base)]
                                        for k in range(2, 6)}}  # (2,) ... (5,): ahead of (1,) at first, behind later
    prior = {(0,): 0.3, (1,): 0.1, (2,): 0.05, (3,): 0.5, (4,): 0.5, (5,): 0.5}  # (2,): the scan's top, but worse
    sc = TableScorer(table)
    win, dropped = raced(sc, list(table), Race(first_share=1 / 16, tie_break="loss"), prior)
    assert win == (0,) and dropped[(1,)] == 0  # halved out in the first round ...
    assert sc.paired((1,), (0,), sc.share(16))[0] < 2 * sc.paired((1,), (0,), sc.share(16))[1]  # ... not clearly behind
    sc = TableScorer(table)
    win, dropped = raced(sc, list(table), Race(first_share=1 / 16, tie_break="scan", tie_margin=1), prior)
    assert win == (1,) and dropped[(1,)] is None and dropped[(0,)] is not None
    d, se = sc.paired((1,), (0,))
    assert sc.scored((1,)) == W and abs(d) < 2 * se  # met on every window: a tie
    d, se = sc.paired((2,), (0,))
    assert d > 2 * se  # the scan's top challenged first and clearly behind: the loss overrules the scan


def test_with_a_tie_margin_the_scan_takes_a_cut_clearly_behind_but_within_the_margin_and_no_other():
    W = 256
    table = {(0,): noisy(2.0, W, 0, sd=0.02), (1,): noisy(2.02, W, 1, sd=0.02), (2,): noisy(2.1, W, 2, sd=0.02)}
    prior = {(0,): 0.3, (1,): 0.2, (2,): 0.1}  # the scan prefers (2,), then (1,)
    sc = TableScorer(table)
    no_margin = Race(first_share=1 / 8, tie_break="scan", tie_margin=1)
    assert raced(sc, list(table), no_margin, prior)[0] == (0,)  # (1,) is clearly behind
    d, se = sc.paired((1,), (0,))
    assert d > 2 * se
    sc = TableScorer(table)
    win, dropped = raced(sc, list(table), Race(first_share=1 / 8, tie_break="scan", tie_margin=1.03), prior)  # 0.0296 nats/token
    assert win == (1,) and dropped[(1,)] is None and dropped[(0,)] is not None  # 0.02 nats behind: within 1.03x
    assert sc.scored((1,)) == W and sc.scored((2,)) == 32  # (2,), 0.1 nats behind, not chased past the first share


@pytest.mark.parametrize("name,k", [("ppl", 5), ("race", 16), ("ppl", 2)])
def test_top_k_defaults_to_the_strategys_own(name, k):
    from slice_with_mergekit.select import STRATEGIES, choose

    L, n, W = 24, 2, 64
    table = {tuple(range(s, s + n)): noisy(2.0 + 0.1 * s, W, s) for s in range(L - n + 1)}
    scan = scan_of(L, n, [float(s) for s in range(L - n + 1)])
    sc = TableScorer(table)
    c = choose(name, scan, n, lambda: sc, top_k=None if k == STRATEGIES[name].top_k else k)
    assert len(c.candidates) >= k and len({x["start"] for x in c.candidates}) >= k
    if name == "ppl":
        assert [x["start"] for x in c.candidates] == list(range(k))  # the scan's top k, each on every window
