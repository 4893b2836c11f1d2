"""Option groups declared once, as pydantic models, with the CLI flags derived from them.

Each field's default and ``description`` are the flag's default and help text (the parsers show
defaults with ArgumentDefaultsHelpFormatter), so a default is written in one place.
``add_flags(parser, Group)`` adds ``--field`` (or ``--{prefix}field``) for every field;
``from_args(Group, args)`` builds the validated group back from the parsed namespace.
A field's ``json_schema_extra`` may give ``"aliases"`` (other spellings of its flag) and ``"choices"``
(for a string validated against a registry).
Types map as: bool -> ``--flag`` (``--flag/--no-flag`` when it defaults to True); Literal -> choices;
``list[str]`` -> a comma list; ``X | None`` -> X with default None.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Iterable, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import UserError

G = TypeVar("G", bound=BaseModel)


def _comma_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _flag_type(annotation: Any) -> tuple[Any, dict]:
    """argparse ``type`` and extra kwargs for a field's annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0])
    if origin is Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), {"choices": choices}
    if origin is list:
        return _comma_list, {"metavar": "A,B,..."}
    return annotation, {}


def add_flags(parser: argparse.ArgumentParser | Any, group: type[BaseModel], prefix: str = "",
              skip: Iterable[str] = (), title: str | None = None) -> None:
    """Add one flag per field of ``group`` (named ``--{prefix}{field}``) to ``parser``."""
    skip = set(skip)
    target = parser.add_argument_group(title or (group.__doc__ or group.__name__).strip().splitlines()[0])
    for name, f in group.model_fields.items():
        if name in skip:
            continue
        more = f.json_schema_extra or {}
        flags = [f"--{prefix}{name}", *more.get("aliases", [])]
        help_ = (f.description or "").replace("%", "%%")
        if f.annotation is bool:
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            target.add_argument(*flags, dest=prefix + name, action=action, default=f.default, help=help_)
            continue
        typ, extra = _flag_type(f.annotation)
        if "choices" in more:
            extra["choices"] = more["choices"]
        target.add_argument(*flags, dest=prefix + name, type=typ, default=f.default, help=help_, **extra)


def from_args(group: type[G], args: argparse.Namespace, prefix: str = "", **override: Any) -> G:
    """The validated ``group`` from parsed flags; a bad value is a one-line error naming its flag."""
    values = {name: getattr(args, prefix + name) for name in group.model_fields if hasattr(args, prefix + name)}
    values.update(override)
    try:
        return group(**values)
    except ValidationError as e:
        raise UserError(describe(e, group, prefix)) from None


def one_of(flag: str, registry: Iterable[str], value: str) -> str:
    """``value`` if the registry has it; else ValueError naming the flag and the choices."""
    if value not in registry:
        raise ValueError(f"{flag} {value!r} is unknown; choose one of: {', '.join(registry)}")
    return value


def describe(e: ValidationError, group: type[BaseModel], prefix: str = "") -> str:
    """One line naming the flag: "--batch_size must be >= 1, got 0"."""
    err = e.errors()[0]
    loc = str(err["loc"][0]) if err["loc"] else ""
    flag = f"--{prefix}{loc}" if loc else "the options"
    ctx, got = err.get("ctx", {}), err.get("input")
    for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx:
            return f"{flag} must be {op} {ctx[key]}, got {got}"
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith("--"):
        return msg
    field = group.model_fields.get(loc)
    hint = f" ({field.description})" if field is not None and field.description else ""
    return f"{flag}: {msg}, got {got!r}{hint}"


# --- the groups -----------------------------------------------------------------------------
# Declared once; compute_block_similarity's CLI is derived from them, and `prune` builds them.

from pydantic import Field, field_validator  # noqa: E402

from .data import BUILTIN_DATASET  # noqa: E402
from .metrics import DEFAULT_METRIC, METRICS  # noqa: E402
from .scan import GRAM_BYTES, TOKENS_PER_TEXT  # noqa: E402


class ModelOptions(BaseModel):
    """Model loading"""

    model_path: str | None = Field(None, description="Hub id or local folder; default: the embedded "
                                                      "SmolLM2-135M-Instruct")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    device: str = Field("auto", description="auto, cpu or cuda")
    device_map: str | None = Field(None, description="e.g. 'auto': shard a model too big for one device (accelerate)")
    gguf_file: str | None = Field(None, description="GGUF file name inside --model_path")
    load_in_4bit: bool = Field(False, description="score a 4-bit NF4 model (needs CUDA and bitsandbytes)")
    trust_remote_code: bool = Field(False, description="allow model code from the Hub")


class DataOptions(BaseModel):
    """Calibration data"""

    dataset: str = Field(BUILTIN_DATASET, description="Hub dataset id, a local jsonl/json/csv/parquet/txt file or "
                         f"folder, or '{BUILTIN_DATASET}' (embedded docstrings of the Python standard library)")
    dataset_column: str = Field("text", description="column holding the text")
    dataset_subset: str = Field("train", description="dataset split")
    dataset_size: int | None = Field(None, ge=1, description="use the first N texts (default: all)")
    dataset_config: str | None = Field(None, description="dataset configuration name (Hub datasets)")
    streaming: bool = Field(False, description="stream the dataset instead of downloading it whole")
    batch_size: int = Field(8, ge=1, description="texts per forward pass")
    max_length: int = Field(1024, ge=1, description="truncate each text to this many tokens")


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
