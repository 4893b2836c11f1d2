"""The scan's option groups (model loading, calibration data, the scan), each declared once as a
pydantic model; compute_block_similarity's CLI and `prune` are derived from them (see flags.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from .data import (
    BUILTIN_DATASET,
    DOCS_DATASET,
    READMES_DATASET,
    load_calibration,
    load_texts,
)
from .flags import one_of
from .metrics import DEFAULT_METRIC, METRICS
from .model import load_model, parse_max_memory, placement

GRAM_BYTES = 64 * 2**20  # float64 working set of one Gram chunk (--gram_bytes)
TOKENS_PER_TEXT = 128  # all-token metrics: evenly spaced non-pad positions per text (0: every token)


PLACEMENT = ("device_map", "max_memory", "offload_folder")  # of ModelOptions: where a model runs, not what it computes


class ModelOptions(BaseModel):
    """Model loading"""

    model_path: str | None = Field(None, description="Hub id or local folder; default: the embedded "
                                                      "SmolLM2-135M-Instruct")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    device: str = Field("auto", description="auto, cpu or cuda")
    device_map: str | None = Field(None, description="e.g. 'auto': spread a model too big for one device over the "
                                   "GPUs, the CPU and disk (accelerate)")
    max_memory: str | None = Field(None, description="with --device_map: the most each device may hold, e.g. "
                                   "'0=70GiB,1=70GiB,cpu=200GiB' (the rest goes to --offload_folder)")
    offload_folder: str | None = Field(None, description="with --device_map: the folder for weights offloaded to disk")
    gguf_file: str | None = Field(None, description="GGUF file name inside --model_path")
    load_in_4bit: bool = Field(False, description="score a 4-bit NF4 model (needs CUDA and bitsandbytes)")
    trust_remote_code: bool = Field(False, description="allow model code from the Hub")

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, v: str | None) -> str | None:
        parse_max_memory(v)
        return v

    @model_validator(mode="after")
    def _placement(self) -> "ModelOptions":
        for flag in ("max_memory", "offload_folder"):
            if getattr(self, flag) and not self.device_map:
                raise ValueError(f"--{flag} places a sharded model: give --device_map auto with it")
        return self

    def load(self, model_path: str | None = None, **override: Any) -> tuple[Any, Any]:
        """(model, tokenizer) as these options say; ``override`` replaces fields for this load."""
        o = self.model_copy(update=override)
        return load_model(model_path or o.model_path, dtype=o.dtype, device=o.device,
                          place=placement(o.device_map, o.max_memory, o.offload_folder), gguf_file=o.gguf_file,
                          load_in_4bit=o.load_in_4bit, trust_remote_code=o.trust_remote_code)


class DataOptions(BaseModel):
    """Calibration data"""

    dataset: str = Field(BUILTIN_DATASET, description="Hub dataset id, a local jsonl/json/csv/parquet/txt file or "
                         f"folder, '{BUILTIN_DATASET}' (embedded docstrings of the Python standard library), "
                         f"'{READMES_DATASET}' (the installed packages' README prose) or '{DOCS_DATASET}' (the "
                         "docstrings and the pydoc reference's prose, sampled across all of it)")
    dataset_column: str = Field("text", description="column holding the text")
    dataset_subset: str = Field("train", description="dataset split")
    dataset_size: int | None = Field(None, ge=1, description="use the first N texts (default: all)")
    dataset_config: str | None = Field(None, description="dataset configuration name (Hub datasets)")
    streaming: bool = Field(False, description="stream the dataset instead of downloading it whole")
    batch_size: int = Field(8, ge=1, description="texts per forward pass")
    max_length: int = Field(1024, ge=1, description="truncate each text to this many tokens")

    def texts(self, split: str | None = None, size: int | None = None, dataset: str | None = None) -> list[str]:
        """The first ``size`` (default --dataset_size) texts of ``split`` (default --dataset_subset) of
        ``dataset`` (default --dataset)."""
        return load_texts(dataset or self.dataset, self.dataset_column, split or self.dataset_subset,
                          size or self.dataset_size, self.dataset_config, self.streaming)

    def calibration(self) -> tuple[list[str], dict]:
        """The calibration texts and the facts a repair records about them (``load_calibration``)."""
        return load_calibration(self.dataset, self.dataset_column, self.dataset_subset, self.dataset_size,
                                self.dataset_config)


class ScanOptions(BaseModel):
    """The scan"""

    layers_to_skip: int = Field(8, ge=1, description="block size n: how many consecutive layers to remove")
    output_dir: str = Field(".", description="where layer_distances.csv, block_distances.json and the heatmap go",
                            json_schema_extra={"aliases": ["--output"]})
    metric: str = Field(DEFAULT_METRIC, description=f"the metric that picks the block; one of: {', '.join(METRICS)}")
    metrics: str = Field("all", description="metrics computed in the same pass: 'all', 'last_token' (only those "
                         "that need just the last token: least memory on big models), or a comma list")
    padding_side: Literal["left", "right"] | None = Field(
        None, description="default: the tokenizer's; scores do not depend on it")
    no_progress: bool = Field(False, description="hide the progress bar")
    checkpoint_every: int = Field(50, ge=0, description="save running sums every N batches to "
                                  "OUTPUT_DIR/scan_state.pt (0: never)")
    resume: bool = Field(False, description="continue from OUTPUT_DIR/scan_state.pt after a crash or preemption")
    tokens_per_text: int = Field(TOKENS_PER_TEXT, ge=0, description="all-token metrics use this many evenly spaced non-pad "
                                 "positions of each text (0: every token); bounds the scan's memory whatever "
                                 "--max_length is")
    gram_bytes: int = Field(GRAM_BYTES, ge=1, description="float64 working set of the Gram computation, in bytes")

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        return one_of("--metric", METRICS, v)

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: str) -> str:
        metric_names(v)
        return v


def metric_names(spec: str) -> list[str]:
    if spec == "all":
        return list(METRICS)
    if spec == "last_token":
        return [m.name for m in METRICS.values() if m.reduce == "last_token"]
    names = [x.strip() for x in spec.split(",") if x.strip()]
    bad = [x for x in names if x not in METRICS]
    if bad or not names:
        raise ValueError(f"--metrics {spec!r}: unknown {bad}; use 'all', 'last_token' or names from: {', '.join(METRICS)}")
    return names
