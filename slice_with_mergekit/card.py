"""The model card of a pruned checkpoint: what was cut, why, and how it scores."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from compute_block_similarity.ranges import format_layers, format_ranges

from .plan import kept_source_layers, read_config


def hub_base_model(source: str, base_model: str | None = None) -> str | None:
    """The card's ``base_model``: a Hub id, never a local path. ``base_model`` if given, the source
    itself if it is a Hub id, else the id the source's config was saved from; None when unknown."""
    from compute_block_similarity.errors import looks_local

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


def model_card(out: Path, plan_path: Path, scan: dict | None = None, repo_id: str | None = None,
               base_model: str | None = None) -> str:
    config = read_config(plan_path)
    base, kept = kept_source_layers(config)
    L = scan["num_layers"] if scan else None
    from transformers import AutoConfig

    if L is None:
        try:
            from .materialize import local_source

            L = AutoConfig.from_pretrained(local_source(base)).get_text_config().num_hidden_layers
        except Exception:
            L = max(kept) + 1
    removed = sorted(set(range(L)) - set(kept))
    ranges = [list(s.sources[0].layer_range) for s in config.slices]
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
        ds = scan.get("dataset", {})
        lines += [f"- **Metric:** `{scan['metric']}` ({scan.get('metric_info', {}).get('description', '')})",
                  f"- **Calibration data:** {ds.get('name')} (split {ds.get('split')}, column {ds.get('column')}), "
                  f"{scan.get('num_samples')} samples, {scan.get('num_tokens')} tokens, max_length {ds.get('max_length')}"]
        if str(n) in scan.get("distances", {}):
            row = scan["distances"][str(n)]
            se = scan.get("stderr", {}).get(str(n), [0.0] * len(row))
            lines += ["", f"Scores of every {n}-layer block (lower = more redundant):", "",
                      "| start | block | score | std. error |", "|---|---|---|---|"]
            lines += [f"| {l} | [{l}, {l + n}) | {v:.4f} | {e:.4f} |" for l, (v, e) in enumerate(zip(row, se))]
    from .repair import REPAIR_FILE, load_repair

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
