"""The model card of a pruned checkpoint: what was cut, why, and how it scores."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from compute_block_similarity.atomic import write_text
from compute_block_similarity.errors import UserError, looks_local
from compute_block_similarity.ranges import format_layers, format_ranges
from compute_block_similarity.scanfile import ScanFile

from .benchmarks import above_chance, fmt, retained
from .checkpoint import (
    REPAIR_FILE,
    kept_ranges_of,
    kept_source_layers,
    local_source,
    num_layers_of,
    read_plan,
)
from .records import (
    EVAL_FILE,
    HEAL_FILE,
    EvalFile,
    HealLedger,
    HealRecord,
    HeldOut,
    TasksRecord,
    load_eval,
)
from .repair_record import load_repair

log = logging.getLogger(__name__)
PLAN_FILE = "mergekit_config.yml"  # the plan every merge writes into its checkpoint


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


def write_card(folder: Path, plan_path: Path | None = None, scan: ScanFile | None = None,
               name: str | None = None) -> Path | None:
    """The project's card as ``folder``/README.md, from the records beside it (the plan: ``plan_path``, else
    the folder's mergekit_config.yml; None, and nothing written, when there is neither)."""
    plan = Path(plan_path) if plan_path else folder / PLAN_FILE
    if not plan.exists():
        log.info("%s: no plan (%s) to describe the cut; its card is left as it is", folder, PLAN_FILE)
        return None
    write_text(folder / "README.md", model_card(folder, plan, scan, name=name))
    return folder / "README.md"


def model_card(out: Path, plan_path: Path, scan: ScanFile | None = None, repo_id: str | None = None,
               base_model: str | None = None, name: str | None = None) -> str:
    config = read_plan(plan_path)
    base, kept = kept_source_layers(config)
    L = scan.num_layers if scan else source_layers(base)
    removed = sorted(set(range(L)) - set(kept))
    ranges = kept_ranges_of(config)
    hub = hub_base_model(base, base_model)
    name = repo_id.split('/')[-1] if repo_id else name or out.name
    ev = load_eval(out / EVAL_FILE)
    results = eval_results(ev)
    meta = ModelCardData(base_model=hub, library_name="transformers", tags=["mergekit", "pruned", "depth-pruning"],
                         model_name=name if results else None, eval_results=results or None)
    shown = hub or Path(base).name
    lines = ["---", meta.to_yaml().strip(), "---", "",
             f"# {name}", "",
             f"A depth-pruned copy of `{shown}`: {len(removed)} of {L} decoder layers removed with a MergeKit passthrough merge.",
             "Layers are 0-based; ranges are half-open `[start, end)` as in MergeKit's `layer_range`.", "",
             f"- **Removed layers:** {format_layers(removed)} (the layer list: {removed})",
             f"- **Kept ranges:** {format_ranges(ranges)}",
             f"- **Layers:** {L} -> {len(kept)}"]
    lines += scan_lines(scan, len(removed)) if scan else []
    lines += repair_lines(out)
    if ev.models:
        stages = [k for k in ("source", "cut", "repaired", "healed") if k in ev.models]
        lines += ["", "## Evaluation", ""]
        if stages:
            lines += ["| " + " | ".join(("dense" if k == "source" else k) for k in stages) + " |",
                      "|" + "---|" * len(stages),
                      "| " + " | ".join(f"{ev.models[k].perplexity:.2f}" for k in stages) + " |", "",
                      "Held-out perplexity (lower is better).", ""]
        second = ev.second_corpus
        shown = [k for k in stages if second and k in second.perplexity]
        if shown:
            lines += [f"On a second corpus of another kind, `{second.dataset.name}` (split "
                      f"{second.dataset.split}), which neither the choice nor the bridge saw: "
                      + ", ".join(f"{'dense' if k == 'source' else k} {second.perplexity[k]:.2f}" for k in shown) + ".", ""]
        lines += benchmark_lines(ev)
    lines += ledger_lines(ev.heal or heal_ledger(out))
    if ev.models:
        lines += ["", "```json", json.dumps(without_per_doc(ev.model_dump(exclude_none=True)), indent=1), "```"]
    lines += ["", "## sliced.yml", "", "```yaml", Path(plan_path).read_text().strip(), "```", ""]
    return "\n".join(lines)


def scan_lines(scan: ScanFile, n: int) -> list[str]:
    """The scan behind the cut: its metric, its calibration data, every n-layer block's score."""
    ds = scan.dataset
    lines = [f"- **Metric:** `{scan.metric}` ({scan.metric_info.description})",
             f"- **Calibration data:** {ds.name} (split {ds.split}, column {ds.column}), "
             f"{scan.num_samples} samples, {scan.num_tokens} tokens, max_length {ds.max_length}"]
    if n in scan.distances:
        row = scan.distances[n]
        se = scan.stderr.get(n, [0.0] * len(row))
        lines += ["", f"Scores of every {n}-layer block (lower = more redundant):", "",
                  "| start | block | score | std. error |", "|---|---|---|---|"]
        lines += [f"| {l} | [{l}, {l + n}) | {v:.4f} | {e:.4f} |" for l, (v, e) in enumerate(zip(row, se))]
    return lines


