"""`prune`: scan -> choose -> sliced.yml -> materialize -> verify -> evaluate -> (heal) -> report.

Every stage's output stays under --work_dir, run through the stage cache (`stage_cache.py`: a rerun
skips a stage whose inputs' fingerprint and outputs are unchanged). The arguments and each stage's
fingerprint are in `prune_args.py`, the report in `prune_report.py`; this file holds the stages, the
variants (ours and each method) and the job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from compute_block_similarity import scanfile
from compute_block_similarity.atomic import output_lock, write_text
from compute_block_similarity.errors import UserError
from compute_block_similarity.job import run_scan
from compute_block_similarity.ranges import format_inclusive, format_layers
from compute_block_similarity.scanfile import ScanFile

from .benchmarks import above_chance, retained, run_tasks, task_manager
from .card import write_card
from .checkpoint import kept_ranges_of, lineage, read_plan
from .evaluate import WindowSettings, perplexity
from .heal import HealRun, heal
from .inmemory import removed_layers
from .materialize import materialize
from .methods import OURS, get_method
from .plan import calibration_scorer, plan, write_config, write_selection
from .prune_args import (
    Fingerprints,
    PruneArgs,
    fingerprints,
    folder_fingerprint,
    heal_config,
)
from .prune_report import Row, write_report
from .records import (
    EVAL_FILE,
    HEAL_FILE,
    BudgetRecord,
    EvalFile,
    HealLedger,
    HealRecord,
    HeldOut,
    ModelEval,
    PerplexityRecord,
    SecondCorpus,
    TasksRecord,
)
from .repair_fit import FitOptions
from .select import budget_search
from .stage_cache import stage
from .verify import verify

log = logging.getLogger(__name__)


def scan_stage(a: PruneArgs, scan_dir: Path) -> None:
    run_scan(a.load.model_copy(update={"model_path": a.model}), a.data,
             a.scan.model_copy(update={"layers_to_skip": a.layers_to_skip[0], "output_dir": str(scan_dir)}))


def eval_stage(a: PruneArgs, texts: list[str], model: str, out: Path) -> None:
    m, tok = a.load.load(model)
    p = perplexity(m, tok, texts, WindowSettings(a.data.max_length, a.data.max_length), progress=True,
                   logits_bytes=a.choice.logits_bytes)
    PerplexityRecord(**p.__dict__).save(out)


def tasks_stage(a: PruneArgs, model: str, removed: list[int], out: Path) -> None:
    """lm-eval --tasks on ``model`` (without the ``removed`` layers, cut in memory, when given)."""
    m, tok = a.load.load(model)
    with removed_layers(m, removed):
        run_tasks(m, tok, a.bench).save(out)


def eval_cut_stage(a: PruneArgs, texts: list[str], plan_path: Path, out: Path) -> None:
    """Perplexity of the plain cut, computed in memory from the source (equal to its checkpoint's)."""
    m, tok = a.load.load(a.model)
    with removed_layers(m, lineage(plan_path, a.model).removed):
        p = perplexity(m, tok, texts, WindowSettings(a.data.max_length, a.data.max_length), progress=True,
                   logits_bytes=a.choice.logits_bytes)
    PerplexityRecord(**p.__dict__).save(out)


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
    BudgetRecord(**asdict(b), passes=score.passes).save(out)


def sizes_to_cut(a: PruneArgs, work: Path, scan: ScanFile, scan_json: Path,
                 scan_fp: str) -> tuple[list[int], BudgetRecord | None]:
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
                           **fingerprints(a).select}, [bjson], budget_stage, a, scan_json, bjson)
    budget = BudgetRecord.load(bjson)
    if budget.n == 0:
        raise UserError(f"--max_ppl_ratio {a.max_ppl_ratio}: removing even one layer gives {budget.curve[0].ratio:.3f}x "
                        "the dense perplexity; raise the budget")
    log.info("budget %.2fx: %d of %d layers can go (calibration perplexity %.3fx dense)", a.max_ppl_ratio,
             budget.n, L, budget.curve[budget.n - 1].ratio)
    return [budget.n], budget


