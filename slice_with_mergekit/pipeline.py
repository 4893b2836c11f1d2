"""`prune`: scan -> choose -> sliced.yml -> materialize -> verify -> evaluate -> (heal) -> report.

Every stage's output stays under --work_dir. A stage records a fingerprint of its inputs (its
arguments and the fingerprints of the stages it reads); a rerun skips a stage whose fingerprint
and outputs are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import ConfigDict, Field, model_validator

from compute_block_similarity.atomic import write_text
from compute_block_similarity.data import BUILTIN_DATASET
from compute_block_similarity.errors import UserError
from compute_block_similarity.metrics import DEFAULT_METRIC
from compute_block_similarity.options import one_of
from compute_block_similarity.ranges import format_layers, format_ranges
from compute_block_similarity.scanfile import ScanFile

from .heal import HealConfig
from .plan import load_scan
from .repair import REPAIRS
from .select import SelectOptions

log = logging.getLogger(__name__)


def stage(work: Path, name: str, inputs: dict, outputs: list[Path], fn: Callable[..., Any], *args: Any) -> str:
    """Run ``fn(*args)`` unless its inputs' fingerprint and outputs are unchanged. Returns the fingerprint."""
    fp = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    stamp = work / f".stage-{name}.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fp and all(p.exists() for p in outputs):
        log.info("stage %s: inputs unchanged, skipped", name)
        return fp
    log.info("stage %s: running", name)
    fn(*args)
    write_text(stamp, json.dumps({"fingerprint": fp, "inputs": inputs}, default=str, indent=1))
    return fp


class PruneArgs(SelectOptions):
    """The whole job"""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="checkpoint folder or Hub id")
    layers_to_skip: list[int] = Field([4], min_length=1, description="block size, or several: '2,4,6,8'")
    dataset: str = Field(BUILTIN_DATASET, description="calibration data: Hub id, local file/folder, or "
                         f"{BUILTIN_DATASET}")
    dataset_column: str = Field("text", description="column holding the text")
    dataset_subset: str = Field("train", description="calibration split (scan, selection, repair, healing)")
    dataset_size: int | None = Field(256, ge=1, description="calibration texts for the scan, selection and repair")
    eval_subset: str = Field("test", description="held-out split for every perplexity reported")
    eval_size: int = Field(64, ge=1, description="held-out texts")
    max_length: int = Field(256, ge=2, description="tokens per text (calibration) and evaluation window")
    batch_size: int = Field(8, ge=1, description="texts per forward pass")
    metric: str = Field(DEFAULT_METRIC, description="the scan metric that ranks the blocks")
    repair: str = Field("linear", description="bridge each cut without training before evaluation and healing; "
                        "the candidates are scored after it", json_schema_extra={"choices": list(REPAIRS)})
    heal: bool = Field(False, description="heal each pruned (and repaired) model; --heal_* set the recipe")
    work_dir: str = Field("prune_out", description="every stage's output, and report.md",
                          json_schema_extra={"aliases": ["--output"]})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="the scan's precision")
    device: str = Field("auto", description="the scan's device")
    trust_remote_code: bool = Field(False, description="allow model code from the Hub")
    max_ppl_ratio: float | None = Field(None, gt=1, description="budget mode: remove as many layers as keep calibration "
                                        "perplexity within this many times the dense model's (e.g. 1.25)")
    target_layers: int | None = Field(None, ge=1, description="keep this many decoder layers (instead of "
                                      "--layers_to_skip)")
    max_layers: int | None = Field(None, ge=1, description="budget mode: remove at most this many layers")
    heal_cfg: HealConfig = Field(default_factory=HealConfig, description="the healing recipe")

    @model_validator(mode="after")
    def _check(self) -> "PruneArgs":
        one_of("--repair", REPAIRS, self.repair)
        if self.max_ppl_ratio is not None and self.target_layers is not None:
            raise ValueError("--max_ppl_ratio and --target_layers are exclusive: give a budget or a layer count")
        if any(n < 1 for n in self.layers_to_skip):
            raise ValueError(f"--layers_to_skip {self.layers_to_skip}: block sizes must be >= 1")
        return self


