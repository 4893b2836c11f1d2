"""Choosing which layers to cut. The angle scan is a cheap proxy; these strategies check it
against the real perplexity of the model with the layers removed (in memory, nothing written).

Strategies live in the ``STRATEGIES`` registry, each with its cost declared beside it, counted in
calibration passes (one forward pass of the model over the calibration text; with a repair, each
candidate costs one more pass for its bridge). The scan itself is one pass with every strategy.
``exhaustive`` (every contiguous block, L - n + 1 passes) is the reference the benchmarks use.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from itertools import takewhile
from typing import Any, Callable, Sequence

from compute_block_similarity.ranges import format_layers
from compute_block_similarity.scanfile import ScanFile

from .evaluate import perplexity, tokenize_windows
from .inmemory import removed_layers

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Strategy:
    name: str
    select: Callable[..., "Choice"]  # (scan, n, score, top_k) -> Choice; score is None unless needs_scorer
    cost: str  # extra calibration passes, as a formula
    help: str
    needs_scorer: bool


STRATEGIES: dict[str, Strategy] = {}


def strategy(name: str, cost: str, help: str, needs_scorer: bool) -> Callable:
    def register(fn: Callable) -> Callable:
        STRATEGIES[name] = Strategy(name, fn, cost, help, needs_scorer)
        return fn

    return register


@dataclass
class Choice:
    strategy: str
    removed: list[int]
    passes: int
    perplexity: float | None = None
    candidates: list[dict] = field(default_factory=list)
    confidence: dict | None = None  # the runner-up, the loss gap to it and its paired standard error


class Scorer:
    """Perplexity of the model with some layers removed, on fixed calibration windows; with
    ``repair`` (see repair.REPAIRS), of the model with the layers removed and the cut bridged,
    each candidate's bridge fitted on the same calibration text (one more pass)."""

    def __init__(self, model: Any, tok: Any, texts: Sequence[str], max_length: int = 256, stride: int = 256,
                 batch_size: int = 8, repair: str = "none"):
        self.model, self.tok, self.texts, self.batch_size = model, tok, texts, batch_size
        self.wins = tokenize_windows(tok, texts, max_length, stride)
        self.kw = dict(max_length=max_length, stride=stride)
        self.repair = repair
        self.passes = 0  # forward passes over the calibration text actually run
        self.cache: dict[tuple[int, ...], float] = {}
        self.windows: dict[tuple[int, ...], list[tuple[float, int]]] = {}  # per-window (nll sum, tokens)

    def __call__(self, removed: Sequence[int]) -> float:
        key = tuple(sorted(removed))
        if key not in self.cache:
            self.passes += 1
            bridge = self._bridge(key)  # fitted on the dense model, before the layers go
            per: list = []
            with removed_layers(self.model, key), bridge:
                self.cache[key] = perplexity(self.model, self.tok, self.texts, batch_size=self.batch_size,
                                             _windows=self.wins, per_window=per, **self.kw).perplexity
            self.windows[key] = per
        return self.cache[key]

    def paired(self, a: Sequence[int], b: Sequence[int]) -> tuple[float, float]:
        """(mean per-token NLL of cut ``a`` minus cut ``b``, its standard error), paired over the same
        calibration windows: a ratio estimator, windows as the sampling unit. Both must be scored."""
        wa, wb = self.windows[tuple(sorted(a))], self.windows[tuple(sorted(b))]
        d = [x[0] - y[0] for x, y in zip(wa, wb)]  # per-window NLL difference
        t = [x[1] for x in wa]
        T, k = sum(t), len(d)
        diff = sum(d) / T
        if k < 2:
            return diff, math.inf
        var = k / (k - 1) * sum((di - ti * diff) ** 2 for di, ti in zip(d, t)) / T**2
        return diff, math.sqrt(var)

    def _bridge(self, removed: tuple[int, ...]) -> Any:
        from contextlib import nullcontext

        from .repair import fit_repair

        if self.repair == "none" or not removed:
            return nullcontext()
        fit = fit_repair(self.model, self.tok, self.texts, removed, method=self.repair, batch_size=self.batch_size,
                         max_length=self.kw["max_length"], skip_unfoldable=True, progress=False)
        self.passes += 1
        return fit.in_memory()


