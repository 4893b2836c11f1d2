"""`eval.json`, typed: one shape, whoever writes it (`prune` for each checkpoint it builds, `evaluate
--into` for any model), validated once on load, read by the model card by attribute.

    {"version": 2, "checkpoint": "repaired",             # the entry that describes this checkpoint
     "dataset": {"name": ..., "split": ..., "texts": 64}, # the held-out text of every perplexity
     "models": {"source": {...}, "cut": {...}, "repaired": {...}, "healed": {...}},   # or evaluate's --name
     "second_corpus": {"dataset": {...}, "perplexity": {"source": ..., "cut": ...}},
     "heal": {...}}                                       # the healing ledger (heal.json's)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compute_block_similarity.atomic import write_text
from compute_block_similarity.errors import UserError

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
PROCESSED = ("healed", "repaired", "pruned", "cut")  # most processed first: the entry a checkpoint is, unless named
DENSE = ("source", "dense")


class HeldOut(BaseModel):
    """The held-out text a perplexity is measured on."""

    name: str | None = Field(None, description="dataset: a Hub id, a local file or a built-in corpus")
    split: str | None = Field(None, description="its split")
    texts: int | None = Field(None, description="how many texts")


class Record(BaseModel):
    """A JSON artifact: one writer (``save``, atomic) and one reader (``load``: validated; a missing file, one
    that is not JSON or one of another shape is one line naming the file, the field and the fix)."""

    FIX: ClassVar[str] = "delete it and rerun the stage that writes it"

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        write_text(path, self.model_dump_json(indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Self:
        return _validated(cls, Path(path), cls.FIX)


class TaskSplit(BaseModel):
    """Where an offline suite task's documents came from (`suite.split_of`)."""

    split: str = Field(description="the split scored, with its size")
    stock_split: str = Field(description="the split lm-eval's stock task scores")
    data: str = Field(description="the package and files")
    licence: str


class PerDoc(BaseModel):
    """A task's headline metric per document, in doc_id order: chance levels and paired standard errors."""

    values: list[float]
    choices: list[int] = Field(description="each document's number of choices")
    docs: str = Field(description="a hash of the documents: two records pair only when theirs agree")
    majority: float | None = Field(None, description="where every document offers the same answers (BoolQ's no / "
                                   "yes): the accuracy of always giving the most common correct one")


class TaskScore(BaseModel):
    """One lm-eval task's result (`benchmarks.record`)."""

    version: Any = Field(None, description="lm-eval's task version")
    num_fewshot: int | None = None
    samples: int | None = Field(None, description="documents scored")
    metrics: dict[str, float]
    stderr: dict[str, float | None] = Field(default_factory=dict)
    higher_is_better: dict[str, bool] = Field(default_factory=dict)
    headline: str = Field(description="the metric tables and retained % use")
    subtask_of: str | None = Field(None, description="the group this task is a subtask of (MMLU's subjects)")
    split: TaskSplit | None = None
    per_doc: PerDoc | None = None

    @property
    def score(self) -> float:
        return self.metrics[self.headline]

    @property
    def higher(self) -> bool:
        """Whether a higher headline is better."""
        return self.higher_is_better.get(self.headline, True)


class TasksRecord(Record):
    """What lm-eval ran and what it scored: versions, few-shot, limit, each task's scores."""

    lm_eval_version: str | None = None
    tasks: dict[str, TaskScore] = Field(default_factory=dict)
    requested: list[str] = Field(default_factory=list, description="--tasks as given")
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: float | None = None

    def top_level(self) -> list[str]:
        """The tasks that are not a group's subtasks."""
        return [t for t, r in self.tasks.items() if not r.subtask_of]



