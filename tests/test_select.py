"""The default selection: the candidate picker, the race (successive halving, early stopping) and
scoring on growing shares of the calibration windows."""

from __future__ import annotations

import math
import random

import pytest

from compute_block_similarity.scanfile import ScanFile
from slice_with_mergekit.select import Race, Scorer, exhaustive, pick_candidates, race, select_race
from conftest import TEXTS, load


def scan_of(L: int, n: int, primary: list[float], **others: list[float]) -> ScanFile:
    return ScanFile(model="m", num_layers=L, distances={n: primary},
                    all_metrics={m: {"distances": {n: d}} for m, d in others.items()})


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
    sc = Scorer(model, tok, TEXTS, max_length=16, stride=16)
    W = sc.num_windows
    cut = [2, 3]
    part = sc.score_on(cut, sc.share(W // 3))
    assert sc.scored(cut) == W // 3 and sc.passes < 0.5
    full = sc(cut)
    assert sc.passes == pytest.approx(1.0)  # the first share was not run twice
    ref = Scorer(model, tok, TEXTS, max_length=16, stride=16)(cut)
    assert full == pytest.approx(ref, rel=1e-5) and math.isfinite(part)
    assert sorted(sc.order) == list(range(W)) and set(sc.share(W // 3)) <= set(sc.share(W // 2))  # nested shares


def test_select_race_on_a_tiny_model_reports_its_candidates_and_cost(tiny_models):
    model, tok = load(tiny_models["qwen3"])  # 8 layers
    L, n = 8, 2
    ref = exhaustive(L, n, Scorer(model, tok, TEXTS, max_length=16, stride=16))
    scan = scan_of(L, n, [float(i) for i in range(L - n + 1)])
    sc = Scorer(model, tok, TEXTS, max_length=16, stride=16)
    c = select_race(scan, n, sc, top_k=L - n + 1)
    assert c.passes == pytest.approx(sc.passes) and c.passes < L - n + 1
    assert {x["start"] for x in c.candidates} == set(range(L - n + 1))  # every block, at some share
    s = c.removed[0]
    assert c.perplexity == pytest.approx(math.exp(sc.score_on(c.removed, sorted(sc.windows[tuple(c.removed)]))))
    assert all(x["se"] is None or x["nll_minus_chosen"] >= -3 * x["se"] for x in c.candidates)  # none clearly better
    assert ref[s] <= sorted(ref.values())[2]  # among the three best blocks on the whole text


def test_repair_aware_scoring_scores_the_bridged_cut(tiny_models):
    from slice_with_mergekit.evaluate import perplexity
    from slice_with_mergekit.inmemory import removed_layers
    from slice_with_mergekit.repair_fit import fit_repair

    model, tok = load(tiny_models["qwen3"])
    texts = [f"{a} {b}" for a in TEXTS for b in TEXTS[:4]]  # enough tokens for the guard to apply the bridge
    cut = [2, 3]
    got = Scorer(model, tok, texts, max_length=64, stride=64, repair="linear")(cut)
    fit = fit_repair(model, tok, texts, cut, method="linear", max_length=64, skip_unfoldable=True, progress=False)
    with removed_layers(model, cut), fit.in_memory():
        ref = perplexity(model, tok, texts, max_length=64, stride=64).perplexity
    assert got == pytest.approx(ref, rel=1e-5)
    plain = Scorer(model, tok, texts, max_length=64, stride=64)(cut)
    assert fit.applied and got < plain  # the bridge was applied, and it is what was scored


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
