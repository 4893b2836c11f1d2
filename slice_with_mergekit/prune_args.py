"""`prune`'s arguments: `PruneArgs`, made of the option groups (the CLI is derived from it), and the
fingerprint of each stage's inputs, taken from the groups that feed it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compute_block_similarity.flags import one_of
from compute_block_similarity.options import (
    PLACEMENT,
    DataOptions,
    ModelOptions,
    ScanOptions,
)

from .benchmarks import TaskOptions
from .heal import HealConfig
from .methods import METHODS, methods_help
from .repair_fit import RepairOptions
from .select import SelectOptions

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
    heal_dataset: str | None = Field(None, description="heal on this corpus instead of the calibration text (a Hub id, "
                                     "a local file, or 'python-package-readmes'): broader text restores general "
                                     "ability where the calibration text is narrow; the last --eval_size texts read "
                                     "are held out of training to pick the best step")
    heal_dataset_subset: str = Field("train", description="split of --heal_dataset")
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
        if self.heal_dataset and not self.heal:
            raise ValueError(f"--heal_dataset {self.heal_dataset} is the healing text: add --heal, or drop it")
        if self.data.max_length < 2:
            raise ValueError(f"--max_length must be >= 2 to score anything, got {self.data.max_length}")
        return self

    @property
    def repair(self) -> str:
        return self.fix.repair

    @property
    def heal_source(self) -> tuple[str, str]:
        """(corpus, split) healing trains on: --heal_dataset, else the calibration text."""
        if self.heal_dataset:
            return self.heal_dataset, self.heal_dataset_subset
        return self.data.dataset, self.data.dataset_subset


@dataclass(frozen=True)
class Fingerprints:
    """Each stage's inputs (what the stage cache hashes), from the option groups that feed it."""

    scan: dict
    select: dict
    materialize: dict
    eval: dict
    heal: dict
    tasks: dict


def fingerprints(a: PruneArgs) -> Fingerprints:
    """Each stage's inputs, from the option groups that feed it (whole ``model_dump()``s, so nothing
    that changes a result can be left out); the stages add the fingerprints of what they read."""
    # placement (--device_map, --max_memory, --offload_folder) changes where the model runs, not what it computes
    model = {"model": a.model, "load": a.load.model_dump(exclude=set(PLACEMENT))}
    scan = a.scan.model_dump(exclude={"output_dir", "no_progress", "checkpoint_every", "resume", "layers_to_skip"})
    evaluation = {**model, "eval_subset": a.eval_subset, "eval_size": a.eval_size, "data": a.data.model_dump()}
    return Fingerprints(
        scan={**model, "data": a.data.model_dump(), "scan": scan, "n": a.layers_to_skip[0]},
        select={**model, "choice": a.choice.model_dump(), "fix": a.fix.model_dump()},
        materialize={"fix": a.fix.model_dump(), "data": a.data.model_dump(), "trust_remote_code": a.load.trust_remote_code},
        eval=evaluation,
        heal={"heal": heal_config(a).model_dump(), "data": a.data.model_dump(), "corpus": list(a.heal_source)},
        tasks={"bench": a.bench.model_dump(), "load": model["load"]},
    )


def folder_fingerprint(folder: str | None) -> list:
    """(path, size, mtime) of every file under --include_path: an edited task YAML or data file reruns the tasks."""
    if not folder:
        return []
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in Path(folder).rglob("*") if p.is_file())


def heal_config(a: PruneArgs) -> HealConfig:
    return a.heal_cfg.model_copy(update={"max_length": a.data.max_length})