@strategy("angle", cost="0", help="the scan's best block by its metric", needs_scorer=False)
def select_angle(scan: ScanFile, n: int, score: "Scorer | None" = None, top_k: int = 0) -> Choice:
    s = scan.ranking(n)[0]
    return Choice("angle", list(range(s, s + n)), 0)


@strategy("deepest", cost="0", help="baseline: the n deepest layers but the last (Gromov et al.)", needs_scorer=False)
def select_deepest(scan: ScanFile, n: int, score: "Scorer | None" = None, top_k: int = 0) -> Choice:
    """Gromov et al.'s baseline: the n deepest layers excluding the final one, [L-1-n, L-1)."""
    L = scan.num_layers
    return Choice("deepest", list(range(L - 1 - n, L - 1)), 0)


def top_k_by_loss(scan: ScanFile, n: int, score: Scorer, top_k: int) -> list[dict]:
    """The scan's top-k blocks, each scored by real calibration perplexity."""
    cands = []
    for s in scan.ranking(n)[:top_k]:
        p = score(list(range(s, s + n)))
        cands.append({"start": s, "removed": format_layers(range(s, s + n)), "perplexity": p,
                      "score": scan.scores(n)[s]})
        log.info("candidate block [%d, %d): perplexity %.3f", s, s + n, p)
    return cands


@strategy("ppl", cost="top_k", help="re-rank the scan's top-k blocks by the real perplexity of the model without them",
          needs_scorer=True)
def select_ppl(scan: ScanFile, n: int, score: Scorer, top_k: int = 5) -> Choice:
    passes0 = score.passes
    cands = top_k_by_loss(scan, n, score, top_k)
    best = min(cands, key=lambda c: c["perplexity"])
    return with_confidence(Choice("ppl", list(range(best["start"], best["start"] + n)), score.passes - passes0,
                                  best["perplexity"], cands), score, n)


def with_confidence(c: Choice, score: Scorer, n: int) -> Choice:
    """Each candidate's calibration loss minus the chosen cut's, with its paired standard error; the
    log says by how many standard errors the choice beats the runner-up."""
    for x in c.candidates:
        d, se = score.paired(range(x["start"], x["start"] + n), c.removed)
        x["nll_minus_chosen"], x["se"] = d, (se if math.isfinite(se) else None)
    rivals = [x for x in c.candidates if x["start"] != c.removed[0]]
    if rivals:
        r = min(rivals, key=lambda x: x["nll_minus_chosen"])
        z = r["nll_minus_chosen"] / r["se"] if r["se"] else None
        c.confidence = {"runner_up": r["start"], "nll_gap": r["nll_minus_chosen"], "se": r["se"], "z": z}
        log.info("--select %s: %s beats the runner-up %s by %.4f nats/token (paired SE %.4f, %.1f SE)%s", c.strategy,
                 format_layers(c.removed), format_layers(range(r["start"], r["start"] + n)), r["nll_minus_chosen"],
                 r["se"] or 0.0, z or 0.0, "" if z is None or z >= 2 else
                 ": close; more calibration text (--dataset_size) would separate them")
    return c


@strategy("refine", cost="top_k + 2 + one per shift",
          help="--select ppl, then shift the best block one layer at a time while a neighbour is better",
          needs_scorer=True)
def select_refine(scan: ScanFile, n: int, score: Scorer, top_k: int = 5) -> Choice:
    """The scan's top-k blocks by real perplexity, then hill-climbing: the best block moves to
    [s-1, s-1+n) or [s+1, s+1+n) while one of them has a lower perplexity. Blocks the angle ranks
    low but that sit beside a good one (the angle's ranking is noisy by a layer or two) are found at
    two passes a step."""
    passes0 = score.passes
    cands = top_k_by_loss(scan, n, score, top_k)
    seen = {c["start"] for c in cands}
    first = min(cands, key=lambda c: c["perplexity"])
    s, best = first["start"], first["perplexity"]
    last = scan.num_layers - n
    while True:
        for t in (s - 1, s + 1):
            if 0 <= t <= last and t not in seen:
                seen.add(t)
                cands.append({"start": t, "removed": format_layers(range(t, t + n)), "perplexity": score(range(t, t + n)),
                              "score": scan.scores(n)[t], "shifted_from": s})
                log.info("refine: block [%d, %d): perplexity %.3f", t, t + n, cands[-1]["perplexity"])
        nxt = min((c for c in cands if abs(c["start"] - s) == 1), key=lambda c: c["perplexity"], default=None)
        if nxt is None or nxt["perplexity"] >= best:
            break
        s, best = nxt["start"], nxt["perplexity"]
    return with_confidence(Choice("refine", list(range(s, s + n)), score.passes - passes0, best, cands), score, n)


