"""Plain cuts (no bridge) judged on both held-out corpora of bench_transfer: the stdlib test split
(in-domain) and python-package-readmes (out-of-domain).

    python bench/bench_plain_cuts.py [--model smollm2] [--n 4] [--starts 3,12,15,14,13] [--judge 32]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3 (both embedded), or a checkpoint path")
    p.add_argument("--n", type=int, default=4, help="layers per cut")
    p.add_argument("--starts", default="3,12,15,14,13", help="first layer of each cut, comma-separated")
    p.add_argument("--judge", type=int, default=32, help="texts of each judging corpus")
    p.add_argument("--max_length", type=int, default=256)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_nll import model_path

    from compute_block_similarity.data import READMES_DATASET, load_texts
    from compute_block_similarity.model import load_model
    from compute_block_similarity.ranges import format_layers
    from slice_with_mergekit.evaluate import WindowSettings, perplexity
    from slice_with_mergekit.inmemory import removed_layers

    model, tok = load_model(model_path(args.model), dtype="float32", device="auto")
    judges = {"in-domain (stdlib test)": load_texts("python-stdlib-docs", split="test", size=args.judge),
              "out-of-domain (package READMEs)": load_texts(READMES_DATASET, split="train", size=args.judge)}
    ml = args.max_length
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {dev}; model {args.model}; {args.judge} texts per judge, max_length {ml}; plain cuts")
    for s in map(int, args.starts.split(",")):
        cut = list(range(s, s + args.n))
        with removed_layers(model, cut):
            ppl = {k: perplexity(model, tok, t, WindowSettings(max_length=ml, stride=ml)).perplexity for k, t in judges.items()}
        print(f"{format_layers(cut):<10} " + "  ".join(f"{k} {v:.2f}" for k, v in ppl.items()), flush=True)


if __name__ == "__main__":
    main()
