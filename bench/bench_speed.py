"""Inference speed of a dense model and its pruned checkpoint, side by side in one process.

The two models are measured in turn, several rounds, on the same prompts and device; each figure is
the median over rounds of measure_speed's own medians, so drift on a busy machine hits both alike.

    python bench/bench_speed.py DENSE PRUNED [--rounds 5] [--prompt_tokens 128] [--new_tokens 32] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dense")
    p.add_argument("pruned")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per round (after one warm-up)")
    p.add_argument("--prompt_tokens", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    from compute_block_similarity.data import load_texts
    from compute_block_similarity.model import load_model
    from slice_with_mergekit.evaluate import measure_speed

    texts = load_texts(split="test", size=64)
    models = {name: load_model(path, dtype=args.dtype, device=args.device)
              for name, path in (("dense", args.dense), ("pruned", args.pruned))}
    runs: dict[str, list] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, (m, tok) in models.items():
            runs[name].append(measure_speed(m, tok, texts, prompt_tokens=args.prompt_tokens,
                                            new_tokens=args.new_tokens, repeats=args.repeats))
    hw = torch.cuda.get_device_name(0) if runs["dense"][0].device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {hw} ({platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"prompts: {args.prompt_tokens} tokens, batch 1, {args.new_tokens} tokens decoded greedily with the KV cache; "
          f"median of {args.rounds} rounds x {args.repeats} runs")
    print(f"{'model':<8} {'layers':>6} {'prefill tok/s':>14} {'decode tok/s':>13} {'weights MiB':>12} {'KV cache MiB':>13}")
    med = {}
    for name, rs in runs.items():
        m = models[name][0]
        med[name] = (statistics.median(r.prefill_tokens_per_s for r in rs), statistics.median(r.decode_tokens_per_s for r in rs))
        print(f"{name:<8} {m.config.get_text_config().num_hidden_layers:>6} {med[name][0]:14.0f} {med[name][1]:13.1f} "
              f"{rs[0].weights_mib:12.0f} {rs[0].kv_cache_mib:13.1f}")
    print(f"pruned / dense: prefill {med['pruned'][0] / med['dense'][0]:.3f}x, decode {med['pruned'][1] / med['dense'][1]:.3f}x, "
          f"weights {runs['pruned'][0].weights_mib / runs['dense'][0].weights_mib:.3f}x, "
          f"KV cache {runs['pruned'][0].kv_cache_mib / runs['dense'][0].kv_cache_mib:.3f}x")


if __name__ == "__main__":
    sys.exit(main())