def repair_lines(out: Path) -> list[str]:
    """The bridges folded into the checkpoint (repair.safetensors), if any."""
    if not (out / REPAIR_FILE).exists():
        return []
    info, _ = load_repair(out / REPAIR_FILE)
    cal = info.calibration
    lines = ["", "## Repair (no training)", "",
             f"Each cut is bridged by one d x d matrix T, fitted by `{info.method}` on {cal.size} texts of "
             f"{cal.dataset} (split {cal.split}, {cal.tokens_fit} tokens) and folded into the "
             "output projection of the layer before the cut (ReplaceMe). `repair.safetensors` holds T.", ""]
    return lines + [f"- [{b.start}, {b.end}) via `{b.writer}`: {b.decision}" for b in info.bridges]


LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"


def without_per_doc(v: Any) -> Any:
    """eval.json without the per-document values (kept in the file for paired SEs; too long for a card)."""
    if isinstance(v, dict):
        return {k: without_per_doc(x) for k, x in v.items() if k != "per_doc"}
    return [without_per_doc(x) for x in v] if isinstance(v, list) else v


def tasks_of(ev: EvalFile, key: str | None) -> TasksRecord | None:
    """The lm-eval record of entry ``key`` (None when it has none)."""
    return ev.models[key].lm_eval if key in ev.models else None


def eval_results(ev: EvalFile) -> list[EvalResult]:
    """The card's ``model-index``: this checkpoint's held-out perplexity and lm-eval scores."""
    key = ev.own()
    if key is None:
        return []
    ds = ev.dataset or HeldOut()
    out = [perplexity_result(ds, ev.models[key].perplexity, "held-out perplexity")]
    second = ev.second_corpus
    if second and key in second.perplexity:
        out.append(perplexity_result(second.dataset, second.perplexity[key], "perplexity on a second corpus"))
    rec = tasks_of(ev, key) or TasksRecord()
    for task, t in rec.tasks.items():
        for metric, value in t.metrics.items():
            out.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                  dataset_split=t.split.split.split()[0] if t.split else None, metric_type=metric,
                                  metric_value=value, metric_name=f"{metric} ({t.num_fewshot}-shot)",
                                  source_name=f"lm-evaluation-harness {rec.lm_eval_version}",
                                  source_url=LM_EVAL_URL))
    return out


def perplexity_result(ds: HeldOut, value: float, name: str) -> EvalResult:
    """A perplexity on a held-out split of dataset ``ds`` as a model-index entry."""
    return EvalResult(task_type="text-generation", dataset_type=str(ds.name or "held-out text"),
                      dataset_name=f"{ds.name} (held-out split {ds.split})", dataset_split=ds.split,
                      metric_type="perplexity", metric_value=float(value), metric_name=name)


def benchmark_lines(ev: EvalFile) -> list[str]:
    rec, dense = tasks_of(ev, ev.own()), getattr(ev.dense(), "lm_eval", None)
    if not rec or not rec.tasks:
        return []
    kept = retained(dense, rec) if dense else {}
    lines = ["", f"Benchmarks (lm-evaluation-harness {rec.lm_eval_version}"
             + (f", limit {rec.limit:g}" if rec.limit else "") + "):", "",
             "| task | metric | shots | this model | dense | retained % |", "|---|---|---|---|---|---|"]
    for task in rec.top_level():
        t = rec.tasks[task]
        d = dense.tasks[task].metrics.get(t.headline) if dense and task in dense.tasks else None
        lines.append(f"| {task} | {t.headline} | {t.num_fewshot} | {fmt(t.score)} | "
                     f"{'-' if d is None else fmt(d)} | {f'{kept[task]:.1f}' if task in kept else '-'} |")
    if "average" in kept:
        lines.append(f"| average | | | | | {kept['average']:.1f} |")
    above = above_chance(dense, rec) if dense else {}
    if "average" in above:
        v, se = above["average"]
        used = ", ".join(t for t in above if t != "average")
        lines += ["", f"Retained above chance, (this - chance) / (dense - chance) averaged over the tasks where dense is "
                  f"more than 2 SE above chance and above always giving the most common answer ({used}): {v:.1f} %"
                  + (f" ± {se:.1f} (paired SE against dense on the same documents)." if se is not None else ".")]
    return lines


def heal_ledger(out: Path) -> HealLedger | None:
    """The ledger the heal command wrote beside its merged model."""
    path = out / HEAL_FILE
    return HealRecord.load(path).ledger if path.exists() else None


def ledger_lines(g: HealLedger | None) -> list[str]:
    if not g:
        return []
    return ["", "## Healing", "",
            f"{g.method}, `{g.loss}` loss: {g.optimizer_steps} optimizer steps, {g.training_tokens:,} training "
            f"tokens, {g.wall_s:.0f} s on {g.world_size} x {g.device} ({g.precision}). Data: {g.data}; "
            f"the best step picked by perplexity on {g.held_out_texts} held-out texts (not those the tables report on): "
            + ", ".join(f"step {h.step}: {h.perplexity:.2f}" for h in g.history) + "."]
