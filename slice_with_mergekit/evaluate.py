"""Token-weighted perplexity on held-out text, with a fixed window (max_length) and stride.

Each text is tokenized on its own, with BOS/EOS by the tokenizer's own convention. A text longer
than max_length is scored in sliding windows: each window predicts only the tokens the previous
window did not, with up to max_length - stride tokens of context. The first token of a text has
nothing to condition on and is not scored.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from compute_block_similarity.errors import UserError
from compute_block_similarity.model import decoder_layers, input_device, text_config

from .records import EVAL_FILE, HeldOut, ModelEval, load_eval

log = logging.getLogger(__name__)


@dataclass
class Perplexity:
    perplexity: float
    nll_sum: float
    tokens_scored: int
    num_texts: int
    max_length: int
    stride: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens_scored


def windows(ids: Sequence[int], max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """(window token ids, how many leading tokens are context only) scoring every token after the
    first exactly once. Each later window adds up to ``stride`` new tokens (at most max_length - 1,
    so at least one token of context precedes them) and fills the rest with the tokens before."""
    end = min(max_length, len(ids))
    out = [(list(ids[:end]), 1)]
    step = min(stride, max_length - 1)
    while end < len(ids):
        new_end = min(end + step, len(ids))
        start = max(0, new_end - max_length)
        out.append((list(ids[start:new_end]), end - start))
        end = new_end
    return out


def tokenize_windows(tok: Any, texts: Sequence[str], max_length: int, stride: int,
                     text_of: list[int] | None = None) -> list[tuple[list[int], int]]:
    """Every text's scoring windows, in order; ``text_of`` (if given) receives each window's text index."""
    if max_length < 2:
        raise ValueError(f"--max_length must be >= 2 to score anything, got {max_length}")
    if not 0 < stride <= max_length:
        raise ValueError(f"--stride must be in [1, --max_length={max_length}], got {stride}")
    out = []
    for j, t in enumerate(texts):
        ids = tok(t, add_special_tokens=True)["input_ids"]
        if len(ids) >= 2:
            w = windows(ids, max_length, stride)
            out.extend(w)
            if text_of is not None:
                text_of.extend([j] * len(w))
    if not out:
        raise UserError("no held-out text has two or more tokens; give a dataset with real text")
    return out


LOGITS_BYTES = 256 * 2**20  # float32 logits (and their exp) held at once by the chunked NLL (--logits_bytes)


def _unwrapped(model: Any) -> Any:
    """The transformers model under a peft wrapper (healing scores a PeftModel)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_of(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden states (N, d) -> float32 logits (N, V), as the model's own forward computes them
    (the output embedding, then Gemma-2's final soft-capping where the config has it)."""
    inner = _unwrapped(model)
    head = inner.get_output_embeddings()
    cap = getattr(text_config(inner), "final_logit_softcapping", None)

    def logits(h: torch.Tensor) -> torch.Tensor:
        z = head(h).float()
        return torch.tanh(z / cap) * cap if cap else z

    return logits


def backbone_of(model: Any) -> Any:
    """The decoder without the LM head (its output is the final-normed hidden state)."""
    return _unwrapped(model).get_decoder()


def vocab_of(model: Any) -> int:
    return int(_unwrapped(model).get_output_embeddings().weight.shape[0])


def head_share(model: Any) -> float:
    """The share of next-token positions at which the LM head costs what the decoder costs per token
    (1 when the head is the cheaper: small vocabularies); matmul FLOPs ~ parameters."""
    head = vocab_of(model) * text_config(model).hidden_size
    body = sum(p.numel() for p in decoder_layers(model).parameters())
    return min(1.0, body / head)


def sample_scored(wins: list[tuple[list[int], int]], share: float) -> list[tuple]:
    """Each window scored at ``share`` of its scored positions, evenly spaced (its last always in):
    (ids, context, positions) triples; windows unchanged when share >= 1."""
    if share >= 1:
        return wins
    out = []
    for w, ctx in wins:
        n = len(w) - ctx
        k = max(1, math.ceil(share * n))
        picks = sorted({ctx + (n - 1) - int(i * n / k) for i in range(k)})
        out.append((w, ctx, picks))
    return out


def chunk_rows(vocab: int, logits_bytes: int) -> int:
    """Positions per LM-head chunk: float32 logits and the exp inside logsumexp, 8 bytes per entry."""
    return max(1, logits_bytes // (8 * vocab))


def window_nll(model: Any, ids: torch.Tensor, mask: torch.Tensor, score: torch.Tensor,
               logits_bytes: int = LOGITS_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 NLL sum, tokens) per row of the scored positions: position t predicts token t + 1.
    The LM head runs on the scored positions only, in chunks: never the (B, S, V) logits at once."""
    h = backbone_of(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]  # (B, S-1, d)
    sel = score[:, 1:].to(h.device)  # (B, S-1)
    rows = sel.nonzero()[:, 0]  # (N,)
    hs, target = h[sel], ids[:, 1:].to(h.device)[sel]  # (N, d), (N,)
    head, nll = lm_head_of(model), []
    step = chunk_rows(vocab_of(model), logits_bytes)
    for a in range(0, hs.shape[0], step):
        z = head(hs[a : a + step])  # (c, V) float32
        nll.append(torch.logsumexp(z, -1) - z.gather(-1, target[a : a + step, None])[:, 0])  # (c,)
    flat = torch.cat(nll).double().cpu() if nll else torch.zeros(0, dtype=torch.float64)
    B = ids.shape[0]
    sums = torch.zeros(B, dtype=torch.float64).index_add_(0, rows.cpu(), flat)
    counts = torch.zeros(B, dtype=torch.long).index_add_(0, rows.cpu(), torch.ones_like(rows.cpu()))
    return sums, counts


@dataclass(frozen=True)
class WindowSettings:
    """How texts become scored windows: ``max_length`` tokens each, the next one starting ``stride`` tokens
    on; a window's tokens before its stride were the previous window's and are context, not scored."""

    max_length: int = 512
    stride: int = 256

    def windows(self, tok: Any, texts: Sequence[str], text_of: list[int] | None = None) -> list:
        """``tokenize_windows`` of ``texts``; ``text_of``, if given, receives each window's text index."""
        return tokenize_windows(tok, texts, self.max_length, self.stride, text_of)


@torch.inference_mode()
def perplexity(model: Any, tok: Any, texts: Sequence[str], windowing: WindowSettings = WindowSettings(), *, batch_size: int = 4,
               progress: bool = False, _windows: list | None = None, per_window: list | None = None,
               logits_bytes: int = LOGITS_BYTES) -> Perplexity:
    """Token-weighted perplexity of ``model`` on ``texts``, cut into windows by ``windowing`` (or on
    ``_windows``, already cut). ``per_window``, if given, receives each window's (nll sum, tokens scored)
    in window order, for paired comparisons of two models. The LM head runs on the scored positions
    only, ``logits_bytes`` of float32 logits at a time."""
    wins = _windows if _windows is not None else windowing.windows(tok, texts)
    dev = input_device(model)
    order = sorted(range(len(wins)), key=lambda i: -len(wins[i][0]))
    nll, count = 0.0, 0
    rows_out: dict[int, tuple[float, int]] = {}
    for k in tqdm(range(0, len(order), batch_size), desc="perplexity", disable=not progress):
        rows = [wins[i] for i in order[k : k + batch_size]]
        width = max(len(r[0]) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        score = torch.zeros_like(ids, dtype=torch.bool)  # positions whose token is predicted
        for b, (w, ctx, *picks) in enumerate(rows):  # a window may name the positions it scores
            ids[b, : len(w)] = torch.tensor(w)
            mask[b, : len(w)] = 1
            if picks:
                score[b, picks[0]] = True
            else:
                score[b, ctx : len(w)] = True
        sums, counts = window_nll(model, ids.to(dev), mask.to(dev), score, logits_bytes)  # (B,), (B,)
        nll += float(sums.sum())
        count += int(counts.sum())
        if per_window is not None:
            for b, i in enumerate(order[k : k + batch_size]):
                rows_out[i] = (float(sums[b]), int(counts[b]))
    if not math.isfinite(nll):
        raise UserError("the model produced NaN or inf log-probabilities; try float32")
    if per_window is not None:
        per_window[:] = [rows_out[i] for i in range(len(wins))]
    return Perplexity(math.exp(nll / count), nll, count, len(texts), windowing.max_length, windowing.stride)


def write_eval(out_dir: str | Path, key: str, result: Perplexity, dataset: HeldOut, **extra: Any) -> Path:
    """Put ``result`` as entry ``key`` of out_dir/eval.json (atomic; other entries kept), where the model
    card picks it up. ``extra``: more fields of a ``ModelEval`` (speed, lm_eval)."""
    path = Path(out_dir) / EVAL_FILE
    ev = load_eval(path)
    if ev.dataset is not None and ev.dataset != dataset:
        log.warning("%s held results on %s (split %s); entry %s is on %s (split %s)", path, ev.dataset.name,
                    ev.dataset.split, key, dataset.name, dataset.split)
    ev.dataset = dataset
    ev.models[key] = ModelEval(**asdict(result), **extra)
    return ev.save(path)


class EvalOutput(BaseModel):
    """Where the result goes"""

    output: str | None = Field(None, description="folder whose eval.json gets the result (default: MODEL if local)",
                               json_schema_extra={"aliases": ["--into"]})
    name: str = Field("perplexity", description="key of this result in eval.json (e.g. source, pruned)")


class SpeedOptions(BaseModel):
    """Speed (--speed)"""

    speed: bool = Field(False, description="also measure prefill and decode tokens/s and memory (medians of repeated "
                        "runs; compare a dense and a pruned model on the same device)")
    speed_prompt_tokens: int = Field(128, ge=1, description="prompt length for --speed")
    speed_new_tokens: int = Field(32, ge=1, description="greedy tokens decoded for --speed")
    speed_repeats: int = Field(5, ge=1, description="timed runs for --speed (after one warm-up)")


@dataclass
class Speed:
    """Inference speed of one model on fixed prompts: medians over ``repeats`` timed runs."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    weights_mib: float  # parameters and buffers
    kv_cache_mib: float  # the cache after prefill + decode
    peak_mib: float | None  # CUDA max allocated; None on the CPU
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    repeats: int
    device: str
    dtype: str


def _cache_of(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


def _cache_bytes(cache: Any) -> int:
    """Bytes of every tensor reachable from a KV cache object, each counted once, whatever its class."""
    seen, total, stack = set(), 0, [cache]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif hasattr(x, "__dict__") and not isinstance(x, torch.nn.Module):
            stack.extend(vars(x).values())
    return total


@torch.inference_mode()
def measure_speed(model: Any, tok: Any, texts: Sequence[str], *, batch_size: int = 1, prompt_tokens: int = 128,
                  new_tokens: int = 32, repeats: int = 5, warmup: int = 1) -> Speed:
    """Prefill tokens/s (one forward over the prompts) and decode tokens/s (greedy, one token at a time
    with the KV cache), as medians of ``repeats`` runs after ``warmup``; same prompts for any model."""
    import statistics
    import time

    if min(batch_size, prompt_tokens, new_tokens, repeats) < 1:
        raise ValueError("--speed needs batch_size, prompt_tokens, new_tokens and repeats >= 1")
    rows = []
    for t in texts:
        ids = tok(t, add_special_tokens=True)["input_ids"]
        if len(ids) >= prompt_tokens:
            rows.append(ids[:prompt_tokens])
        if len(rows) == batch_size:
            break
    if len(rows) < batch_size:
        raise UserError(f"--speed needs {batch_size} text(s) of at least {prompt_tokens} tokens; lower "
                        "--speed_prompt_tokens or give longer texts")
    dev = input_device(model)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ids = torch.tensor(rows, device=dev)
    # transformers >= 5.20 names the KV cache `cache`; earlier releases `past_key_values`
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prefill, decode, cache_bytes = [], [], 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for r in range(warmup + repeats):
        mask = torch.ones_like(ids)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        sync()
        t1 = time.perf_counter()
        past, nxt = _cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens):
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{cache_kw: past})
            past, nxt = _cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t2 = time.perf_counter()
        if r >= warmup:
            prefill.append(ids.numel() / (t1 - t0))
            decode.append(ids.shape[0] * new_tokens / (t2 - t1))
        cache_bytes = _cache_bytes(past)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    return Speed(statistics.median(prefill), statistics.median(decode), weights / 2**20, cache_bytes / 2**20,
                 torch.cuda.max_memory_allocated() / 2**20 if cuda else None, batch_size, prompt_tokens, new_tokens,
                 repeats, str(dev), str(next(model.parameters()).dtype).replace("torch.", ""))
