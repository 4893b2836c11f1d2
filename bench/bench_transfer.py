"""Does the default choice hold up on text it never saw? The default (`--select race --repair linear`:
candidates bridged and cross-fitted on the calibration text, the winner's final bridge fitted on all
of it) against the exhaustive best under the same treatment (every contiguous block cut and bridged on
the same calibration text), judged on two held-out corpora:

  * in-domain: the test split of the calibration corpus (python-stdlib-docs: stdlib docstrings);
  * out-of-domain: python-package-readmes, English README prose of the installed Python packages
    (what a project is, how to install and cite it, its licence): documentation of another kind,
    which neither the choice nor any bridge saw.

    python bench/bench_transfer.py [--model smollm2|gemma3|PATH] [--sizes 4,8] [--calib 256] [--judge 32]
                                   [--gains none,5]

--gains: the default's --max_bridge_gain, one race per value (none: no limit) against the same
exhaustive judgement.

Cost: the default's calibration passes beyond the scan, against the exhaustive search's on the same
calibration text (L - n + 1 scoring passes plus the bridges' statistics pass).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3 (both embedded), or a checkpoint path")
    p.add_argument("--sizes", default="4,8")
    p.add_argument("--calib", type=int, default=256, help="calibration texts (train split; prune's default)")
    p.add_argument("--calib_dataset", default="python-stdlib-docs", help="calibration corpus (a builtin); its test "
                   "split is the in-domain judge")
    p.add_argument("--judge", type=int, default=32, help="texts of each judging corpus")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--plain_weight", type=float, default=0.0, help="--plain_weight of the default choice")
    p.add_argument("--gains", default="5", help="--max_bridge_gain values of the default, comma-separated "
                   "(none: no limit); one race each")
    p.add_argument("--bridge_texts", default="64", help="the race's bridge_texts values (Scorer: texts per fold's "
                   "bridges, at least a quarter; all: the whole other fold), comma-separated; one race each")
    p.add_argument("--tie_breaks", default="auto", help="the race's --tie_break values (auto, scan, loss), comma-separated; one race each")
    p.add_argument("--tie_margins", default=None, help="the race's --tie_margin values (perplexity ratios), "
                   "comma-separated; one race each (default: the library's)")
    p.add_argument("--json", default=None, help="also write the rows, with every race candidate's calibration "
                   "perplexity and the whole exhaustive table, to this file")
    p.add_argument("--cache", default=None, help="JSON file keeping judged blocks between runs (same flags)")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_nll import model_path
    from common import judged_key

    from compute_block_similarity import ScanSettings, scan_model
    from compute_block_similarity.data import BUILTIN_DATASET, READMES_DATASET, load_texts
    from compute_block_similarity.model import load_model
    from compute_block_similarity.ranges import format_layers
    from compute_block_similarity.report import json_payload
    from compute_block_similarity.scanfile import ScanFile
    from slice_with_mergekit.evaluate import WindowSettings, perplexity
    from slice_with_mergekit.inmemory import removed_layers
    from slice_with_mergekit.repair_fit import FitOptions, fit_repairs
    from slice_with_mergekit.scoring import ScoreSettings, Scorer
    from slice_with_mergekit.race import Race
    from slice_with_mergekit.select import SelectOptions, bridge_dependence, select_race

    path = model_path(args.model)
    model, tok = load_model(path, dtype="float32", device="auto")
    calib = load_texts(args.calib_dataset, split="train", size=args.calib)
    own = "in-domain (stdlib test)" if args.calib_dataset == BUILTIN_DATASET else f"in-domain ({args.calib_dataset} test)"
    judges = {own: load_texts(args.calib_dataset, split="test", size=args.judge),
              "out-of-domain (package READMEs)": load_texts(READMES_DATASET, split="train", size=args.judge)}
    ml = args.max_length
    cache = json.loads(Path(args.cache).read_text()) if args.cache and os.path.exists(args.cache) else {}

    def key_of(removed: list[int]) -> str:
        # the final bridge of a cut is fit_repair on all of the calibration text, as fit_repairs gives it
        data = "" if args.calib_dataset == BUILTIN_DATASET else args.calib_dataset
        return judged_key(path, args.calib, args.judge, ml, removed, data)

    def judge(removed: list[int], fit) -> dict[str, float]:
        key = key_of(removed)
        if key not in cache:
            with removed_layers(model, removed), (fit.in_memory() if fit is not None else nullcontext()):
                cache[key] = {k: perplexity(model, tok, t, WindowSettings(max_length=ml, stride=ml)).perplexity for k, t in judges.items()}
            if args.cache:
                Path(args.cache).write_text(json.dumps(cache))
        return cache[key]

    t0 = time.perf_counter()
    res = scan_model(model, tok, calib, ScanSettings(batch_size=8, max_length=ml, progress=False))
    scan = ScanFile.model_validate({**json_payload(res, 1), "model": str(path)})
    L = res.num_layers
    dense = judge([], None)
    margins = args.tie_margins.split(",") if args.tie_margins else [str(SelectOptions().tie_margin)]
    rows = []
    for n in map(int, args.sizes.split(",")):
        blocks = [list(range(s, s + n)) for s in range(L - n + 1)]
        todo = [b for b in blocks if key_of(b) not in cache]  # the bridges of blocks not judged yet
        fits = fit_repairs(model, tok, calib, todo, FitOptions(max_length=ml, skip_unfoldable=True,
                                                               progress=False)) if todo else {}
        ex = {b[0]: judge(b, fits.get(tuple(b))) for b in blocks}
        for g, bt, tb, tm in [(g, bt, tb, tm) for g in args.gains.split(",") for bt in args.bridge_texts.split(",")
                              for tb in args.tie_breaks.split(",") for tm in margins]:
            gain = None if g == "none" else float(g)
            cal = Scorer(model, tok, calib, ScoreSettings(max_length=ml, stride=ml, repair="linear", plain_weight=args.plain_weight, bridge_texts=None if bt == "all" else int(bt)))
            cfg = Race(max_gain=gain, tie_break=tb, tie_margin=float(tm))
            c = bridge_dependence(cal, select_race(scan, n, cal, 16, cfg), cfg)  # as choose() runs it
            exhaustive = (L - n + 1) + sum(len(cal.bridge_texts(f)) for f in range(2)) / len(calib)
            ours = ex[c.removed[0]]  # judged under the final bridge: fit_repair on all of the calibration text
            for k in judges:
                best = min(ex, key=lambda s: ex[s][k])
                rows.append({"n": n, "gain": g, "bridge_texts": bt, "tie_break": tb, "tie_margin": tm, "judge": k, "ours": format_layers(c.removed), "ours_ppl": ours[k],
                             "best": format_layers(range(best, best + n)), "best_ppl": ex[best][k],
                             "ratio": ours[k] / ex[best][k], "passes": c.passes, "exhaustive_passes": exhaustive,
                             "dependent": bool(c.bridge and c.bridge["dependent"]),
                             "plain_over_bridged": c.bridge["ratio"] if c.bridge else None,
                             "set_aside": [x["removed"] for x in c.candidates if x.get("set_aside")],
                             "candidates": c.candidates, "exhaustive": {format_layers(range(b, b + n)): v for b, v in ex.items()}})
                print(f"n={n} gain {g} bridge_texts {bt} tie_break {tb} tie_margin {tm} {k}: {rows[-1]['ours']} ratio {rows[-1]['ratio']:.3f} "
                      f"passes {c.passes:.2f} of {exhaustive:.2f}", file=sys.stderr, flush=True)  # progress
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {dev} ({platform.machine()}), torch {torch.__version__}; {time.perf_counter() - t0:.0f} s")
    print(f"model: {Path(path).name}, {L} layers; calibration {args.calib} {args.calib_dataset} texts (train split), "
          f"max_length {ml}; default: --select race --repair linear --plain_weight {args.plain_weight:g}, "
          f"--max_bridge_gain as in the gain column, the race's bridge_texts as in the fold column, --tie_break as in the tie column; judges: {args.judge} texts each of the stdlib test split and of the package READMEs")
    print("dense perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in dense.items()))
    print(f"{'n':>2} {'gain':>4} {'fold':>4} {'tie':>4} {'marg':>5} {'judge':<32} {'default':<9} {'ppl':>8} {'best bridged':<13} {'ppl':>8} {'ratio':>6} "
          f"{'passes':>7} {'of exhaustive':>13} {'plain/bridged':>13}")
    for r in rows:
        dep = f"{r['plain_over_bridged']:.2f}x" + (" dep." if r["dependent"] else "") if r["plain_over_bridged"] else "-"
        print(f"{r['n']:>2} {r['gain']:>4} {r['bridge_texts']:>4} {r['tie_break']:>4} {r['tie_margin']:>5} {r['judge']:<32} {r['ours']:<9} {r['ours_ppl']:8.2f} {r['best']:<13} {r['best_ppl']:8.2f} "
              f"{r['ratio']:6.3f} {r['passes']:7.2f} {r['passes'] / r['exhaustive_passes']:13.0%} {dep:>13}")
    for r in rows[::2]:
        if r["set_aside"]:
            print(f"n={r['n']} gain {r['gain']} fold {r['bridge_texts']} tie {r['tie_break']}: set aside as bridge-dependent: {', '.join(r['set_aside'])}")


if __name__ == "__main__":
    main()
