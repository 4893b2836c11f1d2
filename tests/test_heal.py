"""Healing on transformers.Trainer: the distillation loss against a plain reference, the best
checkpoint kept, resume equal to an uninterrupted run, full training of the layers at the cut, and
a 2-process torchrun (gloo) run that leaves a checkpoint that loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, load

from slice_with_mergekit.evaluate import WindowSettings, perplexity

CFG = dict(steps=6, eval_every=2, seq_len=32, lr=3e-3, warmup=1, batch_size=2, max_length=64, loss="lm")
TRAIN, HELD = TEXTS * 10, TEXTS


def kl_reference(s: torch.Tensor, t: torch.Tensor, T: float, k: int) -> torch.Tensor:
    """Token by token, with python loops: KL over the teacher's top-k tokens plus a 'rest' bucket."""
    total = 0.0
    rows_s, rows_t = s.reshape(-1, s.shape[-1]).double(), t.reshape(-1, t.shape[-1]).double()
    for a, b in zip(rows_s, rows_t):
        ps, pt = torch.softmax(a / T, -1), torch.softmax(b / T, -1)
        top = torch.argsort(pt, descending=True)[:k] if k else torch.arange(len(pt))
        qs, qt = list(ps[top]), list(pt[top])
        if k:
            qs.append(1 - sum(qs))
            qt.append(1 - sum(qt))
        total += sum(float(x) * (float(torch.log(x)) - float(torch.log(y))) for x, y in zip(qt, qs) if x > 0)
    return torch.tensor(total / len(rows_s) * T * T)


@pytest.mark.parametrize("T,k", [(1.0, 0), (2.0, 0), (1.0, 5), (0.5, 3)])
def test_kd_loss_matches_reference(T, k):
    from slice_with_mergekit.heal_trainer import kd_loss

    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 11) * 2, torch.randn(2, 3, 11) * 2
    assert float(kd_loss(s, t, T, k)) == pytest.approx(float(kl_reference(s, t, T, k)), rel=1e-4, abs=1e-6)
    assert float(kd_loss(t, t, T, k)) == pytest.approx(0.0, abs=1e-6)  # student = teacher


def test_kd_heal_of_the_teacher_itself_has_zero_loss_and_gradient(tiny_llama, tmp_path):
    """Student = teacher: the KD loss and its gradient are zero at every step (Adam would still move on noise)."""
    from transformers import TrainerCallback

    from slice_with_mergekit.heal import HealConfig, HealRun, heal

    logs: list[dict] = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs_=None, **kw):
            logs.append(kw.get("logs") or {})

    cfg = HealConfig(**{**CFG, "loss": "kd", "steps": 2, "eval_every": 1, "lr": 1e-12})
    s = heal(str(tiny_llama), TRAIN, HELD, str(tmp_path / "h"), cfg, run=HealRun(teacher=str(tiny_llama)), progress=False, callbacks=[Keep()])
    train_logs = [g for g in logs if "loss" in g and "grad_norm" in g]
    assert len(train_logs) == 2
    assert all(abs(g["loss"]) < 1e-6 and g["grad_norm"] < 1e-6 for g in train_logs), train_logs
    assert [h.perplexity for h in s.history] == pytest.approx([s.after_cut] * 3, rel=1e-6)


