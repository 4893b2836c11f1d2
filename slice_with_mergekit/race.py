"""The race (`--select race`): the scan's candidates from every metric, one per region of the depth,
raced by real calibration loss: each round scores the survivors on a growing share of the windows and
drops those clearly behind the leader (paired standard errors), until one is left or the text is spent;
ties the loss cannot separate go to the scan (`--tie_break`). The strategy that runs it is in select.py."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, get_args

from tqdm import tqdm

from compute_block_similarity.flags import one_of
from compute_block_similarity.ranges import format_layers
from compute_block_similarity.scanfile import ScanFile

from .scoring import Scorer

log = logging.getLogger(__name__)


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
