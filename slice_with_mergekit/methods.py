"""The field's depth-pruning methods, as their papers run them: a registry for ``prune --baselines``.

Each entry declares what it removes (from the scan's scores, so every method sees the same calibration
text) and how it repairs the cut; ``prune`` builds, evaluates and heals each one under the protocol it
uses for ours, so the report's rows differ only by the method. ``X+bridge`` rows put our least-squares
bridge (the job's ``--repair``) on method X's choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from compute_block_similarity.errors import UserError
from compute_block_similarity.flags import one_of
from compute_block_similarity.scanfile import ScanFile

OURS = "ours"
ANGLE = "angular_last_token"
BI = "block_influence"


def deepest(scan: ScanFile, n: int) -> list[int]:
    """The n layers just before the last one."""
    L = scan.num_layers
    if n > L - 1:
        raise UserError(f"baseline deepest: cannot remove {n} of {L} layers and keep the last one")
    return list(range(L - 1 - n, L - 1))


def _needs(scan: ScanFile, metric: str, who: str) -> None:
    if metric not in (scan.metric, *scan.all_metrics):
        raise UserError(f"baseline {who} needs the scan's {metric} scores; rerun the scan with --metrics all")


def angle_block(scan: ScanFile, n: int) -> list[int]:
    """The n-layer block of least last-token angular distance (Gromov et al. 2024, eq. 7)."""
    _needs(scan, ANGLE, "angle")
    start = scan.ranking(n, ANGLE)[0]
    return list(range(start, start + n))


def least_influence(scan: ScanFile, n: int) -> list[int]:
    """ShortGPT: the n single layers of least Block Influence (1 - cos between a layer's input and output,
    over all tokens), contiguous or not, in layer order."""
    _needs(scan, BI, "shortgpt")
    return sorted(scan.ranking(1, BI)[:n])


@dataclass(frozen=True)
class Method:
    """One row of the comparison: which layers go, and the repair its paper applies."""

    name: str
    removes: Callable[[ScanFile, int], list[int]]
    repair: str | None  # a --repair name; None: the job's own --repair (our bridge)
    cite: str
    does: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("shortgpt", least_influence, "none", "Men et al. 2024, ShortGPT (arXiv 2403.03853)",
           "the n layers of least Block Influence, contiguous or not; no repair"),
    Method("angle", angle_block, "none", "Gromov et al. 2024 (arXiv 2403.17887), as PruneMe runs it",
           "the block of least last-token angular distance; no repair (healing, with --heal, as ours)"),
    Method("replaceme", angle_block, "cosine", "Shumitskaya et al. 2025, ReplaceMe (arXiv 2505.02819)",
           "the angle block, replaced by a linear transform fitted on the cosine objective, folded; training-free"),
    Method("deepest", deepest, "none", "Gromov et al. 2024; a strong baseline after healing (arXiv 2411.15558)",
           "the n layers just before the last one; no repair"),
    Method("shortgpt+bridge", least_influence, None, "ShortGPT's choice", "ShortGPT's layers, bridged with our repair"),
    Method("angle+bridge", angle_block, None, "Gromov et al.'s choice", "the angle block, bridged with our repair"),
    Method("deepest+bridge", deepest, None, "the deepest block", "the n layers before the last, bridged with our repair"),
)}


def get_method(name: str) -> Method:
    return METHODS[one_of("--baselines", METHODS, name)]


def methods_help() -> str:
    return "; ".join(f"{m.name}: {m.does} ({m.cite})" for m in METHODS.values())
