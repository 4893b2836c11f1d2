"""Heal a pruned checkpoint on `transformers.Trainer` with peft LoRA (or full training of the layers
next to the cut), by language-model loss, distillation from the dense source model, or both.

What is ours: the distillation loss, the packing of texts into training blocks, held-out
perplexity as the metric that picks the best checkpoint, and merging the best adapter into a
normal checkpoint. Everything else is the Trainer's: the schedule, gradient accumulation, bf16,
evaluation and saving every --eval_every steps, keeping the best, --resume, progress and logging,
and data parallel / FSDP / DeepSpeed under `torchrun` or `accelerate launch` with no code of ours.

The teacher's logits are computed on the fly, not cached: healing runs are short (well under one
epoch of the training text), a teacher forward costs about half a student training step, and a
cache of top-k logits would cost disk and a pre-pass for no reuse.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compute_block_similarity.errors import UserError
from compute_block_similarity.model import decoder_layers, load_model
from compute_block_similarity.options import ModelOptions

from .checkpoint import copy_companions, kept_source_layers, local_source, read_plan
from .evaluate import tokenize_windows
from .heal_trainer import Blocks, _trainer_class, pack
from .records import HEAL_FILE, HealLedger, HealRecord, HealStart, HealStep

log = logging.getLogger(__name__)


class HealRun(BaseModel):
    """The heal command's run"""

    eval_subset: str = Field("test", description="held-out split for the perplexity that picks the best step")
    eval_size: int = Field(64, ge=1, description="held-out texts")
    output: str | None = Field(None, description="merged healed model (default: MODEL-healed)")
    teacher: str | None = Field(None, description="dense teacher for --loss kd (default: the source model named in "
                                "MODEL/mergekit_config.yml)")
    resume: bool = Field(False, description="continue an interrupted run from OUTPUT.work")


class HealConfig(BaseModel):
    """Healing: the recipe (defaults measured on SmolLM2, see bench/bench_heal.py)"""

    model_config = ConfigDict(extra="forbid")

    loss: Literal["lm", "kd", "lm+kd"] = Field(
        "lm", description="training loss: next-token cross-entropy, forward KL to the dense teacher's logits, or their "
                         "sum (lm recovered the most per token on SmolLM2, see bench/heal_smollm2.txt)")
    kd_temperature: float = Field(1.0, gt=0, description="softmax temperature of the distillation loss (scaled by T^2)")
    kd_top_k: int = Field(0, ge=0, description="distil on the teacher's top-k tokens plus one bucket for the rest "
                                               "(0: the whole vocabulary)")
    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: 2 x rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | None = Field(
        None, description="LoRA target module names, or 'mlp' for the MLP projections (default: every linear layer but "
                          "the LM head, PEFT's all-linear; on SmolLM2 it closes 88.8% of the gap on unseen text against "
                          "86.3% for the MLP alone, bench/heal_smollm2_lm_all.txt)")
    train_layers: str | None = Field(None, description="fully train these layers of the pruned model instead of LoRA: "
                                                       "'auto' (the two layers at each cut) or a comma list")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (with the default LoRA, 2e-3 closes 91.6% of the gap on "
                                              "unseen text on SmolLM2 against 88.8% at 1e-3, bench/heal_smollm2_lr2.txt)")
    schedule: Literal["cosine", "constant", "linear"] = Field("cosine", description="learning-rate schedule after warmup")
    steps: int = Field(100, ge=1, description="optimizer steps")
    warmup: int = Field(10, ge=0, description="warmup steps (at most --steps)")
    batch_size: int = Field(4, ge=1, description="packed sequences per device per step")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    seq_len: int = Field(256, ge=2, description="tokens per packed training sequence")
    eval_every: int = Field(25, ge=1, description="held-out perplexity and a checkpoint every N steps (best kept)")
    max_length: int = Field(256, ge=2, description="held-out evaluation window")
    load_in_4bit: bool = Field(False, description="QLoRA: 4-bit base (CUDA + bitsandbytes)")
    fsdp: bool = Field(False, description="shard the student's weights, gradients and optimizer state over the "
                       "processes of torchrun (FSDP2, one unit per decoder layer); the merged model is gathered whole")
    seed: int = Field(0, description="seed of LoRA init, data order and dropout")

    @model_validator(mode="after")
    def _cross(self) -> "HealConfig":
        if self.train_layers and self.load_in_4bit:
            raise ValueError("--train_layers trains full weights; it cannot be combined with --load_in_4bit")
        return self

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank


# --- data -----------------------------------------------------------------------------------


