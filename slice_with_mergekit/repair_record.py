"""The record of a repair: repair.safetensors (each bridge's T and how it was fitted), the fold's
arithmetic, and the check that a checkpoint's patched tensors equal source x recorded T.
What verify and the model card need; nothing here fits anything."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compute_block_similarity.atomic import atomic_path
from compute_block_similarity.errors import UserError

from .checkpoint import REPAIR_FILE, output_key, tensor_index


def fold_tensor(kind: str, is_bias: bool, w: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """float64 fold of one source tensor: bias b T, Linear T^T W, Conv1D / embedding W T."""
    w, T = w.double(), T.double()
    if is_bias or kind != "linear":
        return w @ T
    return T.T @ w


def norm_weight(gain: torch.Tensor, offset: float) -> torch.Tensor:
    """A post-norm's weight for a gain: Gemma's norm computes (1 + w) * x / rms(x), so w = gain - 1."""
    return gain.double() - offset


class Calibration(BaseModel):
    """The text a bridge was fitted on (``load_calibration``'s facts, and the tokens the fit used)."""

    model_config = ConfigDict(extra="allow")

    dataset: str | None = None
    column: str | None = None
    split: str | None = None
    size: int | None = Field(None, description="texts")
    config: str | None = None
    tokens_fit: int | None = Field(None, description="tokens per run in the fit part")
    tokens_heldout: int | None = Field(None, description="tokens per run in the guard's held-out part")
    max_length: int | None = None


class BridgeRecord(BaseModel):
    """One bridge as recorded: where it sits, what it folds into, and the guard's verdict (T is a tensor)."""

    model_config = ConfigDict(extra="allow")

    start: int
    end: int
    writer: str = Field(description="the module T is folded into, in the source model")
    kind: str
    applied: bool
    ridge: float
    decision: str
    heldout_mse_cut: float | None = None
    heldout_mse_bridged: float | None = None
    heldout_ppl_cut: float | None = None
    heldout_ppl_bridged: float | None = None
    bias: bool = False
    norm: str = ""
    norm_offset: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.start}_{self.end}"


class RepairRecord(BaseModel):
    """repair.safetensors' metadata: the fit, each bridge, the kept layers, each patched tensor's source and hash."""

    method: str
    calibration: Calibration = Field(default_factory=Calibration)
    seconds: float = 0.0
    bridges: list[BridgeRecord] = Field(default_factory=list)
    kept: list[int] = Field(default_factory=list)
    patched: dict[str, str] = Field(default_factory=dict, description="output tensor: its source tensor")
    hashes: dict[str, str] = Field(default_factory=dict, description="output tensor: sha256 as written")


def folded(b: Any, skey: str, source: torch.Tensor, T: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """What the patched tensor ``skey`` holds (float64): the writer's weight or bias folded with T, or a
    post-norm's weight set to the refitted gain. ``b``: a Bridge or its BridgeRecord."""
    if b.norm and skey == f"{b.norm}.weight":
        return norm_weight(gain, b.norm_offset)
    return fold_tensor(b.kind, skey.endswith(".bias"), source, T)


def patched_tensors(result: Any, kept: Sequence[int]) -> dict[str, tuple[str, int]]:
    """{output tensor name: (source tensor name, index of its bridge)} for every applied bridge."""
    out = {}
    for i, b in enumerate(result.bridges):
        if not b.applied:
            continue
        names = [f"{b.writer}.weight"] + ([f"{b.writer}.bias"] if b.bias else []) + ([f"{b.norm}.weight"] if b.norm else [])
        for name in names:
            out[output_key(name, kept)] = (name, i)
    return out


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (any dtype): what verify compares a patched tensor against."""
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def save_repair(result: Any, path: Path, kept: Sequence[int], hashes: dict[str, str] | None = None) -> None:
    """repair.safetensors: each bridge's T (and gain), the fit's facts, and each patched tensor's hash as written."""
    from safetensors.torch import save_file

    tensors = {f"bridge.{b.start}_{b.end}": b.T.double().contiguous() for b in result.bridges}
    tensors.update({f"gain.{b.start}_{b.end}": b.gain.double().contiguous() for b in result.bridges
                    if getattr(b, "gain", None) is not None})
    if not tensors:
        tensors = {"empty": torch.zeros(0)}
    rec = RepairRecord(**result.record(), kept=list(kept), hashes=hashes or {},
                       patched={k: v[0] for k, v in patched_tensors(result, kept).items()})
    meta = {"format": "pt", "repair": rec.model_dump_json()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_repair(path: Path) -> tuple[RepairRecord, dict[str, torch.Tensor]]:
    """(the recorded facts, {"bridge.S_E": T, "gain.S_E": a post-norm's gain}) from a repair.safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        info = RepairRecord.model_validate_json(meta["repair"])
    except (SafetensorError, KeyError, ValidationError, OSError) as e:
        raise UserError(f"{path} is not a repair file written by slice_with_mergekit ({e}); run `repair` again") from None
    return info, tensors


def check_repaired(out: Path, src: Path, kept: Sequence[int]) -> tuple[set[str], list[str]]:
    """(names of the patched tensors, those that do not equal source x recorded T to float tolerance)."""
    path = out / REPAIR_FILE
    if not path.exists():
        return set(), []
    info, tensors = load_repair(path)
    bridges = {b.key: b for b in info.bridges}
    bad = []
    with ExitStack() as stack:
        out_of, src_of = tensor_index(out, stack), tensor_index(src, stack)
        for okey, skey in info.patched.items():
            try:
                ok = _matches_fold(okey, skey, bridges, tensors, out_of, src_of)
            except (RuntimeError, KeyError, StopIteration, TypeError) as e:
                raise UserError(f"{path}: its record of {okey} does not fit the checkpoint ({str(e).splitlines()[0]}); "
                                "the file is damaged or from another checkpoint: run `repair` again") from None
            want_hash = info.hashes.get(okey)
            if not ok or (want_hash and okey in out_of and tensor_hash(out_of[okey].get_tensor(okey)) != want_hash):
                bad.append(okey)
    return set(info.patched), bad


def _matches_fold(okey: str, skey: str, bridges: dict[str, BridgeRecord], tensors: dict, out_of: dict,
                  src_of: dict) -> bool:
    """Does the output tensor equal the source tensor folded with its recorded T (or the recorded gain), to
    float tolerance?"""
    b = next(b for b in bridges.values() if skey.startswith(b.writer + ".") or (b.norm and skey == f"{b.norm}.weight"))
    if okey not in out_of or skey not in src_of:
        return False
    got = out_of[okey].get_tensor(okey)
    want = folded(b, skey, src_of[skey].get_tensor(skey), tensors[f"bridge.{b.key}"], tensors.get(f"gain.{b.key}"))
    eps = torch.finfo(got.dtype).eps
    return torch.allclose(got.double(), want, rtol=4 * eps, atol=4 * eps * float(want.abs().max()))
