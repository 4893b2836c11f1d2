"""`prune`'s stage cache: a stage records a fingerprint of its inputs (its arguments and the
fingerprints of the stages it reads) and its cost; a rerun skips a stage whose fingerprint and outputs
are unchanged."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from compute_block_similarity.atomic import write_text

log = logging.getLogger(__name__)


def stage(work: Path, name: str, inputs: dict, outputs: list[Path], fn: Callable[..., Any], *args: Any) -> str:
    """Run ``fn(*args)`` unless its inputs' fingerprint and outputs are unchanged. Returns the fingerprint."""
    fp = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    stamp = work / f".stage-{name}.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fp and all(p.exists() for p in outputs):
        log.info("stage %s: inputs unchanged, skipped", name)
        return fp
    log.info("stage %s: running", name)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn(*args)
    cost = {"seconds": time.perf_counter() - t0, "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
    write_text(stamp, json.dumps({"fingerprint": fp, "inputs": inputs, **cost}, default=str, indent=1))
    return fp


def stage_costs(work: Path) -> list[dict]:
    """Each stage's wall time and peak CUDA memory, as recorded when it last ran, in the order it ran."""
    rows = []
    for p in sorted(work.glob(".stage-*.json"), key=lambda p: p.stat().st_mtime):
        s = json.loads(p.read_text())
        if "seconds" in s:
            rows.append({"stage": p.stem.removeprefix(".stage-"), "seconds": s["seconds"], "peak_cuda_mib": s["peak_cuda_mib"]})
    return rows


def stage_lines(work: Path) -> list[str]:
    rows = stage_costs(work)
    if not rows:
        return []
    gpu = any(r["peak_cuda_mib"] for r in rows)
    lines = ["", "## What each stage cost (as recorded when it last ran)", "",
             "| stage | wall time | " + ("peak CUDA memory |" if gpu else ""), "|---|---|" + ("---|" if gpu else "")]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['seconds']:.1f} s | " + (f"{r['peak_cuda_mib']:,.0f} MiB |" if gpu else ""))
    return lines