def run_scan(a: "PruneArgs", scan_dir: Path) -> None:
    from compute_block_similarity.cli import scan
    from compute_block_similarity.options import DataOptions, ModelOptions, ScanOptions

    scan(ModelOptions(model_path=a.model, dtype=a.dtype, device=a.device, trust_remote_code=a.trust_remote_code),
         DataOptions(dataset=a.dataset, dataset_column=a.dataset_column, dataset_subset=a.dataset_subset,
                     dataset_size=a.dataset_size, max_length=a.max_length, batch_size=a.batch_size),
         ScanOptions(layers_to_skip=a.layers_to_skip[0], metric=a.metric, output_dir=str(scan_dir)))


def run_eval(a: "PruneArgs", texts: list[str], model: str, out: Path) -> None:
    from compute_block_similarity.model import load_model

    from .evaluate import perplexity

    m, tok = load_model(model, trust_remote_code=a.trust_remote_code)
    p = perplexity(m, tok, texts, max_length=a.max_length, stride=a.max_length, progress=True)
    write_text(out, json.dumps(p.__dict__, indent=1) + "\n")


def run_eval_cut(a: "PruneArgs", texts: list[str], plan_path: Path, out: Path) -> None:
    """Perplexity of the plain cut, computed in memory from the source (equal to its checkpoint's)."""
    from compute_block_similarity.model import load_model

    from .evaluate import perplexity
    from .inmemory import removed_layers

    m, tok = load_model(a.model, trust_remote_code=a.trust_remote_code)
    keep = {i for r in _ranges(plan_path) for i in range(*r)}
    with removed_layers(m, [i for i in range(m.config.get_text_config().num_hidden_layers) if i not in keep]):
        p = perplexity(m, tok, texts, max_length=a.max_length, stride=a.max_length, progress=True)
    write_text(out, json.dumps(p.__dict__, indent=1) + "\n")


def run_plan(a: "PruneArgs", scan_json: Path, n: int, plan_path: Path, removed: list[int] | None = None) -> None:
    from compute_block_similarity.ranges import format_inclusive

    from .plan import plan, write_config, write_selection

    fixed = {"remove": format_inclusive(removed)} if removed else {"layers_to_skip": n}
    choices: list = []
    write_config(plan(str(scan_json), select=a.select, top_k=a.top_k, select_texts=a.select_texts, model=a.model,
                      repair=a.repair, trust_remote_code=a.trust_remote_code, choice_out=choices, **fixed), plan_path)
    if choices:
        write_selection(plan_path, choices[0])


def selection_inputs(a: "PruneArgs") -> dict:
    """What a choice of block depends on, for the stages' fingerprints."""
    return {**a.model_dump(include=set(SelectOptions.model_fields)), "repair": a.repair}


def run_budget(a: "PruneArgs", scan_json: Path, out: Path) -> None:
    from .plan import calibration_scorer
    from .select import budget_search

    scan = load_scan(scan_json)
    score = calibration_scorer(scan, a.model, a.select_texts, a.trust_remote_code, a.repair)
    b = budget_search(scan, score, a.max_ppl_ratio, a.select, a.top_k, a.max_layers)
    write_text(out, json.dumps({**asdict(b), "passes": score.passes}, indent=1) + "\n")


