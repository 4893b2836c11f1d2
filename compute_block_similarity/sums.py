"""The scan's float64 sums: per metric, the sum over samples of each block's value (``Accumulator``,
all-reduced over ranks under torchrun), and checkpoints of them for ``--resume`` after a crash or
preemption (``Checkpoint``, keyed by a fingerprint of the batches, the metrics and the model). The pass
that fills them is scan.py."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .atomic import atomic_path
from .batching import Batch
from .errors import UserError, first_line
from .metrics import Metric

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- accumulation


@dataclass
class Accumulator:
    """float64 sums over samples of each metric's per-sample value for every pair (i, j)."""

    metrics: tuple[str, ...]
    num_layers: int
    sums: torch.Tensor | None = None  # (M, L+1, L+1)
    sumsq: torch.Tensor | None = None  # (M, L+1, L+1)
    num_samples: int = 0
    num_tokens: int = 0

    def __post_init__(self) -> None:
        shape = (len(self.metrics), self.num_layers + 1, self.num_layers + 1)
        if self.sums is None:
            self.sums = torch.zeros(shape, dtype=torch.float64)
            self.sumsq = torch.zeros(shape, dtype=torch.float64)

    def add(self, values: torch.Tensor, num_tokens: int) -> None:
        """values: (M, B, L+1, L+1) per-sample metric values."""
        v = values.detach().to("cpu", torch.float64)
        # counters first: a Ctrl-C between these lines leaves counts that betray the half-added batch
        self.num_samples += v.shape[1]
        self.num_tokens += num_tokens
        self.sums += v.sum(1)
        self.sumsq += (v * v).sum(1)

    def all_reduce(self) -> None:
        """Sum over data-parallel ranks (no-op without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        counts = torch.tensor([self.num_samples, self.num_tokens], dtype=torch.float64)
        flat = torch.cat([self.sums.flatten(), self.sumsq.flatten(), counts]).to(dev)
        dist.all_reduce(flat)
        flat = flat.cpu()
        k = self.sums.numel()
        self.sums = flat[:k].view_as(self.sums).clone()
        self.sumsq = flat[k : 2 * k].view_as(self.sumsq).clone()
        self.num_samples, self.num_tokens = int(flat[-2].item()), int(flat[-1].item())

    def state_dict(self) -> dict:
        return {"metrics": list(self.metrics), "num_layers": self.num_layers, "sums": self.sums, "sumsq": self.sumsq,
                "num_samples": self.num_samples, "num_tokens": self.num_tokens}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "Accumulator":
        return cls(tuple(sd["metrics"]), sd["num_layers"], sd["sums"], sd["sumsq"], sd["num_samples"], sd["num_tokens"])


def per_sample_values(gram: torch.Tensor, sample_of: torch.Tensor, last_rows: torch.Tensor,
                      batch_size: int, metrics: Sequence[Metric]) -> torch.Tensor:
    """gram: (N, L+1, L+1) over the captured tokens; sample_of: (N,) sample index of each token;
    last_rows: (B,) row of each sample's last token.  Returns (M, B, L+1, L+1)."""
    lengths = torch.bincount(sample_of, minlength=batch_size).to(torch.float64)  # (B,)
    out = []
    for m in metrics:
        if m.reduce == "last_token":
            out.append(m.fn(gram[last_rows]))
        else:
            v = m.fn(gram)  # (N, L+1, L+1)
            s = torch.zeros((batch_size, *v.shape[1:]), dtype=v.dtype, device=v.device)
            s.index_add_(0, sample_of, v)
            out.append(s / lengths[:, None, None])
    return torch.stack(out)


def check_finite(gram: torch.Tensor) -> None:
    sq = gram.diagonal(dim1=-2, dim2=-1)  # (N, L+1): squared norms
    bad = (~torch.isfinite(sq)).any(0).nonzero().flatten().tolist()
    if bad:
        l = bad[0]
        where = "the embedding output (input of layer 0)" if l == 0 else f"the output of decoder layer {l - 1}"
        raise UserError(f"NaN or inf in {where}; try --dtype float32 or check the checkpoint's weights")


# ---------------------------------------------------------------- checkpoints


class ScanInterrupted(KeyboardInterrupt):
    """Ctrl-C during a scan, after its progress was saved."""

    def __init__(self, path: str, done: int, total: int):
        super().__init__(f"interrupted after {done} of {total} batches; the progress is saved in {path}: "
                         "run the same command with --resume to continue")


@dataclass
class Checkpoint:
    """Running sums and the position in the batches, saved every ``every`` batches so that
    ``resume=True`` continues a crashed or preempted scan with the same result."""

    path: str
    every: int = 50
    resume: bool = False

    def rank_path(self, rank: int) -> str:
        return self.path if rank == 0 else f"{self.path}.rank{rank}"

    def load(self, rank: int, fingerprint: str) -> tuple[Accumulator | None, int]:

        p = self.rank_path(rank)
        if not self.resume or not os.path.exists(p):
            if self.resume:
                log.warning("--resume: no checkpoint at %s; starting from the beginning", p)
            return None, 0
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
            state["fingerprint"], state["done"], state["acc"]
        except Exception as e:  # truncated, garbage or foreign: torch raises many types
            raise UserError(f"--resume: {p} is truncated or corrupt ({first_line(e)}); delete it and rerun "
                            "without --resume") from None
        if state["fingerprint"] != fingerprint:
            raise UserError(f"--resume: {p} belongs to a scan with other inputs (model, data, batch size, "
                            "max_length, metrics or ranks); rerun without --resume or delete it")
        log.info("resuming from %s: %d batches done", p, state["done"])
        return Accumulator.from_state_dict(state["acc"]), int(state["done"])

    def save(self, rank: int, fingerprint: str, acc: Accumulator, done: int) -> None:
        with atomic_path(self.rank_path(rank)) as tmp:
            torch.save({"fingerprint": fingerprint, "done": done, "acc": acc.state_dict()}, tmp)

    def remove(self, rank: int) -> None:
        import contextlib

        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.rank_path(rank))


def model_fingerprint(model: nn.Module) -> str:
    """The model's identity for --resume: its config, every parameter's name, shape and dtype, and a
    strided sample of each parameter's values (64 of them), so another checkpoint of the same shape is told apart."""

    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode() if hasattr(model, "config") else b"")
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            if p.device.type != "meta" and p.numel():
                flat = p.detach().reshape(-1)
                h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


def fingerprint(batches: Sequence[Batch], names: Sequence[str], world: int, extra: dict) -> str:
    import json

    h = hashlib.sha256(json.dumps({"metrics": list(names), "world": world, **extra}, sort_keys=True).encode())
    for b in batches:
        h.update(b.input_ids.numpy().tobytes())
        h.update(b.attention_mask.numpy().tobytes())
    return h.hexdigest()
