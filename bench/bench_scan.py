"""Scan cost against a bare decoder forward over the same batches, and against a naive
PruneMe-style `output_hidden_states` scan. Each mode runs in its own process so peak memory
(RSS on CPU, max allocated on CUDA) is its own.

    python bench/bench_scan.py [--model_path P] [--dataset_size 256] [--batch_size 16] [--max_length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

MODES = ("bare_forward", "scan_default_metric", "scan_all_metrics", "naive_hidden_states")


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def run_mode(args: argparse.Namespace) -> dict:
    from compute_block_similarity.data import load_texts
    from compute_block_similarity.model import default_model_dir, load_model
    from compute_block_similarity.scan import decoder_of, input_device, make_batches, scan_model, tokenize

    model, tok = load_model(args.model_path or default_model_dir(), dtype=args.dtype, device=args.device)
    texts = load_texts(size=args.dataset_size)
    ids, _ = tokenize(tok, texts, args.max_length)
    batches = make_batches(ids, args.batch_size, tok.pad_token_id or 0, "right")
    dev = input_device(model)
    tokens = sum(int(b.lengths.sum()) for b in batches)
    n = args.layers_to_skip
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    if args.mode == "bare_forward":
        with torch.inference_mode():
            for b in batches:
                m = b.attention_mask.to(dev)
                decoder_of(model)(input_ids=b.input_ids.to(dev), attention_mask=m,
                                  position_ids=(m.cumsum(-1) - 1).clamp_min(0), use_cache=False)
    elif args.mode.startswith("scan"):
        metrics = None if args.mode == "scan_all_metrics" else ["angular_last_token"]
        scan_model(model, tok, texts, metrics=metrics, batch_size=args.batch_size, max_length=args.max_length,
                   padding_side="right", progress=False)
    else:  # PruneMe: full model with LM head, every layer's whole sequence kept, last token compared
        sums = None
        with torch.inference_mode():
            for b in batches:
                m = b.attention_mask.to(dev)
                hs = model(input_ids=b.input_ids.to(dev), attention_mask=m, output_hidden_states=True).hidden_states
                last = m.sum(-1) - 1
                x = torch.stack([h[torch.arange(len(last)), last] for h in hs]).float()  # (L+1, B, H)
                x = x / x.norm(dim=-1, keepdim=True)
                d = torch.arccos((x[:-n] * x[n:]).sum(-1).clamp(-1, 1)) / torch.pi  # (L+1-n, B)
                sums = d.sum(1) if sums is None else sums + d.sum(1)
    sync()
    wall = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": args.mode, "wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall, "peak_bytes": peak,
            "peak_kind": "cuda max allocated" if dev.type == "cuda" else "process peak RSS"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--dataset_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--layers_to_skip", type=int, default=4)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeat", type=int, default=2, help="runs per mode; the fastest is reported")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    passthrough = [a for a in sys.argv[1:]]
    rows = {}
    for mode in MODES:
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--mode", mode], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows[mode] = min(runs, key=lambda r: r["wall_s"])
    base = rows["bare_forward"]["wall_s"]
    print(f"machine: {machine()}")
    print(f"workload: {args.dataset_size} texts, batch {args.batch_size}, max_length {args.max_length}, "
          f"{rows['bare_forward']['tokens']} tokens, best of {args.repeat}")
    print(f"{'mode':<22} {'wall s':>8} {'tok/s':>9} {'x bare':>7} {'peak MiB':>9}  ({rows['bare_forward']['peak_kind']})")
    for mode, r in rows.items():
        print(f"{mode:<22} {r['wall_s']:8.2f} {r['tok_per_s']:9.0f} {r['wall_s'] / base:7.3f} {r['peak_bytes'] / 2**20:9.0f}")


if __name__ == "__main__":
    main()