def _lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def test_heal_improves_keeps_best_and_resume_equals_uninterrupted(tiny_llama, tmp_path):
    from transformers import TrainerCallback

    from compute_block_similarity import UserError
    from slice_with_mergekit.heal import HealConfig, HealRun, heal

    full = heal(str(tiny_llama), TRAIN, HELD, str(tmp_path / "a"), HealConfig(**CFG), progress=False)
    assert [h.step for h in full.history] == [0, 2, 4, 6]
    assert full.after_heal < full.after_cut
    assert full.after_heal == min(h.perplexity for h in full.history)
    healed, tok = load(tmp_path / "a")
    assert perplexity(healed, tok, HELD, WindowSettings(max_length=64, stride=64)).perplexity == pytest.approx(full.after_heal, rel=1e-4)
    assert not any("lora" in k for k in healed.state_dict())  # adapters merged into a normal checkpoint

    class Die(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:
                raise KeyboardInterrupt("interrupted")

    with pytest.raises(KeyboardInterrupt):
        heal(str(tiny_llama), TRAIN, HELD, str(tmp_path / "b"), HealConfig(**CFG), progress=False, callbacks=[Die()])
    assert not (tmp_path / "b").exists()  # an interrupted run leaves no model
    with pytest.raises(UserError, match="--resume"):
        heal(str(tiny_llama), TRAIN, HELD, str(tmp_path / "b"), HealConfig(**CFG), progress=False)
    with pytest.raises(UserError, match="other settings"):
        heal(str(tiny_llama), TRAIN, HELD, str(tmp_path / "b"), HealConfig(**{**CFG, "lr": 1e-3}), run=HealRun(resume=True), progress=False)
    start = tmp_path / "b.work" / "heal_start.json"
    good = start.read_text()
    start.write_text('{"after_cut": "x"}')  # tampered: one line naming the file and the fix, the run kept
    with pytest.raises(UserError, match="heal_start.json.*delete the run's .work folder") as e:
        heal(str(tiny_llama), TRAIN, HELD, str(tmp_path / "b"), HealConfig(**CFG), run=HealRun(resume=True), progress=False)
    assert "\n" not in str(e.value)
    start.write_text(good)
    resumed = heal(str(tiny_llama), TRAIN, HELD, str(tmp_path / "b"), HealConfig(**CFG), run=HealRun(resume=True), progress=False)
    assert [h.step for h in resumed.history] == [0, 2, 4, 6]
    for a, b in zip(full.history, resumed.history):
        assert b.perplexity == pytest.approx(a.perplexity, rel=1e-5)
    la, lb = _lora(tmp_path / "a.work" / "checkpoint-6"), _lora(tmp_path / "b.work" / "checkpoint-6")
    for k in la:
        torch.testing.assert_close(lb[k], la[k], rtol=1e-5, atol=1e-7)


def test_the_best_checkpoint_is_the_one_kept(tiny_llama, tmp_path):
    """Training that helps, then is wrecked from step 3 on: the output is the best step's model."""
    from transformers import TrainerCallback

    from slice_with_mergekit.heal import HealConfig, heal

    class Wreck(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step >= 3:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if "lora_B" in n:
                            p.add_(torch.randn_like(p))

    cfg = HealConfig(**{**CFG, "steps": 5, "eval_every": 1})
    s = heal(str(tiny_llama), TRAIN, HELD, str(tmp_path / "h"), cfg, progress=False, callbacks=[Wreck()])
    ppl = [h.perplexity for h in s.history]
    assert s.best_step in (1, 2) and min(ppl) < ppl[-1] and min(ppl) < ppl[0]
    healed, tok = load(tmp_path / "h")
    assert perplexity(healed, tok, HELD, WindowSettings(max_length=64, stride=64)).perplexity == pytest.approx(min(ppl), rel=1e-4)


@pytest.fixture(scope="module")
def cut_llama(tiny_llama, tmp_path_factory) -> Path:
    """tiny Llama (6 layers) with [2,4) removed, materialized by MergeKit (so it names its source)."""
    from slice_with_mergekit.materialize import materialize
    from slice_with_mergekit.plan import build_config, write_config

    d = tmp_path_factory.mktemp("cut")
    write_config(build_config(str(tiny_llama), 6, [2, 3], None), d / "sliced.yml")
    return materialize(str(d / "sliced.yml"), str(d / "model"))


def test_train_layers_auto_trains_only_the_layers_at_the_cut(cut_llama, tmp_path):
    from safetensors.torch import load_file

    from slice_with_mergekit.heal import HealConfig, cut_neighbours, heal

    assert cut_neighbours(cut_llama, 4) == [1, 2]  # kept 0,1 | 4,5: output layers 1 and 2 meet at the cut
    s = heal(str(cut_llama), TRAIN, HELD, str(tmp_path / "h"), HealConfig(**{**CFG, "train_layers": "auto"}),
             progress=False)
    assert s.after_heal < s.after_cut
    before, after = load_file(cut_llama / "model.safetensors"), load_file(tmp_path / "h" / "model.safetensors")
    changed = {k.split(".")[2] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1", "2"}, changed


def test_kd_teacher_defaults_to_the_source_in_mergekit_config(cut_llama, tiny_llama, tmp_path):
    from slice_with_mergekit.heal import HealConfig, heal

    s = heal(str(cut_llama), TRAIN, HELD, str(tmp_path / "h"), HealConfig(**{**CFG, "loss": "lm+kd", "kd_top_k": 8}),
             progress=False)
    assert Path(s.teacher) == Path(tiny_llama)
    assert s.after_heal < s.after_cut


def test_heal_cli_flags_come_from_the_config(cut_llama, tmp_path, capsys):
    from slice_with_mergekit.cli import build_parser, main
    from slice_with_mergekit.heal import HealConfig

    args = build_parser().parse_args(["heal", "x"])
    for name, f in HealConfig.model_fields.items():
        assert getattr(args, name) == f.default, name
    assert main(["heal", str(cut_llama), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_torchrun_two_processes_heal_to_a_checkpoint_that_loads(cut_llama, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TRAIN))
    out = tmp_path / "healed"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "slice_with_mergekit", "heal", str(cut_llama), "--output", str(out), "--dataset", str(data),
           "--eval_subset", "train", "--eval_size", "7", "--steps", "4", "--eval_every", "2", "--seq_len", "32",
           "--batch_size", "2", "--lr", "3e-3", "--warmup", "0", "--max_length", "64", "--loss", "lm+kd"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "heal.json").read_text())
    assert s["tokens_per_step"] == 2 * 2 * 32  # two processes, each a batch of 2 x 32 tokens
    g = s["ledger"]
    assert g["world_size"] == 2 and g["optimizer_steps"] == 4 and g["training_tokens"] == 4 * 2 * 2 * 32
    assert g["loss"] == "lm+kd" and str(data) in g["data"] and g["held_out_texts"] == 7
    healed, tok = load(out)
    assert perplexity(healed, tok, TEXTS, WindowSettings(max_length=64, stride=64)).perplexity == pytest.approx(s["after_heal"], rel=1e-4)


def test_prune_heal_rerun_with_another_recipe_starts_over(tiny_models, tmp_path, caplog):
    import logging

    from slice_with_mergekit.cli import main as slice_main

    base = ["prune", str(tiny_models["qwen3"]), "--layers_to_skip", "2", "--dataset_size", "24", "--eval_size", "6",
            "--max_length", "64", "--heal", "--heal_steps", "2", "--heal_seq_len", "32", "--heal_loss", "lm",
            "--work_dir", str(tmp_path / "w")]
    assert slice_main(base) == 0
    first = json.loads((tmp_path / "w" / "n2" / "healed" / "heal.json").read_text())
    assert first["config"]["lr"] == 2e-3 and first["config"]["max_length"] == 64
    with caplog.at_level(logging.INFO):
        assert slice_main([*base, "--heal_lr", "3e-3"]) == 0
    second = json.loads((tmp_path / "w" / "n2" / "healed" / "heal.json").read_text())
    assert second["config"]["lr"] == 3e-3 and second["after_cut"] == pytest.approx(first["after_cut"])
    assert "stage materialize-n2: inputs unchanged, skipped" in caplog.text


def test_kd_with_the_teacher_offloaded_heals_as_with_it_whole(cut_llama, tiny_llama, tmp_path, caplog):
    """--teacher_device_map: accelerate places the teacher (here: CPU + disk) and the run is unchanged."""
    import logging

    from safetensors.torch import load_file

    from compute_block_similarity.options import ModelOptions
    from slice_with_mergekit.heal import HealConfig, heal

    cfg = HealConfig(loss="kd", steps=3, eval_every=3, seq_len=32, batch_size=2, warmup=0, lr=3e-3, max_length=64)
    heal(str(cut_llama), TRAIN, HELD, str(tmp_path / "whole"), cfg, progress=False)
    place = ModelOptions(device_map="auto", max_memory="cpu=60KB", offload_folder=str(tmp_path / "offload"))
    with caplog.at_level(logging.INFO):
        heal(str(cut_llama), TRAIN, HELD, str(tmp_path / "placed"), cfg, progress=False, teacher_load=place)
    assert "module(s) on disk" in caplog.text
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "placed"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], load_file(cut_llama / "model.safetensors")[k]) for k in a)  # it did train