class ModelEval(BaseModel):
    """One model's figures: held-out perplexity, and what else was measured."""

    model_config = ConfigDict(extra="forbid")

    perplexity: float = Field(description="token-weighted perplexity on the held-out text")
    nll_sum: float | None = None
    tokens_scored: int | None = None
    num_texts: int | None = None
    max_length: int | None = Field(None, description="window, tokens")
    stride: int | None = None
    repair: str | None = Field(None, description="the repair folded into this model (`--repair`)")
    speed: dict[str, Any] | None = Field(None, description="evaluate --speed: prefill and decode throughput, memory")
    lm_eval: TasksRecord | None = Field(None, description="lm-eval's scores, per document")
    retained: dict[str, float] | None = Field(None, description="retained % of dense per task and 'average'")
    above_chance: dict[str, tuple[float, float | None]] | None = Field(
        None, description="retained above chance (%, paired SE) per task and 'average'")


class SecondCorpus(BaseModel):
    """Perplexity on a second held-out corpus of another kind (`prune --eval_dataset`)."""

    dataset: HeldOut
    perplexity: dict[str, float] = Field(description="per entry of `models`")


class HealStep(BaseModel):
    step: int
    perplexity: float = Field(description="held-out perplexity on the texts that pick the step")


class HealLedger(BaseModel):
    """What a healing run spent, as anyone comparing recovery methods asks first (heal.json's `ledger`)."""

    optimizer_steps: int
    training_tokens: int
    tokens_per_step: int
    wall_s: float
    resumed_from: str | None = Field(None, description="the checkpoint a --resume continued from")
    device: str
    world_size: int = Field(description="processes")
    precision: str
    method: str = Field(description="LoRA rank r, or full training of some layers")
    loss: str
    data: str = Field(description="the training text: source, split, texts, packed blocks")
    held_out_texts: int = Field(description="texts that pick the best step")
    history: list[HealStep]


HEAL_FILE = "heal.json"


class HealRecord(Record):
    """heal.json beside a healed model: the perplexity before and after, the step kept, the recipe, the ledger."""

    after_cut: float = Field(description="held-out perplexity before healing (on the texts that pick the step)")
    after_heal: float = Field(description="at the best step")
    best_step: int = Field(description="0: no step beat the start, the checkpoint is kept as it was")
    history: list[HealStep]
    teacher: str | None = Field(None, description="the dense model distilled from (--loss kd)")
    config: dict[str, Any] = Field(description="the HealConfig")
    tokens_per_step: int
    ledger: HealLedger


class HealStart(Record):
    """heal_start.json in a healing run's .work folder: what --resume continues, and must match."""

    FIX: ClassVar[str] = "delete the run's .work folder to heal from the start"

    after_cut: float = Field(description="held-out perplexity before the first step")
    config: dict[str, Any] = Field(description="the HealConfig the run was started with")


class EvalFile(Record):
    model_config = ConfigDict(extra="forbid")

    version: Literal[2] = 2
    checkpoint: str | None = Field(None, description="the entry of `models` that describes this checkpoint")
    dataset: HeldOut | None = None
    models: dict[str, ModelEval] = Field(default_factory=dict)
    second_corpus: SecondCorpus | None = None
    heal: HealLedger | None = Field(None, description="the healing ledger: steps, tokens, wall time, devices")

    def own(self) -> str | None:
        """The entry that describes this checkpoint: the one named, else the most processed, else the
        first that is not the dense model."""
        if self.checkpoint in self.models:
            return self.checkpoint
        named = [k for k in self.models if k not in DENSE]
        return next((k for k in PROCESSED if k in named), named[0] if named else None)

    def dense(self) -> ModelEval | None:
        return next((self.models[k] for k in DENSE if k in self.models), None)



def load_eval(path: str | os.PathLike, *, missing_ok: bool = True) -> EvalFile:
    """An eval.json, validated; an empty one when absent (``missing_ok``). A file of another shape is one
    line naming it; one from before this format (no ``version``) is read as empty, with a warning."""
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return EvalFile()
        raise UserError(f"{path} does not exist; run `evaluate --into` or `prune` to write it")
    raw = _read_json(path, "delete it and rerun the evaluation")
    if isinstance(raw, dict) and "version" not in raw:
        log.warning("%s is of an older format; it is not read (rerun the evaluation to rewrite it)", path)
        return EvalFile()
    return _checked(EvalFile, raw, path, "delete it and rerun the evaluation")


