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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compute_block_similarity import scanfile
from compute_block_similarity.atomic import atomic_path, output_lock, write_text
from compute_block_similarity.data import load_calibration, load_texts
from compute_block_similarity.errors import UserError
from compute_block_similarity.flags import one_of
from compute_block_similarity.job import run_scan
from compute_block_similarity.options import (
    PLACEMENT,
    DataOptions,
    ModelOptions,
    ScanOptions,
)
from compute_block_similarity.ranges import (
    format_inclusive,
    format_layers,
    format_ranges,
)
from compute_block_similarity.report import plot_triangle
from compute_block_similarity.scanfile import ScanFile

from .benchmarks import (
    TaskOptions,
    above_chance,
    above_chance_tasks,
    compare,
    fmt,
    retained,
    run_tasks,
    task_manager,
    top_level,
)
from .card import model_card
from .checkpoint import kept_ranges_of, lineage, read_plan
from .evaluate import perplexity
from .heal import HealConfig, heal
from .inmemory import removed_layers
from .materialize import materialize
from .methods import METHODS, OURS, get_method, methods_help
from .plan import calibration_scorer, plan, write_config, write_selection
from .repair_fit import RepairOptions
from .select import SelectOptions, budget_search
from .verify import verify

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


SCAN_FLAGS = ["metric"]  # of ScanOptions, the ones prune takes; the rest keep the scan's defaults


class PruneArgs(BaseModel):
    """The whole job"""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="checkpoint folder or Hub id")
    load: ModelOptions = Field(default_factory=ModelOptions, json_schema_extra={"flags": {
        "skip": ["model_path", "gguf_file", "load_in_4bit"], "title": "Model loading and placement (every stage)"}})
    # the calibration data feeds the scan, the selection, the repair and healing; max_length is also the eval window
    data: DataOptions = Field(default_factory=lambda: DataOptions(dataset_size=256, max_length=256),
                              json_schema_extra={"flags": {"skip": ["streaming"], "title": "Calibration data", "helps": {
                                  "dataset_size": "calibration texts for the scan, selection and repair",
                                  "dataset_subset": "calibration split (scan, selection, repair, healing)",
                                  "max_length": "tokens per text (calibration) and evaluation window"}}})
    scan: ScanOptions = Field(default_factory=ScanOptions, json_schema_extra={"flags": {
        "skip": [k for k in ScanOptions.model_fields if k not in SCAN_FLAGS], "title": "The scan",
        "helps": {"metric": "the scan metric that ranks the blocks"}}})
    choice: SelectOptions = Field(default_factory=SelectOptions)
    fix: RepairOptions = Field(default_factory=RepairOptions, json_schema_extra={"flags": {
        "title": "Repair: each cut is bridged before evaluation and healing, and the candidates are scored after it"}})
    heal_cfg: HealConfig = Field(default_factory=HealConfig, json_schema_extra={"flags": {
        "prefix": "heal_", "skip": ["max_length"], "title": "Healing (with --heal), as the heal command"}})
    layers_to_skip: list[int] = Field([4], min_length=1, description="block size, or several: '2,4,6,8'")
    eval_subset: str = Field("test", description="held-out split for every perplexity reported")
    eval_size: int = Field(64, ge=1, description="held-out texts")
    eval_dataset: str | None = Field(None, description="a second held-out corpus, of another kind than the calibration "
                                     "text (a Hub id, a local file, or 'python-package-readmes': the installed packages' "
                                     "README prose): every model's perplexity on it too, to see how a cut transfers")
    eval_dataset_subset: str = Field("test", description="split of --eval_dataset (a local file has only 'train')")
    heal: bool = Field(False, description="heal each pruned (and repaired) model; --heal_* set the recipe")
    work_dir: str = Field("prune_out", description="every stage's output, and report.md",
                          json_schema_extra={"aliases": ["--output"]})
    max_ppl_ratio: float | None = Field(None, gt=1, description="budget mode: remove as many layers as keep calibration "
                                        "perplexity within this many times the dense model's (e.g. 1.25)")
    target_layers: int | None = Field(None, ge=1, description="keep this many decoder layers (instead of "
                                      "--layers_to_skip)")
    max_layers: int | None = Field(None, ge=1, description="budget mode: remove at most this many layers")
    bench: TaskOptions = Field(default_factory=TaskOptions, json_schema_extra={"flags": {
        "title": "Benchmarks (lm-eval): the dense model and every cut, repaired and healed model, with retained %"}})
    baselines: list[str] = Field([], description="the field's methods, each as its paper runs it, built, evaluated and "
                                 "healed under the same protocol as ours, side by side in report.md: " + methods_help())

    @model_validator(mode="after")
    def _check(self) -> "PruneArgs":
        if self.max_ppl_ratio is not None and self.target_layers is not None:
            raise ValueError("--max_ppl_ratio and --target_layers are exclusive: give a budget or a layer count")
        if any(n < 1 for n in self.layers_to_skip):
            raise ValueError(f"--layers_to_skip {self.layers_to_skip}: block sizes must be >= 1")
        for b in self.baselines:
            one_of("--baselines", METHODS, b)
        if self.data.max_length < 2:
            raise ValueError(f"--max_length must be >= 2 to score anything, got {self.data.max_length}")
        return self

    @property
    def repair(self) -> str:
        return self.fix.repair


