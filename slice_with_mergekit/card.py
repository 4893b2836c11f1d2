"""The model card of a pruned checkpoint: what was cut, why, and how it scores."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from compute_block_similarity.errors import UserError, looks_local
from compute_block_similarity.ranges import format_layers, format_ranges
from compute_block_similarity.scanfile import ScanFile

from .checkpoint import (
    REPAIR_FILE,
    kept_ranges_of,
    kept_source_layers,
    local_source,
    num_layers_of,
    read_plan,
)
from .repair_record import load_repair


def source_layers(source: str) -> int:
    """The source model's decoder layer count, from its config (never guessed from the kept ranges)."""
    try:
        return num_layers_of(local_source(source))
    except (OSError, ValueError) as e:
        raise UserError(f"the card needs the source model {source}'s config to list the removed layers "
                        f"({str(e).splitlines()[0]}); pass --scan block_distances.json") from None


def hub_base_model(source: str, base_model: str | None = None) -> str | None:
    """The card's ``base_model``: a Hub id, never a local path. ``base_model`` if given, the source
    itself if it is a Hub id, else the id the source's config was saved from; None when unknown."""
    if base_model:
        return base_model
    if not looks_local(source) and not Path(source).exists():
        return source
    try:
        cfg = json.loads((Path(source) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = cfg.get("_name_or_path") or ""
    return name if name and not looks_local(name) and not Path(name).exists() else None


def model_card(out: Path, plan_path: Path, scan: ScanFile | None = None, repo_id: str | None = None,
               base_model: str | None = None) -> str:
    config = read_plan(plan_path)
    base, kept = kept_source_layers(config)
    L = scan.num_layers if scan else source_layers(base)
    removed = sorted(set(range(L)) - set(kept))
    ranges = kept_ranges_of(config)
    hub = hub_base_model(base, base_model)
    meta = {**({"base_model": hub} if hub else {}), "library_name": "transformers",
            "tags": ["mergekit", "pruned", "depth-pruning"]}
    shown = hub or Path(base).name
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {repo_id.split('/')[-1] if repo_id else out.name}", "",
             f"A depth-pruned copy of `{shown}`: {len(removed)} of {L} decoder layers removed with a MergeKit passthrough merge.",
             "Layers are 0-based; ranges are half-open `[start, end)` as in MergeKit's `layer_range`.", "",
             f"- **Removed layers:** {format_layers(removed)} (the layer list: {removed})",
             f"- **Kept ranges:** {format_ranges(ranges)}",
             f"- **Layers:** {L} -> {len(kept)}"]
    if scan:
        n = len(removed)
        ds = scan.dataset
        lines += [f"- **Metric:** `{scan.metric}` ({scan.metric_info.description})",
                  f"- **Calibration data:** {ds.name} (split {ds.split}, column {ds.column}), "
                  f"{scan.num_samples} samples, {scan.num_tokens} tokens, max_length {ds.max_length}"]
        if n in scan.distances:
            row = scan.distances[n]
            se = scan.stderr.get(n, [0.0] * len(row))
            lines += ["", f"Scores of every {n}-layer block (lower = more redundant):", "",
                      "| start | block | score | std. error |", "|---|---|---|---|"]
            lines += [f"| {l} | [{l}, {l + n}) | {v:.4f} | {e:.4f} |" for l, (v, e) in enumerate(zip(row, se))]
    if (out / REPAIR_FILE).exists():
        info, _ = load_repair(out / REPAIR_FILE)
        cal = info.get("calibration", {})
        lines += ["", "## Repair (no training)", "",
                  f"Each cut is bridged by one d x d matrix T, fitted by `{info['method']}` on {cal.get('size')} texts of "
                  f"{cal.get('dataset')} (split {cal.get('split')}, {cal.get('tokens_fit')} tokens) and folded into the "
                  "output projection of the layer before the cut (ReplaceMe). `repair.safetensors` holds T.", ""]
        lines += [f"- [{b['start']}, {b['end']}) via `{b['writer']}`: {b['decision']}" for b in info["bridges"]]
    ev = out / "eval.json"
    if ev.exists():
        data = json.loads(ev.read_text())
        stages = [k for k in ("source", "cut", "repaired", "healed") if isinstance(data.get(k), dict)]
        lines += ["", "## Evaluation", ""]
        if stages:
            lines += ["| " + " | ".join(("dense" if k == "source" else k) for k in stages) + " |",
                      "|" + "---|" * len(stages),
                      "| " + " | ".join(f"{data[k]['perplexity']:.2f}" for k in stages) + " |", "",
                      "Held-out perplexity (lower is better).", ""]
        lines += ["```json", json.dumps(data, indent=1), "```"]
    lines += ["", "## sliced.yml", "", "```yaml", Path(plan_path).read_text().strip(), "```", ""]
    return "\n".join(lines)
