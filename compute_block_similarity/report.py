"""What a scan writes: PruneMe's CSV, the full JSON, and the heatmap of the whole triangle."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_paths
from .metrics import get_metric
from .ranges import kept_ranges
from .scanfile import FORMAT_VERSION, validate

log = logging.getLogger(__name__)

LAYER_CONVENTION = "0-based, half-open [start, end): block [l, l+n) is layers l..l+n-1"


def csv_text(result: Any, n: int) -> str:
    """PruneMe's columns: block_start,block_end,average_distance, one row per start l = 0..L-n."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["block_start", "block_end", "average_distance"])
    for l, d in enumerate(result.scores(n)):
        w.writerow([l, l + n, repr(d)])
    return buf.getvalue()


def metric_block(result: Any, metric: str) -> dict:
    m = get_metric(metric)
    return {
        "reduce": m.reduce,
        "lower_is_redundant": m.lower_is_redundant,
        "description": m.description,
        "distances": {str(n): v for n, v in result.triangle(metric).items()},
        "stderr": {str(n): result.stderrs(n, metric) for n in range(1, result.num_layers)},
        "best_start_per_n": {str(n): s for n, s in result.best_starts(metric).items()},
    }


def json_payload(result: Any, n: int) -> dict:
    s = result.best_start(n)
    primary = metric_block(result, result.metric)
    return {
        "format_version": FORMAT_VERSION,
        "layer_convention": LAYER_CONVENTION,
        "num_layers": result.num_layers,
        "num_samples": result.num_samples,
        "num_tokens": result.num_tokens,
        "num_skipped_empty": result.num_skipped,
        "metric": result.metric,
        "metric_info": {k: primary[k] for k in ("reduce", "lower_is_redundant", "description")},
        **result.provenance,
        "layers_to_skip": n,
        "distances": primary["distances"],
        "stderr": primary["stderr"],
        "best_start_per_n": primary["best_start_per_n"],
        "best_start": s,
        "removed_layers": list(range(s, s + n)),
        "kept_ranges": [list(r) for r in kept_ranges(result.num_layers, range(s, s + n))],
        "all_metrics": {m: metric_block(result, m) for m in result.mean if m != result.metric},
    }


def plot_heatmap(result: Any, path: str) -> None:
    """Whole triangle: x = start layer, y = block size n; the best block per n is marked."""
    plot_triangle(result.triangle(), result.num_layers, result.metric,
                  os.path.basename(str(result.provenance.get("model", ""))), result.best_starts(), path)


def plot_triangle(triangle: dict[int, list[float]], L: int, metric: str, title: str, best: dict[int, int],
                  path: str, chosen: dict[int, list[int]] | None = None) -> None:
    """Score of every block [l, l+n) as a heatmap; x marks the scan's best start per n, and a box each
    ``chosen`` cut (n -> removed layers) when the choice was made otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    grid = np.full((L, L), np.nan)  # (n, start)
    for n, row in triangle.items():
        grid[n, : len(row)] = row
    fig, ax = plt.subplots(figsize=(7, 5.5))
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r", interpolation="nearest",
                   extent=(-0.5, L - 0.5, -0.5, L - 0.5))
    ax.scatter(list(best.values()), list(best.keys()), marker="x", s=18, c="red", label="best start per n (scan)")
    for k, (n, removed) in enumerate((chosen or {}).items()):
        ax.add_patch(Rectangle((min(removed) - 0.5, n - 0.5), 1, 1, fill=False, ec="magenta", lw=2.5,
                               label="chosen cut" if k == 0 else None))
    ax.set_xlabel("start layer l (block [l, l+n) removed)")
    ax.set_ylabel("block size n")
    ax.set_ylim(0.5, L - 0.5)
    ax.set_title(f"{metric}: {title}", fontsize=10)
    fig.colorbar(im, ax=ax, label=metric)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_outputs(result: Any, output_dir: str, n: int) -> dict[str, str]:
    """Write layer_distances.csv, block_distances.json and block_distances.png atomically."""
    result.scores(n)  # validate n before any file is touched
    paths = {k: os.path.join(output_dir, f) for k, f in
             (("csv", "layer_distances.csv"), ("json", "block_distances.json"), ("heatmap", "block_distances.png"))}
    data = json_payload(result, n)
    validate(data)  # the writer keeps the contract the readers rely on
    csv_body, payload = csv_text(result, n), json.dumps(data, indent=1)
    with atomic_paths([paths["csv"], paths["json"], paths["heatmap"]]) as (csv_tmp, json_tmp, png_tmp):
        Path(csv_tmp).write_text(csv_body, encoding="utf-8")
        Path(json_tmp).write_text(payload + "\n", encoding="utf-8")
        plot_heatmap(result, png_tmp)
    return paths
