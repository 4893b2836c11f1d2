"""The scan: one batched pass that scores every block [l, l+n) for every n.

Data path, top to bottom:
  texts -> token ids (sorted by length) -> padded batches
  -> decoder forward (no LM head) with hooks capturing x^0..x^L at the needed tokens
  -> per-token Gram matrix across depth, float64  # (tokens, L+1, L+1)
  -> every metric for every (i, j) pair -> per-sample values  # (batch, L+1, L+1)
  -> float64 sums, sums of squares and counts -> ScanResult (means, standard errors)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .batching import Batch, make_batches, tokenize
from .errors import UserError
from .metrics import DEFAULT_METRIC, METRICS, get_metric, rank_blocks
from .model import decoder_layers, decoder_of, input_device
from .options import GRAM_BYTES, TOKENS_PER_TEXT
from .ranges import format_layers, format_ranges, kept_ranges
from .report import write_outputs
from .sums import (
    Accumulator,
    Checkpoint,
    ScanInterrupted,
    check_finite,
    fingerprint,
    model_fingerprint,
    per_sample_values,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- capture


class ResidualCapture:
    """Hooks on the decoder layers recording x^0 (input of layer 0) and x^1..x^L (layer outputs,
    before the final norm) at the selected token positions only."""

    def __init__(self, layers: nn.ModuleList, stats_device: torch.device):
        self.layers = layers
        self.stats_device = stats_device
        self.rows: torch.Tensor | None = None  # (N,) flat (B*S) indices of the tokens to keep, row-major
        self.states: list[torch.Tensor] = []  # L+1 entries of (N, H)
        self.handles = [layers[0].register_forward_pre_hook(self._pre, with_kwargs=True)]
        self.handles += [layer.register_forward_hook(self._post) for layer in layers]

    def select(self, keep: torch.Tensor, device: torch.device) -> None:
        """keep: (B, S) bool, on the CPU. Indices are found once per batch, on the CPU: a boolean
        index in every hook would make the GPU wait for the CPU L+1 times per batch."""
        self.rows = keep.flatten().nonzero().squeeze(1).to(device, non_blocking=True)

    def _keep(self, h: torch.Tensor) -> None:
        rows = self.rows.to(h.device, non_blocking=True)
        self.states.append(h.flatten(0, 1).index_select(0, rows).to(self.stats_device))  # (N, H), model dtype

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.states = []
        self._keep(args[0] if args else kwargs["hidden_states"])

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._keep(output[0] if isinstance(output, (tuple, list)) else output)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()




def gram_across_depth(states: Sequence[torch.Tensor], max_bytes: int = GRAM_BYTES) -> torch.Tensor:
    """G[t, i, j] = <x^i_t, x^j_t> in float64.  states: L+1 of (N, H) -> (N, L+1, L+1).

    Tokens are stacked and upcast a chunk at a time, so the float64 copy and its Gram together stay
    within ``max_bytes`` and the captured states are never copied whole."""
    depth, (num, hidden) = len(states), states[0].shape
    chunk = max(1, max_bytes // (8 * depth * (hidden + depth)))
    out = []
    for k in range(0, num, chunk):
        xc = torch.stack([s[k : k + chunk] for s in states], dim=1).double()  # (chunk, L+1, H)
        out.append(xc @ xc.transpose(1, 2))
    return torch.cat(out)


def sample_positions(mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, S) bool: at most k evenly spaced non-pad positions per row, the first and last always kept
    (so last-token metrics are unchanged). Depends only on each text's own length, never on the
    batch or the padding side. k = 0 keeps every non-pad position."""
    if k <= 0:
        return mask.bool()
    keep = torch.zeros_like(mask, dtype=torch.bool)
    for b in range(mask.shape[0]):
        pos = mask[b].nonzero().squeeze(1)  # (n_b,)
        if len(pos) > k:
            pos = pos[torch.linspace(0, len(pos) - 1, k).round().long()] if k > 1 else pos[-1:]
        keep[b, pos] = True
    return keep


# ---------------------------------------------------------------- result


