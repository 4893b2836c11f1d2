"""`prune`'s stage cache: a stage records a fingerprint of its inputs (its arguments and the
fingerprints of the stages it reads) and its cost; a rerun skips a stage whose fingerprint and outputs
are unchanged."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from pydantic import ConfigDict, Field

from compute_block_similarity.errors import UserError

from .records import Record

log = logging.getLogger(__name__)


class StageStamp(Record):
    """.stage-NAME.json: the fingerprint of a stage's inputs when it last ran, the inputs, and what it cost."""

    model_config = ConfigDict(extra="allow")
    FIX: ClassVar[str] = "delete it (the stage reruns)"

    fingerprint: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    seconds: float | None = Field(None, description="wall time")
    peak_cuda_mib: float | None = None


@dataclass
class StageCost:
    stage: str
    seconds: float
    peak_cuda_mib: float | None


def stage(work: Path, name: str, inputs: dict, outputs: list[Path], fn: Callable[..., Any], *args: Any) -> str:
    """Run ``fn(*args)`` unless its inputs' fingerprint and outputs are unchanged. Returns the fingerprint."""
    canonical = json.dumps(inputs, sort_keys=True, default=str)  # the fingerprint's text, and the stamp's inputs
    fp = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    path = work / f".stage-{name}.json"
    last = last_run(path)
    if last and last.fingerprint == fp and all(p.exists() for p in outputs):
        log.info("stage %s: inputs unchanged, skipped", name)
        return fp
    log.info("stage %s: running", name)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn(*args)
    stamp = StageStamp(fingerprint=fp, inputs=json.loads(canonical),
                       seconds=time.perf_counter() - t0,
                       peak_cuda_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
    stamp.save(path)
    log.info("stage %s: done in %.1f s", name, stamp.seconds)
    return fp


def last_run(path: Path) -> StageStamp | None:
    """A stage's stamp; None when it never ran, or its stamp is unreadable (the stage reruns)."""
    if not path.exists():
        return None
    try:
        return StageStamp.load(path)
    except UserError as e:
        log.warning("%s; the stage reruns", e)
        return None


def stage_costs(work: Path) -> list[StageCost]:
    """Each stage's wall time and peak CUDA memory, as recorded when it last ran, in the order it ran."""
    rows = []
    for p in sorted(work.glob(".stage-*.json"), key=lambda p: p.stat().st_mtime):
        s = last_run(p)
        if s and s.seconds is not None:
            rows.append(StageCost(p.stem.removeprefix(".stage-"), s.seconds, s.peak_cuda_mib))
    return rows


def stage_lines(work: Path) -> list[str]:
    rows = stage_costs(work)
    if not rows:
        return []
    gpu = any(r.peak_cuda_mib for r in rows)
    lines = ["", "## What each stage cost (as recorded when it last ran)", "",
             "| stage | wall time | " + ("peak CUDA memory |" if gpu else ""), "|---|---|" + ("---|" if gpu else "")]
    for r in rows:
        lines.append(f"| {r.stage} | {r.seconds:.1f} s | " + (f"{r.peak_cuda_mib:,.0f} MiB |" if gpu else ""))
    return lines
