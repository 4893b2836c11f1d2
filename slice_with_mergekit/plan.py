"""A scan result -> MergeKit passthrough config (sliced.yml), checked before any weight is read.

Layers are 0-based and half-open ([start, end)), as in MergeKit's ``layer_range``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from mergekit.common import ModelReference
from mergekit.config import (
    InputSliceDefinition,
    MergeConfiguration,
    OutputSliceDefinition,
)
from pydantic import BaseModel, Field

from compute_block_similarity import scanfile
from compute_block_similarity.atomic import write_text
from compute_block_similarity.data import BUILTIN_DATASET, load_texts
from compute_block_similarity.errors import UserError, first_line, looks_local
from compute_block_similarity.options import ModelOptions
from compute_block_similarity.ranges import (
    format_layers,
    format_ranges,
    kept_ranges,
    parse_layers,
)
from compute_block_similarity.scanfile import ScanFile

from .records import Selection
from .scoring import ScoreSettings, Scorer
from .select import Choice, SelectOptions, choose

log = logging.getLogger(__name__)


class PlanFlags(BaseModel):
    """The plan"""

    scan: str = Field("block_distances.json", description="block_distances.json written by compute_block_similarity")
    output: str = Field("sliced.yml", description="where to write the MergeKit config", json_schema_extra={"aliases": ["-o"]})
    layers_to_skip: int | None = Field(None, description="remove the scan's best block of n layers (default: the "
                                       "scan's n)")
    start: int | None = Field(None, description="remove the block [start, start+n) instead of the best one")
    remove: str | None = Field(None, description="remove any set of 0-based layers, e.g. '21-28,30' (inclusive runs)")
    model: str | None = Field(None, description="source model path or id; default: the one the scan recorded",
                              json_schema_extra={"aliases": ["--model_path"]})
    dtype: str | None = Field(None, description="the merged checkpoint's dtype; default: the source model's")


def layers_to_remove(scan: ScanFile, *, layers_to_skip: int | None = None, start: int | None = None,
                   remove: str | None = None) -> list[int]:
    """The layers to cut: the scan's best block of ``layers_to_skip``, the block [start, start+n),
    or an explicit ``remove`` list such as "21-28,30"."""
    L = scan.num_layers
    if remove is not None:
        if start is not None:
            raise ValueError("--remove and --start are exclusive: give one plan")
        layers = parse_layers(remove)
    else:
        n = layers_to_skip if layers_to_skip is not None else scan.layers_to_skip
        if n is None:
            raise ValueError("--layers_to_skip is required: this scan records no block size")
        if not 1 <= n < L:
            raise ValueError(f"--layers_to_skip {n} must be in [1, {L - 1}] for a {L}-layer model")
        if start is None:
            start = scan.best_start(n)
        if not (0 <= start and start + n <= L):
            raise ValueError(f"--start {start} with --layers_to_skip {n}: need 0 <= start < end <= {L}")
        layers = list(range(start, start + n))
    bad = [i for i in layers if not 0 <= i < L]
    if bad:
        raise ValueError(f"--remove: layers {format_layers(bad)} are outside [0, {L}) for a {L}-layer model")
    if len(layers) >= L:
        raise ValueError(f"the plan removes all {L} layers; keep at least one")
    return layers


def source_config(model: str, trust_remote_code: bool = False) -> Any:
    """The source's config.json only; no weights are read."""
    from transformers import AutoConfig

    if looks_local(model) and not os.path.exists(model):
        raise UserError(f"model {model} does not exist; pass --model with a local checkpoint or a Hub id")
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise UserError(f"model {model}: cannot read its config.json ({first})") from None


def check_architecture(cfg: Any, model: str) -> None:
    from mergekit.architecture import arch_info_for_config

    archs = getattr(cfg, "architectures", None) or []
    if len(archs) != 1 or arch_info_for_config(cfg) is None:
        raise UserError(f"MergeKit has no architecture definition for {model} ({', '.join(archs) or 'no architectures'}); "
                        "it cannot slice this model")