def sizes_to_cut(a: "PruneArgs", work: Path, scan: ScanFile, scan_json: Path, scan_fp: str) -> tuple[list[int], dict | None]:
    """--layers_to_skip, or the n that --target_layers or the --max_ppl_ratio budget asks for."""
    L = scan.num_layers
    if a.target_layers is not None:
        if not 1 <= a.target_layers < L:
            raise ValueError(f"--target_layers {a.target_layers} must be in [1, {L - 1}] for a {L}-layer model")
        return [L - a.target_layers], None
    if a.max_ppl_ratio is None:
        return a.layers_to_skip, None
    bjson = work / "budget.json"
    stage(work, "budget", {"scan": scan_fp, "ratio": a.max_ppl_ratio, "max_layers": a.max_layers, **selection_inputs(a)},
          [bjson], run_budget, a, scan_json, bjson)
    budget = json.loads(bjson.read_text())
    if budget["n"] == 0:
        first = budget["curve"][0]
        raise UserError(f"--max_ppl_ratio {a.max_ppl_ratio}: removing even one layer gives {first['ratio']:.3f}x the "
                        "dense perplexity; raise the budget")
    log.info("budget %.2fx: %d of %d layers can go (calibration perplexity %.3fx dense)", a.max_ppl_ratio,
             budget["n"], L, budget["curve"][budget["n"] - 1]["ratio"])
    return [budget["n"]], budget


def run_materialize(a: "PruneArgs", plan_path: Path, model_dir: Path) -> None:
    from .materialize import materialize
    from .repair import load_calibration

    texts, cal = (load_calibration(a.dataset, a.dataset_column, a.dataset_subset, a.dataset_size)
                  if a.repair != "none" else ([], {}))
    materialize(str(plan_path), str(model_dir), trust_remote_code=a.trust_remote_code, repair=a.repair,
                repair_texts=texts, repair_calibration=cal, max_length=a.max_length, batch_size=a.batch_size,
                skip_unfoldable=True)


def run_verify(plan_path: Path, model_dir: Path, report: Path) -> None:
    from compute_block_similarity.errors import UserError

    from .verify import verify

    rep = verify(str(model_dir), str(plan_path))
    write_text(report, rep.render() + "\n")
    if not rep.ok:
        raise UserError(f"verification of {model_dir} failed; see {report}")


HEAL_TEXTS = 10_000


def heal_config(a: "PruneArgs") -> HealConfig:
    return a.heal_cfg.model_copy(update={"max_length": a.max_length})


def run_heal(a: "PruneArgs", model_dir: Path, model_fp: str, eval_texts: list[str], hdir: Path) -> None:
    from compute_block_similarity.data import load_texts

    from .heal import heal

    # healing wants far more text than the calibration: up to HEAL_TEXTS of the training split
    train = load_texts(a.dataset, a.dataset_column, a.dataset_subset, HEAL_TEXTS)
    cfg = heal_config(a)
    work, inputs = Path(f"{hdir}.work"), json.dumps({"model": model_fp, "heal": cfg.model_dump()}, sort_keys=True)
    marker = work / "prune_inputs.json"
    if work.exists() and not (marker.exists() and marker.read_text() == inputs):
        shutil.rmtree(work)  # a run for another model or recipe: start over; the same one resumes
    work.mkdir(parents=True, exist_ok=True)
    write_text(marker, inputs)
    heal(str(model_dir), train, eval_texts, str(hdir), cfg, resume=True, progress=True)


