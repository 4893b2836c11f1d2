"""Heal a pruned checkpoint with LoRA (peft), following Gromov et al.: adapters on the MLP
projections, cosine schedule with warmup, then the adapters are merged into a normal checkpoint.

Long-running by design, so it has a progress bar, held-out perplexity every --eval_every steps
(the best adapter is kept: extra steps can make a model worse), and --resume from the last saved
state (adapter, optimizer, scheduler, step) after an interruption. QLoRA (4-bit base) on CUDA.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from compute_block_similarity.errors import UserError
from compute_block_similarity.scan import input_device

from .evaluate import perplexity, tokenize_windows

log = logging.getLogger(__name__)


@dataclass
class HealConfig:
    rank: int = 8                 # LoRA rank (Gromov et al. use 2-64 by model)
    alpha: float | None = None    # LoRA alpha; default: = rank, as in the paper
    dropout: float = 0.05
    lr: float = 3e-4              # peak learning rate
    steps: int = 200
    warmup: int = 20
    batch_size: int = 4
    seq_len: int = 256            # tokens per training sequence (texts are packed)
    eval_every: int = 50
    save_every: int = 50
    eval_max_length: int = 256
    target_modules: list[str] | None = None  # default: every linear layer inside the MLPs
    load_in_4bit: bool = False
    seed: int = 0

    def check(self) -> None:
        for k in ("rank", "steps", "batch_size", "seq_len", "eval_every", "save_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"--{k} must be >= 1, got {getattr(self, k)}")
        if not 0 <= self.warmup <= self.steps:
            raise ValueError(f"--warmup must be in [0, --steps={self.steps}], got {self.warmup}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")


@dataclass
class HealState:
    step: int = 0
    best_ppl: float = math.inf
    best_step: int = 0
    history: list[dict] = field(default_factory=list)


def mlp_targets(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers inside MLP blocks (gate/up/down_proj, GPT-2's c_fc/c_proj)."""
    from transformers.pytorch_utils import Conv1D

    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if ".mlp." in name and isinstance(mod, (torch.nn.Linear, Conv1D))}
    if not names:
        raise UserError("found no linear layers inside MLP blocks; pass --target_modules")
    return sorted(names)


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


def load_for_healing(path: str, cfg: HealConfig) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"dtype": torch.bfloat16 if torch.cuda.is_available() else torch.float32}
    if cfg.load_in_4bit:
        import importlib.util

        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--load_in_4bit (QLoRA) needs CUDA and `pip install bitsandbytes`; drop the flag for LoRA")
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
        kw["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if "device_map" not in kw and torch.cuda.is_available():
        model.to("cuda")
    return model, AutoTokenizer.from_pretrained(path)


def heal(checkpoint: str, train_texts: Sequence[str], eval_texts: Sequence[str], output: str,
         cfg: HealConfig | None = None, resume: bool = False, progress: bool = True) -> dict:
    """LoRA-heal ``checkpoint``; write the merged best model to ``output``. Returns the perplexities."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import get_cosine_schedule_with_warmup

    cfg = cfg or HealConfig()
    cfg.check()
    if not (Path(checkpoint) / "config.json").exists():
        raise UserError(f"{checkpoint} is not a checkpoint folder (no config.json)")
    work = Path(output + ".work")
    if work.exists() and not resume:
        raise UserError(f"{work} holds an earlier healing run; pass --resume to continue it or delete it")
    torch.manual_seed(cfg.seed)
    model, tok = load_for_healing(checkpoint, cfg)
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                      target_modules=cfg.target_modules or mlp_targets(model), task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    data = pack(tok, train_texts, cfg.seq_len)
    eval_wins = tokenize_windows(tok, eval_texts, cfg.eval_max_length, cfg.eval_max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup, cfg.steps)
    state = HealState()
    dev = input_device(model)

    def evaluate() -> float:
        model.eval()
        p = perplexity(model, tok, eval_texts, max_length=cfg.eval_max_length, stride=cfg.eval_max_length,
                       _windows=eval_wins).perplexity
        model.train()
        return p

    def save(name: str, extra: bool) -> None:
        d = work / name
        tmp = work / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(get_peft_model_state_dict(model), tmp / "adapter.pt")
        if extra:
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "rng": torch.get_rng_state(),
                        "state": asdict(state), "config": asdict(cfg)}, tmp / "trainer.pt")
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)

    if resume and (work / "last" / "trainer.pt").exists():
        t = torch.load(work / "last" / "trainer.pt", weights_only=False)
        if t["config"] != asdict(cfg):
            raise UserError(f"--resume: {work} was started with other settings; use the same flags or delete it")
        set_peft_model_state_dict(model, torch.load(work / "last" / "adapter.pt", weights_only=True))
        opt.load_state_dict(t["opt"])
        sched.load_state_dict(t["sched"])
        torch.set_rng_state(t["rng"])
        state = HealState(**t["state"])
        log.info("resuming healing at step %d (best perplexity %.3f at step %d)", state.step, state.best_ppl,
                 state.best_step)
    else:
        work.mkdir(parents=True, exist_ok=True)
        p0 = evaluate()
        state.history.append({"step": 0, "perplexity": p0})
        state.best_ppl, state.best_step = p0, 0
        save("best", False)
        save("last", True)
        log.info("held-out perplexity after the cut: %.3f", p0)

    model.train()
    bar = tqdm(total=cfg.steps, initial=state.step, desc="heal", disable=not progress)
    while state.step < cfg.steps:
        idx = torch.arange(state.step * cfg.batch_size, (state.step + 1) * cfg.batch_size) % len(data)
        batch = data[idx].to(dev)  # (batch, seq_len)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", best_ppl=f"{state.best_ppl:.2f}")
        if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            p = evaluate()
            state.history.append({"step": state.step, "perplexity": p, "loss": loss.item()})
            if p < state.best_ppl:
                state.best_ppl, state.best_step = p, state.step
                save("best", False)
            log.info("step %d: held-out perplexity %.3f (best %.3f at step %d)", state.step, p, state.best_ppl,
                     state.best_step)
        if state.step % cfg.save_every == 0 or state.step == cfg.steps:
            save("last", True)
    bar.close()

    set_peft_model_state_dict(model, torch.load(work / "best" / "adapter.pt", weights_only=True))
    merged = model.merge_and_unload()
    tmp_out = Path(output + ".partial")
    shutil.rmtree(tmp_out, ignore_errors=True)
    merged.save_pretrained(tmp_out)
    from .materialize import copy_companions

    copy_companions(Path(checkpoint), tmp_out)
    if Path(output).exists():
        shutil.rmtree(output)
    os.replace(tmp_out, output)
    after_cut = state.history[0]["perplexity"]
    summary = {"after_cut": after_cut, "after_heal": state.best_ppl, "best_step": state.best_step,
               "history": state.history, "config": asdict(cfg)}
    from compute_block_similarity.atomic import write_text

    write_text(Path(output) / "heal.json", json.dumps(summary, indent=1) + "\n")
    log.info("healed: held-out perplexity %.3f after the cut -> %.3f after healing (step %d); merged model in %s",
             after_cut, state.best_ppl, state.best_step, output)
    return summary
