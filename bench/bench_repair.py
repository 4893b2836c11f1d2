"""What the least-squares bridge undoes, on SmolLM2-135M-Instruct (or --model_path).

For each block size n, the block the angle scan picks (and any --blocks), on the held-out split:
perplexity dense, plain cut, cut + linear bridge, cut + cosine bridge; the share of the cut's
perplexity increase each bridge undoes; and each fit's wall time next to one bare decoder forward
pass over the same calibration text. Bridges are fitted on the train split only.

    python bench/bench_repair.py [--sizes 2,4,6,8] [--blocks 8-12,14-18] [--calib 256] [--heldout 64]
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
    add_data_flags(p, calib=256)
    p.add_argument("--sizes", default="2,4,6,8", help="block sizes; each uses the angle scan's best block")
    p.add_argument("--blocks", default="", help="extra half-open blocks 'start-end', e.g. '8-12,2-6'")
    p.add_argument("--methods", default="linear,cosine")
    args = p.parse_args()

    from compute_block_similarity import ScanSettings, scan_model
    from compute_block_similarity.batching import make_batches, tokenize
    from compute_block_similarity.model import decoder_of, input_device
    from slice_with_mergekit.evaluate import WindowSettings, perplexity
    from slice_with_mergekit.inmemory import removed_layers
    from slice_with_mergekit.repair_fit import FitOptions, fit_repair

    model, tok, calib, held = load(args)
    dev = input_device(model)

    def heldout_ppl() -> float:
        return perplexity(model, tok, held, WindowSettings(max_length=args.max_length, stride=args.max_length), batch_size=8).perplexity

    ids, _ = tokenize(tok, calib, args.max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = make_batches(ids, 8, pad, "right")
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            decoder_of(model)(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev), use_cache=False)
    pass_s = time.perf_counter() - t0
    res = scan_model(model, tok, calib, ScanSettings(batch_size=16, max_length=args.max_length, progress=False))
    blocks = [(res.best_start(n), res.best_start(n) + n, "angle") for n in map(int, args.sizes.split(",") if args.sizes else [])]
    blocks += [(int(a), int(b), "given") for a, b in (x.split("-") for x in args.blocks.split(",") if x)]
    dense = heldout_ppl()
    rows = []
    for s, e, why in blocks:
        removed = list(range(s, e))
        with removed_layers(model, removed):
            cut = heldout_ppl()
        row = {"block": [s, e], "n": e - s, "picked_by": why, "dense": dense, "cut": cut}
        for method in args.methods.split(","):
            fit = fit_repair(model, tok, calib, removed, FitOptions(method=method, max_length=args.max_length, progress=False))
            applied = [b for b in fit.bridges if b.applied]
            with removed_layers(model, removed), fit.in_memory():
                rep = heldout_ppl()
            row[method] = {"ppl": rep, "undone": (cut - rep) / (cut - dense), "fit_s": fit.seconds,
                           "fit_passes": fit.seconds / pass_s, "applied": bool(applied),
                           "ridge": fit.bridges[0].ridge, "decision": fit.bridges[0].decision}
        rows.append(row)
    hw = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {hw} ({platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: {res.num_layers} layers; calibration {len(calib)} texts (train split, {sum(map(len, ids))} tokens, "
          f"max_length {args.max_length}); held-out {len(held)} texts (test split); one bare calibration forward "
          f"pass {pass_s:.1f}s; dense held-out perplexity {dense:.2f}")
    methods = args.methods.split(",")
    head = f"{'block':<9} {'n':>2} {'by':<6} {'cut':>9}" + "".join(
        f" {m:>9} {'undone':>7} {'fit s':>6} {'passes':>6}" for m in methods)
    print(head)
    for r in rows:
        line = f"[{r['block'][0]}, {r['block'][1]})".ljust(9) + f" {r['n']:>2} {r['picked_by']:<6} {r['cut']:9.2f}"
        for m in methods:
            x = r[m]
            line += f" {x['ppl']:9.2f} {x['undone']:7.1%} {x['fit_s']:6.1f} {x['fit_passes']:6.2f}"
            line += "" if x["applied"] else " (guard: not applied)"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense_heldout_ppl": dense, "pass_seconds": pass_s, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