@strategy("iterative", cost="about n (L - n/2)", help="remove one layer at a time by perplexity (SLEB); "
          "may pick non-contiguous layers", needs_scorer=True)
def select_iterative(scan: ScanFile, n: int, score: Scorer, top_k: int = 0) -> Choice:
    """SLEB: remove one layer per step, the one whose removal gives the lowest perplexity on the
    current (already pruned) model. The first and last surviving layers are never candidates."""
    num_layers = scan.num_layers
    gone: list[int] = []
    passes0, p = score.passes, None
    steps = []
    for _ in range(n):
        alive = [i for i in range(num_layers) if i not in gone]
        trials = {i: score(sorted(gone + [i])) for i in alive[1:-1]}
        pick = min(trials, key=trials.get)
        gone.append(pick)
        p = trials[pick]
        steps.append({"removed": pick, "perplexity": p})
        log.info("iterative: remove layer %d -> perplexity %.3f", pick, p)
    return Choice("iterative", sorted(gone), score.passes - passes0, p, steps)


def exhaustive(num_layers: int, n: int, score: Scorer) -> dict[int, float]:
    """The reference: every contiguous block by real perplexity (L - n + 1 passes)."""
    return {s: score(list(range(s, s + n))) for s in range(num_layers - n + 1)}


def choose(name: str, scan: ScanFile, n: int, score_factory: Callable[[], Scorer] | None, top_k: int = 5) -> Choice:
    if name not in STRATEGIES:
        raise ValueError(f"--select {name!r} is unknown; choose one of: {', '.join(STRATEGIES)}")
    st = STRATEGIES[name]
    if not st.needs_scorer:
        return st.select(scan, n, None, top_k)
    if top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {top_k}")
    return st.select(scan, n, score_factory(), top_k)


def strategies_help() -> str:
    return "; ".join(f"{s.name}: {s.help} ({s.cost} extra passes)" for s in STRATEGIES.values())


@dataclass
class Budget:
    """Budget mode's answer: the most layers that can go with perplexity within ``max_ratio`` x dense."""

    max_ratio: float
    dense: float
    n: int  # 0 when not even one layer fits
    curve: list[dict]  # per n tried: removed, perplexity, ratio, within

    @property
    def removed(self) -> list[int]:
        return self.curve[self.n - 1]["removed"] if self.n else []


def budget_search(scan: ScanFile, score: Scorer, max_ratio: float, strategy: str = "angle", top_k: int = 5,
                  max_layers: int | None = None) -> Budget:
    """Grow n from 1 while the chosen n-layer cut keeps calibration perplexity within ``max_ratio``
    times the dense model's; one scan serves every n. Stops at the first n over budget."""
    if max_ratio <= 1:
        raise ValueError(f"--max_ppl_ratio must be > 1 (1.25 allows a 25% increase), got {max_ratio}")
    dense = score([])
    top = min(max_layers or scan.num_layers - 2, scan.num_layers - 2)
    curve: list[dict] = []
    for n in range(1, top + 1):
        c = choose(strategy, scan, n, lambda: score, top_k)
        p = c.perplexity if c.perplexity is not None else score(c.removed)
        curve.append({"n": n, "removed": c.removed, "perplexity": p, "ratio": p / dense, "within": p <= max_ratio * dense})
        log.info("budget: n=%d removes %s: perplexity %.3f = %.3fx dense (budget %.2fx)", n, format_layers(c.removed),
                 p, p / dense, max_ratio)
        if not curve[-1]["within"]:
            break
    n = sum(1 for _ in takewhile(lambda r: r["within"], curve))
    return Budget(max_ratio, dense, n, curve)
