"""Check a pruned checkpoint against its source and plan: loads, right depth, bitwise-equal kept
layers, exact parameter count, no spurious lm_head, and cached generation equal to uncached."""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compute_block_similarity.errors import UserError
from compute_block_similarity.model import input_device, placement
from compute_block_similarity.options import ModelOptions
from compute_block_similarity.ranges import format_layers

from .checkpoint import (
    REPAIR_FILE,
    layer_of,
    lineage,
    source_key,
    tensor_files,
    tensor_index,
)
from .repair_record import check_repaired

log = logging.getLogger(__name__)

def differing_tensors(out: Path, src: Path, kept: list[int]) -> list[str]:
    """Output tensors not bitwise equal to the source tensor they came from (cast to the output's dtype, as a
    plan's ``dtype:`` casts), compared pair by pair."""
    def same(o: torch.Tensor, s: torch.Tensor) -> bool:
        return o.shape == s.shape and torch.equal(o, s.to(o.dtype))

    with ExitStack() as stack:
        src_of, out_of = tensor_index(src, stack), tensor_index(out, stack)
        return [k for k, h in out_of.items()
                if source_key(k, kept) not in src_of
                or not same(h.get_tensor(k), src_of[source_key(k, kept)].get_tensor(source_key(k, kept)))]


def numel_by_name(folder: Path) -> dict[str, int]:
    from safetensors import safe_open

    out = {}
    for f in tensor_files(folder):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                out[k] = math.prod(sf.get_slice(k).get_shape())
    return out


@dataclass
class Checks:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append((name, ok, detail))
        return ok

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def render(self) -> str:
        w = max(len(n) for n, _, _ in self.checks)
        lines = [f"  {'PASS' if ok else 'FAIL'}  {n:<{w}}  {d}" for n, ok, d in self.checks]
        return "\n".join(lines + [f"verification {'passed' if self.ok else 'FAILED'}"])


def verify(out_path: str, plan_path: str, source: str | None = None, generate_tokens: int = 8,
           load: ModelOptions | None = None) -> Checks:
    """Check a pruned checkpoint against its source and plan; the generation check loads it placed as
    ``load`` says (``--device_map``, ``--max_memory``: one bigger than a device), else on the CPU."""
    from transformers import AutoConfig

    out = Path(out_path)
    if not (out / "config.json").exists():
        raise UserError(f"{out} is not a checkpoint folder (no config.json); materialize it first")
    lin = lineage(plan_path, source)
    src, kept, L, removed = lin.source_dir, lin.kept, lin.num_layers, lin.removed
    rep = Checks()
    rep.add("plan", True, f"source {lin.source}: remove {format_layers(removed)}, keep {len(kept)} of {L} layers")

    cfg = AutoConfig.from_pretrained(out)
    n_out = cfg.get_text_config().num_hidden_layers
    rep.add("num_hidden_layers", n_out == len(kept), f"{n_out} (expected {L} - {len(removed)} = {len(kept)})")

    src_names = numel_by_name(src)
    out_names = numel_by_name(out)
    tied = bool(getattr(cfg.get_text_config(), "tie_word_embeddings", False))
    expected = {source_key(k, kept) for k in out_names}
    wanted = {k for k in src_names if layer_of(k) not in removed}
    if tied:
        wanted.discard("lm_head.weight")
    missing, extra = sorted(wanted - expected), sorted(expected - wanted)
    rep.add("tensor names", not missing and not extra,
            f"{len(out_names)} tensors" + (f"; missing {missing[:3]}" if missing else "") + (f"; extra {extra[:3]}" if extra else ""))
    rep.add("tied embeddings", not (tied and "lm_head.weight" in out_names),
            "tied, no separate lm_head" if tied else "untied lm_head kept")

    predicted = sum(v for k, v in src_names.items() if k in wanted)
    actual = sum(out_names.values())
    rep.add("parameter count", actual == predicted,
            f"{actual:,} (plan predicts {predicted:,}; source {sum(src_names.values()):,})")

    patched, bad = check_repaired(out, src, kept)
    diffs = [k for k in differing_tensors(out, src, kept) if k not in patched]
    plain = len(out_names) - len(patched)
    rep.add("bitwise equal to source", not diffs, f"{plain - len(diffs)}/{plain} "
            f"{'unpatched ' if patched else ''}tensors identical" + (f"; differ: {diffs[:3]}" if diffs else ""))
    if (out / REPAIR_FILE).exists():
        rep.add("repair bridges", not bad, f"{len(patched) - len(bad)}/{len(patched)} patched tensors equal source x "
                f"recorded T" + (f"; differ: {bad[:3]}" if bad else ""))

    generation_checks(rep, out, generate_tokens, load)
    return rep


def generation_checks(rep: Checks, out: Path, generate_tokens: int, load: ModelOptions | None) -> None:
    """transformers loads the checkpoint with no missing or unexpected weights, and greedy generation
    gives the same tokens with the KV cache as without it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        place = placement(load.device_map, load.max_memory, load.offload_folder) if load else {}
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32, **place)
        tok = AutoTokenizer.from_pretrained(out)
    except Exception as e:
        rep.add("AutoModelForCausalLM loads", False, str(e).splitlines()[0])
        return rep
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    rep.add("AutoModelForCausalLM loads", not bad, type(model).__name__ + (f"; {bad}" if bad else ""))
    ids = tok("The pruned model says", return_tensors="pt").input_ids.to(input_device(model))
    gen = dict(max_new_tokens=generate_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **gen)
        plain = model.generate(ids, use_cache=False, **gen)
    same = torch.equal(cached, plain)
    rep.add("generates with KV cache", same and cached.shape[1] > ids.shape[1],
            repr(tok.decode(cached[0, ids.shape[1]:])) + ("" if same else " (differs from use_cache=False)"))
    return rep
