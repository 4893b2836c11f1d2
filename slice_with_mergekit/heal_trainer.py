"""What healing adds to `transformers.Trainer`: texts packed into training blocks, the distillation and
language-model losses, and held-out perplexity as the metric that picks the best step. The recipe
(`HealConfig`) and the run are in `heal.py`."""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from compute_block_similarity.errors import UserError

from .evaluate import perplexity

log = logging.getLogger(__name__)


def pack(tok: Any, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Concatenate tokenized texts (each with the tokenizer's special tokens) into (N, seq_len) blocks."""
    ids: list[int] = []
    eos = tok.eos_token_id
    for t in texts:
        ids.extend(tok(t, add_special_tokens=True)["input_ids"])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(f"the training text has {len(ids)} tokens, fewer than one --seq_len={seq_len} block")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, data: torch.Tensor):
        self.data = data  # (N, seq_len)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


# --- the loss -------------------------------------------------------------------------------


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Mean forward KL(teacher || student) per token, times T^2. Logits (..., V).

    With ``top_k`` the teacher's distribution is its k most likely tokens plus one bucket holding the
    rest of its mass (the student's bucket: its mass outside those k), so the loss is still an exact
    KL between two (k+1)-way distributions, zero iff they agree there."""
    V = student.shape[-1]
    log_s = F.log_softmax(student.float() / temperature, dim=-1)  # (..., V)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if 0 < top_k < V:
        log_t, idx = log_t.topk(top_k, dim=-1)  # (..., k)
        log_s = log_s.gather(-1, idx)
        rest_t = torch.log((-torch.expm1(torch.logsumexp(log_t, -1, keepdim=True))).clamp_min(1e-12))
        rest_s = torch.log((-torch.expm1(torch.logsumexp(log_s, -1, keepdim=True))).clamp_min(1e-12))
        log_t, log_s = torch.cat([log_t, rest_t], -1), torch.cat([log_s, rest_s], -1)  # (..., k+1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (...)
    return kl.mean() * temperature**2


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, S, V), ids (B, S)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


# --- the trainer ----------------------------------------------------------------------------


def _trainer_class() -> type:
    from transformers import Trainer

    class HealTrainer(Trainer):
        """Trainer whose loss may distil from ``teacher`` and whose metric is held-out perplexity."""

        loss_is_scaled_for_ga = False  # our loss is a per-batch mean; the Trainer divides by grad_accum

        def __init__(self, *a: Any, heal_cfg: Any, teacher: Any, eval_windows: list, **kw: Any):
            super().__init__(*a, **kw)
            self.heal_cfg, self.teacher, self.eval_windows = heal_cfg, teacher, eval_windows

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]  # (B, S)
            logits = model(input_ids=ids, use_cache=False).logits  # (B, S, V)
            loss = 0.0
            if self.heal_cfg.loss in ("lm", "lm+kd"):
                loss = loss + lm_loss(logits, ids)
            if self.heal_cfg.loss in ("kd", "lm+kd"):
                with torch.no_grad():
                    t = self.teacher(input_ids=ids, use_cache=False).logits
                loss = loss + kd_loss(logits[:, :-1], t[:, :-1], self.heal_cfg.kd_temperature, self.heal_cfg.kd_top_k)
            return (loss, {"logits": logits}) if return_outputs else loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
            ppl = held_out_perplexity(self.model, self.eval_windows, self.accelerator)
            metrics = {f"{metric_key_prefix}_loss": math.log(ppl), f"{metric_key_prefix}_perplexity": ppl}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return HealTrainer


@torch.no_grad()
def held_out_perplexity(model: Any, wins: list, accelerator: Any = None, batch_size: int = 4) -> float:
    """evaluate.perplexity over ``wins``, each process scoring its share, summed over processes. Under
    FSDP every forward is collective (each process gathers the layers' shards), so every process
    scores all the windows instead."""

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if accelerator is not None and getattr(accelerator.state, "fsdp_plugin", None) is not None:
        rank, world = 0, 1
    part = wins[rank::world]
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    if part:
        r = perplexity(model, None, [], batch_size=batch_size, _windows=part)
        nll, count = r.nll_sum, r.tokens_scored
    model.train(was_training)
    if world > 1:
        t = accelerator.reduce(torch.tensor([nll, count], dtype=torch.float64, device=accelerator.device), "sum")
        nll, count = float(t[0]), int(t[1])
    return math.exp(nll / count)


# --- models ---------------------------------------------------------------------------------
