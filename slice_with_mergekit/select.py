"""Choosing which layers to cut. The angle scan is a cheap proxy; these strategies check it
against the real perplexity of the model with the layers removed (in memory, nothing written).

Strategies live in the ``STRATEGIES`` registry, each with its cost declared beside it, counted in
calibration passes (one forward pass of the model over the calibration text; with a repair, each
candidate costs one more pass for its bridge). The scan itself is one pass with every strategy.
``exhaustive`` (every contiguous block, L - n + 1 passes) is the reference the benchmarks use.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import takewhile
from typing import Any, Callable, Iterator, Literal, Sequence, get_args

from pydantic import BaseModel, Field, field_validator
from tqdm import tqdm

from compute_block_similarity.flags import one_of
from compute_block_similarity.ranges import format_layers
from compute_block_similarity.scanfile import ScanFile

from .evaluate import (
    LOGITS_BYTES,
    head_share,
    perplexity,
    sample_scored,
    tokenize_windows,
)
from .inmemory import removed_layers
from .repair_fit import FitOptions, TooFewTokens, fit_repairs

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Strategy:
    name: str
    select: Callable[..., "Choice"]  # (scan, n, score, top_k[, cfg]) -> Choice; score is None unless needs_scorer
    cost: str  # extra calibration passes, as a formula
    help: str
    needs_scorer: bool
    top_k: int = 0  # candidates scored by loss when --top_k is not given (0: the strategy takes none)
    races: bool = False  # takes the race's rules (a Race, as cfg)


STRATEGIES: dict[str, Strategy] = {}


def strategy(name: str, cost: str, help: str, needs_scorer: bool, top_k: int = 0, races: bool = False) -> Callable:
    def register(fn: Callable) -> Callable:
        STRATEGIES[name] = Strategy(name, fn, cost, help, needs_scorer, top_k, races)
        return fn

    return register


@dataclass
class Choice:
    strategy: str
    removed: list[int]
    passes: float  # calibration passes spent (forward tokens / one pass's)
    perplexity: float | None = None
    candidates: list[dict] = field(default_factory=list)
    confidence: dict | None = None  # the runner-up, the loss gap to it and its paired standard error
    bridge: dict | None = None  # with a repair: the chosen cut's plain and bridged perplexity, whether it leans on it


FOLDS = 2  # cross-fitting: text j is in fold j % FOLDS


def paired_diff(wa: dict[int, tuple[float, int]], wb: dict[int, tuple[float, int]],
                idx: Sequence[int]) -> tuple[float, float]:
    """(mean per-token NLL of ``wa`` minus ``wb`` over windows ``idx``, its standard error): a ratio
    estimator, windows as the sampling unit. ``wa``, ``wb``: window -> (NLL sum, tokens), the same
    tokens in both."""
    d = [wa[i][0] - wb[i][0] for i in idx]  # per-window NLL difference
    t = [wa[i][1] for i in idx]
    T, k = sum(t), len(d)
    diff = sum(d) / T
    if k < 2:
        return diff, math.inf
    var = k / (k - 1) * sum((di - ti * diff) ** 2 for di, ti in zip(d, t)) / T**2
    return diff, math.sqrt(var)


class Scorer:
    """Perplexity of the model with some layers removed, on fixed calibration windows; with
    ``repair`` (see repair.REPAIRS), of the model with the layers removed and the cut bridged,
    cross-fitted: the calibration texts are split in two folds (alternate texts), and the windows of
    each fold are scored under a bridge fitted on the other fold's texts, so a candidate is ranked by
    what its bridge does on text it did not see (the chosen cut's final bridge is fitted on all of it,
    and guarded: kept only if it lowers held-out loss; a candidate's bridge is not, since its scored
    windows are that test already).

    With a large vocabulary the LM head costs more than the decoder; then each window is scored at
    ``score_share`` of its next-token positions (default: the share at which the head costs what the
    decoder costs; all of them for small vocabularies), and every loss and paired SE is over those.

    Losses are kept per window, so a candidate can be scored on a share of the windows first
    (``share``: the first windows of a fixed shuffled order) and on more later, paying only for the
    new ones. ``passes`` counts the forward tokens run, in units of one pass over every window."""

    _plain: "Scorer | None" = None  # plain cuts on the same windows, made by plain()

    def __init__(self, model: Any, tok: Any, texts: Sequence[str], max_length: int = 256, stride: int = 256,
                 batch_size: int = 8, repair: str = "none", seed: int = 0, logits_bytes: int = LOGITS_BYTES,
                 score_share: float | None = None, plain_weight: float = 0.0, bridge_texts: int | None = 64):
        self.model, self.tok, self.texts, self.batch_size = model, tok, texts, batch_size
        self.score_share = head_share(model) if score_share is None else score_share
        text_of: list[int] = []
        self.wins = sample_scored(tokenize_windows(tok, texts, max_length, stride, text_of), self.score_share)
        self.folds = FOLDS
        self.fold = [j % FOLDS for j in text_of]  # per window
        self.order = list(range(len(self.wins)))
        random.Random(seed).shuffle(self.order)  # growing shares: representative, nested
        self.total_tokens = sum(len(w[0]) for w in self.wins)
        self.kw = dict(max_length=max_length, stride=stride)
        self.repair, self.logits_bytes, self.plain_weight = repair, logits_bytes, plain_weight
        self.max_bridge_texts = bridge_texts  # texts per fold's bridges (at least a quarter); None: the whole fold
        self.tokens_run = 0
        self.windows: dict[tuple[int, ...], dict[int, tuple[float, int]]] = {}  # cut -> window -> (nll sum, tokens)
        self.bridged: dict[tuple[int, ...], dict[int, tuple[float, int]]] = {}  # the same, bridged alone
        self.bridges: dict[tuple[tuple[int, ...], int], Any] = {}  # (cut, fold scored) -> bridge fitted off it

    def plain(self) -> "Scorer":
        """The scorer of the plain cuts (no bridge) on the same windows, in the same order; one per
        scorer, so windows it scored are not run again, and its forwards count in ``passes``."""
        if self._plain is None:
            s = copy.copy(self)
            s.repair, s.windows, s.bridged, s.bridges, s.tokens_run = "none", {}, {}, {}, 0
            self._plain = s
        return self._plain

    def log_gain(self, removed: Sequence[int], idx: Sequence[int]) -> tuple[float, float]:
        """How much the bridge carries the cut: (log of its plain perplexity over its bridged one on
        windows ``idx``, the paired SE over them); runs the windows not yet scored either way."""
        key = tuple(sorted(removed))
        self.score_on(key, idx)
        self.plain().score_on(key, idx)
        return paired_diff(self.plain().windows[key], self.bridged[key], idx)

    @property
    def passes(self) -> float:
        """Forward tokens run so far, in passes over the calibration windows (a bridge fit counts one;
        plain cuts scored for log_gain() count too)."""
        return (self.tokens_run + (self._plain.tokens_run if self._plain is not None else 0)) / self.total_tokens

    @property
    def num_windows(self) -> int:
        return len(self.wins)

    def share(self, m: int) -> list[int]:
        """The first ``m`` windows of the fixed shuffled order."""
        return sorted(self.order[:m])

    def score_on(self, removed: Sequence[int], idx: Sequence[int]) -> float:
        """Mean NLL per token of the cut on windows ``idx``; runs only the windows not yet scored."""
        key = tuple(sorted(removed))
        have = self.windows.setdefault(key, {})
        todo = [i for i in idx if i not in have]
        if todo and self.repair != "none" and key:
            self.prepare([key])  # a cut no one prepared: its own pass (and the folds settled)
        folds = range(self.folds) if self.repair != "none" and key else [None]
        for f in folds:
            part = [i for i in todo if f is None or self.fold[i] == f]
            if not part:
                continue
            per = self._run(key, part, self._bridge(key, f))  # the bridge is fitted on the dense model
            self.bridged.setdefault(key, {}).update(zip(part, per))
            if f is not None and self.plain_weight > 0:  # (1 - w) bridged + w plain, window by window
                w = self.plain_weight
                per = [((1 - w) * b + w * p, t) for (b, t), (p, _) in zip(per, self._run(key, part, nullcontext()))]
            have.update(zip(part, per))
        return sum(have[i][0] for i in idx) / sum(have[i][1] for i in idx)

    def _run(self, key: tuple[int, ...], part: list[int], bridge: Any) -> list[tuple[float, int]]:
        """(NLL sum, tokens) of windows ``part`` with the layers ``key`` removed, within ``bridge``."""
        per: list = []
        with removed_layers(self.model, key), bridge:
            perplexity(self.model, self.tok, [], batch_size=self.batch_size, _windows=[self.wins[i] for i in part],
                       logits_bytes=self.logits_bytes, per_window=per, **self.kw)
        self.tokens_run += sum(len(self.wins[i][0]) for i in part)
        return per

    def __call__(self, removed: Sequence[int]) -> float:
        """Perplexity of the cut on every calibration window."""
        return math.exp(self.score_on(removed, range(self.num_windows)))

    def scored(self, removed: Sequence[int]) -> int:
        """How many windows the cut has been scored on."""
        return len(self.windows.get(tuple(sorted(removed)), {}))

    def seen_perplexity(self, removed: Sequence[int]) -> float:
        """Perplexity of the cut on the windows it has been scored on (runs nothing)."""
        key = tuple(sorted(removed))
        return math.exp(self.score_on(key, sorted(self.windows[key])))

    def paired(self, a: Sequence[int], b: Sequence[int], idx: Sequence[int] | None = None) -> tuple[float, float]:
        """(mean per-token NLL of cut ``a`` minus cut ``b``, its standard error), paired over the same
        calibration windows (``idx``, default: every window both were scored on)."""
        wa, wb = self.windows[tuple(sorted(a))], self.windows[tuple(sorted(b))]
        return paired_diff(wa, wb, sorted(set(wa) & set(wb)) if idx is None else list(idx))

    def bridge_texts(self, fold: int) -> list[int]:
        """The texts (indices) whose bridges score the windows of ``fold``: the other folds' texts, at
        most a quarter of the calibration text or ``bridge_texts`` texts, whichever is more (None: all
        of them)."""
        other = [j for j in range(len(self.texts)) if self.folds == 1 or j % self.folds != fold]
        cap = self.max_bridge_texts
        return other if cap is None else other[: max(cap, len(self.texts) // 4)]

    def prepare(self, cuts: Sequence[Sequence[int]]) -> None:
        """Fit the bridges of every cut not yet bridged, one per fold, their statistics collected in one
        shared pass over each fold's bridge texts (counted once), instead of a pass per cut."""
        if self.repair == "none":
            return
        todo = [c for c in dict.fromkeys(tuple(sorted(c)) for c in cuts if c) if (c, 0) not in self.bridges]
        if not todo:
            return
        try:
            self._fit(todo)
        except TooFewTokens as e:
            if self.folds == 1 or any(self.windows.values()):  # cross-fitted scores exist: no switching
                raise
            log.warning("too little calibration text to cross-fit the candidates' bridges (%s): each is scored on the "
                        "text it is fitted on, which flatters a bridge; raise --dataset_size for out-of-sample scores",
                        str(e).split(";")[0])
            self.folds, self.fold, self.bridges = 1, [0] * len(self.wins), {}
            self._fit(todo)

    def _fit(self, todo: list[tuple[int, ...]]) -> None:
        for f in range(self.folds):
            idx = self.bridge_texts(f)
            # no guard: a bridge is judged by the windows it scores, out of sample; the guard's two held-out
            # perplexities per cut and fold cost 0.18 passes a cut (SmolLM2), more than the shared fit pass
            log.info("race: fitting the bridges of %d candidates in one pass over %d texts (fold %d of %d)",
                     len(todo), len(idx), f + 1, self.folds)
            with quiet("slice_with_mergekit.repair_fit"):  # a log line per candidate's bridge is noise
                fit = FitOptions(method=self.repair, batch_size=self.batch_size, max_length=self.kw["max_length"],
                                 guard=False, skip_unfoldable=True)
                fits = fit_repairs(self.model, self.tok, [self.texts[j] for j in idx], todo, fit)
            self.bridges.update({(c, f): r for c, r in fits.items()})
            self.tokens_run += self.total_tokens * len(idx) / len(self.texts)

    def _bridge(self, removed: tuple[int, ...], fold: int | None) -> Any:
        if self.repair == "none" or not removed or fold is None:
            return nullcontext()
        return self.bridges[(removed, fold)].in_memory()  # prepared by score_on


@contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Only warnings from ``logger`` while inside."""
    lg = logging.getLogger(logger)
    level = lg.level
    lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        lg.setLevel(level)


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
    score.prepare([range(s, s + n) for s in scan.ranking(n)[:top_k]])
    for s in scan.ranking(n)[:top_k]:
        p = score(list(range(s, s + n)))
        cands.append({"start": s, "removed": format_layers(range(s, s + n)), "perplexity": p,
                      "score": scan.scores(n)[s]})
        log.info("candidate block [%d, %d): perplexity %.3f", s, s + n, p)
    return cands


@strategy("ppl", cost="top_k", help="re-rank the scan's top-k blocks by the real perplexity of the model without them",
          needs_scorer=True, top_k=5)
def select_ppl(scan: ScanFile, n: int, score: Scorer, top_k: int = 5) -> Choice:
    passes0 = score.passes
    cands = top_k_by_loss(scan, n, score, top_k)
    best = min(cands, key=lambda c: c["perplexity"])
    return with_confidence(Choice("ppl", list(range(best["start"], best["start"] + n)), score.passes - passes0,
                                  best["perplexity"], cands), score, n)


def with_confidence(c: Choice, score: Scorer, n: int) -> Choice:
    """Each candidate's calibration loss minus the chosen cut's, with its paired standard error over
    the windows both were scored on; the log says by how many standard errors the choice beats the
    runner-up, the rival it beats least clearly."""
    for x in c.candidates:
        d, se = score.paired(range(x["start"], x["start"] + n), c.removed)
        x["nll_minus_chosen"], x["se"] = d, (se if math.isfinite(se) else None)
    rivals = [x for x in c.candidates if x["start"] != c.removed[0] and not x.get("set_aside")]
    if rivals:  # the runner-up: the rival least clearly beaten (fewest standard errors behind)
        r = min(rivals, key=lambda x: (x["nll_minus_chosen"] / x["se"] if x["se"] else math.inf, x["nll_minus_chosen"]))
        z = r["nll_minus_chosen"] / r["se"] if r["se"] else None
        c.confidence = {"runner_up": r["start"], "nll_gap": r["nll_minus_chosen"], "se": r["se"], "z": z}
        if r["nll_minus_chosen"] < 0:  # the choice is not the loss leader: a tie given to the scan (--tie_break)
            log.info("--select %s: %s trails %s by %.4f nats/token (paired SE %.4f, %.1f SE), a tie on the calibration "
                     "loss, which the scan breaks (--tie_break)", c.strategy, format_layers(c.removed),
                     format_layers(range(r["start"], r["start"] + n)), -r["nll_minus_chosen"], r["se"] or 0.0, -(z or 0.0))
            return c
        log.info("--select %s: %s beats the runner-up %s by %.4f nats/token (paired SE %.4f, %.1f SE)%s", c.strategy,
                 format_layers(c.removed), format_layers(range(r["start"], r["start"] + n)), r["nll_minus_chosen"],
                 r["se"] or 0.0, z or 0.0, "" if z is None or z >= 2 else
                 ": close; more calibration text (--dataset_size) would separate them")
    return c


@strategy("refine", cost="top_k + 2 + one per shift",
          help="--select ppl, then shift the best block one layer at a time while a neighbour is better",
          needs_scorer=True, top_k=5)
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


def pick_candidates(scan: ScanFile, n: int, k: int) -> list[int]:
    """Up to ``k`` block starts to score, covering different regions of the depth first.

    Every metric the scan computed votes: a block's rank is the best rank any metric gives it (ties:
    the primary metric's order). Blocks are taken in that order, skipping any that overlaps one
    already taken, until no non-overlapping block is left; the rest are filled by rank."""
    rank = {s: i for i, s in enumerate(scan.ranking(n))}  # the primary metric's
    best = dict(rank)
    for m, b in scan.all_metrics.items():
        if m != scan.metric and n in b.distances:
            for i, s in enumerate(scan.ranking(n, m)):
                best[s] = min(best[s], i)
    order = sorted(rank, key=lambda s: (best[s], rank[s]))
    picked: list[int] = []
    for s in order:  # one per region
        if len(picked) < k and all(abs(s - p) >= n for p in picked):
            picked.append(s)
    for s in order:  # then by rank
        if len(picked) < k and s not in picked:
            picked.append(s)
    return picked


TieBreak = Literal["auto", "scan", "loss"]  # ties to the scan's favourite, or the lowest loss; auto: scan under a repair


@dataclass
class Race:
    """The race's rules: successive halving on growing shares of the calibration windows, with early
    stopping; with a repair, cuts their bridge carries set aside, and ties given to the scan. The
    defaults are prune's (SelectOptions takes its flags' defaults from here)."""

    first_share: float = 0.03  # windows every candidate is scored on first (8 of prune's 264: min_windows)
    z: float = 2.0  # a candidate more than z paired standard errors behind the leader is dropped
    min_windows: int = 8
    max_gain: float | None = 5.0  # with a repair: a cut whose plain perplexity is over this x its bridged one is set aside
    tie_break: TieBreak = "auto"
    tie_margin: float = 1.03  # perplexity ratio: a rival not clearly this far above the loss leader is tied with it

    def __post_init__(self) -> None:
        one_of("--tie_break", get_args(TieBreak), self.tie_break)
        if self.tie_margin < 1:
            raise ValueError(f"--tie_margin must be >= 1 (a perplexity ratio), got {self.tie_margin}")

    def first(self, W: int) -> int:
        """How many of ``W`` windows the first round scores."""
        return min(W, max(self.min_windows, math.ceil(W * self.first_share)))

    def scan_breaks_ties(self, repair: str) -> bool:
        """Whether ties go to the scan for candidates scored under ``repair`` ("auto": under a bridge)."""
        return self.tie_break == "scan" or (self.tie_break == "auto" and repair != "none")


def race(score: Scorer, cuts: list[tuple[int, ...]], cfg: Race = Race()) -> tuple[tuple[int, ...], dict]:
    """The cut with the lowest calibration loss among ``cuts``, found without scoring every cut on
    every window: all are scored on a first share, then, at each doubling of the share, the
    candidates clearly behind the leader (``z`` paired SEs) are dropped and at most half (at least
    two) survive. Ends early when one is left, else when the survivors have seen every window.
    With ``cfg.max_gain``, the first round skips the cuts its bridge carries (see first_round()).
    Ties are settle_ties()'s (select_race calls it once, after shifting the loss leader). Returns
    (winner, {cut: the round it was dropped in, -1 if set aside, None for the winner})."""
    score.prepare(cuts)  # every candidate's bridge from one shared pass
    W = score.num_windows
    m = cfg.first(W)
    dropped: dict[tuple[int, ...], int | None] = dict.fromkeys(cuts)  # None: still in the race
    alive, rnd = list(dropped), 0
    while True:
        idx = score.share(m)
        nll = {c: score.score_on(c, idx) for c in tqdm(alive, desc=f"race round {rnd + 1}: {len(alive)} cuts on {m} of "
                                                                     f"{W} windows", unit="cut", leave=False)}
        ranked = sorted(alive, key=lambda c: nll[c])
        k = len(alive) if m == W else max(2, math.ceil(len(alive) / 2))  # the last two meet on every window
        if rnd == 0:
            keep, aside = first_round(score, ranked, idx, k, cfg)
            dropped.update(dict.fromkeys(aside, -1))
        else:
            keep = survivors(score, ranked, idx, k, cfg.z)
        dropped.update({c: rnd for c in alive if c not in keep and dropped[c] != -1})
        log.info("race round %d: %d cuts on %d of %d windows, %d kept; leader %s at perplexity %.3f (%.2f passes so far)",
                 rnd + 1, len(alive), m, W, len(keep), format_layers(keep[0]), math.exp(nll[keep[0]]), score.passes)
        alive = keep
        if len(alive) == 1 or m == W:
            break
        m, rnd = min(W, 2 * m), rnd + 1
    return alive[0], dropped


def survivors(score: Scorer, ranked: list[tuple[int, ...]], idx: list[int], k: int, z: float) -> list[tuple[int, ...]]:
    """The best ``k`` of ``ranked`` (best first on windows ``idx``) not clearly behind the first."""
    return [c for c in ranked if c == ranked[0] or not _clearly_behind(score, c, ranked[0], idx, z)][:k]


def first_round(score: Scorer, ranked: list[tuple[int, ...]], idx: list[int], k: int,
                cfg: Race = Race()) -> tuple[list, list]:
    """The first round's survivors among ``ranked`` (best first on windows ``idx``): the best cut a
    bridge does not carry (carried()) leads, and up to ``k`` in all not clearly behind it survive. The
    cuts are walked best first, so only those walked past pay carried()'s plain forward; one ranked
    too low to survive is dropped without it. When every cut is carried, none is set aside.
    Returns (survivors, set aside)."""
    keep: list[tuple[int, ...]] = []
    aside: list[tuple[int, ...]] = []
    for c in ranked:
        if len(keep) == k:
            break
        if keep and _clearly_behind(score, c, keep[0], idx, cfg.z):
            continue
        (aside if len(ranked) > 1 and carried(score, c, idx, cfg) else keep).append(c)
    if not keep:  # every cut carried: race them all
        return survivors(score, ranked, idx, k, cfg.z), []
    return keep, aside


def settle_ties(score: Scorer, win: tuple[int, ...], dropped: dict, prior: dict, cfg: Race = Race()) -> tuple[tuple, dict]:
    """``win`` (the loss leader) or, when ``cfg`` gives ties to the scan, the scan's favourite among the
    raced cuts tied with it (not set aside; ``prior``: the scan's score, lower wins); see
    scan_tie_break(). Returns (winner, ``dropped`` updated as race() gives it)."""
    if not cfg.scan_breaks_ties(score.repair):
        return win, dropped
    rivals = [c for c, r in dropped.items() if c != win and r != -1]
    new, aside = scan_tie_break(score, win, rivals, prior, cfg)
    dropped.update(dict.fromkeys(aside, -1))
    if new != win:
        dropped[win], dropped[new] = max((r for r in dropped.values() if r is not None), default=0), None
    return new, dropped


def scan_tie_break(score: Scorer, win: tuple[int, ...], rivals: list[tuple[int, ...]], prior: dict,
                   cfg: Race = Race()) -> tuple[tuple, list]:
    """The scan's favourite among ``win`` (the loss leader) and the ``rivals`` tied with it: a rival
    is tied unless its calibration perplexity is clearly (``z`` paired SEs) more than ``cfg.tie_margin``
    times the leader's. Each rival the scan ranks above ``win`` (lower ``prior``), best
    first, is scored beside it on doubling shares of the windows from the share it has seen, until
    it is clearly beyond the margin (next rival) or has met it on every window (tied: it wins). A
    rival its bridge carries (carried() on the first share, tested once it is not clearly beyond
    the margin on the windows it has seen) is passed over, as the race sets such cuts aside.
    Returns (the winner, the rivals set aside)."""
    W, margin, z = score.num_windows, math.log(cfg.tie_margin), cfg.z  # margin: nats/token
    first, aside = score.share(cfg.first(W)), []
    for c in sorted((r for r in rivals if prior[r] < prior[win]), key=prior.get):
        m, tested = score.scored(c), False
        while True:
            idx = score.share(m)
            for x in (win, c):
                score.score_on(x, idx)
            if _clearly_behind(score, c, win, idx, z, margin):
                break
            if not tested:  # once, when the margin alone does not settle it
                tested = True
                if carried(score, c, first, cfg):
                    aside.append(c)
                    break
            if m == W:
                log.info("race: %s is within %.3fx of %s's calibration perplexity (%g paired SE on every window), a "
                         "tie (--tie_margin %.3g): %s, the scan's favourite, wins", format_layers(c),
                         math.exp(score.paired(c, win)[0]), format_layers(win), z, math.exp(margin), format_layers(c))
                return c, aside
            m = min(W, 2 * m)
    return win, aside


def carried(score: Scorer, c: tuple[int, ...], idx: list[int], cfg: Race = Race()) -> bool:
    """Whether ``c``'s bridge carries it: log_gain() on windows ``idx`` over log ``cfg.max_gain`` (never
    without a repair or a limit). Tested on the first ``cfg.min_windows`` of them first, and on all
    only when those leave it within ``cfg.z`` paired SEs of the limit. Such a cut is set aside: a
    bridge rescues a badly damaged block less on other text than on the calibration text."""
    if cfg.max_gain is None or score.repair == "none":
        return False
    limit = math.log(cfg.max_gain)
    few = score.share(min(cfg.min_windows, len(idx)))
    for part in (few, idx) if len(idx) > len(few) else (idx,):
        lg, se = score.log_gain(c, part)
        if abs(lg - limit) > cfg.z * se:
            break
    if lg > limit:
        log.info("race: %s set aside: bridge-dependent (plain cut %.1fx its bridged perplexity on %d windows, over "
                 "--max_bridge_gain %g)", format_layers(c), math.exp(lg), len(part), cfg.max_gain)
    return lg > limit


def _clearly_behind(score: Scorer, c: tuple, leader: tuple, idx: list[int], z: float, margin: float = 0.0) -> bool:
    """Cut ``c``'s loss on windows ``idx`` more than ``margin`` nats/token above the leader's, by ``z`` paired SEs."""
    d, se = score.paired(c, leader, idx)
    return d - margin > z * se


@strategy("race", cost="1 to 4.5 passes measured (top_k candidates, most dropped on a share of the text)",
          help="the scan's candidates from every metric, one per region of the depth, raced by real loss on a "
               "growing share of the calibration text (successive halving, clear losers dropped early), then "
               "the winner shifted a layer while a neighbour wins", needs_scorer=True, top_k=16, races=True)
def select_race(scan: ScanFile, n: int, score: Scorer, top_k: int = 16, cfg: Race = Race()) -> Choice:
    passes0 = score.passes
    block = lambda s: tuple(range(s, s + n))  # noqa: E731
    picked = pick_candidates(scan, n, top_k)
    for s in picked:
        log.info("candidate block [%d, %d)", s, s + n)
    win, dropped = race(score, [block(s) for s in picked], cfg)  # the loss leader
    last = scan.num_layers - n
    shifted = {win[0]}
    while True:  # shift the winner while a neighbour beats it; a neighbour halved out earlier races again
        new = [t for t in (win[0] - 1, win[0] + 1) if 0 <= t <= last and t not in shifted]
        if not new:
            break
        shifted.update(new)
        w2, d2 = race(score, [win, *map(block, new)], cfg)
        dropped.update({c: r for c, r in d2.items() if c[0] in new})
        if w2 == win:
            break
        log.info("race: block [%d, %d) beats its neighbour [%d, %d)", w2[0], w2[0] + n, win[0], win[0] + n)
        win = w2
    prior = {block(s): v for s, v in enumerate(scan.scores(n))}  # the scan's score: no bridge or loss fit shapes it
    win, dropped = settle_ties(score, win, dropped, prior, cfg)
    cands = [{"start": c[0], "removed": format_layers(c), "windows": score.scored(c),
              "perplexity": score.seen_perplexity(c),  # on the windows each one was scored on
              "score": scan.scores(n)[c[0]], "dropped_in_round": r,
              **({"set_aside": True} if r == -1 else {})} for c, r in dropped.items()]
    return with_confidence(Choice("race", list(win), score.passes - passes0, score.seen_perplexity(win), cands),
                           score, n)


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
    score.prepare([range(s, s + n) for s in range(num_layers - n + 1)])
    return {s: score(list(range(s, s + n))) for s in range(num_layers - n + 1)}


BRIDGE_DEPENDENT = 2.0  # a cut whose plain perplexity is this many times its bridged one leans on its bridge


def bridge_dependence(score: Scorer, c: Choice, cfg: Race = Race()) -> Choice:
    """With a repair: the chosen cut's plain loss beside its bridged one on the race's first share of
    the windows (where the race's set-aside test has usually scored it); a warning when the bridge carries
    it (plain / bridged perplexity > BRIDGE_DEPENDENT), because a bridge rescues a badly damaged block
    less on other text than on the calibration text."""
    key = tuple(c.removed)
    if score.repair == "none" or key not in score.bridged:
        return c
    idx = score.share(cfg.first(score.num_windows))
    passes0 = score.passes
    lg, _ = score.log_gain(key, idx)  # runs the windows not yet scored either way
    seen = score.bridged[key]
    b = math.exp(sum(seen[i][0] for i in idx) / sum(seen[i][1] for i in idx))
    p = b * math.exp(lg)
    c.passes += score.passes - passes0
    c.bridge = {"plain_perplexity": p, "bridged_perplexity": b, "ratio": p / b, "dependent": p / b > BRIDGE_DEPENDENT,
                "windows": len(idx)}
    if c.bridge["dependent"]:
        log.warning("--select %s: %s is bridge-dependent: its plain cut scores %.3f against %.3f bridged (%.1fx) on "
                    "%d calibration windows; a bridge transfers worse to other text than it scores here, so judge it "
                    "on your own text (prune --eval_dataset) or compare --repair none", c.strategy,
                    format_layers(c.removed), p, b, p / b, len(idx))
    return c


def choose(name: str, scan: ScanFile, n: int, score_factory: Callable[[], Scorer] | None,
           top_k: int | None = None, cfg: Race = Race()) -> Choice:
    """The strategy's choice of n layers; ``top_k`` None: the strategy's own default; ``cfg``: the
    race's rules, for a strategy that races."""
    st = STRATEGIES[one_of("--select", STRATEGIES, name)]
    top_k = st.top_k if top_k is None else top_k
    if not st.needs_scorer:
        return st.select(scan, n, None, top_k)
    if top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {top_k}")
    score = score_factory()
    c = st.select(scan, n, score, top_k, cfg) if st.races else st.select(scan, n, score, top_k)
    return bridge_dependence(score, c, cfg)


def strategies_help() -> str:
    return f"how the block is chosen, one of: {', '.join(STRATEGIES)}; " + "; ".join(
        f"{s.name}: {s.help} ({s.cost} extra passes)" for s in STRATEGIES.values())


class SelectOptions(BaseModel):
    """Block selection"""

    select: str = Field("race", description=strategies_help(), json_schema_extra={"choices": list(STRATEGIES)})
    top_k: int | None = Field(None, ge=1, description="candidate blocks scored by loss: race scores them on a "
                              "growing share of the calibration text; ppl and refine each on all of it (one pass each) "
                              "(default: " + ", ".join(f"{s.name} {s.top_k}" for s in STRATEGIES.values() if s.top_k)
                              + ")")
    select_texts: int | None = Field(None, ge=1, description="calibration texts that score the candidates "
                                     "(default: all the scan's)")
    score_share: float | None = Field(None, gt=0, le=1, description="share of each calibration window's next-token "
                                      "positions a candidate is scored on (default: all, unless the LM head costs more "
                                      "than the decoder per token, as with Gemma's 262k vocabulary: then the share at "
                                      "which it costs as much)")
    logits_bytes: int = Field(LOGITS_BYTES, ge=1, description="float32 logits the scoring holds at once (the LM head "
                              "runs in chunks of positions; bounds the memory whatever the vocabulary)")
    plain_weight: float = Field(0.0, ge=0, le=1, description="with a repair: rank the candidates by (1 - w) x bridged "
                                "+ w x plain loss per token (0: the bridged loss alone; each window then costs two "
                                "forwards): a cut that leans on its bridge transfers worse to other text")

    max_bridge_gain: float | None = Field(Race.max_gain, gt=1, description="with a repair: --select race sets aside the "
                                          "candidates whose plain cut's perplexity is more than this many times their "
                                          "bridged one on the first share of the calibration text (unless all are; "
                                          "only those that could survive the first round are tested): a "
                                          "bridge that rescues a badly damaged block transfers worse to other text "
                                          "(measured on SmolLM2, bench/transfer_smollm2_gain5.txt)")

    tie_break: TieBreak = Field(
        Race.tie_break, description="--select race: the candidates the calibration loss cannot separate from the winner (never "
        "2 paired SE behind it) challenge it on every window, the scan's favourites first, and a tie goes to the one "
        "the scan ranks first (scan), or the lowest loss keeps it (loss); auto: scan when the candidates are scored "
        "under a bridge (--repair), whose fit transfers worse to other text than it scores (measured on SmolLM2, "
        "bench/race_rules_smollm2.txt), loss for plain cuts")

    tie_margin: float = Field(Race.tie_margin, ge=1, description="with --tie_break scan (auto under a repair): a candidate whose "
                              "calibration perplexity is not clearly (2 paired SE) more than this many times the loss "
                              "leader's is tied with it, and the scan's favourite among the tied wins (1: only "
                              "statistical ties); a few per cent of calibration loss says little about other text "
                              "(measured on SmolLM2 and Gemma-3-270M, bench/race_rules_*_margin.txt)")

    @field_validator("select")
    @classmethod
    def _known(cls, v: str) -> str:
        return one_of("--select", STRATEGIES, v)

    def race(self) -> Race:
        """The race's rules these options set."""
        return Race(max_gain=self.max_bridge_gain, tie_break=self.tie_break, tie_margin=self.tie_margin)


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


def budget_search(scan: ScanFile, score: Scorer, max_ratio: float, strategy: str = "race", top_k: int | None = None,
                  max_layers: int | None = None, cfg: Race = Race()) -> Budget:
    """Grow n from 1 while the chosen n-layer cut keeps calibration perplexity within ``max_ratio``
    times the dense model's; one scan serves every n. Stops at the first n over budget."""
    if max_ratio <= 1:
        raise ValueError(f"--max_ppl_ratio must be > 1 (1.25 allows a 25% increase), got {max_ratio}")
    dense = score([])
    top = min(max_layers or scan.num_layers - 2, scan.num_layers - 2)
    curve: list[dict] = []
    for n in range(1, top + 1):
        c = choose(strategy, scan, n, lambda: score, top_k, cfg)
        p = score(c.removed)  # on every calibration window, as the dense model (a race may stop on a share)
        curve.append({"n": n, "removed": c.removed, "perplexity": p, "ratio": p / dense, "within": p <= max_ratio * dense})
        log.info("budget: n=%d removes %s: perplexity %.3f = %.3fx dense (budget %.2fx)", n, format_layers(c.removed),
                 p, p / dense, max_ratio)
        if not curve[-1]["within"]:
            break
    n = sum(1 for _ in takewhile(lambda r: r["within"], curve))
    return Budget(max_ratio, dense, n, curve)
