"""The repair fit's statistics: one forward pass of the dense model over the calibration text, stopped
after the deepest layer a run needs, with hooks taking at every non-pad token m (the writer's output),
x^s and x^e, accumulated per run as float64 normal equations, M^T M and M^T Y with Y = x^e - x^s + m,
for a fit part and a held-out part (every HELDOUT_EVERY-th text). The fits that solve them are in
repair_fit.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from compute_block_similarity.batching import make_batches, tokenize
from compute_block_similarity.model import decoder_layers, input_device, text_config

from .repair_writers import Writer, _forward, _output_tensor, _stop_after

log = logging.getLogger(__name__)

HELDOUT_EVERY = 5  # every 5th calibration text chooses the ridge and guards the bridge
NORM_SAMPLE_TOKENS = 16384  # calibration tokens kept to refit a post-norm gain (d unknowns)


@dataclass
class RunStats:
    """float64 normal equations of one run, for the fit part (0) and the held-out part (1)."""

    AtA: list[torch.Tensor]  # 2 x (d, d): sum m^T m
    AtY: list[torch.Tensor]  # 2 x (d, d): sum m^T y,  y = x^e - x^s + m
    YtY: list[float]  # 2 x sum ||y||^2
    EtE: list[float]  # 2 x sum ||x^e - x^s||^2, the plain cut's error
    tokens: list[int]
    sample: list[torch.Tensor] = field(default_factory=list)  # (r, m, x^e) token rows, for the cosine fit
    norm_sample: list[torch.Tensor] = field(default_factory=list)  # (m, x^e - h) float64 rows, for a post-norm gain


    def add(self, part: int, m: torch.Tensor, y: torch.Tensor, plain: torch.Tensor) -> None:
        """One batch's tokens of this run: m and y (N, d) float64, plain = x^e - x^s (N, d)."""
        self.AtA[part] += m.T @ m
        self.AtY[part] += m.T @ y
        self.YtY[part] += float((y * y).sum())
        self.EtE[part] += float((plain ** 2).sum())
        self.tokens[part] += m.shape[0]

    @staticmethod
    def zeros(d: int, device: Any) -> "RunStats":
        z = lambda: torch.zeros((d, d), dtype=torch.float64, device=device)  # noqa: E731
        return RunStats([z(), z()], [z(), z()], [0.0, 0.0], [0.0, 0.0], [0, 0])


@dataclass(frozen=True)
class FitOptions:
    """How bridges are fitted: the repair (`--repair`) and the fit's settings, travelling whole from
    materialize and repair to the fit."""

    method: str = "linear"  # a repair of REPAIRS
    batch_size: int = 8
    max_length: int = 256  # calibration tokens per text
    guard: bool = True  # keep a bridge only if it lowers held-out calibration loss
    cosine_steps: int = 100  # --repair cosine: optimizer steps
    sample_tokens: int = 32768  # --repair cosine: token rows kept for the fit
    skip_unfoldable: bool = False  # a run whose bridge cannot fold exactly is left plain, not refused
    progress: bool = True


def _hooks(layers: Any, runs: Sequence[tuple[int, int]], writers: dict[int, Writer], taps: dict) -> list:
    """Forward hooks that put, per batch, each run's x^s, m (and N(m) after a post-norm) and x^e in ``taps``."""
    def keep(key: str) -> Callable:
        return lambda mod, args, out: taps.__setitem__(key, _output_tensor(out))

    hooks = []
    for s, e in runs:
        if s == 0:  # the embedding output is x^0 itself, taken at layer 0's input
            hooks.append(layers[0].register_forward_pre_hook(
                lambda m, a, kw: taps.__setitem__("x0", a[0] if a else kw["hidden_states"]), with_kwargs=True))
        else:
            hooks.append(writers[s].module.register_forward_hook(keep(f"m{s}")))
            hooks.append(layers[s - 1].register_forward_hook(keep(f"x{s}")))
            if writers[s].norm is not None:  # N(m), to take h = x^s - N(m)
                hooks.append(writers[s].norm.module.register_forward_hook(keep(f"n{s}")))
        hooks.append(layers[e - 1].register_forward_hook(keep(f"x{e}")))
    hooks.append(_stop_after(layers[max(e for _, e in runs) - 1]))
    return hooks


