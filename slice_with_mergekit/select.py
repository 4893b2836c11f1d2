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
from typing import Callable

from pydantic import BaseModel, Field, field_validator

from compute_block_similarity.flags import one_of
from compute_block_similarity.ranges import format_layers
from compute_block_similarity.scanfile import ScanFile

from .evaluate import LOGITS_BYTES
from .race import Race, TieBreak, pick_candidates, race, settle_ties
from .scoring import Scorer

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
