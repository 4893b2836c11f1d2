"""Edit a loaded model in memory, with no checkpoint written.

``removed_layers``: the layer list, num_hidden_layers, per-layer config lists and the KV-cache layer
indices are all renumbered, so the result computes what the MergeKit checkpoint of the same plan
computes. ``read_weight`` / ``replaced_weight``: a weight read or swapped where it really lives, also
when accelerate offloads it to the CPU or disk between forwards (``--device_map`` with ``--max_memory``)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
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


# ---------------------------------------------------------------- weights that accelerate offloads


def _offload_store(module: nn.Module, name: str) -> tuple[Any, str] | None:
    """(the mutable mapping accelerate reads ``module.<name>`` from before each forward, its key) when the
    weight is offloaded (a "meta" parameter between forwards); None when it is an ordinary tensor."""
    hook = getattr(module, "_hf_hook", None)
    wm = getattr(hook, "weights_map", None) if getattr(hook, "offload", False) else None
    if wm is None or getattr(module, name).device.type != "meta":
        return None
    key, store = name, wm
    while hasattr(store, "prefix") and hasattr(store, "dataset"):  # accelerate's PrefixedDataset, nested
        key, store = store.prefix + key, store.dataset
    # OffloadedWeightsLoader (disk) reads its ``state_dict`` before the files; a plain dict (cpu_offload) is itself
    return (store.state_dict if hasattr(store, "state_dict") and hasattr(store, "index") else store), key


def read_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module.<name>``'s value, also when accelerate offloads it to the CPU or disk between forwards."""
    slot = _offload_store(module, name)
    if slot is None:
        return getattr(module, name).detach()
    hook = module._hf_hook
    return hook.weights_map[name].to(getattr(hook, "execution_device", None) or "cpu")


@contextmanager
def replaced_weight(module: nn.Module, name: str, value: torch.Tensor) -> Iterator[None]:
    """Within the block ``module.<name>`` holds ``value`` (on its device, in its dtype); restored on exit.
    An offloaded weight is replaced where accelerate loads it from, so every forward sees the new value."""
    slot = _offload_store(module, name)
    if slot is None:
        p = getattr(module, name)
        old = p.detach().clone()
        with torch.no_grad():
            p.copy_(value.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                p.copy_(old)
        return
    store, key = slot
    had, old = key in store, store.get(key) if hasattr(store, "get") else None
    store[key] = value.detach().to("cpu", getattr(module, name).dtype).contiguous()
    try:
        yield
    finally:
        if had:
            store[key] = old
        else:
            del store[key]