def prune(a: PruneArgs) -> Path:
    from compute_block_similarity.data import load_texts

    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    scan_json = work / "scan" / "block_distances.json"
    scan_in = {"model": a.model, "dataset": a.dataset, "column": a.dataset_column, "split": a.dataset_subset,
               "size": a.dataset_size, "max_length": a.max_length, "batch_size": a.batch_size, "metric": a.metric,
               "n": a.layers_to_skip[0]}
    scan_fp = stage(work, "scan", scan_in, [scan_json], run_scan, a, work / "scan")
    scan = load_scan(scan_json)
    eval_texts = load_texts(a.dataset, a.dataset_column, a.eval_subset, a.eval_size)
    eval_in = {"texts": hashlib.sha256("\x00".join(eval_texts).encode()).hexdigest(), "max_length": a.max_length}
    src_eval = work / "source_eval.json"
    stage(work, "eval-source", {"model": a.model, **eval_in}, [src_eval], run_eval, a, eval_texts, a.model, src_eval)
    src_ppl = json.loads(src_eval.read_text())["perplexity"]
    sizes, budget = sizes_to_cut(a, work, scan, scan_json, scan_fp)
    rows = []
    for n in sizes:
        d = work / f"n{n}"
        plan_path, model_dir, pr_eval, hdir = d / "sliced.yml", d / "model", d / "pruned_eval.json", d / "healed"
        cut_eval = d / "cut_eval.json"
        fixed = budget["curve"][n - 1]["removed"] if budget else None
        plan_fp = stage(work, f"plan-n{n}", {"scan": scan_fp, "n": n, "removed": fixed, **selection_inputs(a)},
                        [plan_path], run_plan, a, scan_json, n, plan_path, fixed)
        mat_fp = stage(work, f"materialize-n{n}", {"plan": plan_fp, "repair": a.repair}, [model_dir / "config.json"],
                       run_materialize, a, plan_path, model_dir)
        stage(work, f"verify-n{n}", {"model": mat_fp}, [d / "verify.txt"], run_verify, plan_path, model_dir, d / "verify.txt")
        stage(work, f"eval-n{n}", {"model": mat_fp, **eval_in}, [pr_eval], run_eval, a, eval_texts, str(model_dir), pr_eval)
        if a.repair != "none":
            stage(work, f"eval-cut-n{n}", {"plan": plan_fp, **eval_in}, [cut_eval], run_eval_cut, a, eval_texts,
                  plan_path, cut_eval)
        healed = None
        if a.heal:
            stage(work, f"heal-n{n}", {"model": mat_fp, "heal": heal_config(a).model_dump(), **eval_in},
                  [hdir / "heal.json"], run_heal, a, model_dir, mat_fp, eval_texts, hdir)
            healed = json.loads((hdir / "heal.json").read_text())["after_heal"]
        ranges = _ranges(plan_path)
        removed = scan.removed(ranges)
        pr = json.loads(pr_eval.read_text())
        cut = json.loads(cut_eval.read_text()) if a.repair != "none" else pr
        ev = {"source": {"perplexity": src_ppl}, "cut": cut,
              **({"repaired": {**pr, "method": a.repair}} if a.repair != "none" else {}),
              **({"healed": {"perplexity": healed}} if healed else {})}
        write_text(model_dir / "eval.json", json.dumps(ev, indent=1) + "\n")
        rows.append({"n": n, "removed": removed, "ranges": ranges, "source": src_ppl, "cut": cut["perplexity"],
                     "repaired": pr["perplexity"] if a.repair != "none" else None, "pruned": pr["perplexity"],
                     "healed": healed, "tokens": pr["tokens_scored"]})
    write_report(work, a, rows, scan, budget)
    return work / "report.md"


def _ranges(plan_path: Path) -> list[list[int]]:
    from .plan import read_config

    return [list(s.sources[0].layer_range) for s in read_config(plan_path).slices]


