"""What the guard on each candidate's bridge cost the repair-aware race, side by side in one process:
`--select race --repair linear` (prune's default) with the candidates' bridges guarded (the library
before: two held-out perplexities per cut and fold, run outside the pass count) and unguarded (now:
the candidates' out-of-sample windows are the test; the final repair still guards). The same scan,
texts and window order for both.

    python bench/bench_candidate_guard.py [--model smollm2|gemma3|PATH] [--calib 256] [--n 4]
"""

from __future__ import annotations

from dataclasses import replace

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from unittest import mock

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3 (both embedded), or a checkpoint path")
    p.add_argument("--calib", type=int, default=256, help="calibration texts (train split; prune's default)")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--n", type=int, default=4, help="block size")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_nll import model_path

    import slice_with_mergekit.repair_fit as repair_fit
    from compute_block_similarity import ScanSettings, scan_model
    from compute_block_similarity.data import load_texts
    from compute_block_similarity.model import load_model
    from compute_block_similarity.ranges import format_layers
    from compute_block_similarity.report import json_payload
    from compute_block_similarity.scanfile import ScanFile
    from slice_with_mergekit.scoring import ScoreSettings, Scorer
    from slice_with_mergekit.select import bridge_dependence, select_race

    path = model_path(args.model)
    model, tok = load_model(path, dtype="float32", device="cpu")
    calib = load_texts("python-stdlib-docs", split="train", size=args.calib)
    ml = args.max_length
    res = scan_model(model, tok, calib, ScanSettings(batch_size=8, max_length=ml, progress=False))
    scan = ScanFile.model_validate({**json_payload(res, 1), "model": str(path)})
    fit, ppl = repair_fit.fit_repairs, repair_fit.perplexity
    rows = []
    for guard in (True, False):
        sc = Scorer(model, tok, calib, ScoreSettings(max_length=ml, stride=ml, repair="linear"))
        guarded = {"tokens": 0}

        def counted(*a, **k):  # the guard's perplexities: repair_fit's only calls
            guarded["tokens"] += sum(len(w[0]) for w in k["_windows"])
            return ppl(*a, **k)

        with mock.patch("slice_with_mergekit.scoring.fit_repairs",
                        lambda m, t, x, c, f, *a, **k: fit(m, t, x, c, replace(f, guard=guard), *a, **k)), \
                mock.patch.object(repair_fit, "perplexity", counted):
            t0 = time.perf_counter()
            c = bridge_dependence(sc, select_race(scan, args.n, sc))  # as choose() runs it
            wall = time.perf_counter() - t0
        rows.append((guard, format_layers(c.removed), c.passes, guarded["tokens"] / sc.total_tokens, wall))
        print(f"guard {guard}: {rows[-1]}", file=sys.stderr, flush=True)
    dev = f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"machine: {dev} ({platform.machine()}), torch {torch.__version__}")
    print(f"model: {Path(path).name}, n = {args.n}; {args.calib} python-stdlib-docs calibration texts, max_length {ml}; "
          "--select race --repair linear, prune's race rules")
    print(f"{'candidate bridges':<18} {'choice':<10} {'counted passes':>14} {'guard passes':>12} {'all passes':>10} {'wall s':>8}")
    for guard, ours, passes, extra, wall in rows:
        print(f"{'guarded' if guard else 'unguarded (now)':<18} {ours:<10} {passes:>14.2f} {extra:>12.2f} "
              f"{passes + extra:>10.2f} {wall:>8.1f}")
    print(f"unguarded / guarded wall time: {rows[1][4] / rows[0][4]:.2f}")


if __name__ == "__main__":
    main()
