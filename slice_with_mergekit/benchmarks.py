"""The field's benchmarks through lm-evaluation-harness (the optional extra ``depth-prune[eval]``).

lm-eval is the engine: its tasks (``--tasks``, the Hub suite or a folder of task YAMLs given by
``--include_path``, so local data works offline), its few-shot and limit handling, its metrics. What
is ours: running it on a model already loaded (a checkpoint, or a cut made in memory), a pinned
record of what ran (``record``: lm-eval version, task versions, few-shot, limit, samples), one
headline metric per task, and the share of the dense model's score a pruned model keeps.

Retained % of a task is ``100 * pruned / dense`` for a higher-is-better metric (accuracy) and
``100 * dense / pruned`` for a lower-is-better one (perplexity), so 100 % is "as good as dense" for
both; the average is the mean over tasks.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compute_block_similarity.errors import UserError, first_line
from compute_block_similarity.model import input_device

log = logging.getLogger(__name__)

INSTALL = "pip install 'depth-prune[eval]' (or: pip install lm-eval)"
# the headline metric of a task: the first of these it reports, else its first metric
HEADLINE = ("acc", "acc_norm", "exact_match", "f1", "mcc", "word_perplexity", "byte_perplexity", "bits_per_byte")


class TaskOptions(BaseModel):
    """Benchmarks (lm-evaluation-harness)"""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] | None = Field(None, description="lm-eval tasks or groups, e.g. 'arc_easy,hellaswag,piqa' "
                                    "(needs lm-eval); with --include_path also your own task YAMLs")
    include_path: str | None = Field(None, description="folder of lm-eval task YAMLs (local data works offline)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per task (default: each task's own)")
    limit: float | None = Field(None, gt=0, description="score only the first N documents of each task (a number "
                                "below 1 is a fraction); for quick checks, not for reported figures")
    task_batch_size: int = Field(8, ge=1, description="lm-eval batch size")

    @field_validator("include_path")
    @classmethod
    def _folder(cls, v: str | None) -> str | None:
        if v is not None and not os.path.isdir(v):
            raise ValueError(f"--include_path {v}: no such folder; give a folder of lm-eval task YAMLs")
        return v


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise UserError(f"--tasks needs lm-evaluation-harness: {INSTALL}") from None
    return lm_eval


@functools.lru_cache(maxsize=4)
def _manager(include_path: str | None) -> Any:
    """Indexing lm-eval's task YAMLs takes seconds: once per folder and process."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()


def task_manager(opts: TaskOptions) -> Any:
    """lm-eval's TaskManager with ``--include_path``; every ``--tasks`` name checked before a model loads."""
    tm = _manager(opts.include_path)
    known = set(tm.all_tasks)
    bad = [t for t in opts.tasks or [] if t not in known]
    if bad:
        where = f" or in --include_path {opts.include_path}" if opts.include_path else \
            "; pass --include_path DIR for your own task YAMLs"
        raise UserError(f"--tasks: {', '.join(bad)} not among lm-eval's tasks{where} (list them: lm-eval ls tasks)")
    return tm


def _number(v: Any) -> float | None:
    """A finite float, else None (lm-eval writes 'N/A' for a stderr it cannot compute)."""
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def record(res: dict, opts: TaskOptions) -> dict:
    """What ran and what it scored, from ``lm_eval.simple_evaluate``'s result. A group's subtasks (MMLU's
    57) are kept with ``subtask_of`` set; tables and retained % show the group's aggregate only."""
    parent = {sub: g for g, subs in (res.get("group_subtasks") or {}).items() for sub in subs if sub != g}
    tasks = {}
    for name, r in res["results"].items():
        hib = res.get("higher_is_better", {}).get(name, {})
        metrics, stderr = {}, {}
        for key, v in r.items():
            if "," not in key:
                continue
            metric, _filter = key.split(",", 1)
            if metric.endswith("_stderr"):
                stderr[metric.removesuffix("_stderr")] = _number(v)
            elif _number(v) is not None:
                metrics[metric] = _number(v)
            else:
                log.warning("lm-eval task %s: metric %s is %r, left out", name, metric, v)
        if not metrics:
            continue
        head = next((m for m in HEADLINE if m in metrics), next(iter(metrics)))
        tasks[name] = {"version": res.get("versions", {}).get(name), "num_fewshot": res.get("n-shot", {}).get(name),
                       "samples": res.get("n-samples", {}).get(name, {}).get("effective"),
                       "metrics": metrics, "stderr": {m: stderr.get(m) for m in metrics},
                       "higher_is_better": {m: bool(hib.get(m, True)) for m in metrics}, "headline": head,
                       "subtask_of": parent.get(name)}
    return {"lm_eval_version": res.get("lm_eval_version"), "tasks": tasks, "requested": list(opts.tasks or []),
            "include_path": opts.include_path, "num_fewshot": opts.num_fewshot, "limit": opts.limit}


def run_tasks(model: Any, tok: Any, opts: TaskOptions, tm: Any = None) -> dict:
    """Run ``--tasks`` on a loaded model (its own device and dtype); returns ``record``'s dict."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    tm = tm or task_manager(opts)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=opts.task_batch_size)
    # lm-eval takes a loaded model's device from model.device, "meta" when accelerate offloads its first
    # weights (--device_map with --max_memory): inputs go where the embedding runs instead
    lm._device = input_device(model)
    limit = int(opts.limit) if opts.limit is not None and opts.limit >= 1 else opts.limit
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(opts.tasks or []), task_manager=tm,
                                      num_fewshot=opts.num_fewshot, limit=limit, log_samples=False)
    except (OSError, ConnectionError) as e:  # a Hub task's data unreachable (offline)
        raise UserError(f"--tasks {','.join(opts.tasks or [])}: lm-eval could not load a task's data "
                        f"({first_line(e)}); offline, give local tasks with --include_path") from None
    rec = record(res, opts)
    for name, t in rec["tasks"].items():
        log.info("lm-eval %s: %s %.4f (%s-shot, %s documents)", name, t["headline"], t["metrics"][t["headline"]],
                 t["num_fewshot"], t["samples"])
    return rec


def headline(rec: dict, task: str) -> tuple[str, float, bool] | None:
    """(metric, value, higher is better) of a task in a record, None if it did not run."""
    t = rec.get("tasks", {}).get(task)
    if not t:
        return None
    m = t["headline"]
    return m, t["metrics"][m], t["higher_is_better"][m]


def retained(dense: dict, pruned: dict) -> dict[str, float]:
    """Retained % per top-level task (headline metric, 100 = dense) and ``"average"``; tasks either lacks
    left out."""
    out = {}
    for task in top_level(dense):
        d, p = headline(dense, task), headline(pruned, task)
        if not d or not p or d[0] != p[0]:
            continue
        num, den = (p[1], d[1]) if d[2] else (d[1], p[1])
        if den > 0:
            out[task] = 100.0 * num / den
    if out:
        out["average"] = sum(out.values()) / len(out)
    return out


def top_level(rec: dict) -> list[str]:
    """The tasks of a record that are not a group's subtasks."""
    return [t for t, r in rec.get("tasks", {}).items() if not r.get("subtask_of")]


def fmt(v: float) -> str:
    """A score for a table: 4 decimals for accuracies and small perplexities, 4 significant digits beyond."""
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"