def plot_ppl(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compute_block_similarity.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [0] + [r["n"] for r in rows]
    ax.plot(ns, [rows[0]["source"]] + [r["cut"] for r in rows], "o-", label="cut")
    if any(r["repaired"] for r in rows):
        ax.plot(ns, [rows[0]["source"]] + [r["repaired"] for r in rows], "^-", label="cut + bridge (no training)")
    if any(r["healed"] for r in rows):
        ax.plot([0] + [r["n"] for r in rows if r["healed"]], [rows[0]["source"]] + [r["healed"] for r in rows if r["healed"]],
                "s--", label="pruned + healing")
    ax.set_xlabel("layers removed")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (ax.yaxis,):
        axis.set_major_formatter(FormatStrFormatter("%.3g"))
        axis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.set_title("held-out perplexity by number of layers removed", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def budget_lines(budget: dict | None, scan: ScanFile) -> list[str]:
    if not budget:
        return []
    lines = ["", f"## How many layers can go: budget {budget['max_ratio']}x the dense calibration perplexity", "",
             f"Answer: **{budget['n']} of {scan.num_layers} layers** (dense calibration perplexity "
             f"{budget['dense']:.3f}).", "", "| n removed | layers removed | calibration perplexity | x dense | within |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {format_layers(r['removed'])} | {r['perplexity']:.3f} | {r['ratio']:.3f} | "
              f"{'yes' if r['within'] else 'no'} |" for r in budget["curve"]]
    return lines


def candidate_lines(work: Path, rows: list[dict], scan: ScanFile) -> list[str]:
    """Every candidate block the selection scored, with its scan score; the chosen one marked."""
    lines = []
    for r in rows:
        sel = work / f"n{r['n']}" / "sliced.select.json"
        if not sel.exists():
            continue
        c = json.loads(sel.read_text())
        lines += ["", f"### Candidates for n = {r['n']} (`--select {c['strategy']}`, {c['passes']:.2f} calibration passes)", "",
                  "| block | scan score | calibration perplexity (windows) | loss - chosen's (nats/token) ± paired SE | "
                  "chosen |", "|---|---|---|---|---|"]
        for x in sorted((x for x in c["candidates"] if "start" in x), key=lambda x: x["perplexity"]):
            block = list(range(x["start"], x["start"] + r["n"]))
            gap = (f"{x['nll_minus_chosen']:+.4f} ± {x['se']:.4f}" if x.get("se") is not None else "-")
            seen = f" ({x['windows']})" if "windows" in x else ""
            lines.append(f"| {format_layers(block)} | {x['score']:.4f} | {x['perplexity']:.3f}{seen} | {gap} | "
                         f"{'**yes**' if block == c['removed'] else ''} |")
    return lines


def write_report(work: Path, a: PruneArgs, rows: list[dict], scan: ScanFile, budget: dict | None = None) -> None:
    from compute_block_similarity.atomic import atomic_path

    from compute_block_similarity.report import plot_triangle

    with atomic_path(work / "heatmap.png") as tmp:  # the scan's heatmap with the chosen cuts boxed
        plot_triangle(scan.distances, scan.num_layers, scan.metric, Path(a.model).name,
                      {n: scan.best_start(n) for n in scan.distances}, str(tmp),
                      chosen={r["n"]: r["removed"] for r in rows})
    plot_ppl(rows, work / "perplexity_vs_layers.png")
    L = scan.num_layers
    lines = [f"# Depth-pruning report: `{a.model}`", "",
             f"{L} decoder layers. Scan: `{scan.metric}` on {scan.num_samples} texts ({scan.num_tokens} tokens) "
             f"of `{a.dataset}`; selection: `{a.select}`. Perplexity: held-out split `{a.eval_subset}` "
             f"({a.eval_size} texts, {rows[0]['tokens']} tokens scored, window {a.max_length}).",
             "Layers are 0-based; ranges are half-open `[start, end)` as in MergeKit's `layer_range`.", "",
             "Repair: `none` (the plain cut)." if a.repair == "none" else
             f"Repair: `{a.repair}` (a least-squares bridge folded into the layer before each cut; "
             "see `n*/model/repair.safetensors`).", "",
             "| n removed | layers removed | kept `layer_range`s | perplexity dense | cut | repaired | healed | checkpoint |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        healed = f"{r['healed']:.2f}" if r["healed"] else "-"
        repaired = f"{r['repaired']:.2f}" if r["repaired"] else "-"
        lines.append(f"| {r['n']} | {format_layers(r['removed'])} | {format_ranges(r['ranges'])} | "
                     f"{r['source']:.2f} | {r['cut']:.2f} | {repaired} | {healed} | "
                     f"`n{r['n']}/{'healed' if r['healed'] else 'model'}` |")
    lines += budget_lines(budget, scan) + candidate_lines(work, rows, scan)
    lines += ["", "![heatmap](heatmap.png)", "", "![perplexity](perplexity_vs_layers.png)", ""]
    write_text(work / "report.md", "\n".join(lines))
    log.info("report: %s", work / "report.md")
