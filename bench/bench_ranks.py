"""Scan throughput with 1 and 2 data-parallel ranks (torchrun, gloo on the CPU; nccl on GPUs).
Each rank gets cores / ranks threads on the CPU, so the rows compare the same machine.

    python bench/bench_ranks.py [--ranks 1,2] [--dataset_size 256] [--max_length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--dataset_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from compute_block_similarity.model import default_model_dir

    model = args.model_path or default_model_dir()
    cores = os.cpu_count() or 1
    rows = []
    for k in map(int, args.ranks.split(",")):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tempfile.mkdtemp()
        env = {**os.environ, "OMP_NUM_THREADS": str(max(cores // k, 1))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(k), "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "compute_block_similarity", "--model_path", model,
               "--dataset_size", str(args.dataset_size), "--batch_size", str(args.batch_size),
               "--max_length", str(args.max_length), "--layers_to_skip", "4", "--device", args.device,
               "--output_dir", out, "--no_progress", "--checkpoint_every", "0"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(r.stderr[-3000:])
        js = json.load(open(os.path.join(out, "block_distances.json")))
        line = next(l for l in r.stderr.splitlines() if "scanned" in l)
        scan_s = float(line.split(" in ")[1].split("s")[0])
        rows.append((k, js["num_tokens"], scan_s, js["num_tokens"] / scan_s, wall, js["best_start"]))
    dev = torch.cuda.get_device_name(0) if args.device != "cpu" else f"CPU {platform.machine()}, {cores} cores"
    print(f"machine: {dev}, torch {torch.__version__}; {args.dataset_size} texts, max_length {args.max_length}")
    print(f"{'ranks':>5} {'tokens':>7} {'scan s':>7} {'tok/s':>7} {'wall s (with load)':>19} {'best start':>10}")
    for k, n, s, tps, wall, best in rows:
        print(f"{k:>5} {n:>7} {s:7.1f} {tps:7.0f} {wall:19.1f} {best:>10}")


if __name__ == "__main__":
    main()