def teacher_of(checkpoint: str | Path) -> str:
    """The dense source model named in the checkpoint's mergekit_config.yml (written by every merge)."""
    cfg = Path(checkpoint) / "mergekit_config.yml"
    if not cfg.exists():
        raise UserError(f"{checkpoint} has no mergekit_config.yml naming its source model; pass --teacher PATH "
                        "or use --loss lm")
    return str(local_source(kept_source_layers(read_plan(cfg))[0]))


def cut_neighbours(checkpoint: str | Path, num_layers: int) -> list[int]:
    """Layers of the pruned model that sit next to a cut (0-based, pruned numbering)."""
    cfg = Path(checkpoint) / "mergekit_config.yml"
    if not cfg.exists():
        raise UserError(f"--train_layers auto needs {cfg} to find the cut; give the layers, e.g. --train_layers 11,12")
    kept = kept_source_layers(read_plan(cfg))[1]
    out: set[int] = set()
    if kept[0] != 0:
        out.add(0)
    for i in range(len(kept) - 1):
        if kept[i + 1] != kept[i] + 1:
            out.update((i, i + 1))
    return sorted(x for x in out if x < num_layers) or [num_layers - 1]


def lora_targets(model: torch.nn.Module, names: list[str] | None) -> list[str] | str:
    """--target_modules as PEFT takes it: the names given, 'mlp' -> mlp_targets(), none -> 'all-linear'."""
    key = [n.lower() for n in names or ["all-linear"]]
    if key == ["mlp"]:
        return mlp_targets(model)
    return "all-linear" if key == ["all-linear"] else names


def mlp_targets(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers inside MLP blocks (gate/up/down_proj, GPT-2's c_fc/c_proj)."""
    from transformers.pytorch_utils import Conv1D

    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if ".mlp." in name and isinstance(mod, (torch.nn.Linear, Conv1D))}
    if not names:
        raise UserError("found no linear layers inside MLP blocks; pass --target_modules")
    return sorted(names)


def _dtype(cfg: HealConfig) -> str:
    # bf16 weights for LoRA on CUDA; full-weight training keeps float32 masters under bf16 autocast
    return "bfloat16" if torch.cuda.is_available() and not cfg.train_layers else "float32"


def load_student(path: str, cfg: HealConfig, quantize: bool = False) -> Any:
    """The model to train (or the teacher), on the CPU until the Trainer places it; 4-bit for QLoRA."""
    return load_model(path, dtype=_dtype(cfg), device="cpu", load_in_4bit=quantize)[0]


def trainable(model: Any, checkpoint: str, cfg: HealConfig) -> Any:
    """The model with what --train_layers or LoRA makes trainable (a peft model for LoRA)."""
    if cfg.train_layers:
        layers = decoder_layers(model)
        if cfg.train_layers == "auto":
            chosen = cut_neighbours(checkpoint, len(layers))
        else:
            try:
                chosen = sorted({int(x) for x in cfg.train_layers.split(",") if x.strip()})
            except ValueError:
                raise UserError(f"--train_layers {cfg.train_layers!r}: expected 'auto' or layer indices like 11,12") from None
            if not chosen or chosen[0] < 0 or chosen[-1] >= len(layers):
                raise UserError(f"--train_layers {cfg.train_layers}: the pruned model has layers 0..{len(layers) - 1}")
        model.requires_grad_(False)
        for i in chosen:
            layers[i].requires_grad_(True)
        log.info("training layers %s of the pruned model in full", chosen)
        return model
    from peft import LoraConfig, get_peft_model

    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout,
                      target_modules=lora_targets(model, cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


# --- the command ----------------------------------------------------------------------------


def training_arguments(cfg: HealConfig, work: Path, progress: bool) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(work), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type=cfg.schedule,
        warmup_steps=min(cfg.warmup, cfg.steps), weight_decay=0.0, max_grad_norm=1.0, seed=cfg.seed, data_seed=cfg.seed,
        eval_strategy="steps", eval_steps=cfg.eval_every, save_strategy="steps", save_steps=cfg.eval_every,
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="perplexity",
        greater_is_better=False, logging_steps=max(1, min(10, cfg.eval_every)), report_to="none",
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), disable_tqdm=not progress,
        remove_unused_columns=False, dataloader_num_workers=0, ddp_find_unused_parameters=False,
        save_only_model=False, dataloader_pin_memory=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
        **({"fsdp": True, "fsdp_config": dict(FSDP_CONFIG)} if cfg.fsdp else {}),  # the Trainer edits it in place
    )


# the Trainer's FSDP: FSDP2, a unit per decoder layer (the model's _no_split_modules), full state dicts on save
FSDP_CONFIG = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT",
               "reshard_after_forward": True}