def fingerprints(a: PruneArgs) -> dict[str, dict]:
    """Each stage's inputs, from the option groups that feed it (whole ``model_dump()``s, so nothing
    that changes a result can be left out); the stages add the fingerprints of what they read."""
    # placement (--device_map, --max_memory, --offload_folder) changes where the model runs, not what it computes
    model = {"model": a.model, "load": a.load.model_dump(exclude=set(PLACEMENT))}
    scan = a.scan.model_dump(exclude={"output_dir", "no_progress", "checkpoint_every", "resume", "layers_to_skip"})
    evaluation = {**model, "eval_subset": a.eval_subset, "eval_size": a.eval_size, "data": a.data.model_dump()}
    return {
        "scan": {**model, "data": a.data.model_dump(), "scan": scan, "n": a.layers_to_skip[0]},
        "select": {**model, "choice": a.choice.model_dump(), "fix": a.fix.model_dump()},
        "materialize": {"fix": a.fix.model_dump(), "data": a.data.model_dump(),
                        "trust_remote_code": a.load.trust_remote_code},
        "eval": evaluation,
        "heal": {"heal": heal_config(a).model_dump(), "data": a.data.model_dump()},
        "tasks": {"bench": a.bench.model_dump(), "load": model["load"]},
    }


def folder_fingerprint(folder: str | None) -> list:
    """(path, size, mtime) of every file under --include_path: an edited task YAML or data file reruns the tasks."""
    if not folder:
        return []
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in Path(folder).rglob("*") if p.is_file())


def scan_stage(a: PruneArgs, scan_dir: Path) -> None:
    run_scan(a.load.model_copy(update={"model_path": a.model}), a.data,
             a.scan.model_copy(update={"layers_to_skip": a.layers_to_skip[0], "output_dir": str(scan_dir)}))


def eval_stage(a: PruneArgs, texts: list[str], model: str, out: Path) -> None:
    m, tok = a.load.load(model)
    p = perplexity(m, tok, texts, max_length=a.data.max_length, stride=a.data.max_length, progress=True,
                   logits_bytes=a.choice.logits_bytes)
    write_text(out, json.dumps(p.__dict__, indent=1) + "\n")


def tasks_stage(a: PruneArgs, model: str, removed: list[int], out: Path) -> None:
    """lm-eval --tasks on ``model`` (without the ``removed`` layers, cut in memory, when given)."""
    m, tok = a.load.load(model)
    with removed_layers(m, removed):
        rec = run_tasks(m, tok, a.bench)
    write_text(out, json.dumps(rec, indent=1) + "\n")


def eval_cut_stage(a: PruneArgs, texts: list[str], plan_path: Path, out: Path) -> None:
    """Perplexity of the plain cut, computed in memory from the source (equal to its checkpoint's)."""
    m, tok = a.load.load(a.model)
    with removed_layers(m, lineage(plan_path, a.model).removed):
        p = perplexity(m, tok, texts, max_length=a.data.max_length, stride=a.data.max_length, progress=True,
                   logits_bytes=a.choice.logits_bytes)
    write_text(out, json.dumps(p.__dict__, indent=1) + "\n")


def plan_stage(a: PruneArgs, scan_json: Path, n: int, plan_path: Path, removed: list[int] | None = None) -> None:
    fixed = {"remove": format_inclusive(removed)} if removed else {"layers_to_skip": n}
    choices: list = []
    write_config(plan(str(scan_json), choice=a.choice, model=a.model, repair=a.repair, load=a.load, choice_out=choices,
                      **fixed), plan_path)
    if choices:
        write_selection(plan_path, choices[0])


def budget_stage(a: PruneArgs, scan_json: Path, out: Path) -> None:
    scan = scanfile.load(scan_json)
    score = calibration_scorer(scan, a.model, a.choice, a.load, a.repair)
    b = budget_search(scan, score, a.max_ppl_ratio, a.choice.select, a.choice.top_k, a.max_layers, a.choice.race())
    write_text(out, json.dumps({**asdict(b), "passes": score.passes}, indent=1) + "\n")