def test_fsdp_config_and_its_limits_on_the_cpu(cut_llama, tmp_path, capsys):
    from slice_with_mergekit.cli import main
    from slice_with_mergekit.heal import FSDP_CONFIG, HealConfig, training_arguments

    args = training_arguments(HealConfig(fsdp=True), tmp_path / "w", progress=False)
    assert args.fsdp and args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["state_dict_type"] == FSDP_CONFIG["state_dict_type"] == "FULL_STATE_DICT"
    assert args.fsdp_plugin_args["auto_wrap_policy"] is not None
    if not torch.cuda.is_available():  # accelerate runs FSDP only on accelerators: one line, nothing written
        assert main(["heal", str(cut_llama), "--fsdp", "--output", str(tmp_path / "h")]) == 2
        err = capsys.readouterr().err
        assert "--fsdp needs GPUs" in err and not (tmp_path / "h").exists()


def test_the_shipped_fsdp_config_is_the_trainers_fsdp():
    """configs/fsdp.yaml (for accelerate launch) says what HealConfig(fsdp=True) gives the Trainer."""
    from accelerate.commands.config.config_args import load_config_from_file

    from slice_with_mergekit.heal import FSDP_CONFIG

    c = load_config_from_file(str(Path(__file__).parents[1] / "configs" / "fsdp.yaml"))
    assert c.distributed_type == "FSDP"
    assert {k.removeprefix("fsdp_"): v for k, v in c.fsdp_config.items() if k.removeprefix("fsdp_") in FSDP_CONFIG} == \
        {k: v for k, v in FSDP_CONFIG.items()}