def complete_checkpoint(work: Path) -> Path | None:
    """The Trainer's last complete ``checkpoint-N`` in ``work`` (it writes trainer_state.json last, so a folder
    without a readable one was cut short by a kill); incomplete ones are removed, saying which."""
    found = sorted((p for p in work.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True) if work.is_dir() else []
    for p in found:
        try:
            json.loads((p / "trainer_state.json").read_text())
            return p
        except (OSError, ValueError):
            log.warning("%s is incomplete (killed while it was written): removed; resuming from the one before", p)
            shutil.rmtree(p)
    return None


def heal(checkpoint: str, train_texts: Sequence[str], eval_texts: Sequence[str], output: str,
         cfg: HealConfig | None = None, *, run: HealRun | None = None, progress: bool = True, callbacks: Sequence[Any] = (), data: str = "given texts",
         teacher_load: ModelOptions | None = None) -> HealRecord:
    """Heal ``checkpoint``; write the best model (merged, a normal checkpoint) to ``output``.

    Checkpoints and the Trainer's state go to ``output + '.work'``; ``run.resume`` continues from its
    last checkpoint; ``run.teacher`` is the dense teacher of a distillation loss (default: the source
    model the checkpoint's mergekit_config.yml names); ``run.output`` is the CLI's, ``output`` here. ``data`` names the training text for the ledger. ``teacher_load`` with a
    ``device_map`` places the distillation teacher with accelerate (over GPUs, CPU, disk) instead of a
    whole copy on each process's device. Returns the summary also written to ``output/heal.json``,
    with the ledger of what healing spent."""
    from transformers import AutoTokenizer, set_seed

    cfg, run = cfg or HealConfig(), run or HealRun()
    work = Path(output + ".work")
    last = _work_folder(checkpoint, cfg, work, run.resume)
    teacher_path = (run.teacher or teacher_of(checkpoint)) if cfg.loss != "lm" else None
    tok = AutoTokenizer.from_pretrained(checkpoint)
    train = Blocks(pack(tok, train_texts, cfg.seq_len))
    need = cfg.steps * cfg.batch_size * cfg.grad_accum
    if len(train) < need:
        log.warning("%d training blocks of %d tokens for %d x %d x %d per device: the Trainer will repeat them (%.1f "
                    "passes over the text; repeated text overfits: give more text, or fewer --steps)",
                    len(train), cfg.seq_len, cfg.steps, cfg.batch_size, cfg.grad_accum, need / max(len(train), 1))
    wins = tokenize_windows(tok, eval_texts, cfg.max_length, cfg.max_length)
    args = training_arguments(cfg, work, progress)  # sets the seed and, under torchrun, the process group
    set_seed(cfg.seed)
    model = trainable(load_student(checkpoint, cfg, cfg.load_in_4bit), checkpoint, cfg)
    tmodel = _teacher(teacher_path, checkpoint, model, cfg, args, teacher_load) if teacher_path else None
    trainer = _trainer_class()(model=model, args=args, train_dataset=train, eval_dataset=wins, heal_cfg=cfg, teacher=tmodel,
                               eval_windows=wins, callbacks=list(callbacks))
    p0, wall = _train(trainer, model, cfg, work, last)
    history = _history(trainer, p0)
    best = min(history, key=lambda h: h.perplexity)
    per_step = cfg.seq_len * cfg.batch_size * cfg.grad_accum * trainer.args.world_size
    summary = HealRecord(after_cut=p0, after_heal=best.perplexity, best_step=best.step, history=history,
                         teacher=teacher_path, config=cfg.model_dump(), tokens_per_step=per_step,
                         ledger=ledger(trainer, cfg, history, wall, last, per_step, f"{data}: {len(train_texts)} texts "
                                       f"packed into {len(train)} blocks of {cfg.seq_len} tokens", len(eval_texts)))
    merged = trainer.model
    if trainer.is_fsdp_enabled:  # the weights are sharded over the processes: gather them whole (collective)
        full = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if trainer.is_world_process_zero():
            merged = trainable(load_student(checkpoint, cfg), checkpoint, cfg)
            merged.load_state_dict(full)
    if trainer.is_world_process_zero():
        write_output(merged, checkpoint, output, summary, healed=best.step > 0)
    trainer.accelerator.wait_for_everyone()
    log.info("healed: held-out perplexity %.3f before -> %.3f after healing (step %d); model in %s",
             p0, best.perplexity, best.step, output)
    return summary


def _work_folder(checkpoint: str, cfg: HealConfig, work: Path, resume: bool) -> Path | None:
    """Check the inputs against ``work`` (the Trainer's folder); its last complete checkpoint to resume from."""
    if not (Path(checkpoint) / "config.json").exists():
        raise UserError(f"{checkpoint} is not a checkpoint folder (no config.json)")
    if cfg.fsdp and not torch.cuda.is_available():
        raise UserError("--fsdp needs GPUs: accelerate runs FSDP only on accelerators (CUDA, XPU, NPU); on the CPU, "
                        "torchrun heals data parallel without it")
    started = work / START_FILE
    last = complete_checkpoint(work)
    if work.exists() and not resume:
        if last is not None:
            raise UserError(f"{work} holds an earlier healing run (last complete checkpoint {last.name}); pass --resume "
                            "to continue it or delete it")
        log.info("%s holds no complete checkpoint of an earlier run (one was killed before its first): starting over", work)
        shutil.rmtree(work)
    if resume and started.exists() and HealStart.load(started).config != cfg.model_dump():
        raise UserError(f"--resume: {work} was started with other settings; use the same flags or delete it")
    return last


START_FILE = "heal_start.json"  # the perplexity before healing and the recipe, for --resume


def _teacher(path: str, checkpoint: str, model: Any, cfg: HealConfig, args: Any, load: ModelOptions | None) -> Any:
    """The distillation teacher, frozen: placed by accelerate with ``load.device_map``, else whole on the device."""
    if load is not None and load.device_map:
        t = load.load(path, dtype=_dtype(cfg))[0].requires_grad_(False)
    else:
        t = load_student(path, cfg).to(args.device).eval().requires_grad_(False)
    if t.config.get_text_config().vocab_size != model.config.get_text_config().vocab_size:
        raise UserError(f"the teacher {path} has another vocabulary than {checkpoint}; pass --teacher")
    return t


def _train(trainer: Any, model: Any, cfg: HealConfig, work: Path, last: Path | None) -> tuple[float, float]:
    """Train (from ``last`` when resuming); (the held-out perplexity before healing, the wall time)."""
    started = work / START_FILE
    if last is None:
        model.to(trainer.args.device)
        p0 = trainer.evaluate()["eval_perplexity"]
        if trainer.is_world_process_zero():
            work.mkdir(parents=True, exist_ok=True)
            HealStart(after_cut=p0, config=cfg.model_dump()).save(started)
        log.info("held-out perplexity before healing: %.3f", p0)
    else:
        p0 = HealStart.load(started).after_cut
        log.info("resuming healing from %s", last)
    if cfg.fsdp and not trainer.is_fsdp_enabled:
        raise UserError("--fsdp: the Trainer did not enable FSDP; launch with torchrun (or accelerate launch)")
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
    if cfg.fsdp:
        log.info("FSDP: the student was sharded over %d process(es) (%s)", trainer.args.world_size,
                 type(trainer.model_wrapped).__name__)
    return p0, time.perf_counter() - t0


def _history(trainer: Any, p0: float) -> list[HealStep]:
    """Held-out perplexity at the start and at every evaluation."""
    return [HealStep(step=0, perplexity=p0)] + [
        HealStep(step=h["step"], perplexity=h["eval_perplexity"]) for h in trainer.state.log_history
        if "eval_perplexity" in h and h["step"] > 0]


def ledger(trainer: Any, cfg: HealConfig, history: list[HealStep], wall: float, resumed: Path | None, per_step: int,
           data: str, held_out_texts: int) -> HealLedger:
    """What a healing run spent, as anyone comparing recovery methods asks first."""
    args = trainer.args
    steps = trainer.state.global_step
    return HealLedger(
        optimizer_steps=steps, training_tokens=steps * per_step, tokens_per_step=per_step, wall_s=wall,
        resumed_from=str(resumed) if resumed else None, device=str(args.device).split(":")[0], world_size=args.world_size,
        precision="bf16 autocast" if args.bf16 else _dtype(cfg),
        method=f"full training of layers {cfg.train_layers}" if cfg.train_layers else
        f"LoRA rank {cfg.rank}" + (" (4-bit base)" if cfg.load_in_4bit else ""), loss=cfg.loss,
        data=data, held_out_texts=held_out_texts, history=history)


def write_output(model: Any, checkpoint: str, output: str, summary: HealRecord, healed: bool) -> None:
    """The best model as a normal checkpoint in ``output``, replaced in one rename."""

    tmp = Path(output + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if healed:
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        merged.save_pretrained(tmp)
        copy_companions(Path(checkpoint), tmp)
    else:  # no step beat the starting point: the checkpoint as it was
        shutil.copytree(checkpoint, tmp)
    summary.save(tmp / HEAL_FILE)
    if Path(output).exists():
        shutil.rmtree(output)
    os.replace(tmp, output)