def sizes_to_cut(a: PruneArgs, work: Path, scan: ScanFile, scan_json: Path, scan_fp: str) -> tuple[list[int], dict | None]:
    """--layers_to_skip, or the n that --target_layers or the --max_ppl_ratio budget asks for."""
    L = scan.num_layers
    if a.target_layers is not None:
        if not 1 <= a.target_layers < L:
            raise ValueError(f"--target_layers {a.target_layers} must be in [1, {L - 1}] for a {L}-layer model")
        return [L - a.target_layers], None
    if a.max_ppl_ratio is None:
        return a.layers_to_skip, None
    bjson = work / "budget.json"
    stage(work, "budget", {"scan": scan_fp, "ratio": a.max_ppl_ratio, "max_layers": a.max_layers,
                           **fingerprints(a)["select"]}, [bjson], budget_stage, a, scan_json, bjson)
    budget = json.loads(bjson.read_text())
    if budget["n"] == 0:
        first = budget["curve"][0]
        raise UserError(f"--max_ppl_ratio {a.max_ppl_ratio}: removing even one layer gives {first['ratio']:.3f}x the "
                        "dense perplexity; raise the budget")
    log.info("budget %.2fx: %d of %d layers can go (calibration perplexity %.3fx dense)", a.max_ppl_ratio,
             budget["n"], L, budget["curve"][budget["n"] - 1]["ratio"])
    return [budget["n"]], budget


def materialize_stage(a: PruneArgs, plan_path: Path, model_dir: Path) -> None:
    d = a.data
    texts, cal = (load_calibration(d.dataset, d.dataset_column, d.dataset_subset, d.dataset_size, d.dataset_config)
                  if a.repair != "none" else ([], {}))
    materialize(str(plan_path), str(model_dir), trust_remote_code=a.load.trust_remote_code, repair=a.repair,
                repair_texts=texts, repair_calibration=cal, max_length=d.max_length, batch_size=d.batch_size,
                skip_unfoldable=True, load=a.load)


def verify_stage(a: PruneArgs, plan_path: Path, model_dir: Path, report: Path) -> None:
    rep = verify(str(model_dir), str(plan_path), load=a.load)
    write_text(report, rep.render() + "\n")
    if not rep.ok:
        raise UserError(f"verification of {model_dir} failed; see {report}")


HEAL_TEXTS = 10_000


def heal_config(a: PruneArgs) -> HealConfig:
    return a.heal_cfg.model_copy(update={"max_length": a.data.max_length})


