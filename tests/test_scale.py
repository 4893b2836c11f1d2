"""Data-parallel ranks (gloo, 2 CPU processes) and resumable scans."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import TEXTS, load, write_jsonl

from compute_block_similarity import ScanSettings, scan_model
from compute_block_similarity.cli import main as scan_main
from compute_block_similarity.sums import Accumulator, Checkpoint

MANY = [f"{t} ({i})" * (1 + i % 4) for i, t in enumerate(TEXTS * 6)]  # 42 texts of mixed lengths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in MANY])
    common = ["-m", "compute_block_similarity", "--model_path", str(tiny_models["qwen3"]), "--dataset", str(data),
              "--batch_size", "5", "--layers_to_skip", "2", "--no_progress", "--device", "cpu"]
    single = subprocess.run([sys.executable, *common, "--output_dir", str(tmp_path / "one")], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    multi = subprocess.run([*torchrun, *common, "--output_dir", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "block_distances.json").read_text())
    two = json.loads((tmp_path / "two" / "block_distances.json").read_text())
    assert two["num_samples"] == one["num_samples"] == len(MANY) and two["num_tokens"] == one["num_tokens"]
    for n in one["distances"]:
        # two ranks batch the texts differently: float32 states, so absolute on distances in [0, 1]
        assert two["distances"][n] == pytest.approx(one["distances"][n], rel=0, abs=1e-6)
        assert two["stderr"][n] == pytest.approx(one["stderr"][n], rel=1e-4, abs=1e-9)
    assert two["best_start"] == one["best_start"]
    assert not list((tmp_path / "two").glob("scan_state*"))


def test_resume_after_a_crash_gives_the_uninterrupted_result(tiny_llama, tmp_path, monkeypatch):
    model, tok = load(tiny_llama)
    full = scan_model(model, tok, MANY, ScanSettings(batch_size=4, progress=False))
    ck = Checkpoint(str(tmp_path / "state.pt"), every=2)
    calls = {"n": 0}
    real_add = Accumulator.add

    def crashing_add(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("preempted")
        return real_add(self, *a, **k)

    monkeypatch.setattr(Accumulator, "add", crashing_add)
    with pytest.raises(KeyboardInterrupt):
        scan_model(model, tok, MANY, ScanSettings(batch_size=4, progress=False), checkpoint=ck)
    monkeypatch.setattr(Accumulator, "add", real_add)
    state = torch.load(ck.path, weights_only=True)
    assert state["done"] == 5  # saved after batches 2 and 4, then on the interrupt during batch 6
    resumed = scan_model(model, tok, MANY, ScanSettings(batch_size=4, progress=False), checkpoint=Checkpoint(ck.path, every=2, resume=True))
    assert (resumed.num_samples, resumed.num_tokens) == (full.num_samples, full.num_tokens)
    for name in full.mean:
        torch.testing.assert_close(resumed.mean[name], full.mean[name], rtol=1e-12, atol=1e-12)


def test_resume_refuses_a_checkpoint_of_other_inputs(tiny_llama, tmp_path):
    from compute_block_similarity import UserError

    model, tok = load(tiny_llama)
    ck = Checkpoint(str(tmp_path / "state.pt"), every=1)
    ck.save(0, "someone-else", Accumulator(("angular_last_token",), 6), 3)
    with pytest.raises(UserError, match="belongs to a scan with other inputs"):
        scan_model(model, tok, MANY, ScanSettings(batch_size=4, progress=False), checkpoint=Checkpoint(ck.path, 1, resume=True))


def test_killed_cli_scan_resumes(tiny_llama, tmp_path):
    """SIGKILL a real CLI scan once it has checkpointed, then --resume: same numbers as a clean run."""
    import signal
    import time

    texts = [f"{t} {i}" for i in range(60) for t in TEXTS]  # 420 texts, batch 1: long enough to kill midway
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    args = [sys.executable, "-m", "compute_block_similarity", "--model_path", str(tiny_llama), "--dataset", str(data),
            "--batch_size", "1", "--layers_to_skip", "2", "--no_progress", "--checkpoint_every", "5"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--output_dir", str(out)], stderr=subprocess.DEVNULL)
    state = out / "scan_state.pt"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the scan finished or failed before it could be killed"
    assert not (out / "block_distances.json").exists()
    assert subprocess.run([*args, "--output_dir", str(out), "--resume"], capture_output=True).returncode == 0
    assert subprocess.run([*args, "--output_dir", str(tmp_path / "clean")], capture_output=True).returncode == 0
    a = json.loads((out / "block_distances.json").read_text())
    b = json.loads((tmp_path / "clean" / "block_distances.json").read_text())
    assert a["num_samples"] == b["num_samples"] == len(texts)
    for n in a["distances"]:
        assert a["distances"][n] == pytest.approx(b["distances"][n], rel=1e-9)
    assert not state.exists()


def test_hooks_capture_the_same_states_under_accelerate_offload(tiny_llama):
    """Layers whose weights live off-device (accelerate hooks load them per forward) still give
    the same scores: our forward hooks see the real activations."""
    from accelerate import cpu_offload

    model, tok = load(tiny_llama)
    plain = scan_model(model, tok, TEXTS, ScanSettings(batch_size=3, progress=False))
    offloaded, _ = load(tiny_llama)
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in offloaded.parameters())
    got = scan_model(offloaded, tok, TEXTS, ScanSettings(batch_size=3, progress=False))
    for name in plain.mean:
        torch.testing.assert_close(got.mean[name], plain.mean[name], rtol=1e-6, atol=1e-9)


def test_cli_device_map_auto(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    assert scan_main(["--model_path", str(tiny_llama), "--dataset", str(data), "--layers_to_skip", "2",
                      "--device_map", "auto", "--output_dir", str(tmp_path / "o"), "--no_progress"]) == 0
    assert json.loads((tmp_path / "o" / "block_distances.json").read_text())["num_samples"] == len(TEXTS)
