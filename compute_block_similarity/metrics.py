"""Metric registry: how much a block of layers changes the residual stream.

Every metric is a function of the Gram matrix of one token's residual states
across depth, so one pass gives every (start, end) pair at once:

    G[t, i, j] = <x^i_t, x^j_t>      # (tokens, L+1, L+1), float64

x^i is the hidden state entering decoder layer i (x^L: the last layer's output,
before the final norm). A block [i, j) is the layers i..j-1, 0-based, half-open.

Each metric declares:
  * ``reduce``: "last_token" scores one token per sample (the last non-pad one);
    "all_tokens" averages over the sample's non-pad tokens first.
  * ``lower_is_redundant``: True when a smaller score means the block changes
    the state less, i.e. is a better candidate for removal.
The scan then averages per-sample values over samples (with a standard error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

Reduce = Literal["last_token", "all_tokens"]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]  # (n, L+1, L+1) gram -> (n, L+1, L+1) values
    reduce: Reduce
    lower_is_redundant: bool
    description: str
    bounds: tuple[float, float] = (0.0, math.inf)  # every score a correct scan can give


METRICS: dict[str, Metric] = {}


def register(name: str, reduce: Reduce, lower_is_redundant: bool, description: str,
             bounds: tuple[float, float] = (0.0, math.inf)):
    def deco(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        METRICS[name] = Metric(name, fn, reduce, lower_is_redundant, description, bounds)
        return fn

    return deco


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"--metric {name!r} is unknown; choose one of: {', '.join(METRICS)}")
    return METRICS[name]


def _norms(gram: torch.Tensor) -> torch.Tensor:
    return gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # (n, L+1)


def cosine(gram: torch.Tensor) -> torch.Tensor:
    n = _norms(gram)
    denom = (n[:, :, None] * n[:, None, :]).clamp_min(torch.finfo(gram.dtype).tiny)
    return (gram / denom).clamp(-1.0, 1.0)  # clamped: acos must never see 1 + eps


def sq_distance(gram: torch.Tensor) -> torch.Tensor:
    d = gram.diagonal(dim1=-2, dim2=-1)  # (n, L+1)
    return (d[:, :, None] + d[:, None, :] - 2 * gram).clamp_min(0)  # ||x^i - x^j||^2


def _angular(gram: torch.Tensor) -> torch.Tensor:
    return torch.arccos(cosine(gram)) / math.pi


register(
    "angular_last_token", "last_token", True,
    "arccos(cos(x^l_T, x^(l+n)_T)) / pi of the last non-pad token (Gromov et al. 2024, eq. 7)", (0.0, 1.0),
)(_angular)

register(
    "angular_all_tokens", "all_tokens", True,
    "arccos(cos) / pi averaged over every non-pad token", (0.0, 1.0),
)(_angular)


@register("block_influence", "all_tokens", True, "ShortGPT Block Influence: 1 - cos, averaged over non-pad tokens",
          (0.0, 2.0))
def _block_influence(gram: torch.Tensor) -> torch.Tensor:
    return 1.0 - cosine(gram)


@register("relative_magnitude", "last_token", True, "||f(x)|| / ||x + f(x)|| of the last token, f(x) = x^(l+n) - x^l")
def _relative_magnitude(gram: torch.Tensor) -> torch.Tensor:
    out_norm = _norms(gram)[:, None, :]  # ||x^j|| for the pair (i, j)
    return sq_distance(gram).sqrt() / out_norm.clamp_min(torch.finfo(gram.dtype).tiny)


@register("euclidean_last_token", "last_token", True, "||x^(l+n)_T - x^l_T||, unnormalized")
def _euclidean(gram: torch.Tensor) -> torch.Tensor:
    return sq_distance(gram).sqrt()


DEFAULT_METRIC = "angular_last_token"


def rank_blocks(scores: "list[float]", lower_is_redundant: bool = True) -> list[int]:
    """Block starts ordered from most to least removable (ties: the shallower first)."""
    return sorted(range(len(scores)), key=lambda l: (scores[l] if lower_is_redundant else -scores[l], l))
