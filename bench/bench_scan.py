"""Scan cost against a bare decoder forward over the same batches, and against a naive
PruneMe-style `output_hidden_states` scan. Each mode runs in its own process so peak memory
(RSS on CPU, max allocated on CUDA) is its own.

    python bench/bench_scan.py [--model_path P] [--dataset_size 256] [--batch_size 16] [--max_length 256]
    # a randomly initialised Llama built in the benchmark (no download), with SmolLM2's tokenizer and vocabulary:
    python bench/bench_scan.py --random_llama 4096,32,11008 --dtype bfloat16 --device cuda --concat 16 --max_length 1024

--concat N joins every N calibration paragraphs into one text, for long sequences. The
repair_fit mode times fitting a least-squares bridge over --layers_to_skip layers in the middle.
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

MODES = ("bare_forward", "scan_default_metric", "scan_all_metrics", "scan_last_token_metrics", "naive_hidden_states",
         "repair_fit")
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM, for model FLOPs utilisation


def random_llama(spec: str, tok_dir: str, dtype: str, device: str):
    """A randomly initialised Llama (hidden, layers, intermediate) with the vocabulary of ``tok_dir``'s tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from compute_block_similarity.model import resolve_device, resolve_dtype

    hidden, layers, inter = map(int, spec.split(","))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = AutoConfig.for_model("llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                               num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                               vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=False,
                               architectures=["LlamaForCausalLM"])
    dev = resolve_device(device)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=resolve_dtype(dtype, dev))
    return model.eval(), tok


def model_flops(model, batches) -> float:
    """Forward FLOPs: 2 x non-embedding parameters per token, plus causal attention 2 L d S^2 per sequence."""
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and "lm_head" not in name)
    lens = torch.cat([b.lengths for b in batches]).double()
    return 2 * n * float(lens.sum()) + 2 * cfg.num_hidden_layers * cfg.hidden_size * float((lens ** 2).sum())


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def run_mode(args: argparse.Namespace) -> dict:
    from compute_block_similarity.data import load_texts
    from compute_block_similarity.model import default_model_dir, load_model
    from compute_block_similarity.batching import make_batches, tokenize
    from compute_block_similarity.model import decoder_of, input_device
    from compute_block_similarity.scan import ScanSettings, scan_model

    if args.random_llama:
        model, tok = random_llama(args.random_llama, args.model_path or default_model_dir(), args.dtype, args.device)
    else:
        model, tok = load_model(args.model_path or default_model_dir(), dtype=args.dtype, device=args.device)
    texts = load_texts(size=args.dataset_size * args.concat)
    texts = ["\n\n".join(texts[i : i + args.concat]) for i in range(0, len(texts), args.concat)]
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
    elif args.mode == "repair_fit":
        from compute_block_similarity.model import decoder_layers
        from slice_with_mergekit.repair_fit import FitOptions, fit_repair

        s = (len(decoder_layers(model)) - n) // 2
        fit_repair(model, tok, texts, list(range(s, s + n)),
                   FitOptions(batch_size=args.batch_size, max_length=args.max_length, progress=False))
    elif args.mode.startswith("scan"):
        metrics = {"scan_all_metrics": None, "scan_default_metric": ["angular_last_token"],
                   "scan_last_token_metrics": ["angular_last_token", "relative_magnitude", "euclidean_last_token"]}[args.mode]
        scan_model(model, tok, texts, ScanSettings(metrics=metrics, batch_size=args.batch_size, max_length=args.max_length, padding_side="right", progress=False))
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
            "flops": model_flops(model, batches),
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
    p.add_argument("--random_llama", default=None, metavar="HIDDEN,LAYERS,INTERMEDIATE",
                   help="benchmark a randomly initialised Llama of this shape (tokenizer from --model_path)")
    p.add_argument("--concat", type=int, default=1, help="join every N calibration texts into one (long sequences)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of modes to run")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    passthrough = [a for a in sys.argv[1:]]
    rows = {}
    for mode in args.modes.split(","):
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--mode", mode], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows[mode] = min(runs, key=lambda r: r["wall_s"])
    base = rows["bare_forward"]["wall_s"]
    cuda = torch.cuda.is_available() and args.device != "cpu"
    print(f"machine: {machine()}")
    print(f"model: {args.random_llama and f'random Llama (hidden, layers, intermediate) = ({args.random_llama})' or args.model_path or 'SmolLM2-135M-Instruct'}, dtype {args.dtype}")
    print(f"workload: {args.dataset_size} texts (each {args.concat} paragraphs), batch {args.batch_size}, max_length "
          f"{args.max_length}, {rows['bare_forward']['tokens']} tokens, best of {args.repeat}")
    print(f"{'mode':<24} {'wall s':>8} {'tok/s':>9} {'x bare':>7} {'peak MiB':>9} {'x bare':>7}"
          + (f" {'MFU':>6}" if cuda else "") + f"  ({rows['bare_forward']['peak_kind']})")
    peak0 = rows["bare_forward"]["peak_bytes"]
    for mode, r in rows.items():
        mfu = f" {r['flops'] / r['wall_s'] / H100_BF16_PEAK:6.1%}" if cuda and mode != "repair_fit" else ""
        print(f"{mode:<24} {r['wall_s']:8.2f} {r['tok_per_s']:9.0f} {r['wall_s'] / base:7.3f} "
              f"{r['peak_bytes'] / 2**20:9.0f} {r['peak_bytes'] / peak0:7.3f}{mfu}")


if __name__ == "__main__":
    main()
