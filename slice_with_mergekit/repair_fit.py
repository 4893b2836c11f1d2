"""Training-free repair of a cut: a least-squares bridge folded into one weight (ReplaceMe, arXiv 2505.02819).

Removing the run of layers [s, e) hands layer e the state x^s instead of x^e. Layer s-1 writes into
the residual stream through its MLP output projection, whose output m is added to the stream:
x^s = r + m. Fit one d x d matrix T so that

    r + m T  ~=  x^e          (least squares:  T = (M^T M + lam I)^-1 M^T (x^e - x^s + m))

over every calibration token, and fold it into that projection (W <- T^T W for a Linear, W <- W T for
a GPT-2 Conv1D, bias b <- b T). A cut at layer 0 folds into the input embedding (E <- E T), which
is refused when the embedding is tied to the LM head. The result is an ordinary checkpoint.

This module is the fit, in memory (what selection needs); repair_record.py is the record and the fold's
arithmetic (what verify and the card need); repair.py folds a fit into a checkpoint on disk.

Data path, top to bottom:
  calibration texts -> batches -> one forward of the dense model, stopped after the last needed layer,
  with hooks taking m (the writer's output), x^s and x^e at non-pad tokens
  -> float64 M^T M, M^T Y per run, split into a fit part and a held-out part (every 5th text)
  -> ridge strength chosen on the held-out part -> guard: held-out loss bridged vs plain cut
  -> T refitted on all tokens -> repair.safetensors (T, provenance) -> folded into the checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import torch
from pydantic import BaseModel, Field, field_validator
from torch import nn

from compute_block_similarity.batching import tokenize
from compute_block_similarity.errors import UserError
from compute_block_similarity.flags import one_of
from compute_block_similarity.model import input_device, text_config
from compute_block_similarity.ranges import runs as ranges_runs

from .evaluate import head_share, perplexity, sample_scored, tokenize_windows
from .inmemory import read_weight, removed_layers, replaced_weight
from .repair_record import fold_tensor, norm_weight
from .repair_stats import HELDOUT_EVERY, FitOptions, RunStats, collect
from .repair_writers import PostNorm, Writer, find_writer

log = logging.getLogger(__name__)

RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # lam = alpha * mean(diag(M^T M))


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class RepairMethod:
    name: str
    help: str
    stores_tokens: bool  # keeps a sample of (r, m, x^e) tokens for an iterative fit


REPAIRS: dict[str, RepairMethod] = {m.name: m for m in (
    RepairMethod("none", "the plain cut", False),
    RepairMethod("linear", "closed-form least squares with a held-out ridge (one forward pass, no training)", False),
    RepairMethod("cosine", "ReplaceMe's cosine objective: Adam on a token sample, started from the linear fit", True),
)}


def get_repair(name: str) -> RepairMethod:
    return REPAIRS[one_of("--repair", REPAIRS, name)]


def repairs_help() -> str:
    return (f"the bridge over each cut, fitted without training, one of: {', '.join(REPAIRS)} ("
            + "; ".join(f"{m.name}: {m.help}" for m in REPAIRS.values()) + ")")


class RepairOptions(BaseModel):
    """Repair"""

    repair: str = Field("linear", description=repairs_help(), json_schema_extra={"choices": list(REPAIRS)})

    @field_validator("repair")
    @classmethod
    def _known(cls, v: str) -> str:
        return one_of("--repair", REPAIRS, v)


# ---------------------------------------------------------------- the fit


@dataclass
class Bridge:
    start: int
    end: int
    writer: str  # module name in the source model
    kind: str
    T: torch.Tensor  # (d, d) float64
    applied: bool
    ridge: float
    decision: str
    heldout_mse_cut: float | None  # None: not fitted
    heldout_mse_bridged: float | None
    heldout_ppl_cut: float | None = None
    heldout_ppl_bridged: float | None = None
    bias: bool = False  # the writer has a bias, folded too
    T_fit: torch.Tensor | None = field(default=None, repr=False)  # fitted without the held-out fifth, for the guard
    norm: str = ""  # post-norm layers: the norm after the writer, whose gain is refitted too
    norm_offset: float = 0.0  # its weight is gain - offset (1 for Gemma's 1 + w)
    gain: torch.Tensor | None = field(default=None, repr=False)  # (d,) float64
    gain_fit: torch.Tensor | None = field(default=None, repr=False)

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("T", "T_fit", "gain", "gain_fit")}


def _solve(AtA: torch.Tensor, AtY: torch.Tensor, alpha: float) -> torch.Tensor:
    d = AtA.shape[0]
    lam = alpha * float(AtA.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(AtA + lam * torch.eye(d, dtype=AtA.dtype, device=AtA.device))
    if int(info) != 0:
        return torch.linalg.lstsq(AtA + lam * torch.eye(d, dtype=AtA.dtype, device=AtA.device), AtY).solution
    return torch.cholesky_solve(AtY, L)


def _mse(T: torch.Tensor, AtA: torch.Tensor, AtY: torch.Tensor, YtY: float) -> float:
    """sum ||y - m T||^2 from the normal equations: YtY - 2 tr(T^T AtY) + tr(T^T AtA T)."""
    return YtY - 2 * float((T * AtY).sum()) + float((T * (AtA @ T)).sum())


class TooFewTokens(UserError):
    """Fewer calibration tokens than a bridge has unknowns per output."""


def fit_linear(st: RunStats, d: int) -> tuple[torch.Tensor, torch.Tensor, float, float, float]:
    """(T on the fit part, T on all tokens, ridge alpha, held-out mse of the plain cut, of the bridge)."""
    if st.tokens[0] < d:
        raise TooFewTokens(f"the bridge has {d} x {d} unknowns but only {st.tokens[0]} calibration tokens to fit them; "
                        f"give at least {d * HELDOUT_EVERY // (HELDOUT_EVERY - 1) + 1} tokens "
                        "(raise --dataset_size or --max_length)")
    has_heldout = st.tokens[1] > 0
    best = None
    for alpha in RIDGE_GRID:
        T = _solve(st.AtA[0], st.AtY[0], alpha)
        err = _mse(T, st.AtA[1], st.AtY[1], st.YtY[1]) if has_heldout else _mse(T, st.AtA[0], st.AtY[0], st.YtY[0])
        if best is None or err < best[0]:
            best = (err, alpha, T)
    err, alpha, T_fit = best
    T_all = _solve(st.AtA[0] + st.AtA[1], st.AtY[0] + st.AtY[1], alpha)
    n = max(st.tokens[1], 1) if has_heldout else st.tokens[0]
    cut = (st.EtE[1] if has_heldout else st.EtE[0]) / n
    return T_fit, T_all, alpha, cut, err / n


def fit_cosine(st: RunStats, T0: torch.Tensor, steps: int = 100, lr: float = 1e-4) -> torch.Tensor:
    """ReplaceMe's variant: minimise mean(1 - cos(r + m T, x^e)) with Adam, from the linear fit."""
    if not st.sample:
        return T0
    r, m, xe = torch.cat(st.sample, dim=1).to(T0.device)  # each (N, d)
    T = T0.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([T], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = (1 - torch.nn.functional.cosine_similarity(r + m @ T, xe, dim=-1)).mean()
        loss.backward()
        opt.step()
    return T.detach().double()


# ---------------------------------------------------------------- applying a bridge


def fit_gain(st: RunStats, T: torch.Tensor, pn: PostNorm) -> torch.Tensor:
    """The post-norm gain, per channel, by least squares once T is fixed: g_j = sum n_j r_j / sum n_j^2
    with n = rms_norm(m T) and r = x^e - h, over the sampled calibration tokens."""
    m, r = torch.cat(st.norm_sample, dim=1).to(T.device)  # each (N, d) float64
    n = pn.apply(m @ T.double(), torch.ones((), dtype=torch.float64, device=T.device))  # (N, d)
    nn_, g0 = (n * n).sum(0), pn.gain().to(T.device)
    fit = nn_ > 1e-12 * nn_.max()  # a channel m T leaves empty keeps its gain (dead channels stay dead)
    return torch.where(fit & pn.live(g0), (n * r).sum(0) / torch.where(fit, nn_, 1.0), g0).cpu()


@contextmanager
def bridged(writers: Sequence[Writer], Ts: Sequence[torch.Tensor],
            gains: Sequence[torch.Tensor | None] | None = None) -> Iterator[None]:
    """Within the block, each writer's weights are folded with its T and a post-norm's weight set to
    its refitted gain (in memory, also where accelerate offloads them); restored on exit."""
    with ExitStack() as stack:
        for w, T, g in zip(writers, Ts, gains or [None] * len(writers)):
            for key in w.params():
                p = read_weight(w.module, key)
                stack.enter_context(replaced_weight(w.module, key, fold_tensor(w.kind, key == "bias", p, T.to(p.device))))
            if w.norm is not None and g is not None:
                stack.enter_context(replaced_weight(w.norm.module, "weight", norm_weight(g, w.norm.offset)))
        yield


@dataclass
class RepairResult:
    method: str
    bridges: list[Bridge]
    calibration: dict
    seconds: float
    writers: dict[int, Writer] = field(default_factory=dict, repr=False)  # by run start, in the fitted model

    @property
    def applied(self) -> list[Bridge]:
        return [b for b in self.bridges if b.applied]

    def in_memory(self) -> Any:
        """A context in which the fitted model carries every applied bridge (combine with removed_layers)."""
        return bridged([self.writers[b.start] for b in self.applied], [b.T for b in self.applied],
                       [b.gain for b in self.applied])

    def record(self) -> dict:
        return {"method": self.method, "calibration": self.calibration, "seconds": round(self.seconds, 3),
                "bridges": [b.record() for b in self.bridges]}


STATS_BYTES = 2 * 2**30  # float64 d x d sums collected in one shared pass (fit_repairs)


@dataclass
class Collected:
    """What one shared pass of the dense model leaves for the fits: each run's writer (or why it has none)
    and its normal equations."""

    writers: dict[int, Writer]
    refused: dict[int, str]
    stats: dict[tuple[int, int], RunStats]


def fit_repair(model: nn.Module, tok: Any, texts: Sequence[str], removed: Sequence[int], fit: FitOptions = FitOptions(),
               calibration: dict | None = None) -> RepairResult:
    """Fit one bridge per contiguous run of ``removed`` on the dense ``model`` (nothing is written).

    A bridge is kept only if the model without the layers but with the bridge has a lower loss on the
    held-out fifth of the calibration text than the plain cut (``fit.guard``). A run whose bridge cannot be
    folded exactly raises UserError, or with ``fit.skip_unfoldable`` is left plain and recorded so."""
    removed = sorted(set(removed))
    return fit_repairs(model, tok, texts, [removed], fit, calibration)[tuple(removed)]


def fit_repairs(model: nn.Module, tok: Any, texts: Sequence[str], cuts: Sequence[Sequence[int]],
                fit: FitOptions = FitOptions(), calibration: dict | None = None,
                stats_bytes: int = STATS_BYTES) -> dict[tuple[int, ...], RepairResult]:
    """fit_repair for every cut in ``cuts`` (each: the removed layers), their bridges' normal equations
    collected in shared forward passes: as many runs per pass as fit in ``stats_bytes``. Returns
    {cut (sorted tuple): its RepairResult}; each result equals fit_repair's for that cut alone."""
    keys = [tuple(sorted(set(c))) for c in cuts]
    if fit.method == "none":
        return {k: RepairResult("none", [], dict(calibration or {}), 0.0) for k in keys}
    if not all(keys):
        raise UserError("the plan removes no layers, so there is nothing to repair")
    t0 = time.perf_counter()
    got = collect_all(model, tok, texts, keys, fit, stats_bytes)
    shared = time.perf_counter() - t0
    out = {}
    for key in keys:
        t1 = time.perf_counter()
        out[key] = _bridge_cut(model, tok, texts, key, got, fit, calibration)
        out[key].seconds = shared + time.perf_counter() - t1
    return out


def collect_all(model: nn.Module, tok: Any, texts: Sequence[str], keys: list[tuple[int, ...]], fit: FitOptions,
                stats_bytes: int) -> Collected:
    """Every run's writer, then the normal equations of every run, in as few passes as ``stats_bytes`` allows."""
    ids, _ = tokenize(tok, texts[:1], 16)
    if not ids:
        raise UserError("the calibration text is empty; give --dataset with real text")
    dev = input_device(model)
    probe = (torch.tensor(ids[:1], device=dev), torch.ones((1, len(ids[0])), dtype=torch.long, device=dev))
    got = Collected({}, {}, {})
    for s in sorted({s for k in keys for s, _ in ranges_runs(k)}):
        try:
            got.writers[s] = find_writer(model, s, probe)
        except UserError as err:
            if not fit.skip_unfoldable:
                raise
            got.refused[s] = str(err)
    runs = sorted({r for k in keys for r in ranges_runs(k) if r[0] in got.writers})
    if fit.method == "cosine" and any(got.writers[s].norm is not None for s, _ in runs):
        raise UserError("--repair cosine cannot fit through the norm after a post-norm layer (Gemma-2/3, OLMo-2); "
                        "use --repair linear")
    d = text_config(model).hidden_size
    per_pass = max(1, stats_bytes // (4 * d * d * 8))  # AtA and AtY for the fit and held-out parts
    sample = fit.sample_tokens if get_repair(fit.method).stores_tokens else 0
    for k in range(0, len(runs), per_pass):
        got.stats.update(collect(model, tok, texts, runs[k : k + per_pass], got.writers, fit, sample))
    return got


def _bridge_cut(model: nn.Module, tok: Any, texts: Sequence[str], removed: tuple[int, ...], got: Collected,
                fit: FitOptions, calibration: dict | None) -> RepairResult:
    """One cut's bridges from the collected statistics: fit, refit the post-norm gains, guard."""
    writers, stats = got.writers, got.stats
    runs = ranges_runs(removed)
    d = text_config(model).hidden_size
    bridges = [Bridge(s, e, "", "", torch.eye(d, dtype=torch.float64), False, 0.0, f"not bridged: {got.refused[s]}",
                      None, None) for s, e in runs if s in got.refused]
    runs = [r for r in runs if r[0] not in got.refused]
    if not runs:
        for b in bridges:
            log.warning("repair [%d, %d): %s", b.start, b.end, b.decision)
        return RepairResult(fit.method, bridges, dict(calibration or {}), 0.0)
    bridges += [_fit_run(stats[(s, e)], writers[s], s, e, d, fit) for s, e in runs]
    fitted = [b for b in bridges if b.start in writers and b.applied]
    if fit.guard:
        _guard(model, tok, texts, removed, fitted, [writers[b.start] for b in fitted], fit.max_length, fit.batch_size)
    else:
        for b in fitted:
            b.decision = "applied (no guard)"
    bridges.sort(key=lambda b: b.start)
    for b in bridges:
        log.info("repair [%d, %d) via %s: %s", b.start, b.end, b.writer, b.decision)
    cal = {**(calibration or {}), "tokens_fit": sum(stats[r].tokens[0] for r in runs) // len(runs),
           "tokens_heldout": sum(stats[r].tokens[1] for r in runs) // len(runs), "max_length": fit.max_length}
    return RepairResult(fit.method, bridges, cal, 0.0, {s: writers[s] for s, _ in runs})


def _fit_run(st: RunStats, w: Writer, s: int, e: int, d: int, fit: FitOptions) -> Bridge:
    """The bridge of one run [s, e) from its normal equations (and a post-norm's refitted gain)."""
    pn = w.norm
    T_fit, T_all, alpha, mse_cut, mse_br = fit_linear(st, d)
    if fit.method == "cosine":
        T_fit = T_all = fit_cosine(st, T_all, steps=fit.cosine_steps)
        mse_br = _mse(T_fit, st.AtA[1], st.AtY[1], st.YtY[1]) / max(st.tokens[1], 1)
    post = {} if pn is None else {"norm": pn.name, "norm_offset": pn.offset, "gain": fit_gain(st, T_all, pn),
                                  "gain_fit": fit_gain(st, T_fit, pn)}
    finite = all(bool(torch.isfinite(x).all()) for x in (T_fit, T_all, *(post.get(k, T_all) for k in ("gain", "gain_fit"))))
    return Bridge(s, e, w.name, w.kind, T_all.cpu(), finite, alpha,
                  "" if finite else "not bridged: the fit is not finite (degenerate calibration activations)",
                  mse_cut, mse_br, bias="bias" in w.params(), T_fit=T_fit.cpu(), **post)


def _guard(model: nn.Module, tok: Any, texts: Sequence[str], removed: Sequence[int], bridges: list[Bridge],
           writers: list[Writer], max_length: int, batch_size: int) -> None:
    """Keep each bridge only if it lowers held-out calibration loss (bridges fitted without that text)."""
    held = [t for i, t in enumerate(t for t in texts if t.strip()) if (i + 1) % HELDOUT_EVERY == 0]
    if not held:
        for b in bridges:
            b.decision = "applied (no held-out calibration text to guard with)"
        return

    # scored as selection scores: at the share of positions where a large vocabulary's LM head costs what the decoder does
    wins = sample_scored(tokenize_windows(tok, held, max_length, max_length), head_share(model))

    def ppl() -> float:
        try:
            return perplexity(model, tok, [], batch_size=batch_size, _windows=wins).perplexity
        except UserError:  # non-finite log-probabilities: a bridge that overflows is refused like one that hurts
            return math.inf

    with removed_layers(model, removed):
        cut = ppl()
        with bridged(writers, [b.T_fit for b in bridges], [b.gain_fit for b in bridges]):
            both = ppl()
    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731  (never inf in a record)
    for b in bridges:
        b.heldout_ppl_cut, b.heldout_ppl_bridged = finite(cut), finite(both)
    if both < cut:
        for b in bridges:
            b.decision = f"applied: held-out calibration perplexity {cut:.3f} plain -> {both:.3f} bridged"
        return
    # the bridges together hurt: keep each one only if it helps on its own
    for b, w in zip(bridges, writers):
        with removed_layers(model, removed), bridged([w], [b.T_fit], [b.gain_fit]):
            alone = ppl() if len(bridges) > 1 else both
        b.heldout_ppl_bridged = finite(alone)
        b.applied = alone < cut
        b.decision = (f"{'applied' if b.applied else 'NOT applied'}: held-out calibration perplexity "
                      f"{cut:.3f} plain -> {alone:.3f} bridged")




def summary(result: RepairResult) -> str:
    if result.method == "none":
        return "no repair"
    parts = [f"[{b.start}, {b.end}) {'bridged' if b.applied else 'left plain'}" for b in result.bridges]
    return f"{result.method}: " + "; ".join(parts)