def test_lora_goes_on_every_linear_layer_but_the_head_by_default_or_the_mlp_or_the_names_given(tiny_llama):
    from peft import LoraConfig, get_peft_model

    from slice_with_mergekit.heal import lora_targets

    def adapted(names):  # leaf names of the modules that got an adapter
        model, _ = load(tiny_llama)
        peft = get_peft_model(model, LoraConfig(r=2, target_modules=lora_targets(model, names), task_type="CAUSAL_LM"))
        return {n.rsplit(".", 1)[-1] for n, m in peft.named_modules() if hasattr(m, "lora_A")}

    mlp = {"gate_proj", "up_proj", "down_proj"}
    assert adapted(None) == {"q_proj", "k_proj", "v_proj", "o_proj"} | mlp  # not lm_head
    assert adapted(["mlp"]) == mlp and adapted(["q_proj", "v_proj"]) == {"q_proj", "v_proj"}


def test_too_little_text_warns_how_often_it_is_repeated(tiny_llama, tmp_path, caplog):
    from transformers import AutoTokenizer

    from slice_with_mergekit.heal import HealConfig, heal
    from slice_with_mergekit.heal_trainer import pack

    blocks = len(pack(AutoTokenizer.from_pretrained(tiny_llama), TEXTS[:1], 32))
    cfg = HealConfig(**{**CFG, "steps": 2 * blocks, "eval_every": 2 * blocks})  # 2 blocks a step: 4 passes
    with caplog.at_level("WARNING"):
        heal(str(tiny_llama), TEXTS[:1], HELD, str(tmp_path / "h"), cfg, progress=False)
    assert f"{blocks} training blocks of 32 tokens" in caplog.text and "(4.0 passes over the text" in caplog.text
