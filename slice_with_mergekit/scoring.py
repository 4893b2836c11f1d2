"""Scoring a cut by real loss: the perplexity of the model without some layers (bridged, cross-fitted,
with a repair) on fixed calibration windows, kept per window so a candidate can be scored on a share of
the text first and on more later, with paired standard errors between cuts. What the strategies in
select.py decide with."""

from __future__ import annotations

import copy
import logging
import math
import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from .evaluate import LOGITS_BYTES, WindowSettings, head_share, perplexity, sample_scored
from .inmemory import removed_layers
from .repair_fit import FitOptions, TooFewTokens, fit_repairs

log = logging.getLogger(__name__)

FOLDS = 2  # cross-fitting: text j is in fold j % FOLDS


@dataclass(frozen=True)
class ScoreSettings:
    """How a ``Scorer`` cuts its texts into windows, runs them and bridges a cut."""

    max_length: int = 256  # tokens per calibration window
    stride: int = 256  # the next window starts this many tokens on (max_length: no overlap)
    batch_size: int = 8  # windows per forward pass
    repair: str = "none"  # a repair.REPAIRS name: cuts scored bridged, cross-fitted; "none": plain cuts
    seed: int = 0  # of the shuffled window order that shares are taken from
    logits_bytes: int = LOGITS_BYTES  # float32 logits of the LM head per chunk
    score_share: float | None = None  # share of each window's next-token positions scored; None: head_share()
    plain_weight: float = 0.0  # a bridged cut's loss is (1 - w) bridged + w plain, window by window
    bridge_texts: int | None = 64  # texts per fold's bridges (at least a quarter of the fold); None: the whole fold

    @property
    def windowing(self) -> WindowSettings:
        return WindowSettings(self.max_length, self.stride)


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

    def __init__(self, model: Any, tok: Any, texts: Sequence[str], settings: ScoreSettings = ScoreSettings()):
        st = self.settings = settings
        self.model, self.tok, self.texts, self.batch_size = model, tok, texts, st.batch_size
        self.score_share = head_share(model) if st.score_share is None else st.score_share
        text_of: list[int] = []
        self.wins = sample_scored(st.windowing.windows(tok, texts, text_of), self.score_share)
        self.folds = FOLDS
        self.fold = [j % FOLDS for j in text_of]  # per window
        self.order = list(range(len(self.wins)))
        random.Random(st.seed).shuffle(self.order)  # growing shares: representative, nested
        self.total_tokens = sum(len(w[0]) for w in self.wins)
        self.repair, self.logits_bytes, self.plain_weight = st.repair, st.logits_bytes, st.plain_weight
        self.max_bridge_texts = st.bridge_texts
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
            perplexity(self.model, self.tok, [], self.settings.windowing, batch_size=self.batch_size,
                       _windows=[self.wins[i] for i in part], logits_bytes=self.logits_bytes, per_window=per)
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
                fit = FitOptions(method=self.repair, batch_size=self.batch_size, max_length=self.settings.max_length,
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
