"""`prune` end to end on a randomly initialised Llama of a given shape: wall time and peak CUDA memory
of every stage (scan, race, materialize + repair, verify, evaluate, heal), from the costs each stage
records beside its output (`prune_out/.stage-*.json`; the same table ends `report.md`).

    # the issue's figure: a 7B-shaped Llama in bf16 on one GPU, healing 20 steps
    python bench/bench_stages.py --shape 4096,32,11008 --dtype bfloat16 --device cuda --heal_steps 20
    # a smoke run of the same path on a CPU (SmolLM2's shape, random weights)
    python bench/bench_stages.py --shape 576,30,1536 --texts 32 --eval_size 8 --heal_steps 5

The random weights make every score meaningless; only the costs are measured. The tokenizer (and
vocabulary) is SmolLM2's unless --vocab resizes it (e.g. 128256, Llama-3's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(shape: str, vocab: int | None, dtype: str, out: Path) -> Path:
    from bench_scan import random_llama

    from compute_block_similarity.model import default_model_dir

    model, tok = random_llama(shape, default_model_dir(), dtype, "cpu")
    if vocab:
        model.resize_token_embeddings(vocab)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU x {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096,32,11008", help="hidden,layers,intermediate of the random Llama")
    p.add_argument("--vocab", type=int, default=None, help="resize the vocabulary (default: SmolLM2's 49152)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, default=8, help="block size to cut")
    p.add_argument("--texts", type=int, default=256, help="calibration texts")
    p.add_argument("--eval_size", type=int, default=64)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--heal_steps", type=int, default=20)
    p.add_argument("--work", default=None, help="keep the model and prune's output here (default: a temp folder)")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from slice_with_mergekit.cli import main as slice_main
    from slice_with_mergekit.stage_cache import stage_costs

    root = Path(args.work or tempfile.mkdtemp(prefix="bench_stages_"))
    t0 = time.perf_counter()
    model = build(args.shape, args.vocab, args.dtype if args.dtype != "auto" else "float32", root / "model")
    built = time.perf_counter() - t0
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's log lines: not the benchmark's output
        rc = slice_main(["prune", str(model), "--layers_to_skip", str(args.n), "--dataset_size", str(args.texts),
                         "--eval_size", str(args.eval_size), "--max_length", str(args.max_length), "--dtype", args.dtype,
                         "--device", args.device, "--heal", "--heal_steps", str(args.heal_steps),
                         "--heal_eval_every", str(args.heal_steps), "--work_dir", str(root / "prune_out")])
    if rc:
        sys.exit(rc)
    rows = stage_costs(root / "prune_out")
    cfg = json.loads((model / "config.json").read_text())
    print(f"machine: {machine()}")
    print(f"model: random Llama (hidden, layers, intermediate) = ({args.shape}), vocabulary {cfg['vocab_size']}, "
          f"dtype {args.dtype}; built and saved in {built:.0f} s")
    print(f"job: prune --layers_to_skip {args.n}, {args.texts} calibration texts, {args.eval_size} held-out, "
          f"max_length {args.max_length}, --heal_steps {args.heal_steps} (defaults otherwise: race, linear bridge)")
    print(f"{'stage':<24} {'wall s':>8} {'peak CUDA MiB':>14}")
    for r in rows:
        peak = f"{r.peak_cuda_mib:,.0f}" if r.peak_cuda_mib else "-"
        print(f"{r.stage:<24} {r.seconds:>8.1f} {peak:>14}")
    print(f"{'total':<24} {sum(r.seconds for r in rows):>8.1f}")


if __name__ == "__main__":
    main()