def _targets(taps: dict, mask: torch.Tensor, s: int, e: int, w: Writer | None) -> tuple[torch.Tensor, ...]:
    """(x^s, x^e, m, y, r) at the batch's non-pad tokens, float64 (N, d); r = x^e - h after a post-norm, else None."""
    def at(key: str) -> torch.Tensor:
        return taps[key][mask.to(taps[key].device)]

    xs = at(f"x{s}").double()
    xe = at(f"x{e}").to(xs.device).double()
    m = xs if s == 0 else at(f"m{s}").to(xs.device).double()
    pn = w.norm if s and w is not None else None
    if pn is None:
        return xs, xe, m, xe - xs + m, None
    # x^s = h + g * rms_norm(m): fit m T to the direction of (x^e - h) / g, at m's scale
    r = xe - xs + at(f"n{s}").to(xs.device).double()  # x^e - h
    g = pn.gain().to(r.device)  # (d,)
    live = pn.live(g)  # a channel with gain 0 is dead: it keeps m's own content
    u = torch.where(live, r / torch.where(live, g, 1.0), 0.0)
    k = ((m * m * live).sum(-1, keepdim=True) / (u * u).sum(-1, keepdim=True).clamp_min(1e-30)).sqrt()
    return xs, xe, m, torch.where(live, u * k, m), r  # y: the live channels at m's own scale


def collect(model: nn.Module, tok: Any, texts: Sequence[str], runs: Sequence[tuple[int, int]],
            writers: dict[int, Writer], fit: FitOptions, sample_tokens: int = 0) -> dict[tuple[int, int], RunStats]:
    """One forward pass of the dense model over ``texts`` (stopped after the deepest needed layer),
    accumulating each run's normal equations on the device its layer runs on; ``sample_tokens`` token
    rows kept per run for a fit that needs them (--repair cosine)."""
    batch_size, max_length = fit.batch_size, fit.max_length
    layers = decoder_layers(model)
    d = text_config(model).hidden_size
    ids, skipped = tokenize(tok, texts, max_length)
    if skipped:
        log.warning("repair: skipped %d empty calibration text(s)", skipped)
    part_of = [0 if (i + 1) % HELDOUT_EVERY else 1 for i in range(len(ids))]
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    dev = input_device(model)
    total = max(1, sum(map(len, ids)))
    stats: dict[tuple[int, int], RunStats] = {}
    taps: dict[str, torch.Tensor] = {}  # what the hooks saw in this batch, (B, S, d)
    hooks = _hooks(layers, runs, writers, taps)
    gens = {r: torch.Generator().manual_seed(1000 * r[0] + r[1]) for r in runs}  # a run's sample: its own, shared pass or not
    try:
        for part in (0, 1):
            sub = [x for x, p in zip(ids, part_of) if p == part]
            for batch in tqdm(make_batches(sub, batch_size, pad, "right") if sub else [],
                              desc=f"repair fit ({'fit' if part == 0 else 'held-out'})", disable=not fit.progress):
                mask = batch.attention_mask.to(dev)
                with torch.no_grad():
                    _forward(model, batch.input_ids.to(dev), mask)
                for s, e in runs:
                    xs, xe, m, y, r = _targets(taps, mask.bool(), s, e, writers.get(s))
                    st = stats.get((s, e)) or stats.setdefault((s, e), RunStats.zeros(d, m.device))
                    st.add(part, m, y, xe - xs)
                    want = NORM_SAMPLE_TOKENS if r is not None else sample_tokens
                    if want and part == 0:
                        keep_n = min(m.shape[0], max(1, want * m.shape[0] // total))
                        pick = torch.randperm(m.shape[0], generator=gens[(s, e)])[:keep_n].to(m.device)
                        if r is not None:  # (m, x^e - h) rows: the gain is refitted on them once T is known
                            st.norm_sample.append(torch.stack([m[pick], r[pick]]).cpu())
                        else:
                            st.sample.append(torch.stack([(xs - m)[pick], m[pick], xe[pick]]).float().cpu())
                taps.clear()
    finally:
        for h in hooks:
            h.remove()
    return stats
