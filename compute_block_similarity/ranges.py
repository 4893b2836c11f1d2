"""Layer-index convention, stated once for the whole project.

Layers are 0-based and every range is half-open, ``[start, end)``, as in Python
slicing and MergeKit's ``layer_range``. The block ``[l, l + n)`` is the n layers
l..l+n-1. Removing it keeps ``[0, l)`` and ``[l + n, L)``, which MergeKit writes
as ``layer_range: [0, l]`` and ``layer_range: [l + n, L]``.
"""

from __future__ import annotations

from typing import Iterable


def kept_ranges(num_layers: int, removed: Iterable[int]) -> list[tuple[int, int]]:
    """Maximal half-open ranges of the layers that survive removing ``removed``."""
    gone = set(removed)
    bad = sorted(i for i in gone if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"layers {bad} are outside [0, {num_layers})")
    ranges: list[tuple[int, int]] = []
    for i in range(num_layers):
        if i in gone:
            continue
        if ranges and ranges[-1][1] == i:
            ranges[-1] = (ranges[-1][0], i + 1)
        else:
            ranges.append((i, i + 1))
    return ranges


def runs(layers: Iterable[int]) -> list[tuple[int, int]]:
    """Maximal half-open ranges covering ``layers``."""
    out: list[tuple[int, int]] = []
    for i in sorted(set(layers)):
        if out and i == out[-1][1]:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def format_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    """The one way ranges are printed: "[0, 12), [16, 30)"."""
    return ", ".join(f"[{a}, {b})" for a, b in ranges)


def format_layers(layers: Iterable[int]) -> str:
    """A set of layer indices as half-open ranges: {12, 13, 14, 15, 20} -> "[12, 16), [20, 21)"."""
    return format_ranges(runs(layers))


def format_inclusive(layers: Iterable[int]) -> str:
    """The "2-5,9" form that --remove reads (inclusive runs); print it only where labelled as such."""
    return ",".join(f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in runs(layers))


def parse_layers(spec: str) -> list[int]:
    """Parse "21-28,30" (inclusive runs, as people write layer lists) into indices."""
    layers: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"--remove {spec!r}: expected a list like '21-28,30'") from None
        if b < a:
            raise ValueError(f"--remove {spec!r}: range {part!r} runs backwards")
        layers.update(range(a, b + 1))
    if not layers:
        raise ValueError("--remove is empty: give layers like '21-28,30'")
    return sorted(layers)
