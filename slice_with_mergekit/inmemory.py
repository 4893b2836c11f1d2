"""Remove decoder layers from a loaded model in memory, with no checkpoint written: the layer list,
num_hidden_layers, per-layer config lists and the KV-cache layer indices are all renumbered, so the
result computes what the MergeKit checkpoint of the same plan computes."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from torch import nn

from compute_block_similarity.model import decoder_layers, text_config

from .surgery import slice_per_layer_fields


def _parent_of(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for _, mod in model.named_modules():
        for name, child in mod.named_children():
            if child is target:
                return mod, name
    raise RuntimeError("decoder layer list not found in its model")


def _set_layer_idx(layer: nn.Module, idx: int) -> None:
    for mod in layer.modules():
        if hasattr(mod, "layer_idx") and isinstance(mod.layer_idx, int):
            mod.layer_idx = idx


@contextmanager
def removed_layers(model: nn.Module, removed: Sequence[int]) -> Iterator[nn.Module]:
    """Within the block, ``model`` runs without the ``removed`` layers (0-based); restored on exit."""
    layers = decoder_layers(model)
    L = len(layers)
    kept = [i for i in range(L) if i not in set(removed)]
    if not kept:
        raise ValueError("cannot remove every layer")
    cfg = text_config(model)
    parent, attr = _parent_of(model, layers)
    saved = {k: getattr(cfg, k) for k in cfg.to_dict() if hasattr(cfg, k)}
    fixed, _ = slice_per_layer_fields(cfg.to_dict(), kept, L, warn=False)  # materialize warns, once
    try:
        setattr(parent, attr, nn.ModuleList([layers[i] for i in kept]))
        for new, old in enumerate(kept):
            _set_layer_idx(layers[old], new)
        for k, v in fixed.items():
            if saved.get(k) != v and hasattr(cfg, k):
                setattr(cfg, k, v)
        cfg.num_hidden_layers = len(kept)
        yield model
    finally:
        setattr(parent, attr, layers)
        for i, layer in enumerate(layers):
            _set_layer_idx(layer, i)
        for k, v in saved.items():
            if getattr(cfg, k, None) != v:
                setattr(cfg, k, v)
        cfg.num_hidden_layers = L
