"""The cost of scoring: one perplexity pass (the chunked NLL every stage uses) against a bare forward
of the decoder over the same windows, the LM head's own matmul, and the plain full-logits
log_softmax it replaced. Each mode runs in its own process, so its peak RSS is its own.

    python bench/bench_nll.py [--model smollm2|gemma3|PATH] [--texts 32] [--max_length 256] [--batch_size 8]
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

MODES = ("bare", "head", "chunked", "plain")
LOGITS_BYTES = 256 * 2**20  # slice_with_mergekit.evaluate.LOGITS_BYTES


def model_path(name: str) -> str:
    from compute_block_similarity.model import default_model_dir, gemma3_model_dir

    return {"smollm2": default_model_dir, "gemma3": gemma3_model_dir}.get(name, lambda: name)()


def run_mode(args: argparse.Namespace) -> dict:
    """One mode, in this process: seconds (best of --repeat) and peak RSS."""
    import torch

    from compute_block_similarity.data import load_texts
    from compute_block_similarity.model import load_model
    from slice_with_mergekit.evaluate import backbone_of, lm_head_of, perplexity, tokenize_windows

    torch.set_grad_enabled(False)
    model, tok = load_model(model_path(args.model), dtype="float32", device="cpu")
    for t in [*model.parameters(), *model.buffers()]:  # fault every weight in: safetensors are mmapped, and a bare
        float(t.float().sum())  # forward reads one row of a tied embedding, the LM head all of it
    wins = tokenize_windows(tok, load_texts(size=args.texts), args.max_length, args.max_length)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    batches = []  # as perplexity() batches them: longest first
    ordered = sorted(wins, key=lambda w: -len(w[0]))
    for k in range(0, len(ordered), args.batch_size):
        rows = ordered[k : k + args.batch_size]
        width = max(len(w) for w, _ in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, (w, _) in enumerate(rows):
            ids[b, : len(w)], mask[b, : len(w)] = torch.tensor(w), 1
        batches.append((ids, mask))
    head = lm_head_of(model)

    def once() -> None:
        if args.mode == "bare":
            for ids, mask in batches:
                backbone_of(model)(input_ids=ids, attention_mask=mask, use_cache=False)
        elif args.mode == "head":  # the LM head over the scored positions alone, as the chunked NLL runs it
            d = model.config.get_text_config().hidden_size
            n = sum(len(w) - ctx for w, ctx in wins)
            h = torch.randn(n, d)
            for a in range(0, n, 32):
                head(h[a : a + 32])
        elif args.mode == "chunked":
            perplexity(model, tok, [], batch_size=args.batch_size, _windows=wins, logits_bytes=args.logits_bytes)
        else:  # the full (B, S, V) logits and a log_softmax copy of them
            for ids, mask in batches:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])

    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": args.mode, "seconds": best, "peak_rss_mib": peak / 1024, "rss_before_mib": rss0 / 1024,
            "windows": len(wins), "tokens": sum(len(w) for w, _ in wins)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3 (both embedded), or a checkpoint path")
    p.add_argument("--texts", type=int, default=32, help="calibration texts (train split of the embedded set)")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--logits_bytes", type=int, default=LOGITS_BYTES, help="the chunked NLL's float32 logits budget")
    p.add_argument("--repeat", type=int, default=2, help="timed passes per mode (the best is kept)")
    p.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    model_path(args.model)  # convert once, outside the timed processes
    res = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--mode", mode, *sys.argv[1:]], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-2000:])
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    bare, head = res["bare"], res["head"]
    print(f"# bench_nll: {args.model}, {bare['windows']} windows, {bare['tokens']} tokens, batch {args.batch_size}, "
          f"max_length {args.max_length}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {__import__('torch').get_num_threads()}")
    print("| mode | seconds | x bare forward | x (bare + LM head) | peak RSS MiB | RSS over the loaded model MiB | peak x bare |")
    print("|---|---|---|---|---|---|---|")
    for mode in MODES:
        r = res[mode]
        print(f"| {mode} | {r['seconds']:.2f} | {r['seconds'] / bare['seconds']:.2f} | "
              f"{r['seconds'] / (bare['seconds'] + head['seconds']):.2f} | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f} | {r['peak_rss_mib'] / bare['peak_rss_mib']:.2f} |")
    print("(the loaded model: every weight resident, so no mode pays for paging in what the others do not read)")


if __name__ == "__main__":
    main()
