"""Token ids and padded batches: the input side of every forward pass (scan, repair fit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, S)

    @property
    def lengths(self) -> torch.Tensor:  # (B,)
        return self.attention_mask.sum(-1)


def tokenize(tokenizer: Any, texts: Iterable[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids per text (special tokens by the tokenizer's convention), and how many were empty."""
    ids, skipped = [], 0
    for text in texts:
        toks = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        if len(toks) == 0 or not text.strip():
            skipped += 1
            continue
        ids.append(list(toks))
    return ids, skipped


def make_batches(ids: Sequence[list[int]], batch_size: int, pad_id: int, padding_side: str) -> list[Batch]:
    """Length-sorted batches (longest first, so an OOM shows at once), padded to the batch max."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = []
    for k in range(0, len(order), batch_size):
        rows = [ids[i] for i in order[k : k + batch_size]]
        width = max(map(len, rows))
        inp = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            sl = slice(0, len(r)) if padding_side == "right" else slice(width - len(r), width)
            inp[b, sl] = torch.tensor(r)
            mask[b, sl] = 1
        batches.append(Batch(inp, mask))
    return batches
