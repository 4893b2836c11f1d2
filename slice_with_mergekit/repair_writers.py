"""Where a bridge folds: for a cut at layer s, the module of layer s-1 whose output is added unchanged to
the residual stream entering layer s (its MLP output projection; the embedding for s = 0), and, in a
post-norm layer (Gemma-2/3, OLMo-2), the norm after it whose gain is refitted too. Found by probing the
model with hooks, for any architecture; a writer that cannot fold exactly is refused with the reason.
The fit that uses them is repair_fit.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compute_block_similarity.errors import UserError
from compute_block_similarity.model import decoder_layers, text_config

from .inmemory import read_weight

log = logging.getLogger(__name__)


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _linear_like(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


class _Stop(Exception):
    """Raised by a hook once every needed layer has run: the rest of the forward is skipped."""


def _forward(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    try:
        getattr(model, "base_model", model)(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                             use_cache=False)
    except _Stop:
        pass


def _stop_after(layer: nn.Module) -> Any:
    def hook(*_: Any) -> None:
        raise _Stop

    return layer.register_forward_hook(hook)


def _probe(model: nn.Module, probe: tuple[torch.Tensor, torch.Tensor], hooks: list) -> None:
    """One no-grad forward of ``probe`` with ``hooks`` in place; they are removed after."""
    try:
        with torch.no_grad():
            _forward(model, *probe)
    finally:
        for h in hooks:
            h.remove()


def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class Writer:
    """The module whose output is added, unchanged, to the residual stream entering layer ``start``."""

    start: int  # the run's first removed layer
    name: str  # module name; its weight is "<name>.weight" in the source's state dict
    module: nn.Module = field(repr=False)
    kind: str  # "linear" | "conv1d" | "embedding"
    norm: "PostNorm | None" = None  # post-norm layers (Gemma-2/3, OLMo-2): x^s = h + g * rms_norm(m)

    def params(self) -> dict[str, nn.Parameter]:
        out = {"weight": self.module.weight}
        if self.kind != "embedding" and getattr(self.module, "bias", None) is not None:
            out["bias"] = self.module.bias
        return out


@dataclass
class PostNorm:
    """An RMS norm between the writer and the residual stream: N(m) = (offset + w) * m / rms(m).
    ``offset`` is 1 for Gemma's ``1 + w`` convention, 0 for OLMo-2's ``w``."""

    name: str
    module: nn.Module = field(repr=False)
    offset: float
    eps: float

    def gain(self) -> torch.Tensor:  # (d,) float64
        return read_weight(self.module).double() + self.offset

    @staticmethod
    def live(g: torch.Tensor) -> torch.Tensor:
        """Channels whose gain is not (numerically) zero; Gemma-3-270M has dead ones."""
        return g.abs() > 1e-6 * g.abs().max()

    def apply(self, m: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """gain * m / rms(m), in float64; m (N, d)."""
        return gain * m * torch.rsqrt((m * m).mean(-1, keepdim=True) + self.eps)


def find_writer(model: nn.Module, start: int, probe: tuple[torch.Tensor, torch.Tensor]) -> Writer:
    """The writer for a run starting at ``start``, found by running the model, not by a name:
    the last Linear/Conv1D of layer start-1 with a d-wide output (the input embedding when start = 0),
    then checked: adding a vector to its output must add exactly that vector to x^start."""
    layers = decoder_layers(model)
    d = text_config(model).hidden_size
    names = {m: n for n, m in model.named_modules()}
    if start == 0:
        emb = model.get_input_embeddings()
        if getattr(text_config(model), "tie_word_embeddings", False):
            raise UserError("the cut starts at layer 0, so its bridge must fold into the input embedding, which this "
                            "model ties to the LM head (folding would change the output too); keep layer 0 or use "
                            "--repair none")
        writer = Writer(0, names[emb], emb, "embedding")
    else:
        order: list[nn.Module] = []
        hooks = [m.register_forward_hook(lambda mod, a, o: order.append(mod))
                 for m in layers[start - 1].modules() if _linear_like(m)]
        _probe(model, probe, hooks + [_stop_after(layers[start - 1])])
        wide = [m for m in order if _output_tensor_width(m) == d]
        if not wide:
            raise UserError(f"layer {start - 1} has no linear projection into the {d}-wide residual stream; "
                            f"{type(model).__name__} cannot take a linear bridge (use --repair none)")
        mod = wide[-1]
        writer = Writer(start, names[mod], mod, "conv1d" if _is_conv1d(mod) else "linear")
    try:
        _check_additive(model, writer, probe)
    except UserError as err:
        if start == 0 or (norm := _post_norm(model, writer, probe, names)) is None:
            raise err from None
        writer.norm = norm
    return writer


def _post_norm(model: nn.Module, writer: Writer, probe: tuple[torch.Tensor, torch.Tensor],
               names: dict) -> PostNorm | None:
    """The RMS norm that takes the writer's output straight into the residual stream, found by running
    the model and checked: moving m by delta must move x^start by exactly N(m + delta) - N(m). None if the
    layer ends in something else (a gate, a scale after the norm)."""
    layer = decoder_layers(model)[writer.start - 1]
    seen: dict[str, Any] = {}
    taps = [writer.module.register_forward_hook(lambda m, a, o: seen.__setitem__("m", _output_tensor(o)))]

    def takes_m(mod: nn.Module, args: tuple, out: Any) -> None:
        if args and "m" in seen and args[0] is seen["m"]:
            seen.setdefault("norm", mod)

    taps += [mod.register_forward_hook(takes_m) for mod in layer.modules()
             if mod is not writer.module and getattr(mod, "weight", None) is not None and mod.weight.dim() == 1]
    _probe(model, probe, taps + [_stop_after(layer)])
    norm = seen.get("norm")
    if norm is None:
        return None
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    w = read_weight(norm)
    x = torch.randn(4, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w)
    with torch.no_grad():
        eff = (norm(x).double().to(w.device) / (x.double() * torch.rsqrt((x.double() ** 2).mean(-1, keepdim=True) + eps))).mean(0)
    w = w.double()
    offset = next((o for o in (0.0, 1.0) if torch.allclose(eff, w + o, rtol=1e-3, atol=1e-3)), None)
    if offset is None:
        return None
    pn = PostNorm(names[norm], norm, offset, eps)
    return pn if _moves_through_norm(model, writer, pn, probe) else None


def _moves_through_norm(model: nn.Module, writer: Writer, pn: PostNorm, probe: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """x^start(m + delta) - x^start(m) == N(m + delta) - N(m): the layer's output is h + N(m), h free of m."""
    layer = decoder_layers(model)[writer.start - 1]
    ms, xs = [], []
    delta: torch.Tensor | None = None
    hooks = [writer.module.register_forward_hook(lambda mod, a, o: None if delta is None else o + delta.to(o.device, o.dtype)),
             writer.module.register_forward_hook(lambda mod, a, o: ms.append(_output_tensor(o).double())),
             layer.register_forward_hook(lambda mod, a, o: xs.append(_output_tensor(o).double())),
             _stop_after(layer)]
    try:
        with torch.no_grad():
            _forward(model, *probe)
            delta = torch.linspace(-1.0, 1.0, ms[0].shape[-1]) * float(ms[0].abs().mean())
            _forward(model, *probe)
    finally:
        for h in hooks:
            h.remove()
    g = pn.gain().to(ms[0].device)
    want = pn.apply(ms[1], g) - pn.apply(ms[0], g)  # (1, S, d)
    moved = xs[1] - xs[0]
    return bool(torch.allclose(moved, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-6))


