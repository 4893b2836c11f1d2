"""What MergeKit leaves wrong in a pruned config: per-layer lists still sized for the source model.

``slice_per_layer_fields`` rewrites a config dict for the kept source layers (in output order):
  * lists with one entry per layer (``layer_types``, ``mlp_layer_types``, ``no_rope_layers``, ...)
    keep the entries of the kept layers, so each layer keeps its own attention type;
  * lists of layer indices (``mlp_only_layers``, ...) keep the kept indices, renumbered;
  * "the first k layers" counts (``max_window_layers``, ``first_k_dense_replace``) count kept layers below k.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

log = logging.getLogger(__name__)

INDEX_LIST_FIELDS = ("mlp_only_layers", "full_attn_idxs", "global_attn_layers", "swa_layers")
PREFIX_COUNT_FIELDS = ("max_window_layers", "first_k_dense_replace")
NESTED = ("text_config",)


def _is_per_layer(key: str, value: Any, L: int) -> bool:
    return isinstance(value, list) and len(value) == L and ("layer" in key or "pattern" in key)


def period(seq: Sequence[Any]) -> int | None:
    """Smallest p < len(seq) with seq[i] == seq[i % p], if the list alternates at all."""
    for p in range(1, len(seq)):
        if all(seq[i] == seq[i % p] for i in range(len(seq))):
            return p if len(set(seq)) > 1 else None
    return None


def slice_per_layer_fields(cfg: dict, kept: Sequence[int], num_layers: int,
                           warn: bool = True) -> tuple[dict, list[str]]:
    """Returns (new config dict, human-readable notes of what changed). ``warn``: log a shifted
    alternating pattern (the checkpoint's config does; the in-memory cut of every candidate does not)."""
    out, notes = dict(cfg), []
    pos = {src: i for i, src in enumerate(kept)}
    for key, value in cfg.items():
        if key in NESTED and isinstance(value, dict):
            out[key], sub = slice_per_layer_fields(value, kept, num_layers, warn)
            notes += [f"{key}.{n}" for n in sub]
        elif key in INDEX_LIST_FIELDS and isinstance(value, list):
            out[key] = [pos[i] for i in value if i in pos]
            notes.append(f"{key}: {value} -> {out[key]}")
        elif key in PREFIX_COUNT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            out[key] = sum(1 for i in kept if i < value)
            if out[key] != value:
                notes.append(f"{key}: {value} -> {out[key]}")
        elif _is_per_layer(key, value, num_layers):
            out[key] = [value[i] for i in kept]
            notes.append(f"{key}: sliced to the {len(kept)} kept layers")
            p = period(value)
            if p and out[key] != [value[i % p] for i in range(len(kept))]:
                if warn:
                    log.warning("the cut shifts the alternating %s pattern (period %d): each kept layer keeps its "
                                "own type, so the result no longer alternates every %d layers", key, p, p)
                notes.append(f"{key}: alternating pattern (period {p}) shifted by the cut")
    if "num_hidden_layers" in out and not any(k in NESTED for k in cfg):
        out["num_hidden_layers"] = len(kept)
    return out, notes
