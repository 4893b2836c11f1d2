"""Failures a user can cause: one line, a non-zero exit, no traceback, nothing good destroyed,
and no foreign state merged."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEXTS, build_tiny, load, write_jsonl

from compute_block_similarity import ScanSettings, scan_model
from compute_block_similarity.cli import main as scan_main
from compute_block_similarity.errors import UserError
from compute_block_similarity.sums import Accumulator, Checkpoint
from slice_with_mergekit.cli import main as slice_main

MANY = [f"{t} ({i})" * (1 + i % 4) for i, t in enumerate(TEXTS * 6)]


def one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resume_refuses_the_state_of_another_model_of_the_same_shape(tiny_llama, tmp_path):
    """Same config, same tokenizer, other weights: the saved sums must not be merged in."""
    other = build_tiny("llama", tmp_path / "other", seed=1)
    ck = Checkpoint(str(tmp_path / "state.pt"), every=1)
    m_other, tok = load(other)
    scan_model(m_other, tok, MANY, ScanSettings(batch_size=4, progress=False), checkpoint=ck)
    assert torch.load(ck.path, weights_only=True)["done"] > 0
    model, tok = load(tiny_llama)
    with pytest.raises(UserError, match="belongs to a scan with other inputs"):
        scan_model(model, tok, MANY, ScanSettings(batch_size=4, progress=False), checkpoint=Checkpoint(ck.path, 1, resume=True))
    resumed = scan_model(m_other, tok, MANY, ScanSettings(batch_size=4, progress=False), checkpoint=Checkpoint(ck.path, 1, resume=True))
    assert resumed.num_samples == len(MANY)  # its own model resumes


def test_ctrl_c_saves_progress_and_says_how_to_resume(tiny_llama, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in MANY])
    common = ["--model_path", str(tiny_llama), "--dataset", str(data), "--batch_size", "4", "--layers_to_skip", "2",
              "--no_progress"]
    args = common + ["--output_dir", str(tmp_path / "scan"), "--checkpoint_every", "100"]
    real_add, calls = Accumulator.add, {"n": 0}

    def interrupted_add(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_add(self, *a, **k)

    monkeypatch.setattr(Accumulator, "add", interrupted_add)
    assert scan_main(args) == 130
    line = one_error_line(capsys.readouterr().err)
    assert "after 3 of 11 batches" in line and "--resume" in line and "scan_state.pt" in line
    monkeypatch.setattr(Accumulator, "add", real_add)
    assert scan_main(args + ["--resume"]) == 0
    resumed = (tmp_path / "scan" / "layer_distances.csv").read_text()
    assert scan_main(common + ["--output_dir", str(tmp_path / "clean")]) == 0
    assert resumed == (tmp_path / "clean" / "layer_distances.csv").read_text()


@pytest.fixture
def built(tiny_llama, tmp_path):
    from slice_with_mergekit.plan import build_config, write_config

    plan = tmp_path / "sliced.yml"
    write_config(build_config(str(tiny_llama), 6, [2, 3], "float32"), plan)
    assert slice_main(["materialize", str(plan), str(tmp_path / "out")]) == 0
    return plan, tmp_path / "out"


@pytest.mark.parametrize("repo,token,message", [("org/bad name", "hf_x", "not valid on the Hub"),
                                                ("org/ok", None, "no Hugging Face token")])
def test_push_checks_before_replacing_the_card(built, monkeypatch, capsys, tmp_path, repo, token, message):
    plan, out = built
    before = (out / "README.md").read_bytes()  # MergeKit's card
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    assert slice_main(["push", str(out), repo, "--plan", str(plan)]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert (out / "README.md").read_bytes() == before


def test_push_dry_run_refuses_a_repo_id_the_hub_would(built, capsys):
    plan, out = built
    before = (out / "README.md").read_bytes()
    assert slice_main(["push", str(out), "org/-bad-", "--plan", str(plan), "--dry-run"]) == 2
    assert "not valid on the Hub" in one_error_line(capsys.readouterr().err)
    assert (out / "README.md").read_bytes() == before


def test_prune_layers_to_skip_typo_is_one_line(tiny_llama, tmp_path, capsys):
    assert slice_main(["prune", str(tiny_llama), "--layers_to_skip", "x,2", "--work_dir", str(tmp_path / "w")]) == 2
    assert "'2,4,6,8'" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- one line per failure class


def _scan_args(model, data, out):
    return ["--model_path", str(model), "--dataset", str(data), "--layers_to_skip", "2", "--output_dir", str(out),
            "--no_progress"]


def test_scan_output_dir_that_is_a_file_fails_before_the_model_loads(tiny_llama, tmp_path, capsys, monkeypatch):
    import compute_block_similarity.model as model_mod

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    (tmp_path / "taken").write_text("keep me")
    monkeypatch.setattr(model_mod, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking"))
    assert scan_main(_scan_args(tiny_llama, data, tmp_path / "taken")) == 2
    assert "is a file, not a folder" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "taken").read_text() == "keep me"


def test_unwritable_output_fails_before_work(tiny_llama, tmp_path, capsys, monkeypatch):
    """Read-only folders (root ignores chmod, so the write probe is made to fail)."""
    import compute_block_similarity.errors as errors

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(errors, "writable", lambda folder: ro not in (folder, *folder.parents))
    assert scan_main(_scan_args(tiny_llama, data, ro / "scan")) == 2
    assert "is not writable" in one_error_line(capsys.readouterr().err)
    assert slice_main(["materialize", str(tmp_path / "nope.yml"), str(ro / "out")]) == 2
    assert "is not writable" in one_error_line(capsys.readouterr().err)
    assert slice_main(["--scan", str(tmp_path / "x.json"), "-o", str(ro / "sliced.yml")]) == 2
    assert "is not writable" in one_error_line(capsys.readouterr().err)
    assert list(ro.iterdir()) == []


def test_environment_failures_are_one_line_and_debug_shows_the_traceback(tiny_llama, tmp_path, capsys, monkeypatch):
    """A full disk mid-write: one line, the earlier output intact; --debug re-raises."""
    import errno

    import compute_block_similarity.report as report

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "scan"
    assert scan_main(_scan_args(tiny_llama, data, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(result, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report, "plot_heatmap", full)  # the last of the three outputs
    assert scan_main(_scan_args(tiny_llama, data, out)) == 2
    assert "disk is full" in one_error_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(OSError):
        scan_main(_scan_args(tiny_llama, data, out) + ["--debug"])


def test_truncated_weights_are_one_line(tiny_llama, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    assert scan_main(_scan_args(broken, data, tmp_path / "scan")) == 2
    assert "truncated or corrupt" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "scan" / "block_distances.json").exists()


@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 10])
def test_corrupt_scan_state_with_resume_is_one_line(tiny_llama, tmp_path, capsys, content):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "scan"
    out.mkdir()
    (out / "scan_state.pt").write_bytes(content)
    assert scan_main(_scan_args(tiny_llama, data, out) + ["--resume"]) == 2
    assert "truncated or corrupt" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("text,message", [("slices: [\n  - {", "not valid YAML"), ("- just\n- a list\n", "not a MergeKit config"),
                                          ("merge_method: 3\nslices: 4\n", "not a valid MergeKit config")])
def test_bad_sliced_yml_is_one_line(tmp_path, capsys, text, message):
    plan = tmp_path / "sliced.yml"
    plan.write_text(text)
    assert slice_main(["materialize", str(plan), str(tmp_path / "out")]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_plan_pointing_at_a_deleted_model_names_it(tiny_llama, tmp_path, capsys):
    from slice_with_mergekit.plan import build_config, write_config

    plan = tmp_path / "sliced.yml"
    write_config(build_config(str(tmp_path / "gone"), 6, [2, 3], "float32"), plan)
    assert slice_main(["materialize", str(plan), str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "does not exist" in line and str(tmp_path / "gone") in line


@pytest.mark.parametrize("content,message", [("", "is empty"), ('{"text": "a"}\n{"text": oops}\n', "line 2 is not valid JSON"),
                                             ("\n\n", "has no rows")])
def test_bad_jsonl_names_the_problem(tiny_llama, tmp_path, capsys, content, message):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    assert scan_main(_scan_args(tiny_llama, data, tmp_path / "scan")) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_short_distances_row_is_refused_and_sliced_yml_kept(tiny_llama, tmp_path, capsys):

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    assert scan_main(_scan_args(tiny_llama, data, tmp_path / "scan")) == 0
    scan = tmp_path / "scan" / "block_distances.json"
    out = tmp_path / "sliced.yml"
    assert slice_main(["--scan", str(scan), "-o", str(out)]) == 0
    good = out.read_bytes()
    js = json.loads(scan.read_text())
    js["distances"]["2"] = js["distances"]["2"][:2]
    scan.write_text(json.dumps(js))
    assert slice_main(["--scan", str(scan), "-o", str(out)]) == 2
    assert "distances[2]" in one_error_line(capsys.readouterr().err)
    assert out.read_bytes() == good


def test_scan_file_is_typed_and_versioned(tiny_llama, tmp_path, capsys):
    from compute_block_similarity.scanfile import ScanFile, load

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    assert scan_main(_scan_args(tiny_llama, data, tmp_path / "scan")) == 0
    path = tmp_path / "scan" / "block_distances.json"
    scan = load(path)
    assert isinstance(scan, ScanFile) and scan.num_layers == 6 and scan.format_version == 1
    n = scan.layers_to_skip
    assert scan.ranking(n)[0] == scan.best_start(n) == json.loads(path.read_text())["best_start"]
    assert scan.removed(scan.kept([2, 3])) == [2, 3] and scan.kept([5]) == [(0, 5)]
    js = json.loads(path.read_text())
    for edit, words in ((lambda d: d.update(format_version=99), "format_version 99"),
                        (lambda d: d.pop("model"), "has no 'model'")):
        bad = dict(js)
        edit(bad)
        path.write_text(json.dumps(bad))
        assert slice_main(["--scan", str(path), "-o", str(tmp_path / "s.yml")]) == 2
        err = one_error_line(capsys.readouterr().err)
        assert words in err and "rerun compute_block_similarity" in err
        assert not (tmp_path / "s.yml").exists()


def _worst(js: dict) -> None:
    row = js["distances"]["2"]
    js["best_start_per_n"]["2"] = row.index(max(row))


@pytest.mark.parametrize("edit,words", [
    (lambda js: js["distances"]["2"].__setitem__(1, float("nan")), "distances[2] holds nan"),
    (lambda js: js["distances"]["2"].__setitem__(0, -0.25), "outside angular_last_token's range [0.0, 1.0]"),
    (lambda js: js["all_metrics"]["block_influence"]["distances"]["1"].__setitem__(0, 2.5),
     "all_metrics.block_influence.distances[1] holds 2.5"),
    (lambda js: js["stderr"]["2"].__setitem__(0, -1.0), "stderr[2] holds a negative"),
    (_worst, "best_start_per_n[2]"),
], ids=["nan", "negative-angle", "influence-over-2", "negative-se", "best-points-at-worst"])
def test_a_scan_file_is_checked_by_meaning_and_a_good_sliced_yml_kept(tiny_llama, tmp_path, capsys, edit, words):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    assert scan_main(_scan_args(tiny_llama, data, tmp_path / "scan")) == 0
    scan = tmp_path / "scan" / "block_distances.json"
    out = tmp_path / "sliced.yml"
    assert slice_main(["--scan", str(scan), "-o", str(out), "--select", "angle"]) == 0
    good = out.read_bytes()
    js = json.loads(scan.read_text())
    edit(js)
    scan.write_text(json.dumps(js))
    assert slice_main(["--scan", str(scan), "-o", str(out), "--select", "angle"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert words in err and "rerun compute_block_similarity" in err, err
    assert out.read_bytes() == good


@pytest.fixture
def repaired_bf16(tiny_llama, tmp_path):
    """A bfloat16 cut of the tiny Llama, bridged with `repair`: (plan, checkpoint, calibration file)."""
    from compute_block_similarity.ranges import parse_layers
    from slice_with_mergekit.plan import build_config, write_config

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS * 6])
    plan = tmp_path / "s.yml"
    write_config(build_config(str(tiny_llama), 6, parse_layers("2-3"), "bfloat16"), plan)
    assert slice_main(["materialize", str(plan), str(tmp_path / "out")]) == 0
    assert slice_main(["repair", str(tmp_path / "out"), "--plan", str(plan), "--dataset", str(data)]) == 0
    return plan, tmp_path / "out", data


def test_verify_catches_a_one_element_change_of_a_patched_bf16_tensor(repaired_bf16):
    from safetensors.torch import load_file, save_file

    from slice_with_mergekit.verify import verify

    plan, out, _ = repaired_bf16
    assert verify(str(out), str(plan)).ok
    f = out / "model.safetensors"
    t = load_file(f)
    key = "model.layers.1.mlp.down_proj.weight"
    assert t[key].dtype == torch.bfloat16
    i = int(t[key].abs().flatten().argmin())  # the smallest element: its sign flip is far inside any tolerance
    t[key].view(-1)[i] = -t[key].view(-1)[i] if t[key].view(-1)[i] != 0 else torch.tensor(1e-3, dtype=torch.bfloat16)
    save_file(t, f, metadata={"format": "pt"})
    rep = verify(str(out), str(plan))
    assert not rep.ok and any(n == "repair bridges" and not ok for n, ok, _ in rep.checks), rep.render()


def test_a_repair_record_with_a_wrong_shape_is_one_line(repaired_bf16, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from slice_with_mergekit.checkpoint import REPAIR_FILE

    plan, out, _ = repaired_bf16
    path = out / REPAIR_FILE
    meta = safe_open(str(path), "pt").metadata()
    t = load_file(path)
    key = next(k for k in t if k.startswith("bridge."))
    t[key] = t[key][:-1].contiguous()  # a T one row short
    save_file(t, path, metadata=meta)
    assert slice_main(["verify", str(out), "--plan", str(plan)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert REPAIR_FILE in err and "run `repair` again" in err


def test_repair_refuses_the_dense_source_and_a_cut_of_another_model(tiny_llama, repaired_bf16, tmp_path, capsys):
    plan, out, data = repaired_bf16
    before = (tiny_llama / "model.safetensors").read_bytes()
    assert slice_main(["repair", str(tiny_llama), "--plan", str(plan), "--dataset", str(data)]) == 2
    assert "is the plan's dense source" in one_error_line(capsys.readouterr().err)
    assert (tiny_llama / "model.safetensors").read_bytes() == before
    # a same-shape sibling named as the plan's source: the cut was built from another model
    sibling = build_tiny("llama", tmp_path / "sibling", seed=7)
    mine = (out / "model.safetensors").read_bytes()
    assert slice_main(["repair", str(out), "--plan", str(plan), "--source", str(sibling), "--dataset", str(data)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "does not come from the plan's source" in err and str(sibling) in err
    assert (out / "model.safetensors").read_bytes() == mine


HEAL_CFG = dict(steps=4, eval_every=2, seq_len=32, lr=3e-3, warmup=1, batch_size=2, max_length=64, loss="lm")
KILL_AT_FIRST_CHECKPOINT = """
import os, signal, sys
from transformers import Trainer
sys.path.insert(0, {tests!r})
from conftest import TEXTS
from slice_with_mergekit.heal import HealConfig, heal
Trainer._save_rng_state = lambda self, out: os.kill(os.getpid(), signal.SIGKILL)  # after the weights, before the state
heal({model!r}, TEXTS * 10, TEXTS, {out!r}, HealConfig(**{cfg!r}), progress=False)
"""


def test_a_heal_killed_as_it_writes_its_first_checkpoint_restarts_or_resumes(tiny_llama, tmp_path):
    """A real SIGKILL while the Trainer writes checkpoint-2: the folder exists without its state. A rerun
    without --resume starts over (it cannot resume); with --resume it falls back to a fresh start too."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from slice_with_mergekit.heal import HealConfig, HealRun, heal

    out = tmp_path / "h"
    script = KILL_AT_FIRST_CHECKPOINT.format(tests=str(Path(__file__).parent), model=str(tiny_llama), out=str(out),
                                             cfg=HEAL_CFG)
    ck = tmp_path / "h.work" / "checkpoint-2"
    for resume in (False, True):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert r.returncode == -9, r.stderr[-2000:]
        assert ck.is_dir() and not (ck / "trainer_state.json").exists() and not out.exists()
        s = heal(str(tiny_llama), TEXTS * 10, TEXTS, str(out), HealConfig(**HEAL_CFG), run=HealRun(resume=resume), progress=False)
        assert [h.step for h in s.history] == [0, 2, 4]
        shutil.rmtree(out)
        shutil.rmtree(tmp_path / "h.work")