@dataclass
class ScanResult:
    """Means and standard errors over samples of d(x^i, x^j) for every metric and pair i < j."""

    num_layers: int
    metric: str
    mean: dict[str, torch.Tensor]  # metric -> (L+1, L+1); [i, j] scores the block [i, j)
    stderr: dict[str, torch.Tensor]
    num_samples: int
    num_tokens: int
    num_skipped: int = 0
    provenance: dict = field(default_factory=dict)

    @classmethod
    def from_accumulator(cls, acc: Accumulator, metric: str, **kw: Any) -> "ScanResult":
        n = acc.num_samples
        if n == 0:
            raise UserError("no sample produced any token; check --dataset_column and --max_length")
        mean = acc.sums / n
        var = ((acc.sumsq - n * mean * mean) / max(n - 1, 1)).clamp_min(0)
        se = (var / n).sqrt() if n > 1 else torch.zeros_like(mean)
        return cls(acc.num_layers, metric, dict(zip(acc.metrics, mean)), dict(zip(acc.metrics, se)),
                   n, acc.num_tokens, **kw)

    def _check_n(self, n: int) -> None:
        if not 1 <= n < self.num_layers:
            raise ValueError(f"--layers_to_skip {n} must be in [1, {self.num_layers - 1}] for a {self.num_layers}-layer model")

    def scores(self, n: int, metric: str | None = None) -> list[float]:
        """Score of removing [l, l+n) for l = 0..L-n."""
        self._check_n(n)
        m = self.mean[metric or self.metric]
        return [float(m[l, l + n]) for l in range(self.num_layers - n + 1)]

    def stderrs(self, n: int, metric: str | None = None) -> list[float]:
        self._check_n(n)
        s = self.stderr[metric or self.metric]
        return [float(s[l, l + n]) for l in range(self.num_layers - n + 1)]

    def ranking(self, n: int, metric: str | None = None) -> list[int]:
        """Starts ordered from most to least removable."""
        m = get_metric(metric or self.metric)
        return rank_blocks(self.scores(n, m.name), m.lower_is_redundant)

    def best_start(self, n: int, metric: str | None = None) -> int:
        return self.ranking(n, metric)[0]

    def best_starts(self, metric: str | None = None) -> dict[int, int]:
        return {n: self.best_start(n, metric) for n in range(1, self.num_layers)}

    def triangle(self, metric: str | None = None) -> dict[int, list[float]]:
        return {n: self.scores(n, metric) for n in range(1, self.num_layers)}

    def separation(self, n: int) -> tuple[int, int | None, float]:
        """(best, runner-up, gap in units of the combined standard error)."""
        rank = self.ranking(n)
        if len(rank) < 2:
            return rank[0], None, math.inf
        sc, se = self.scores(n), self.stderrs(n)
        b, r = rank[0], rank[1]
        combined = math.hypot(se[b], se[r])
        gap = abs(sc[r] - sc[b])
        return b, r, (gap / combined if combined > 0 else math.inf)

    def summary(self, n: int) -> str:
        s = self.best_start(n)
        removed = list(range(s, s + n))
        keep = kept_ranges(self.num_layers, removed)
        return (f"by {self.metric}: remove layers {format_layers(removed)} of {self.num_layers} (0-based, half-open); "
                f"keep {format_ranges(keep)} (slice_with_mergekit chooses again by real loss unless --select angle)")

    def write(self, output_dir: str, layers_to_skip: int) -> dict[str, str]:
        return write_outputs(self, output_dir, layers_to_skip)


# ---------------------------------------------------------------- the scan


def _batches(tokenizer: Any, texts: Iterable[str], max_length: int, batch_size: int,
             padding_side: str | None) -> tuple[list, int, str]:
    """(every batch of the non-empty texts, how many were empty, the padding side used)."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if max_length < 1:
        raise ValueError(f"--max_length must be >= 1, got {max_length}")
    ids, skipped = tokenize(tokenizer, texts, max_length)
    if skipped:
        log.warning("skipped %d empty text(s) that tokenize to nothing", skipped)
    if not ids:
        raise UserError("the dataset has no non-empty text; check --dataset, --dataset_column and --dataset_subset")
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    return make_batches(ids, batch_size, pad_id, side), skipped, side


@dataclass
class _Pass:
    """One scan's forward machinery: the decoder, where inputs go, the residual capture, the metrics."""

    decoder: Any
    dev: torch.device
    capture: ResidualCapture
    chosen: list
    all_tokens: bool  # some metric reads every (sampled) token, not just the last
    tokens_per_text: int
    gram_bytes: int

    def add(self, batch: Batch, acc: Accumulator) -> int:
        """One batch forward, its Gram matrices across depth, its per-sample values into ``acc``; its tokens."""
        mask = batch.attention_mask.to(self.dev)
        lengths = mask.sum(-1)  # (B,)
        last = (mask * torch.arange(mask.shape[1], device=self.dev)).argmax(-1)  # (B,) last non-pad index
        if self.all_tokens:
            keep = sample_positions(batch.attention_mask, self.tokens_per_text)  # (B, S) on the CPU
            self.capture.select(keep, self.dev)
        else:
            self.capture.rows = torch.arange(mask.shape[0], device=self.dev) * mask.shape[1] + last
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # same positions whatever the padding side
        self.decoder(input_ids=batch.input_ids.to(self.dev), attention_mask=mask, position_ids=positions, use_cache=False)
        gram = gram_across_depth(self.capture.states, self.gram_bytes)  # (N, L+1, L+1)
        check_finite(gram)
        counts = keep.sum(-1).to(self.dev) if self.all_tokens else torch.ones_like(lengths)
        sample_of = torch.repeat_interleave(torch.arange(len(counts), device=self.dev), counts)
        last_rows = counts.cumsum(0) - 1  # row-major packing: each sample's last kept token
        tokens = int(lengths.sum())
        acc.add(per_sample_values(gram, sample_of, last_rows, len(counts), self.chosen), tokens)
        self.capture.states = []
        return tokens

    def loop(self, batches: list[Batch], done: int, acc: Accumulator, bar: Any, checkpoint: Checkpoint | None,
             rank: int, fp: str) -> None:
        """Every batch after the first ``done``, the sums saved every ``checkpoint.every`` and on Ctrl-C."""
        try:
            with torch.inference_mode():
                for k, batch in enumerate(batches[done:], start=done + 1):
                    bar.update(self.add(batch, acc))
                    done = k
                    if checkpoint and k % checkpoint.every == 0 and k < len(batches):
                        checkpoint.save(rank, fp, acc, k)
        except KeyboardInterrupt:
            whole = acc.num_samples == sum(b.input_ids.shape[0] for b in batches[:done])  # no batch half-added
            if checkpoint and done and whole:
                checkpoint.save(rank, fp, acc, done)  # the sums cover exactly the first `done` batches
                raise ScanInterrupted(checkpoint.rank_path(rank), done, len(batches)) from None
            raise


