"""Regret of each block-selection strategy on SmolLM2-135M-Instruct (or --model_path).

regret = held-out perplexity after the strategy's cut / the best held-out perplexity over every
contiguous block of the same size (exhaustive search). Strategies choose on the calibration split;
regret is measured on the held-out split. Cost: calibration passes beyond the scan (one forward
pass over the calibration text each); the exhaustive search costs L - n + 1 held-out passes.

    python bench/bench_select.py [--sizes 2,4,6,8] [--calib 512] [--heldout 64] [--max_length 192] [--top_k 5,8]

The held-out split here is of the calibration corpus only, and the cuts are plain. The default under
its repair, judged also on text of another kind (package READMEs) against every block cut and bridged
the same way: bench/bench_transfer.py (docs/benchmarks.md, "The default choice on text it never saw").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_data_flags, load  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(p, calib=512)
    p.set_defaults(max_length=192)  # the recorded runs: bench/select_smollm2_race*.txt
    p.add_argument("--sizes", default="2,4,6,8")
    p.add_argument("--top_k", default="0", help="one or more k for --select ppl and refine, e.g. 5,8 (0: neither)")
    p.add_argument("--race_k", type=int, default=16, help="candidates for --select race (the default strategy)")
    p.add_argument("--heldout_cache", default=None, help="JSON file keeping the exhaustive held-out search between runs "
                   "(valid for the same model, --heldout and --max_length)")
    p.add_argument("--iterative_max_n", type=int, default=0, help="run SLEB-style iterative only up to this n (it is costly)")
    args = p.parse_args()

    from compute_block_similarity import ScanSettings, scan_model
    from compute_block_similarity.ranges import format_layers
    from compute_block_similarity.report import json_payload
    from compute_block_similarity.scanfile import ScanFile
    from slice_with_mergekit.scoring import ScoreSettings, Scorer
    from slice_with_mergekit.select import select_deepest, select_iterative, select_ppl, select_race, select_refine

    model, tok, calib, held = load(args)
    t0 = time.perf_counter()
    res = scan_model(model, tok, calib, ScanSettings(batch_size=16, max_length=args.max_length, progress=False))
    scan_s = time.perf_counter() - t0
    L = res.num_layers
    scan = ScanFile.model_validate({**json_payload(res, 1), "model": str(args.model_path)})  # every metric
    cal = Scorer(model, tok, calib, ScoreSettings(max_length=args.max_length, stride=args.max_length))
    hel = Scorer(model, tok, held, ScoreSettings(max_length=args.max_length, stride=args.max_length))
    dense = hel([])
    rows = []
    cache = {}
    if args.heldout_cache and os.path.exists(args.heldout_cache):
        with open(args.heldout_cache) as f:
            cache = json.load(f)
    for n in map(int, args.sizes.split(",")):
        t = time.perf_counter()
        key = f"{args.model_path}|{args.heldout}|{args.max_length}|{n}"
        if key in cache:
            exh = {int(s): v for s, v in cache[key].items()}
        else:
            exh = cache[key] = {s: hel(list(range(s, s + n))) for s in range(L - n + 1)}
            if args.heldout_cache:
                with open(args.heldout_cache, "w") as f:
                    json.dump(cache, f)
        exh_s = time.perf_counter() - t
        best_s = min(exh, key=exh.get)
        cal_race = Scorer(model, tok, calib, ScoreSettings(max_length=args.max_length, stride=args.max_length))  # its own cost count
        c = select_race(scan, n, cal_race, args.race_k)
        choices = {f"race (k={args.race_k})": (c.removed, c.passes)}
        choices["angle"] = (list(range(res.best_start(n), res.best_start(n) + n)), 0)
        choices["deepest"] = (select_deepest(scan, n).removed, 0)
        for k in sorted(int(k) for k in args.top_k.split(",") if k.strip() and int(k) > 0):
            c = select_ppl(scan, n, cal, k)  # cached: a larger k pays only for its new candidates
            choices[f"ppl (k={k})"] = (c.removed, len(c.candidates))
            c = select_refine(scan, n, cal, k)
            choices[f"refine (k={k})"] = (c.removed, len(c.candidates))
        if n <= args.iterative_max_n:
            c = select_iterative(scan, n, cal)
            choices["iterative"] = (c.removed, c.passes)
        for name, (removed, passes) in choices.items():
            ppl = exh[removed[0]] if removed == list(range(removed[0], removed[0] + n)) else hel(removed)
            rows.append({"n": n, "strategy": name, "removed": removed, "heldout_ppl": ppl,
                         "regret": ppl / exh[best_s], "extra_passes": passes, "cost": passes / (L - n + 1)})
        rows.append({"n": n, "strategy": "exhaustive", "removed": list(range(best_s, best_s + n)),
                     "heldout_ppl": exh[best_s], "regret": 1.0, "extra_passes": L - n + 1, "cost": 1.0, "seconds": exh_s})
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {dev} ({platform.machine()}), torch {torch.__version__}")
    print(f"model: {L} layers; calibration {args.calib} texts (train split), held-out {args.heldout} texts "
          f"(test split), max_length {args.max_length}; scan {scan_s:.1f}s; dense held-out perplexity {dense:.2f}")
    print(f"{'n':>2} {'strategy':<14} {'removed':<16} {'held-out ppl':>12} {'regret':>7} {'extra passes':>12} "
          f"{'of exhaustive':>13}")
    for r in rows:
        rm = format_layers(r["removed"])
        print(f"{r['n']:>2} {r['strategy']:<14} {rm:<16} {r['heldout_ppl']:12.2f} {r['regret']:7.3f} {r['extra_passes']:12.2f} "
              f"{r['cost']:13.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense_heldout_ppl": dense, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