def texts_inputs(fps: dict, texts: list[str]) -> dict:
    """An evaluation stage's inputs: the eval fingerprint and the texts it scores."""
    return {**fps["eval"], "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest()}


def pick_texts(a: PruneArgs, eval_texts: list[str], fps: dict) -> tuple[list[str], dict]:
    """Held-out texts that pick healing's best step: the next --eval_size texts of the held-out split after
    the ones every perplexity is reported on, so the healed figure is measured on text that chose nothing."""
    d = a.data
    more = load_texts(d.dataset, d.dataset_column, a.eval_subset, 2 * a.eval_size, d.dataset_config)[a.eval_size:]
    if not more:
        log.warning("the held-out split %s has no texts beyond the %d reported on: healing picks its best step on "
                    "those same texts, which flatters the healed figure; use a larger split", a.eval_subset, a.eval_size)
        more = eval_texts
    return more, texts_inputs(fps, more)


def heal_stage(a: PruneArgs, model_dir: Path, model_fp: str, eval_texts: list[str], hdir: Path) -> None:
    # healing wants far more text than the calibration: up to HEAL_TEXTS of the training split
    d = a.data
    train = load_texts(d.dataset, d.dataset_column, d.dataset_subset, HEAL_TEXTS, d.dataset_config)
    cfg = heal_config(a)
    work, inputs = Path(f"{hdir}.work"), json.dumps({"model": model_fp, "heal": cfg.model_dump()}, sort_keys=True)
    marker = work / "prune_inputs.json"
    if work.exists() and not (marker.exists() and marker.read_text() == inputs):
        shutil.rmtree(work)  # a run for another model or recipe: start over; the same one resumes
    work.mkdir(parents=True, exist_ok=True)
    write_text(marker, inputs)
    heal(str(model_dir), train, eval_texts, str(hdir), cfg, resume=True, progress=True,
         data=f"{d.dataset} (split {d.dataset_subset})", teacher_load=a.load)


@dataclass
class Variant:
    """One pruned model of the job (ours, or a baseline built the same way): its folder, and the
    fingerprints of the stages that planned and built it."""

    n: int
    name: str
    work: Path
    plan_fp: str = ""
    mat_fp: str = ""

    @property
    def tag(self) -> str:
        return f"n{self.n}" if self.name == OURS else f"n{self.n}-{self.name}"

    @property
    def dir(self) -> Path:
        return self.work / self.tag

    @property
    def plan(self) -> Path:
        return self.dir / "sliced.yml"

    @property
    def model(self) -> Path:
        return self.dir / "model"

    @property
    def healed(self) -> Path:
        return self.dir / "healed"

    def read(self, name: str) -> float:
        return json.loads((self.dir / name).read_text())["perplexity"]


def build_stages(a: PruneArgs, ctx: dict, v: Variant, fixed: list[int] | None) -> None:
    """plan -> materialize (+ bridge) -> verify -> held-out perplexity of the checkpoint and the plain cut."""
    fps, eval_in, texts, work = ctx["fps"], ctx["eval_in"], ctx["eval_texts"], v.work
    v.plan_fp = stage(work, f"plan-{v.tag}", {"scan": ctx["scan_fp"], "n": v.n, "removed": fixed, **fps["select"]},
                      [v.plan], plan_stage, a, ctx["scan_json"], v.n, v.plan, fixed)
    v.mat_fp = stage(work, f"materialize-{v.tag}", {"plan": v.plan_fp, **fps["materialize"]},
                     [v.model / "config.json"], materialize_stage, a, v.plan, v.model)
    stage(work, f"verify-{v.tag}", {"model": v.mat_fp}, [v.dir / "verify.txt"], verify_stage, a, v.plan, v.model,
          v.dir / "verify.txt")
    stage(work, f"eval-{v.tag}", {**eval_in, "model": v.mat_fp}, [v.dir / "pruned_eval.json"], eval_stage, a, texts,
          str(v.model), v.dir / "pruned_eval.json")
    if a.repair != "none":
        stage(work, f"eval-cut-{v.tag}", {**eval_in, "plan": v.plan_fp}, [v.dir / "cut_eval.json"], eval_cut_stage,
              a, texts, v.plan, v.dir / "cut_eval.json")


def second_corpus_stages(a: PruneArgs, ctx: dict, v: Variant) -> dict[str, float]:
    """--eval_dataset: the plain cut's and the checkpoint's perplexity on the second corpus."""
    if not ctx.get("texts2"):
        return {}
    in2, texts2 = ctx["eval2_in"], ctx["texts2"]
    if a.repair != "none":
        stage(v.work, f"eval2-cut-{v.tag}", {**in2, "plan": v.plan_fp}, [v.dir / "cut_eval2.json"], eval_cut_stage,
              a, texts2, v.plan, v.dir / "cut_eval2.json")
    stage(v.work, f"eval2-{v.tag}", {**in2, "model": v.mat_fp}, [v.dir / "pruned_eval2.json"], eval_stage, a, texts2,
          str(v.model), v.dir / "pruned_eval2.json")
    pr2 = v.read("pruned_eval2.json")
    if a.repair == "none":
        return {"source": ctx["src_ppl2"], "cut": pr2}
    return {"source": ctx["src_ppl2"], "cut": v.read("cut_eval2.json"), "repaired": pr2}


def heal_stages(a: PruneArgs, ctx: dict, v: Variant, shift: dict[str, float]) -> tuple[float | None, dict | None]:
    """Heal the checkpoint, its best step picked on held-out texts of its own; (its perplexity on the texts
    every row uses, the healing ledger). The second corpus's healed figure goes into ``shift``."""
    if not a.heal:
        return None, None
    fps, key = ctx["fps"], {"model": v.mat_fp, "heal": ctx["fps"]["heal"]}
    stage(v.work, f"heal-{v.tag}", {**ctx["pick_in"], **fps["heal"], "model": v.mat_fp}, [v.healed / "heal.json"],
          heal_stage, a, v.model, v.mat_fp, ctx["pick_texts"], v.healed)
    stage(v.work, f"eval-healed-{v.tag}", {**ctx["eval_in"], **key}, [v.dir / "healed_eval.json"], eval_stage, a,
          ctx["eval_texts"], str(v.healed), v.dir / "healed_eval.json")
    if ctx.get("texts2"):
        stage(v.work, f"eval2-healed-{v.tag}", {**ctx["eval2_in"], **key}, [v.dir / "healed_eval2.json"], eval_stage,
              a, ctx["texts2"], str(v.healed), v.dir / "healed_eval2.json")
        shift["healed"] = v.read("healed_eval2.json")
    return v.read("healed_eval.json"), json.loads((v.healed / "heal.json").read_text()).get("ledger")


def task_stages(a: PruneArgs, ctx: dict, v: Variant, removed: list[int]) -> dict[str, dict]:
    """lm-eval on each form of the model: the plain cut (in memory from the source, scored once per set of
    removed layers and shared by every method that removes them), the repaired checkpoint, healed."""
    if not a.bench.tasks:
        return {}
    repaired = a.repair != "none"
    layers = format_inclusive(removed)  # e.g. "12-19" or "3,7,9-11"
    cut_out = v.work / "cut_tasks" / f"tasks_cut_{layers}.json"
    stage(v.work, f"tasks-cut-{layers}", {**ctx["tasks_in"], "model": ctx["fps"]["eval"]["model"], "removed": removed},
          [cut_out], tasks_stage, a, a.model, removed, cut_out)
    write_text(v.dir / "tasks_cut.json", cut_out.read_text())
    tasks = {"cut": json.loads(cut_out.read_text())}
    forms = [("repaired", str(v.model), {"model": v.mat_fp})] if repaired else []
    if a.heal:
        forms.append(("healed", str(v.healed), {"model": v.mat_fp, "heal": ctx["fps"]["heal"]}))
    for form, path, key in forms:
        out = v.dir / f"tasks_{form}.json"
        stage(v.work, f"tasks-{form}-{v.tag}", {**ctx["tasks_in"], **key}, [out], tasks_stage, a, path, [], out)
        tasks[form] = json.loads(out.read_text())
    return tasks


def method_args(a: PruneArgs, ctx: dict, name: str) -> tuple[PruneArgs, dict]:
    """The job's arguments and context for one method: its own repair (None: the job's --repair)."""
    repair = None if name == OURS else get_method(name).repair
    if repair is None or repair == a.repair:
        return a, ctx
    am = a.model_copy(update={"fix": a.fix.model_copy(update={"repair": repair})})
    return am, {**ctx, "fps": fingerprints(am)}


def variant_stages(a: PruneArgs, work: Path, ctx: dict, n: int, name: str, fixed: list[int] | None) -> dict:
    """One pruned model (ours, or a method under the same protocol): build, second corpus, heal,
    benchmarks; its eval.json and card; its row of the report."""
    a, ctx = method_args(a, ctx, name)
    v = Variant(n, name, work)
    build_stages(a, ctx, v, fixed)
    ranges = kept_ranges_of(read_plan(v.plan))
    removed = ctx["scan"].removed(ranges)
    shift = second_corpus_stages(a, ctx, v)
    healed, ledger = heal_stages(a, ctx, v, shift)
    tasks = task_stages(a, ctx, v, removed)
    repaired = a.repair != "none"
    pr = json.loads((v.dir / "pruned_eval.json").read_text())
    cut = json.loads((v.dir / "cut_eval.json").read_text()) if repaired else pr
    ev = {"dataset": {"name": a.data.dataset, "split": a.eval_subset, "texts": a.eval_size},
          "source": {"perplexity": ctx["src_ppl"]}, "cut": cut, **({"repaired": {**pr, "method": a.repair}} if repaired else {}),
          **({"healed": {"perplexity": healed}, "heal": ledger} if healed else {}),
          **({"second_corpus": {"dataset": {"name": a.eval_dataset, "split": a.eval_dataset_subset,
                                            "texts": len(ctx["texts2"])}, **shift}} if shift else {}),
          "checkpoint": "repaired" if repaired else "cut",
          **({"lm_eval": {"source": ctx["src_tasks"], **tasks},
              "retained": {form: {"retained": retained(ctx["src_tasks"], rec),
                                  "above_chance": above_chance(ctx["src_tasks"], rec)} for form, rec in tasks.items()}}
             if tasks else {})}
    write_records(v.model, ev, v.plan, ctx["scan"])
    if healed:
        write_records(v.healed, {**ev, "checkpoint": "healed"}, v.plan, ctx["scan"])
    return {"n": n, "name": name, "repair": a.repair, "removed": removed, "ranges": ranges, "source": ctx["src_ppl"],
            "cut": cut["perplexity"], "repaired": pr["perplexity"] if repaired else None, "pruned": pr["perplexity"],
            "healed": healed, "ledger": ledger, "tokens": pr["tokens_scored"], "tasks": tasks, "shift": shift,
            "dir": v.tag}


def write_records(checkpoint: Path, ev: dict, plan_path: Path, scan: ScanFile) -> None:
    """A checkpoint's eval.json and its model card (README.md), which reads it."""
    write_text(checkpoint / "eval.json", json.dumps(ev, indent=1) + "\n")
    write_text(checkpoint / "README.md", model_card(checkpoint, plan_path, scan))


def prune(a: PruneArgs) -> Path:
    """The whole job in ``--work_dir``, one run at a time there (a second is refused, naming the first)."""
    with output_lock(a.work_dir):
        return run_prune(a)


def run_prune(a: PruneArgs) -> Path:
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tm = task_manager(a.bench) if a.bench.tasks else None  # task names checked before any stage runs
    fps = fingerprints(a)
    scan_json = work / "scan" / "block_distances.json"
    scan_fp = stage(work, "scan", fps["scan"], [scan_json], scan_stage, a, work / "scan")
    scan = scanfile.load(scan_json)
    data = a.data
    eval_texts = load_texts(data.dataset, data.dataset_column, a.eval_subset, a.eval_size, data.dataset_config)
    eval_in = texts_inputs(fps, eval_texts)
    src_eval = work / "source_eval.json"
    stage(work, "eval-source", eval_in, [src_eval], eval_stage, a, eval_texts, a.model, src_eval)
    ctx = {"scan": scan, "scan_json": scan_json, "scan_fp": scan_fp, "fps": fps, "eval_in": eval_in,
           "eval_texts": eval_texts, "src_ppl": json.loads(src_eval.read_text())["perplexity"], "src_tasks": None}
    if a.heal:
        ctx["pick_texts"], ctx["pick_in"] = pick_texts(a, eval_texts, fps)
    if a.eval_dataset:
        ctx["texts2"] = load_texts(a.eval_dataset, data.dataset_column, a.eval_dataset_subset, a.eval_size,
                                   data.dataset_config)
        ctx["eval2_in"] = texts_inputs(fps, ctx["texts2"])
        src2 = work / "source_eval2.json"
        stage(work, "eval2-source", ctx["eval2_in"], [src2], eval_stage, a, ctx["texts2"], a.model, src2)
        ctx["src_ppl2"] = json.loads(src2.read_text())["perplexity"]
    if tm is not None:
        ctx["tasks_in"] = {**fps["tasks"], "include": folder_fingerprint(a.bench.include_path)}
        src_tasks = work / "source_tasks.json"
        stage(work, "tasks-source", {**ctx["tasks_in"], "model": fps["eval"]["model"]}, [src_tasks], tasks_stage, a,
              a.model, [], src_tasks)
        ctx["src_tasks"] = json.loads(src_tasks.read_text())
    sizes, budget = sizes_to_cut(a, work, scan, scan_json, scan_fp)
    rows = []
    for n in sizes:
        ours = variant_stages(a, work, ctx, n, OURS, budget["curve"][n - 1]["removed"] if budget else None)
        rows.append(ours)
        for b in a.baselines:
            layers = get_method(b).removes(scan, n)
            if layers == ours["removed"] and method_args(a, ctx, b)[0].repair == a.repair:
                log.info("baseline %s for n = %d removes %s, the same layers as our choice, with the same repair", b, n,
                         format_layers(layers))
                rows.append({**ours, "name": b, "same_as": OURS})
                continue
            rows.append(variant_stages(a, work, ctx, n, b, layers))
    write_report(work, a, rows, scan, budget, ctx["src_tasks"])
    return work / "report.md"


def plot_ppl(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        if c.get("bridge"):
            b = c["bridge"]
            lines += ["", f"The chosen cut scores {b['plain_perplexity']:.3f} plain and {b['bridged_perplexity']:.3f} bridged "
                      f"({b['ratio']:.2f}x) on its {b['windows']} calibration windows"
                      + (": **bridge-dependent** (over 2x); a bridge rescues a badly damaged block less on other text, "
                         "so check the perplexity on a second corpus (`--eval_dataset`)." if b["dependent"] else ".")]
    return lines


def model_lines(rows: list[dict], src_tasks: dict | None) -> list[str]:
    """One row per model (dense; each choice's cut / repaired / healed form): perplexity and every
    task's headline score with its retained % of the dense model's, and retained above chance with its
    paired SE; then ours against each method, and where the documents came from."""
    if not src_tasks:
        return []
    tasks = top_level(src_tasks)
    heads = [f"{t} ({src_tasks['tasks'][t]['headline']}, {src_tasks['tasks'][t]['num_fewshot']}-shot)" for t in tasks]
    lines = ["", "## Models side by side: perplexity and benchmarks (lm-eval)", "",
             f"lm-eval {src_tasks['lm_eval_version']}" + (f", --limit {src_tasks['limit']:g}" if src_tasks["limit"] else "")
             + (f", tasks from `{src_tasks['include_path']}`" if src_tasks["include_path"] else "")
             + ". Each cell: score (retained % of dense); retained % is pruned / dense for a higher-is-better metric, "
             "dense / pruned for a lower-is-better one, so 100 % = as good as dense. Above chance: the average over "
             "tasks of (pruned - chance) / (dense - chance), chance = the mean of 1 / choices, ± its paired SE "
             "against the dense model on the same documents" + left_out(src_tasks) + ".", "",
             "| model | layers removed | perplexity | " + " | ".join(heads) + " | retained % (average) | "
             "above chance % (average ± SE) |", "|---" * (len(tasks) + 5) + "|"]

    def row(label: str, layers: str, ppl: float | None, rec: dict) -> str:
        kept, above = retained(src_tasks, rec), above_chance(src_tasks, rec)
        cells = []
        for t in tasks:
            h = rec.get("tasks", {}).get(t)
            cells.append("-" if not h else fmt(h['metrics'][h['headline']]) +
                         (f" ({kept[t]:.1f} %)" if t in kept else ""))
        avg = f"{kept['average']:.1f} %" if "average" in kept else "-"
        return (f"| {label} | {layers} | {f'{ppl:.2f}' if ppl else '-'} | " + " | ".join(cells) + f" | {avg} | "
                + (pm(*above["average"]) if "average" in above else "-") + " |")

    lines.append(row("dense", "-", rows[0]["source"], src_tasks))
    cuts = set()  # a plain cut is printed once per set of removed layers (ReplaceMe's cut is the angle cut)
    for r in rows:
        if r.get("same_as"):
            continue
        for form in ("cut", "repaired", "healed"):
            key = (r["n"], format_layers(r["removed"]))
            if form == "cut" and key in cuts:
                continue
            if form == "cut":
                cuts.add(key)
            if form in r["tasks"]:
                lines.append(row(f"{r['name']} n={r['n']}, {form}", format_layers(r["removed"]), r[form], r["tasks"][form]))
    return lines + versus_lines(rows, src_tasks) + split_lines(src_tasks)


def left_out(src_tasks: dict) -> str:
    """The tasks left out of retained above chance, and why (`above_chance_tasks`)."""
    out = {t: why for t, why in above_chance_tasks(src_tasks).items() if why}
    return ("; left out of it: " + ", ".join(f"`{t}` ({why})" for t, why in out.items())) if out else ""


def pm(v: float, se: float | None) -> str:
    return f"{v:.1f} ± {se:.1f}" if se is not None else f"{v:.1f}"


def training_free(r: dict) -> str | None:
    """The form a row ends with before any training: repaired where a repair ran, else the cut."""
    return "repaired" if "repaired" in r["tasks"] else "cut" if "cut" in r["tasks"] else None


def versus_lines(rows: list[dict], src_tasks: dict) -> list[str]:
    """Ours minus each method in average retained above chance, paired over the same documents: training-free
    forms against each other, and healed against healed."""
    out = []
    for ours in (r for r in rows if r["name"] == OURS):
        for r in rows:
            if r["n"] != ours["n"] or r["name"] == OURS or r.get("same_as"):
                continue
            for label, fa, fb in (("training-free", training_free(ours), training_free(r)), ("healed", "healed", "healed")):
                if fa in ours["tasks"] and fb in r["tasks"]:
                    c = compare(src_tasks, ours["tasks"][fa], r["tasks"][fb])
                    if c:
                        z = c[0] / c[1] if c[1] > 0 else float("inf") * (1 if c[0] > 0 else -1)
                        verdict = "ours better" if z > 2 else "ours worse" if z < -2 else "within 2 SE"
                        out.append(f"| n={ours['n']} | {label} | ours {fa} vs {r['name']} {fb} | {c[0]:+.1f} ± {c[1]:.1f} | "
                                   f"{z:+.1f} | {verdict} |")
    if not out:
        return []
    return ["", "### Ours against each method (average retained above chance, points; paired over the same documents)",
            "", "| n | form | models | ours - method ± SE | SE | verdict |", "|---|---|---|---|---|---|"] + out


def split_lines(src_tasks: dict) -> list[str]:
    """Where each task's documents came from, when it is a task of the offline suite."""
    known = [(t, src_tasks["tasks"][t]["split"]) for t in top_level(src_tasks) if src_tasks["tasks"][t].get("split")]
    if not known:
        return []
    return ["", "Documents: " + "; ".join(f"`{t}` {s['split']} (stock task: {s['stock_split']}; {s['data']}, "
                                          f"{s['licence']})" for t, s in known) + "."]


def shift_lines(a: PruneArgs, rows: list[dict]) -> list[str]:
    """The same models on the second held-out corpus (--eval_dataset), beside the calibration domain's."""
    if not any(r.get("shift") for r in rows):
        return []
    lines = ["", f"## On another corpus: `{a.eval_dataset}` (split `{a.eval_dataset_subset}`)", "",
             "Held-out perplexity on text of another kind than the calibration text, which neither the choice nor "
             "the bridge saw; x dense in brackets. A cut that holds up here holds up on text it was not tuned on.", "",
             "| model | layers removed | dense | cut | repaired | healed |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("shift")
        if not s or r.get("same_as"):
            continue
        cell = lambda k: f"{s[k]:.2f} ({s[k] / s['source']:.2f}x)" if k in s else "-"  # noqa: E731
        lines.append(f"| {r['name']} n={r['n']} | {format_layers(r['removed'])} | {s['source']:.2f} | {cell('cut')} | "
                     f"{cell('repaired')} | {cell('healed')} |")
    return lines


def ledger_lines(rows: list[dict]) -> list[str]:
    """What each healing run spent: tokens, steps, wall time, devices, precision, data."""
    done = [r for r in rows if r.get("ledger") and not r.get("same_as")]
    if not done:
        return []
    lines = ["", "## Healing ledger", "", "| model | optimizer steps | training tokens | wall time | devices | "
             "precision | training data | perplexity by step (on the held-out texts that pick the step) |", "|---|---|---|---|---|---|---|---|"]
    for r in done:
        g = r["ledger"]
        curve = ", ".join(f"{h['step']}: {h['perplexity']:.2f}" for h in g["history"])
        lines.append(f"| {r['name']} n={r['n']} | {g['optimizer_steps']} | {g['training_tokens']:,} | {g['wall_s']:.0f} s | "
                     f"{g['world_size']} x {g['device']} | {g['precision']} | {g['data']} | {curve} |")
    return lines


def write_report(work: Path, a: PruneArgs, rows: list[dict], scan: ScanFile, budget: dict | None = None,
                 src_tasks: dict | None = None) -> None:
    ours = [r for r in rows if r["name"] == OURS]
    with atomic_path(work / "heatmap.png") as tmp:  # the scan's heatmap with the chosen cuts boxed
        plot_triangle(scan.distances, scan.num_layers, scan.metric, Path(a.model).name,
                      {n: scan.best_start(n) for n in scan.distances}, str(tmp),
                      chosen={r["n"]: r["removed"] for r in ours})
    plot_ppl(ours, work / "perplexity_vs_layers.png")
    L = scan.num_layers
    lines = [f"# Depth-pruning report: `{a.model}`", "",
             f"{L} decoder layers. Scan: `{scan.metric}` on {scan.num_samples} texts ({scan.num_tokens} tokens) "
             f"of `{a.data.dataset}`; selection: `{a.choice.select}`. Perplexity: held-out split `{a.eval_subset}` "
             f"({a.eval_size} texts, {rows[0]['tokens']} tokens scored, window {a.data.max_length}).",
             "Layers are 0-based; ranges are half-open `[start, end)` as in MergeKit's `layer_range`.", "",
             "Repair: `none` (the plain cut)." if a.repair == "none" else
             f"Repair: `{a.repair}` (a least-squares bridge folded into the layer before each cut; "
             "see `n*/model/repair.safetensors`).", ""]
    if a.baselines:
        lines += ["Baselines, built and evaluated exactly like our choice: "
                  + "; ".join(f"`{b}`: {METHODS[b].does} ({METHODS[b].cite})" for b in a.baselines) + ".", ""]
    lines += ["| model | n removed | layers removed | kept `layer_range`s | repair | perplexity dense | cut | repaired | "
              "healed | checkpoint |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        healed = f"{r['healed']:.2f}" if r["healed"] else "-"
        repaired = f"{r['repaired']:.2f}" if r["repaired"] else "-"
        where = (f"same as {r['same_as']}" if r.get("same_as") else
                 f"`{r['dir']}/{'healed' if r['healed'] else 'model'}`")
        lines.append(f"| {r['name']} | {r['n']} | {format_layers(r['removed'])} | {format_ranges(r['ranges'])} | "
                     f"{r.get('repair', a.repair)} | {r['source']:.2f} | {r['cut']:.2f} | {repaired} | {healed} | {where} |")
    lines += shift_lines(a, rows) + model_lines(rows, src_tasks) + ledger_lines(rows)
    lines += budget_lines(budget, scan) + candidate_lines(work, ours, scan) + stage_lines(work)
    lines += ["", "![heatmap](heatmap.png)", "", "![perplexity](perplexity_vs_layers.png)", ""]
    write_text(work / "report.md", "\n".join(lines))
    log.info("report: %s", work / "report.md")