@dataclass(frozen=True)
class ScanSettings:
    """What ``scan_model`` computes and how it batches (the flags: ScanOptions and DataOptions)."""

    metric: str = DEFAULT_METRIC  # the metric that picks the best block (see ``metrics.METRICS``)
    metrics: Sequence[str] | None = None  # computed in the same pass; None: every registered metric
    batch_size: int = 8  # texts per forward pass
    max_length: int = 1024  # texts are truncated to this many tokens
    padding_side: str | None = None  # "left" or "right"; None: the tokenizer's. Scores do not depend on it
    progress: bool = True  # a tqdm bar with tokens per second
    tokens_per_text: int = TOKENS_PER_TEXT  # all-token metrics: evenly spaced non-pad positions per text (0: all);
    # memory beyond the forward is (L+1) x batch_size x tokens_per_text hidden states
    gram_bytes: int = GRAM_BYTES  # the float64 working set of the Gram computation, in bytes


def scan_model(model: nn.Module, tokenizer: Any, texts: Iterable[str], settings: ScanSettings = ScanSettings(), *,
               provenance: dict | None = None, checkpoint: Checkpoint | None = None) -> ScanResult:
    """Score every block of consecutive decoder layers of a loaded causal LM.

    Args:
        model: a transformers causal LM, on any device or sharded by ``device_map``.
        tokenizer: its tokenizer; BOS/EOS are added by the tokenizer's own convention.
        texts: calibration texts. Every one is used; ones that tokenize to nothing are skipped and counted.
        settings: what to compute and how to batch (``ScanSettings``).
        provenance: model/dataset facts recorded in the outputs.
        checkpoint: save running sums every ``checkpoint.every`` batches; resume from them.

    Under torchrun / accelerate launch (torch.distributed initialized), each rank takes every
    world-th batch and the float64 sums are all-reduced; the result is the single-process one.
    """
    st = settings
    get_metric(st.metric)
    names = tuple(dict.fromkeys([st.metric, *(st.metrics if st.metrics is not None else METRICS)]))
    chosen = [get_metric(n) for n in names]
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
    batches, skipped, side = _batches(tokenizer, texts, st.max_length, st.batch_size, st.padding_side)
    batches = batches[rank::world]
    layers = decoder_layers(model)
    acc, done = Accumulator(names, len(layers)), 0
    fp = fingerprint(batches, names, world, {"padding_side": side, "layers": len(layers), "tokens_per_text": st.tokens_per_text,
                                             "model": model_fingerprint(model)}) if checkpoint else ""
    if checkpoint:
        acc, done = checkpoint.load(rank, fp)
        acc = acc or Accumulator(names, len(layers))
    dev = input_device(model)
    run = _Pass(decoder_of(model), dev, ResidualCapture(layers, stats_device=dev), chosen,
                any(m.reduce == "all_tokens" for m in chosen), st.tokens_per_text, st.gram_bytes)
    bar = tqdm(total=sum(int(b.lengths.sum()) for b in batches), initial=sum(int(b.lengths.sum()) for b in batches[:done]),
               unit="tok", unit_scale=True, desc="scan", disable=not st.progress or rank != 0)
    t0, tokens_before = time.perf_counter(), acc.num_tokens
    try:
        run.loop(batches, done, acc, bar, checkpoint, rank, fp)
    finally:
        run.capture.remove()
        bar.close()
    acc.all_reduce()
    elapsed = time.perf_counter() - t0
    log.info("scanned %d samples, %d tokens in %.1fs (%.0f tok/s)", acc.num_samples, acc.num_tokens,
             elapsed, (acc.num_tokens - tokens_before * world) / max(elapsed, 1e-9))
    return ScanResult.from_accumulator(acc, st.metric, num_skipped=skipped, provenance=dict(provenance or {}))