def test_heal_resume_skips_an_incomplete_checkpoint_for_the_last_complete_one(tiny_llama, tmp_path):
    from transformers import TrainerCallback

    from slice_with_mergekit.heal import HealConfig, HealRun, heal

    class Die(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt("interrupted")

    cfg = HealConfig(**HEAL_CFG)
    full = heal(str(tiny_llama), TEXTS * 10, TEXTS, str(tmp_path / "a"), cfg, progress=False)
    with pytest.raises(KeyboardInterrupt):
        heal(str(tiny_llama), TEXTS * 10, TEXTS, str(tmp_path / "b"), cfg, progress=False, callbacks=[Die()])
    work = tmp_path / "b.work"
    assert (work / "checkpoint-2" / "trainer_state.json").exists()
    (work / "checkpoint-4").mkdir()  # killed as it began writing checkpoint-4: empty
    with pytest.raises(UserError, match="--resume"):  # a complete checkpoint-2 exists: resuming is possible
        heal(str(tiny_llama), TEXTS * 10, TEXTS, str(tmp_path / "b"), cfg, progress=False)
    resumed = heal(str(tiny_llama), TEXTS * 10, TEXTS, str(tmp_path / "b"), cfg, run=HealRun(resume=True), progress=False)
    assert [h.step for h in resumed.history] == [0, 2, 4]
    for x, y in zip(full.history, resumed.history):
        assert y.perplexity == pytest.approx(x.perplexity, rel=1e-5)


KILL_IN_THE_FOLD = """
import os, signal, sys
import safetensors.torch
def die(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"half a shard")
    os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = die
from slice_with_mergekit.cli import main
main(["repair", {out!r}, "--plan", {plan!r}, "--dataset", {data!r}])
"""


def test_a_repair_killed_while_it_replaces_the_shard_leaves_a_folder_that_verifies_and_repairs(repaired_bf16, capsys):
    """A real SIGKILL while the fold writes its temporary shard inside the checkpoint folder."""
    import subprocess
    import sys

    from slice_with_mergekit.verify import verify

    plan, out, data = repaired_bf16
    before = (out / "model.safetensors").read_bytes()
    r = subprocess.run([sys.executable, "-c", KILL_IN_THE_FOLD.format(out=str(out), plan=str(plan), data=str(data))],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, r.stderr[-2000:]
    leftovers = [f.name for f in out.iterdir() if f.name.startswith(".")]
    assert leftovers and all(".tmp" in f for f in leftovers)  # what the kill left: a hidden, half-written temporary
    assert (out / "model.safetensors").read_bytes() == before  # the weights as they were
    assert verify(str(out), str(plan)).ok
    assert slice_main(["repair", str(out), "--plan", str(plan), "--dataset", str(data)]) == 0
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # the rerun cleaned up
    assert verify(str(out), str(plan)).ok


class _Evil:
    def __reduce__(self):
        return (print, ("PICKLE CODE RAN",))


def test_a_pickle_checkpoint_is_refused_in_one_line_and_runs_nothing(tmp_path, capsys):
    import os

    import yaml

    model = build_tiny("llama", tmp_path / "m")
    os.remove(model / "model.safetensors")
    torch.save({"model.embed_tokens.weight": _Evil()}, model / "pytorch_model.bin")
    assert scan_main(_scan_args(model, "python-stdlib-docs", tmp_path / "scan") + ["--dataset_size", "4"]) == 2
    out = capsys.readouterr()
    assert "only safetensors" in one_error_line(out.err) and "PICKLE CODE RAN" not in out.out + out.err
    plan = tmp_path / "s.yml"
    plan.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(model), "layer_range": [0, 2]}]}, {"sources": [{"model": str(model), "layer_range": [4, 6]}]}]}))
    assert slice_main(["materialize", str(plan), str(tmp_path / "out")]) == 2
    out = capsys.readouterr()
    assert "only safetensors" in one_error_line(out.err) and "PICKLE CODE RAN" not in out.out + out.err
    assert not (tmp_path / "out").exists()


