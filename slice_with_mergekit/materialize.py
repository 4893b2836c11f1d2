"""Run a sliced.yml through MergeKit's API, then fix what MergeKit leaves wrong."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from mergekit.config import MergeConfiguration

from compute_block_similarity.atomic import atomic_path, output_lock, write_text
from compute_block_similarity.options import ModelOptions

from .card import write_card
from .checkpoint import (
    copy_companions,
    is_depth_cut,
    kept_source_layers,
    local_source,
    num_layers_of,
    read_plan,
)
from .repair import repair_checkpoint
from .repair_fit import FitOptions
from .surgery import slice_per_layer_fields

log = logging.getLogger(__name__)

def out_config(src: Path, kept: list[int], num_layers: int, dtype: str | None, trust_remote_code: bool) -> Any:
    """The source's config for the kept layers: num_hidden_layers and every per-layer field sliced."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    fixed, notes = slice_per_layer_fields(cfg.to_dict(), kept, num_layers)
    for note in notes:
        log.info("config: %s", note)
    for key, value in fixed.items():
        if key == "text_config" and hasattr(cfg, "text_config"):
            for k, v in value.items():
                if k in cfg.text_config.to_dict() and getattr(cfg.text_config, k, None) != v:
                    setattr(cfg.text_config, k, v)
        elif key in cfg.to_dict() and getattr(cfg, key, None) != value:
            setattr(cfg, key, value)
    cfg.get_text_config().num_hidden_layers = len(kept)  # n_layer, num_layers, ... via each config's attribute_map
    if dtype:
        cfg.dtype = dtype
    return cfg


def merge_passthrough(config: MergeConfiguration, out: Path, options: Any, out_cfg: Any, config_source: str) -> None:
    """MergeKit's run_merge for a passthrough slice, with the output config built by us.

    run_merge derives the output config by setting num_hidden_layers alone, and transformers refuses to
    save a config whose per-layer lists (layer_types, ...) no longer match it, so run_merge fails on
    Qwen3, Gemma 3 and the like. MergeKit has no hook for the output config; rather than patch its
    private builder, we drive its public pieces (the same planner and executor write the same tensors)
    and write the config and mergekit_config.yml ourselves (the card is ours: `card.write_card`)."""
    from mergekit.architecture import get_architecture_info
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.plan import MergePlanner

    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    targets = MergePlanner(config, arch_info, options=options, out_model_config=out_cfg).plan_to_disk(out_path=str(out))
    for _ in Executor(targets=targets, math_device=options.device, storage_device="cpu").run(quiet=options.quiet):
        pass
    out_cfg.save_pretrained(out)
    (out / "mergekit_config.yml").write_text(config_source, encoding="utf-8")


def drop_spurious_lm_head(out: Path) -> None:
    """Tied embeddings stay tied: drop a spurious lm_head.weight that only duplicates the embeddings
    (each rewritten file replaced atomically)."""
    cfg = json.loads((out / "config.json").read_text())
    tied = cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings", False))
    if not tied:
        return
    from safetensors import safe_open
    from safetensors.torch import save_file

    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            names = list(sf.keys())
            if "lm_head.weight" not in names:
                continue
            tensors = {k: sf.get_tensor(k) for k in names if k != "lm_head.weight"}
            meta = sf.metadata()
        log.info("dropping a spurious lm_head.weight from %s (the model ties it to the embeddings)", f.name)
        with atomic_path(f) as tmp:
            save_file(tensors, tmp, metadata=meta or {"format": "pt"})
        index = out / "model.safetensors.index.json"
        if index.exists():
            idx = json.loads(index.read_text())
            idx["weight_map"].pop("lm_head.weight", None)
            write_text(index, json.dumps(idx, indent=2))


def materialize(plan_path: str, out_path: str, *, device: str = "cpu", trust_remote_code: bool = False,
                repair: FitOptions | None = None, repair_texts: list[str] | None = None,
                repair_calibration: dict | None = None, load: ModelOptions | None = None) -> Path:
    """sliced.yml -> a loadable pruned checkpoint in ``out_path`` (written to a temporary folder first),
    MergeKit computing on ``device``.

    ``repair`` (its method one of repair.REPAIRS; None: the plain cut) fits bridges on ``repair_texts`` (the source loaded and placed by
    ``load``, default: on ``device``) and folds them in before the folder replaces ``out_path``, so a
    failed repair leaves the previous checkpoint as it was."""
    from mergekit.options import MergeOptions

    config = read_plan(plan_path)
    model, kept = kept_source_layers(config)
    if not is_depth_cut(kept):
        log.warning("%s repeats or reorders layers: a MergeKit frankenmerge, built as mergekit-yaml builds it, but "
                    "not a depth cut (repair and verify refuse it)", plan_path)
    src = local_source(model)
    L = num_layers_of(src, trust_remote_code)
    out = Path(out_path)
    with output_lock(out):
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        options = MergeOptions(device=device, lazy_unpickle=True, trust_remote_code=trust_remote_code, quiet=True)
        tmp.mkdir(parents=True)
        out_cfg = out_config(src, kept, L, config.out_dtype or config.dtype, trust_remote_code)
        merge_passthrough(config, tmp, options, out_cfg, Path(plan_path).read_text())
        drop_spurious_lm_head(tmp)
        copy_companions(src, tmp)
        if repair is not None and repair.method != "none":
            repair_checkpoint(str(tmp), plan_path, repair_texts or [], repair, source=str(src),
                              load=load or ModelOptions(device=device, trust_remote_code=trust_remote_code),
                              calibration=repair_calibration)
        write_card(tmp, Path(plan_path), name=out.name)  # what was cut, the bridge; scores join it later
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)  # the previous checkpoint steps aside, then the new one takes its name
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    log.info("wrote the pruned checkpoint to %s (%d of %d layers kept)", out, len(kept), L)
    return out