def build_config(model: str, num_layers: int, removed: Sequence[int], dtype: str | None) -> MergeConfiguration:
    """A passthrough MergeConfiguration keeping every layer not in ``removed``."""
    ref = ModelReference.model_validate(model)
    slices = [OutputSliceDefinition(sources=[InputSliceDefinition(model=ref, layer_range=r)])
              for r in kept_ranges(num_layers, removed)]
    return MergeConfiguration(merge_method="passthrough", slices=slices, dtype=dtype)


def source_dtype(cfg: Any) -> str | None:
    dt = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    return str(dt).replace("torch.", "") if dt is not None else None


def calibration_scorer(scan: ScanFile, model: str, choice: SelectOptions | None = None,
                       load: ModelOptions | None = None, repair: str = "none") -> Scorer:
    """A perplexity scorer on the scan's own calibration text (its dataset provenance): ``choice.select_texts``
    of its texts, the LM head in chunks of ``choice.logits_bytes``; the model loaded (and placed) by ``load``."""
    choice = choice or SelectOptions()
    ds = scan.dataset
    texts = load_texts(ds.name or BUILTIN_DATASET, ds.column or "text", ds.split or "train",
                       choice.select_texts or ds.size, ds.config)
    m, tok = (load or ModelOptions()).load(model, gguf_file=getattr(scan, "gguf_file", None))
    ml = min(int(ds.max_length or 256), 1024)
    return Scorer(m, tok, texts, ScoreSettings(max_length=ml, stride=ml, repair=repair, logits_bytes=choice.logits_bytes,
                                               score_share=choice.score_share, plain_weight=choice.plain_weight))


def plan(scan_path: str, *, layers_to_skip: int | None = None, start: int | None = None, remove: str | None = None,
         model: str | None = None, dtype: str | None = None, load: ModelOptions | None = None,
         choice: SelectOptions | None = None, repair: str = "none",
         choice_out: list | None = None) -> MergeConfiguration:
    """Everything MergeKit leaves unchecked, checked; then the config.

    ``choice.select`` (a strategy of select.STRATEGIES) picks the block of
    ``layers_to_skip`` when no explicit --start/--remove is given. With ``repair``, candidates are
    scored after that repair (the plan itself stays the plain cut). ``load`` loads and places the
    model that scores them; ``dtype`` is the merged checkpoint's.
    """
    load = load or ModelOptions()
    trust_remote_code = load.trust_remote_code

    choice = choice or SelectOptions()
    select, top_k = choice.select, choice.top_k
    scan = scanfile.load(scan_path)
    removed = layers_to_remove(scan, layers_to_skip=layers_to_skip, start=start, remove=remove)
    scanned = scan.model
    if model is not None and os.path.normpath(model) != os.path.normpath(scanned):
        log.warning("--model %s overrides the scanned model %s", model, scanned)
    src = model or scanned
    cfg = source_config(src, trust_remote_code)  # checked before any selection loads the weights
    L = cfg.get_text_config().num_hidden_layers
    if L != scan.num_layers:
        raise UserError(f"{src} has {L} layers but the scan saw {scan.num_layers}; "
                        "pass --model with the model that was scanned")
    check_architecture(cfg, src)
    if select != "angle" and start is None and remove is None:
        picked = choose(select, scan, len(removed),
                        lambda: calibration_scorer(scan, src, choice, load, repair), top_k, choice.race())
        removed = picked.removed
        if choice_out is not None:
            choice_out.append(picked)
        log.info("--select %s: remove %s (%.2f calibration passes%s)", select, format_layers(removed), picked.passes,
                 f", perplexity {picked.perplexity:.3f}" if picked.perplexity else "")
    config = build_config(src, L, removed, dtype or source_dtype(cfg))
    keep = kept_ranges(L, removed)
    log.info("removing layers %s of %d; keeping %s", format_layers(removed), L, format_ranges(keep))
    return config


def write_config(config: MergeConfiguration, path: str | os.PathLike) -> None:
    write_text(path, config.to_yaml() + "\n")


def write_selection(plan_path: str | os.PathLike, choice: Choice) -> Path:
    """The selection's evidence beside the plan: sliced.yml -> sliced.select.json (every candidate scored)."""
    return Selection.model_validate(asdict(choice)).save(Selection.beside(plan_path))