def test_a_second_run_on_one_output_refuses_naming_the_first_and_a_stale_lock_is_taken_over(tiny_llama, tmp_path,
                                                                                             capsys):
    import subprocess

    from compute_block_similarity.ranges import parse_layers
    from slice_with_mergekit.plan import build_config, write_config

    plan = tmp_path / "s.yml"
    write_config(build_config(str(tiny_llama), 6, parse_layers("2-3"), "float32"), plan)
    out = tmp_path / "out"
    assert slice_main(["materialize", str(plan), str(out)]) == 0
    good = (out / "model.safetensors").read_bytes()
    other = subprocess.Popen(["sleep", "60"])  # a live run holding the lock
    try:
        (tmp_path / "out.lock").write_text(str(other.pid))
        assert slice_main(["materialize", str(plan), str(out)]) == 2
        err = one_error_line(capsys.readouterr().err)
        assert f"pid {other.pid}" in err and str(out) in err
        assert (out / "model.safetensors").read_bytes() == good  # the first run's folder untouched
        w = tmp_path / "w"
        (tmp_path / "w.lock").write_text(str(other.pid))
        assert slice_main(["prune", str(tiny_llama), "--layers_to_skip", "2", "--work_dir", str(w)]) == 2
        assert f"pid {other.pid}" in one_error_line(capsys.readouterr().err)
    finally:
        other.kill()
        other.wait()
    (tmp_path / "out.lock").write_text(str(other.pid))  # its run is gone: a stale lock
    assert slice_main(["materialize", str(plan), str(out)]) == 0
    assert not (tmp_path / "out.lock").exists() and (out / "model.safetensors").read_bytes() == good


def test_overlapping_slices_build_as_mergekit_does_but_repair_and_verify_refuse_them(tiny_llama, tmp_path, capsys,
                                                                                     caplog):
    import yaml

    plan = tmp_path / "franken.yml"
    plan.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(tiny_llama), "layer_range": [0, 4]}]},
        {"sources": [{"model": str(tiny_llama), "layer_range": [2, 6]}]}]}))
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert slice_main(["materialize", str(plan), str(out)]) == 0
    assert "repeats or reorders layers" in caplog.text
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 8
    for cmd in (["repair", str(out), "--plan", str(plan)], ["verify", str(out), "--plan", str(plan)]):
        assert slice_main(cmd) == 2
        assert "not a depth cut" in one_error_line(capsys.readouterr().err)


def test_custom_code_in_a_config_is_not_run_and_the_log_says_so(tmp_path, caplog):
    from compute_block_similarity.model import load_model

    model = build_tiny("llama", tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    with caplog.at_level("WARNING"):
        m, _ = load_model(str(model), device="cpu")
    assert type(m).__name__ == "LlamaForCausalLM"
    assert "NOT run" in caplog.text and "--trust_remote_code" in caplog.text
