"""Repair on disk: fit the bridges on the plan's dense source (repair_fit.py) and fold them into the
pruned checkpoint, shard by shard, each shard replaced atomically; the record goes to repair.safetensors."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Sequence

import torch

from compute_block_similarity.atomic import atomic_path
from compute_block_similarity.errors import UserError
from compute_block_similarity.options import ModelOptions

from .checkpoint import (
    REPAIR_FILE,
    clean_leftovers,
    layer_of,
    lineage,
    output_key,
    tensor_files,
    tensor_index,
)
from .repair_fit import FitOptions, RepairResult, fit_repair
from .repair_record import folded, patched_tensors, save_repair, tensor_hash

log = logging.getLogger(__name__)


def apply_to_checkpoint(out: Path, src: Path, result: RepairResult, kept: Sequence[int]) -> list[str]:
    """Fold every applied bridge into the checkpoint in ``out`` (from the source's tensors, so a rerun
    does not compound), shard by shard, each shard replaced atomically; then write repair.safetensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    clean_leftovers(out)
    patch = patched_tensors(result, kept)
    done, hashes = [], {}
    with ExitStack() as stack:
        src_of = tensor_index(src, stack)
        for f in tensor_files(out):
            with safe_open(str(f), "pt") as h:
                names, meta = list(h.keys()), h.metadata()
                if not set(names) & set(patch):
                    continue
                tensors = {k: h.get_tensor(k) for k in names}
            for k in set(names) & set(patch):
                skey, i = patch[k]
                if skey not in src_of:
                    raise UserError(f"the source checkpoint {src} has no {skey}; is the plan's source the right model?")
                b = result.bridges[i]
                new = folded(b, skey, src_of[skey].get_tensor(skey), b.T, b.gain)
                tensors[k] = new.to(tensors[k].dtype).contiguous()
                hashes[k] = tensor_hash(tensors[k])
                done.append(k)
            with atomic_path(f) as tmp:
                save_file(tensors, tmp, metadata=meta or {"format": "pt"})
    missing = sorted(set(patch) - set(done))
    if missing:
        raise UserError(f"{out} has no tensor {missing[0]}; is it the checkpoint of this plan?")
    save_repair(result, out / REPAIR_FILE, kept, hashes)
    return done


def check_lineage(out: Path, src: Path, kept: Sequence[int], plan_path: str, samples: int = 8) -> None:
    """Before any weight is touched: ``out`` is not the source itself, and a sample of its tensors that no
    bridge patches equals the source's (bitwise, in the checkpoint's dtype), so the bridge fitted on the
    plan's source is folded into a cut of that source and no other."""

    if out.resolve() == src.resolve():
        raise UserError(f"{out} is the plan's dense source {src}, not a pruned checkpoint of it; repair writes only "
                        "into the checkpoint that materialize or mergekit-yaml built from the plan")
    with ExitStack() as stack:
        out_of, src_of = tensor_index(out, stack), tensor_index(src, stack)
        edge = {l for l in kept if l + 1 not in kept}  # a bridge patches the layer before a cut (and its norm) ...
        embed_patched = 0 not in kept  # ... or, for a cut at layer 0, the embedding
        keep_set = set(kept)
        pairs = [(k, output_key(k, kept)) for k in sorted(src_of)
                 if (layer_of(k) is None and not embed_patched) or (layer_of(k) in keep_set and layer_of(k) not in edge)]
        pairs = [(s, o) for s, o in pairs if o in out_of]
        step = max(1, len(pairs) // samples)
        for skey, okey in pairs[::step][:samples]:
            got = out_of[okey].get_tensor(okey)
            want = src_of[skey].get_tensor(skey)
            if got.shape != want.shape or not torch.equal(got, want.to(got.dtype)):
                raise UserError(f"{out} does not come from the plan's source {src}: its {okey} differs from the "
                                f"source's {skey} (plan {plan_path}); give the plan the checkpoint was built from, "
                                "or --source for where its model lives")



def repair_checkpoint(out_path: str, plan_path: str, texts: Sequence[str], fit: FitOptions = FitOptions(), *,
                      source: str | None = None, load: ModelOptions | None = None,
                      calibration: dict | None = None) -> RepairResult:
    """Fit bridges (``fit``) on the plan's dense source (loaded and placed by ``load``) and fold them into the
    checkpoint ``out_path`` built from it."""
    out = Path(out_path)
    if not (out / "config.json").exists():
        raise UserError(f"{out} is not a checkpoint folder (no config.json); build it with mergekit-yaml or materialize")
    load = load or ModelOptions()
    lin = lineage(plan_path, source, load.trust_remote_code)
    check_lineage(out, lin.source_dir, lin.kept, plan_path)
    model, tok = load.load(str(lin.source_dir))
    result = fit_repair(model, tok, texts, lin.removed, fit, calibration)
    del model
    done = apply_to_checkpoint(out, lin.source_dir, result, lin.kept)
    log.info("repair %s: %d of %d bridge(s) folded into %s (%s) in %.1fs", fit.method, len(result.applied),
             len(result.bridges), out, ", ".join(done) or "nothing changed", result.seconds)
    return result
