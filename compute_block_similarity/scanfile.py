"""block_distances.json, typed: the contract between the scan and every later stage.

The scanner writes it (report.json_payload is validated against it before writing); plan, select,
card, the pipeline and the benchmarks read it through ``load`` and ask it their questions
(``ranking``, ``best_start``, ``removed``, ``kept``) rather than indexing a dict. Layers are 0-based,
ranges half-open ``[start, end)``. Scores are indexed by block size n, then by start l = 0..L-n.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError
from .metrics import DEFAULT_METRIC, METRICS, rank_blocks
from .ranges import kept_ranges

FORMAT_VERSION = 1


class MetricInfo(BaseModel):
    reduce: str = "mean"
    lower_is_redundant: bool = True
    description: str = ""


class MetricScores(MetricInfo):
    distances: dict[int, list[float]]
    stderr: dict[int, list[float]] = Field(default_factory=dict)
    best_start_per_n: dict[int, int] = Field(default_factory=dict)


class DatasetInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    config: str | None = None
    split: str | None = None
    column: str | None = None
    size: int | None = None
    max_length: int | None = None


class ScanFile(BaseModel):
    """One scan: every block's score for every block size n, for the primary metric and the others."""

    model_config = ConfigDict(extra="allow")  # provenance the scanner adds (dtype, gguf_file, ...)

    format_version: int = FORMAT_VERSION
    layer_convention: str = "0-based layers; blocks are half-open [start, end)"
    model: str
    num_layers: int = Field(ge=2)
    metric: str = DEFAULT_METRIC
    metric_info: MetricInfo = Field(default_factory=MetricInfo)
    distances: dict[int, list[float]]
    stderr: dict[int, list[float]] = Field(default_factory=dict)
    best_start_per_n: dict[int, int] = Field(default_factory=dict)
    layers_to_skip: int | None = None
    num_samples: int | None = None
    num_tokens: int | None = None
    num_skipped_empty: int = 0
    dataset: DatasetInfo = Field(default_factory=DatasetInfo)
    all_metrics: dict[str, MetricScores] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _shapes(self) -> "ScanFile":
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version} is not {FORMAT_VERSION}")
        L = self.num_layers
        for name, rows in [("distances", self.distances), ("stderr", self.stderr),
                           *((f"all_metrics.{m}.distances", b.distances) for m, b in self.all_metrics.items())]:
            for n, row in rows.items():
                if not 1 <= n < L or len(row) != L - n + 1:
                    raise ValueError(f"{name}[{n}] should hold {L} - {n} + 1 numbers (one per start) but holds {len(row)}")
        self._meaning()
        return self

    def _meaning(self) -> None:
        """Every score finite and within its metric's range; every best start at a best score."""
        tables = [(self.metric, "", self.distances, self.stderr, self.best_start_per_n, self.metric_info.lower_is_redundant),
                  *((m, f"all_metrics.{m}.", b.distances, b.stderr, b.best_start_per_n, b.lower_is_redundant)
                    for m, b in self.all_metrics.items())]
        for metric, where, dist, se, best, lower in tables:
            lo, hi = METRICS[metric].bounds if metric in METRICS else (-math.inf, math.inf)
            for n, row in dist.items():
                bad = next((v for v in row if not (math.isfinite(v) and lo - 1e-9 <= v <= hi + 1e-9)), None)
                if bad is not None:
                    raise ValueError(f"{where}distances[{n}] holds {bad}, outside {metric}'s range [{lo}, {hi}]")
            for n, row in se.items():
                if any(not (math.isfinite(v) and v >= 0) for v in row):
                    raise ValueError(f"{where}stderr[{n}] holds a negative or non-finite standard error")
            for n, start in best.items():
                row = dist.get(n)
                if row is None or not 0 <= start < len(row) or row[start] != (min(row) if lower else max(row)):
                    raise ValueError(f"{where}best_start_per_n[{n}] = {start} is not a best block of distances[{n}]")

    # --- the questions later stages ask ---------------------------------------------------

    def scores(self, n: int, metric: str | None = None) -> list[float]:
        """Score of every n-layer block [l, l+n), l = 0..L-n."""
        if metric not in (None, self.metric):
            return self.all_metrics[metric].distances[n]
        if n not in self.distances:
            raise UserError(f"the scan has no {n}-layer blocks (it has n = {min(self.distances)}..{max(self.distances)})")
        return self.distances[n]

    def lower_is_redundant(self, metric: str | None = None) -> bool:
        return (self.all_metrics[metric] if metric not in (None, self.metric) else self.metric_info).lower_is_redundant

    def ranking(self, n: int, metric: str | None = None) -> list[int]:
        """Block starts, most redundant first (ties: the shallower first)."""
        return rank_blocks(self.scores(n, metric), self.lower_is_redundant(metric))

    def best_start(self, n: int) -> int:
        return self.best_start_per_n.get(n, self.ranking(n)[0])

    def kept(self, removed: list[int] | range) -> list[tuple[int, int]]:
        """The half-open ranges that survive removing ``removed``."""
        return kept_ranges(self.num_layers, removed)

    def removed(self, kept: list[tuple[int, int]] | list[list[int]]) -> list[int]:
        """The layers that ``kept`` ranges leave out."""
        keep = {i for a, b in kept for i in range(a, b)}
        return [i for i in range(self.num_layers) if i not in keep]


def validate(data: Any, where: str = "block_distances.json") -> ScanFile:
    """A ScanFile from parsed JSON; a malformed or old file is one error naming the problem and the fix."""
    if not isinstance(data, dict):
        raise UserError(f"--scan {where} is not a scan file; point it at block_distances.json from compute_block_similarity")
    try:
        return ScanFile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        what = f"has no {loc!r}" if err["type"] == "missing" else f"{loc + ': ' if loc else ''}{err['msg'].removeprefix('Value error, ')}"
        raise UserError(f"--scan {where} {what}; the file is truncated, edited or from another version: "
                        "rerun compute_block_similarity") from None


def load(path: str | os.PathLike) -> ScanFile:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--scan {path} does not exist; run compute_block_similarity first") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--scan {path} is not valid JSON ({e.msg}); point it at block_distances.json") from None
    return validate(data, str(path))