M = TypeVar("M", bound=BaseModel)


def _checked(cls: type[M], raw: Any, path: Path, fix: str) -> M:
    """``raw`` as ``cls``; a mismatch is one line naming the file, the field and the fix."""
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "top level"
        raise UserError(f"{path}: {where}: {err['msg']}; {fix}") from None


def _read_json(path: Path, fix: str) -> Any:
    """A JSON file's content; one that is not JSON is one line naming it and the fix."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not JSON ({e}); {fix}") from None


def _validated(cls: type[M], path: Path, fix: str) -> M:
    """A JSON file read as ``cls``: missing, not JSON or of another shape, one line."""
    if not path.exists():
        raise UserError(f"{path} does not exist; {fix}")
    return _checked(cls, _read_json(path, fix), path, fix)


class Candidate(BaseModel):
    """One block the selection scored: where it starts, its scan score, its calibration loss."""

    model_config = ConfigDict(extra="allow")

    start: int | None = Field(None, description="first removed layer (a contiguous block)")
    removed: str | int | None = Field(None, description="the removed layers; --select iterative: the layer of a step")
    perplexity: float | None = Field(None, description="calibration perplexity without the block")
    score: float | None = Field(None, description="the scan's score")
    windows: int | None = Field(None, description="--select race: calibration windows it was scored on")
    dropped_in_round: int | None = Field(None, description="--select race: the round it left (-1: set aside)")
    set_aside: bool = False
    nll_minus_chosen: float | None = Field(None, description="its loss minus the chosen cut's, nats/token")
    se: float | None = Field(None, description="the paired standard error of that gap")


class Confidence(BaseModel):
    """The runner-up: the rival the choice beats least clearly."""

    runner_up: int
    nll_gap: float
    se: float | None = None
    z: float | None = None


class BridgeCheck(BaseModel):
    """With a repair: the chosen cut plain and bridged on the race's first share of the windows."""

    plain_perplexity: float
    bridged_perplexity: float
    ratio: float
    dependent: bool = Field(description="plain / bridged above 2: the cut leans on its bridge")
    windows: int


SELECTION_SUFFIX = ".select.json"


class Selection(Record):
    """The selection's evidence beside its plan (sliced.yml -> sliced.select.json): what was chosen, at
    what cost, and every candidate scored."""

    version: Literal[1] = 1
    strategy: str
    removed: list[int]
    passes: float = Field(description="calibration passes spent")
    perplexity: float | None = None
    candidates: list[Candidate] = Field(default_factory=list)
    confidence: Confidence | None = None
    bridge: BridgeCheck | None = None

    FIX: ClassVar[str] = "plan again to rewrite it"

    @staticmethod
    def beside(plan_path: str | os.PathLike) -> Path:
        return Path(plan_path).with_suffix(SELECTION_SUFFIX)


class BudgetPoint(BaseModel):
    n: int
    removed: list[int]
    perplexity: float = Field(description="calibration perplexity without the layers")
    ratio: float = Field(description="x the dense model's")
    within: bool


class BudgetRecord(Record):
    """`prune --max_ppl_ratio`: the most layers that can go within the budget, and the curve that says so."""

    max_ratio: float
    dense: float = Field(description="the dense model's calibration perplexity")
    n: int = Field(description="layers that can go (0: not even one)")
    curve: list[BudgetPoint]
    passes: float = 0.0


    @property
    def removed(self) -> list[int]:
        return self.curve[self.n - 1].removed if self.n else []




class PerplexityRecord(Record, ModelEval):
    """A stage's held-out perplexity (`evaluate.Perplexity`'s fields), as its own file: a `ModelEval`."""


