"""One import direction: the import graph of both packages (read with ast, imports inside functions
included) runs only downwards through the layers the README's layout names, has no cycle, and keeps
intra-project imports at the top of each file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = ("compute_block_similarity", "slice_with_mergekit")

# Bottom to top, as in the README's "Layout". A module imports only modules of lower layers.
LAYERS: list[tuple[str, list[str]]] = [
    ("base: one-line errors", ["compute_block_similarity.errors"]),
    ("base: leaves", ["compute_block_similarity." + m for m in ("atomic", "ranges", "metrics", "batching")]),
    ("base: flags, data, model, scan file", ["compute_block_similarity." + m for m in ("flags", "data", "model", "scanfile")]),
    ("base: option groups, scan outputs", ["compute_block_similarity.options", "compute_block_similarity.report"]),
    ("scanner: the float64 sums", ["compute_block_similarity.sums"]),
    ("scanner", ["compute_block_similarity.scan"]),
    ("scanner: the job", ["compute_block_similarity.job", "compute_block_similarity.__init__"]),
    ("scanner: CLI", ["compute_block_similarity.cli"]),
    ("scanner: entry points", ["compute_block_similarity.__main__", "compute_block_similarity.layer_similarity"]),
    ("checkpoint", ["slice_with_mergekit." + m for m in ("__init__", "checkpoint", "surgery")]),
    ("the standard suite's task files, the records (eval.json, heal.json, the selection, ...)", ["slice_with_mergekit.suite", "slice_with_mergekit.records"]),
    ("model in memory, repair record", ["slice_with_mergekit." + m for m in ("inmemory", "evaluate", "benchmarks", "repair_record")]),
    ("where a bridge folds", ["slice_with_mergekit.repair_writers"]),
    ("the repair fit's statistics", ["slice_with_mergekit.repair_stats"]),
    ("repair fit, healing's trainer", ["slice_with_mergekit.repair_fit", "slice_with_mergekit.heal_trainer"]),
    ("scoring a cut by real loss", ["slice_with_mergekit.scoring"]),
    ("the race", ["slice_with_mergekit.race"]),
    ("stages: choice, fold, checks, healing, card",
     ["slice_with_mergekit." + m for m in ("select", "repair", "verify", "heal", "card")]),
    ("stages: plan, materialize, push", ["slice_with_mergekit." + m for m in ("plan", "materialize", "push", "methods")]),
    ("the job: arguments and fingerprints, the stage cache", ["slice_with_mergekit.prune_args", "slice_with_mergekit.stage_cache"]),
    ("the job: the report", ["slice_with_mergekit.prune_report"]),
    ("the job: prune", ["slice_with_mergekit.pipeline"]),
    ("CLI", ["slice_with_mergekit.cli"]),
    ("entry point", ["slice_with_mergekit.__main__"]),
]
LAYER_OF = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}


def modules() -> dict[str, Path]:
    return {f"{pk}.{p.stem}": p for pk in PACKAGES for p in sorted((ROOT / pk).glob("*.py"))}


def project_imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported project module, whether the import sits inside a function) for every import."""
    pkg = name.split(".")[0]
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    known = modules()
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            base = (f"{pkg}.{n.module}" if n.module else pkg) if n.level else (n.module or "")
            if base.split(".")[0] not in PACKAGES:
                continue
            targets = [f"{base}.{a.name}" for a in n.names] if base in PACKAGES else [base]
            targets = [t if t in known else f"{t.split('.')[0]}.__init__" if t in PACKAGES else t for t in targets]
            out += [(t if t in known else f"{base}.__init__", id(n) in inner) for t in targets]
        elif isinstance(n, ast.Import):
            out += [(a.name if a.name in known else f"{a.name}.__init__", id(n) in inner)
                    for a in n.names if a.name.split(".")[0] in PACKAGES]
    return out


def test_every_module_has_a_layer():
    assert set(modules()) == set(LAYER_OF), set(modules()) ^ set(LAYER_OF)


@pytest.mark.parametrize("name", sorted(LAYER_OF))
def test_imports_run_only_downwards(name):
    path = modules()[name]
    for target, _ in project_imports(name, path):
        if target == name:
            continue
        assert LAYER_OF[target] < LAYER_OF[name], (
            f"{name} ({LAYERS[LAYER_OF[name]][0]}) imports {target} ({LAYERS[LAYER_OF[target]][0]}), "
            "which is not below it")


@pytest.mark.parametrize("name", sorted(LAYER_OF))
def test_project_imports_are_at_the_top(name):
    inner = [t for t, deferred in project_imports(name, modules()[name]) if deferred]
    assert not inner, f"{name} imports {inner} inside a function; move them to the top of the file"


def test_the_slicer_never_imports_the_scanners_cli_and_production_code_never_mocks():
    for name, path in modules().items():
        text = path.read_text()
        assert "unittest" not in text and "mock" not in text.replace("mock_", ""), name
        if name.startswith("slice_with_mergekit"):
            assert all(not t.startswith("compute_block_similarity.cli") for t, _ in project_imports(name, path)), name


def test_the_layer_check_can_fail(tmp_path):
    """A deliberate upward import is caught."""
    bad = tmp_path / "checkpoint.py"
    bad.write_text("from .pipeline import prune\n\ndef f():\n    from .plan import plan\n")
    found = project_imports("slice_with_mergekit.checkpoint", bad)
    assert ("slice_with_mergekit.pipeline", False) in found and ("slice_with_mergekit.plan", True) in found
    assert all(LAYER_OF[t] > LAYER_OF["slice_with_mergekit.checkpoint"] for t, _ in found)