def materialize_stage(a: PruneArgs, plan_path: Path, model_dir: Path) -> None:
    texts, cal = a.data.calibration() if a.repair != "none" else ([], {})
    fit = FitOptions(method=a.repair, batch_size=a.data.batch_size, max_length=a.data.max_length, skip_unfoldable=True)
    materialize(str(plan_path), str(model_dir), trust_remote_code=a.load.trust_remote_code, repair=fit,
                repair_texts=texts, repair_calibration=cal, load=a.load)


def verify_stage(a: PruneArgs, plan_path: Path, model_dir: Path, report: Path) -> None:
    rep = verify(str(model_dir), str(plan_path), load=a.load)
    write_text(report, rep.render() + "\n")
    if not rep.ok:
        raise UserError(f"verification of {model_dir} failed; see {report}")


HEAL_TEXTS = 10_000


def texts_inputs(fps: Fingerprints, texts: list[str]) -> dict:
    """An evaluation stage's inputs: the eval fingerprint and the texts it scores."""
    return {**fps.eval, "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest()}


def heal_texts(a: PruneArgs) -> tuple[list[str], list[str]]:
    """Healing's training texts (up to HEAL_TEXTS: healing wants far more text than the calibration) and, with
    --heal_dataset, the held-out texts that pick its best step: the last --eval_size texts read, never trained on
    (empty without --heal_dataset: the calibration corpus's held-out split picks, ``pick_texts``)."""
    if not a.heal_dataset:
        return a.data.texts(size=HEAL_TEXTS), []
    corpus, split = a.heal_source
    texts = a.data.texts(split, HEAL_TEXTS + a.eval_size, dataset=corpus)
    if len(texts) <= a.eval_size:
        raise UserError(f"--heal_dataset {a.heal_dataset} (split {a.heal_dataset_subset!r}) has {len(texts)} texts, "
                        f"and healing holds out --eval_size {a.eval_size} of them to pick its best step: give a "
                        "larger corpus or a smaller --eval_size")
    return texts[:-a.eval_size], texts[-a.eval_size:]


def pick_texts(a: PruneArgs, eval_texts: list[str], fps: Fingerprints, held: list[str]) -> tuple[list[str], dict]:
    """Held-out texts that pick healing's best step: ``held`` (those held out of --heal_dataset), or else the
    next --eval_size texts of the held-out split after the ones every perplexity is reported on, so the healed
    figure is measured on text that chose nothing."""
    more = held or a.data.texts(a.eval_subset, 2 * a.eval_size)[a.eval_size:]
    if not more:
        log.warning("the held-out split %s has no texts beyond the %d reported on: healing picks its best step on "
                    "those same texts, which flatters the healed figure; use a larger split", a.eval_subset, a.eval_size)
        more = eval_texts
    return more, texts_inputs(fps, more)


def heal_stage(a: PruneArgs, model_dir: Path, model_fp: str, train: list[str], eval_texts: list[str],
               hdir: Path) -> None:
    corpus, split = a.heal_source
    cfg = heal_config(a)
    work = Path(f"{hdir}.work")
    inputs = json.dumps({"model": model_fp, "heal": cfg.model_dump(), "corpus": [corpus, split]}, sort_keys=True)
    marker = work / "prune_inputs.json"
    if work.exists() and not (marker.exists() and marker.read_text() == inputs):
        shutil.rmtree(work)  # a run for another model or recipe: start over; the same one resumes
    work.mkdir(parents=True, exist_ok=True)
    write_text(marker, inputs)
    heal(str(model_dir), train, eval_texts, str(hdir), cfg, run=HealRun(resume=True), progress=True,
         data=f"{corpus} (split {split})", teacher_load=a.load)


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
        return PerplexityRecord.load(self.dir / name).perplexity


@dataclass
class Job:
    """What every variant of the job shares: the scan, the held-out texts and the dense model's figures on
    them, each stage's fingerprint."""

    scan: ScanFile
    scan_json: Path
    scan_fp: str
    fps: Fingerprints
    eval_texts: list[str]
    eval_in: dict  # the evaluation stages' inputs: fingerprint and texts
    src_ppl: float
    src_tasks: TasksRecord | None = None
    tasks_in: dict = field(default_factory=dict)
    heal_train: list[str] = field(default_factory=list)  # --heal: the texts healing trains on, read once
    pick_texts: list[str] = field(default_factory=list)  # --heal: the texts that pick the best step
    pick_in: dict = field(default_factory=dict)
    texts2: list[str] = field(default_factory=list)  # --eval_dataset: the second corpus
    eval2_in: dict = field(default_factory=dict)
    src_ppl2: float | None = None


def build_stages(a: PruneArgs, job: Job, v: Variant, fixed: list[int] | None) -> None:
    """plan -> materialize (+ bridge) -> verify -> held-out perplexity of the checkpoint and the plain cut."""
    fps, work = job.fps, v.work
    v.plan_fp = stage(work, f"plan-{v.tag}", {"scan": job.scan_fp, "n": v.n, "removed": fixed, **fps.select},
                      [v.plan], plan_stage, a, job.scan_json, v.n, v.plan, fixed)
    v.mat_fp = stage(work, f"materialize-{v.tag}", {"plan": v.plan_fp, **fps.materialize},
                     [v.model / "config.json"], materialize_stage, a, v.plan, v.model)
    stage(work, f"verify-{v.tag}", {"model": v.mat_fp}, [v.dir / "verify.txt"], verify_stage, a, v.plan, v.model,
          v.dir / "verify.txt")
    stage(work, f"eval-{v.tag}", {**job.eval_in, "model": v.mat_fp}, [v.dir / "pruned_eval.json"], eval_stage, a,
          job.eval_texts, str(v.model), v.dir / "pruned_eval.json")
    if a.repair != "none":
        stage(work, f"eval-cut-{v.tag}", {**job.eval_in, "plan": v.plan_fp}, [v.dir / "cut_eval.json"], eval_cut_stage,
              a, job.eval_texts, v.plan, v.dir / "cut_eval.json")


def second_corpus_stages(a: PruneArgs, job: Job, v: Variant) -> dict[str, float]:
    """--eval_dataset: the plain cut's and the checkpoint's perplexity on the second corpus."""
    if not job.texts2:
        return {}
    if a.repair != "none":
        stage(v.work, f"eval2-cut-{v.tag}", {**job.eval2_in, "plan": v.plan_fp}, [v.dir / "cut_eval2.json"],
              eval_cut_stage, a, job.texts2, v.plan, v.dir / "cut_eval2.json")
    stage(v.work, f"eval2-{v.tag}", {**job.eval2_in, "model": v.mat_fp}, [v.dir / "pruned_eval2.json"], eval_stage, a,
          job.texts2, str(v.model), v.dir / "pruned_eval2.json")
    pr2 = v.read("pruned_eval2.json")
    if a.repair == "none":
        return {"source": job.src_ppl2, "cut": pr2}
    return {"source": job.src_ppl2, "cut": v.read("cut_eval2.json"), "repaired": pr2}


def heal_stages(a: PruneArgs, job: Job, v: Variant, shift: dict[str, float]) -> tuple[float | None, HealLedger | None]:
    """Heal the checkpoint, its best step picked on held-out texts of its own; (its perplexity on the texts
    every row uses, the healing ledger). The second corpus's healed figure goes into ``shift``."""
    if not a.heal:
        return None, None
    key = {"model": v.mat_fp, "heal": job.fps.heal}
    stage(v.work, f"heal-{v.tag}", {**job.pick_in, **job.fps.heal, "model": v.mat_fp}, [v.healed / HEAL_FILE],
          heal_stage, a, v.model, v.mat_fp, job.heal_train, job.pick_texts, v.healed)
    stage(v.work, f"eval-healed-{v.tag}", {**job.eval_in, **key}, [v.dir / "healed_eval.json"], eval_stage, a,
          job.eval_texts, str(v.healed), v.dir / "healed_eval.json")
    if job.texts2:
        stage(v.work, f"eval2-healed-{v.tag}", {**job.eval2_in, **key}, [v.dir / "healed_eval2.json"], eval_stage,
              a, job.texts2, str(v.healed), v.dir / "healed_eval2.json")
        shift["healed"] = v.read("healed_eval2.json")
    return v.read("healed_eval.json"), HealRecord.load(v.healed / HEAL_FILE).ledger


def task_stages(a: PruneArgs, job: Job, v: Variant, removed: list[int]) -> dict[str, TasksRecord]:
    """lm-eval on each form of the model: the plain cut (in memory from the source, scored once per set of
    removed layers and shared by every method that removes them), the repaired checkpoint, healed."""
    if not a.bench.tasks:
        return {}
    layers = format_inclusive(removed)  # e.g. "12-19" or "3,7,9-11"
    cut_out = v.work / "cut_tasks" / f"tasks_cut_{layers}.json"
    stage(v.work, f"tasks-cut-{layers}", {**job.tasks_in, "model": job.fps.eval["model"], "removed": removed},
          [cut_out], tasks_stage, a, a.model, removed, cut_out)
    write_text(v.dir / "tasks_cut.json", cut_out.read_text())
    tasks = {"cut": TasksRecord.load(cut_out)}
    forms = [("repaired", str(v.model), {"model": v.mat_fp})] if a.repair != "none" else []
    if a.heal:
        forms.append(("healed", str(v.healed), {"model": v.mat_fp, "heal": job.fps.heal}))
    for form, path, key in forms:
        out = v.dir / f"tasks_{form}.json"
        stage(v.work, f"tasks-{form}-{v.tag}", {**job.tasks_in, **key}, [out], tasks_stage, a, path, [], out)
        tasks[form] = TasksRecord.load(out)
    return tasks


def method_args(a: PruneArgs, job: Job, name: str) -> tuple[PruneArgs, Job]:
    """The job's arguments and shared state for one method: its own repair (None: the job's --repair)."""
    repair = None if name == OURS else get_method(name).repair
    if repair is None or repair == a.repair:
        return a, job
    am = a.model_copy(update={"fix": a.fix.model_copy(update={"repair": repair})})
    return am, replace(job, fps=fingerprints(am))


def variant_stages(a: PruneArgs, job: Job, n: int, name: str, fixed: list[int] | None) -> Row:
    """One pruned model (ours, or a method under the same protocol): build, second corpus, heal,
    benchmarks; its eval.json and card; its row of the report."""
    a, job = method_args(a, job, name)
    v = Variant(n, name, Path(a.work_dir))
    build_stages(a, job, v, fixed)
    ranges = kept_ranges_of(read_plan(v.plan))
    shift = second_corpus_stages(a, job, v)
    healed, ledger = heal_stages(a, job, v, shift)
    removed = job.scan.removed(ranges)
    pr = PerplexityRecord.load(v.dir / "pruned_eval.json")
    cut = PerplexityRecord.load(v.dir / "cut_eval.json") if a.repair != "none" else pr
    row = Row(n=n, name=name, repair=a.repair, removed=removed, ranges=ranges, source=job.src_ppl, cut=cut.perplexity,
              repaired=pr.perplexity if a.repair != "none" else None, healed=healed, ledger=ledger,
              tokens=pr.tokens_scored or 0, tasks=task_stages(a, job, v, removed), shift=shift, dir=v.tag)
    ev = eval_file(a, job, row, cut, pr)
    write_records(v.model, ev, v.plan, job.scan)
    if healed:
        write_records(v.healed, ev.model_copy(update={"checkpoint": "healed"}), v.plan, job.scan)
    return row


def eval_file(a: PruneArgs, job: Job, row: Row, cut: PerplexityRecord, pr: PerplexityRecord) -> EvalFile:
    """A checkpoint's eval.json: the dense model, the plain cut, the repaired and healed forms, each with its
    perplexity and lm-eval scores (retained %, retained above chance)."""
    repaired = a.repair != "none"
    second = SecondCorpus(dataset=HeldOut(name=a.eval_dataset, split=a.eval_dataset_subset, texts=len(job.texts2)),
                          perplexity=row.shift) if row.shift else None
    ev = EvalFile(dataset=HeldOut(name=a.data.dataset, split=a.eval_subset, texts=a.eval_size),
                  checkpoint="repaired" if repaired else "cut", heal=row.ledger, second_corpus=second)
    ev.models["source"] = ModelEval(perplexity=job.src_ppl, lm_eval=job.src_tasks if row.tasks else None)
    ev.models["cut"] = ModelEval.model_validate(cut.model_dump())
    if repaired:
        ev.models["repaired"] = ModelEval.model_validate({**pr.model_dump(), "repair": a.repair})
    if row.healed:
        ev.models["healed"] = ModelEval(perplexity=row.healed)
    for form, rec in row.tasks.items():
        ev.models[form].lm_eval = rec
        ev.models[form].retained = retained(job.src_tasks, rec)
        ev.models[form].above_chance = above_chance(job.src_tasks, rec)
    return ev


def write_records(checkpoint: Path, ev: EvalFile, plan_path: Path, scan: ScanFile) -> None:
    """A checkpoint's eval.json and its model card (README.md), which reads it."""
    ev.save(checkpoint / EVAL_FILE)
    write_card(checkpoint, plan_path, scan)


def prune(a: PruneArgs) -> Path:
    """The whole job in ``--work_dir``, one run at a time there (a second is refused, naming the first)."""
    with output_lock(a.work_dir):
        return run_prune(a)


def run_prune(a: PruneArgs) -> Path:
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tm = task_manager(a.bench) if a.bench.tasks else None  # task names checked before any stage runs
    job = dense_stages(a, work)
    if tm is not None:
        job.tasks_in = {**job.fps.tasks, "include": folder_fingerprint(a.bench.include_path)}
        src_tasks = work / "source_tasks.json"
        stage(work, "tasks-source", {**job.tasks_in, "model": job.fps.eval["model"]}, [src_tasks], tasks_stage, a,
              a.model, [], src_tasks)
        job.src_tasks = TasksRecord.load(src_tasks)
    sizes, budget = sizes_to_cut(a, work, job.scan, job.scan_json, job.scan_fp)
    rows = []
    for n in sizes:
        ours = variant_stages(a, job, n, OURS, budget.curve[n - 1].removed if budget else None)
        rows.append(ours)
        for b in a.baselines:
            layers = get_method(b).removes(job.scan, n)
            if layers == ours.removed and method_args(a, job, b)[0].repair == a.repair:
                log.info("baseline %s for n = %d removes %s, the same layers as our choice, with the same repair", b, n,
                         format_layers(layers))
                rows.append(replace(ours, name=b, same_as=OURS))
                continue
            rows.append(variant_stages(a, job, n, b, layers))
    write_report(work, a, rows, job.scan, budget, job.src_tasks)
    return work / "report.md"


def dense_stages(a: PruneArgs, work: Path) -> Job:
    """The scan and the dense model's held-out perplexity (on the second corpus too); the texts healing
    trains on and picks its step on, each read once."""
    fps = fingerprints(a)
    d = a.data
    eval_texts = d.texts(a.eval_subset, a.eval_size)
    eval_in = texts_inputs(fps, eval_texts)
    train, picks = [], ([], {})
    if a.heal:
        train, held = heal_texts(a)  # a bad --heal_dataset stops the job here
        picks = pick_texts(a, eval_texts, fps, held)
    scan_json = work / "scan" / "block_distances.json"
    scan_fp = stage(work, "scan", fps.scan, [scan_json], scan_stage, a, work / "scan")
    src_eval = work / "source_eval.json"
    stage(work, "eval-source", eval_in, [src_eval], eval_stage, a, eval_texts, a.model, src_eval)
    job = Job(scanfile.load(scan_json), scan_json, scan_fp, fps, eval_texts, eval_in,
              PerplexityRecord.load(src_eval).perplexity)
    job.heal_train, (job.pick_texts, job.pick_in) = train, picks
    if a.eval_dataset:
        job.texts2 = d.texts(a.eval_dataset_subset, a.eval_size, dataset=a.eval_dataset)
        job.eval2_in = texts_inputs(fps, job.texts2)
        src2 = work / "source_eval2.json"
        stage(work, "eval2-source", job.eval2_in, [src2], eval_stage, a, job.texts2, a.model, src2)
        job.src_ppl2 = PerplexityRecord.load(src2).perplexity
    return job