def _output_tensor_width(mod: nn.Module) -> int:
    return mod.nf if _is_conv1d(mod) else mod.out_features


def _check_additive(model: nn.Module, writer: Writer, probe: tuple[torch.Tensor, torch.Tensor]) -> None:
    """x^start must move by exactly delta when the writer's output moves by delta; else a fold is not exact."""
    layers = decoder_layers(model)
    seen: list[torch.Tensor] = []
    if writer.start == 0:
        tap = layers[0].register_forward_pre_hook(
            lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).float()), with_kwargs=True)
    else:
        tap = layers[writer.start - 1].register_forward_hook(lambda m, a, o: seen.append(_output_tensor(o).float()))
    stop = _stop_after(layers[max(writer.start - 1, 0)])
    delta = torch.zeros(0)
    shift = lambda mod, a, out: out + delta.to(out.device, out.dtype)  # noqa: E731
    try:
        with torch.no_grad():
            _forward(model, *probe)
            scale = max(1.0, float(seen[0].abs().mean()))
            delta = torch.linspace(-scale, scale, seen[0].shape[-1])
            h = writer.module.register_forward_hook(shift)
            try:
                _forward(model, *probe)
            finally:
                h.remove()
    finally:
        tap.remove()
        stop.remove()
    moved = seen[1] - seen[0]  # (1, S, d)
    eps = torch.finfo(next(model.parameters()).dtype).eps
    tol = 0.02 * scale + 8 * eps * float(seen[0].abs().max())
    if not torch.allclose(moved, delta.to(moved.device).expand_as(moved), rtol=0, atol=tol):
        where = "the input embedding" if writer.start == 0 else writer.name
        raise UserError(f"the output of {where} is not added unchanged to the residual stream entering layer "
                        f"{writer.start} (a norm or scale sits in between), so a bridge cannot be folded into it "
                        "exactly; use --repair none for this model")
