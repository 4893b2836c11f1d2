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
from typing import Any, Literal

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
    lm_eval: dict[str, Any] | None = Field(None, description="benchmarks.record(): lm-eval scores, per document")
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


class EvalFile(BaseModel):
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

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        write_text(path, self.model_dump_json(indent=1, exclude_none=True) + "\n")
        return path


def load_eval(path: str | os.PathLike, *, missing_ok: bool = True) -> EvalFile:
    """An eval.json, validated; an empty one when absent (``missing_ok``). A file of another shape is one
    line naming it; one from before this format (no ``version``) is read as empty, with a warning."""
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return EvalFile()
        raise UserError(f"{path} does not exist; run `evaluate --into` or `prune` to write it")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not JSON ({e}); delete it and rerun the evaluation") from None
    if isinstance(raw, dict) and "version" not in raw:
        log.warning("%s is of an older format; it is not read (rerun the evaluation to rewrite it)", path)
        return EvalFile()
    try:
        return EvalFile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise UserError(f"{path}: {where}: {err['msg']}; delete it and rerun the evaluation") from None
