"""`python -m compute_block_similarity`: PruneMe's flags, plus ours. A thin layer over scan_model."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from .data import BUILTIN_DATASET, load_texts
from .errors import UserError, check_output_dir, debug_enabled, run_cli
from .metrics import DEFAULT_METRIC, METRICS
from .scan import GRAM_BYTES, TOKENS_PER_TEXT
from .model import default_model_dir, load_model

log = logging.getLogger("compute_block_similarity")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compute_block_similarity",
        description="Score every block of consecutive decoder layers by how little it changes the hidden state, "
        "and report the best block to remove. Layers are 0-based; blocks are half-open [start, end).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    # PruneMe's flags, unchanged
    a("--model_path", default=None, help="Hub id or local folder; default: the embedded SmolLM2-135M-Instruct")
    a("--dataset", default=BUILTIN_DATASET, help="Hub dataset id, a local jsonl/json/csv/parquet/txt file or folder, "
      f"or '{BUILTIN_DATASET}' (embedded docstrings of the Python standard library)")
    a("--dataset_column", default="text", help="column holding the text")
    a("--batch_size", type=int, default=8, help="texts per forward pass")
    a("--max_length", type=int, default=1024, help="truncate each text to this many tokens")
    a("--layers_to_skip", type=int, default=8, help="block size n: how many consecutive layers to remove")
    a("--dataset_size", type=int, default=None, help="use the first N texts (default: all)")
    a("--dataset_subset", default="train", help="dataset split")
    # ours
    a("--output_dir", default=".", help="where layer_distances.csv, block_distances.json and the heatmap go")
    a("--metric", default=DEFAULT_METRIC, help=f"the metric that picks the block; one of: {', '.join(METRICS)}")
    a("--metrics", default="all", help="metrics computed in the same pass: 'all', 'last_token' (only those that "
      "need just the last token: least memory on big models), or a comma list")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="auto: bfloat16 on CUDA, float32 on CPU")
    a("--device", default="auto", help="auto, cpu or cuda")
    a("--device_map", default=None, help="e.g. 'auto': shard a model too big for one device (accelerate)")
    a("--gguf_file", default=None, help="GGUF file name inside --model_path")
    a("--dataset_config", default=None, help="dataset configuration name (Hub datasets)")
    a("--streaming", action="store_true", help="stream the dataset instead of downloading it whole")
    a("--load_in_4bit", action="store_true", help="score a 4-bit NF4 model (needs CUDA and bitsandbytes)")
    a("--trust_remote_code", action="store_true", help="allow model code from the Hub")
    a("--padding_side", default=None, choices=["left", "right"], help="default: the tokenizer's; scores do not depend on it")
    a("--no_progress", action="store_true", help="hide the progress bar")
    a("--checkpoint_every", type=int, default=50, help="save running sums every N batches to "
      "OUTPUT_DIR/scan_state.pt (0: never)")
    a("--resume", action="store_true", help="continue from OUTPUT_DIR/scan_state.pt after a crash or preemption")
    a("--tokens_per_text", type=int, default=TOKENS_PER_TEXT, help="all-token metrics use this many evenly spaced "
      "non-pad positions of each text (0: every token); bounds the scan's memory whatever --max_length is")
    a("--debug", action="store_true", help="show the traceback of every error (also: DEPTH_PRUNE_DEBUG=1)")
    a("--gram_bytes", type=int, default=GRAM_BYTES, help="float64 working set of the Gram computation, in bytes")
    return p


def metric_names(spec: str) -> list[str]:
    if spec == "all":
        return list(METRICS)
    if spec == "last_token":
        return [m.name for m in METRICS.values() if m.reduce == "last_token"]
    names = [x.strip() for x in spec.split(",") if x.strip()]
    bad = [x for x in names if x not in METRICS]
    if bad or not names:
        raise ValueError(f"--metrics {spec!r}: unknown {bad}; use 'all', 'last_token' or names from: {', '.join(METRICS)}")
    return names


def init_distributed(device: str) -> str:
    """Join the process group that torchrun / accelerate launch describe in the environment."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    use_cuda = device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def run(args: argparse.Namespace) -> dict[str, str]:
    import os

    from .scan import Checkpoint, scan_model

    if args.metric not in METRICS:
        raise ValueError(f"--metric {args.metric!r} is unknown; choose one of: {', '.join(METRICS)}")
    if args.layers_to_skip < 1:
        raise ValueError(f"--layers_to_skip must be >= 1, got {args.layers_to_skip}")
    for flag in ("batch_size", "max_length", "dataset_size"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag} must be >= 1, got {v}")
    metric_names(args.metrics)
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint_every must be >= 0, got {args.checkpoint_every}")
    if args.tokens_per_text < 0:
        raise ValueError(f"--tokens_per_text must be >= 0 (0: every token), got {args.tokens_per_text}")
    if args.gram_bytes < 1:
        raise ValueError(f"--gram_bytes must be >= 1, got {args.gram_bytes}")
    check_output_dir(args.output_dir, "--output_dir")
    device = init_distributed(args.device)
    model_path = args.model_path or default_model_dir()
    texts = load_texts(args.dataset, args.dataset_column, args.dataset_subset, args.dataset_size,
                       args.dataset_config, args.streaming)
    model, tok = load_model(model_path, dtype=args.dtype, device=device, device_map=args.device_map,
                            gguf_file=args.gguf_file, load_in_4bit=args.load_in_4bit,
                            trust_remote_code=args.trust_remote_code)
    L = model.config.get_text_config().num_hidden_layers
    if args.layers_to_skip >= L:
        raise ValueError(f"--layers_to_skip {args.layers_to_skip} must be < the model's {L} layers")
    provenance = {
        "model": model_path, "gguf_file": args.gguf_file, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "load_in_4bit": args.load_in_4bit,
        "dataset": {"name": args.dataset, "config": args.dataset_config, "split": args.dataset_subset,
                    "column": args.dataset_column, "size": args.dataset_size, "max_length": args.max_length},
        "tokens_per_text": args.tokens_per_text,
    }
    ckpt = None
    if args.checkpoint_every or args.resume:
        ckpt = Checkpoint(os.path.join(args.output_dir, "scan_state.pt"), args.checkpoint_every or 50, args.resume)
    result = scan_model(model, tok, texts, metric=args.metric, metrics=metric_names(args.metrics), batch_size=args.batch_size,
                        max_length=args.max_length, padding_side=args.padding_side,
                        progress=not args.no_progress, provenance=provenance, checkpoint=ckpt,
                        tokens_per_text=args.tokens_per_text, gram_bytes=args.gram_bytes)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank != 0:
        if ckpt:
            ckpt.remove(rank)
        return {}
    n = args.layers_to_skip
    best, runner, z = result.separation(n)
    if runner is None:
        log.info("only one candidate block of %d layers", n)
    elif z > 2:
        log.info("best block [%d, %d) beats the runner-up [%d, %d) by %.1f standard errors: a clear winner",
                 best, best + n, runner, runner + n, z)
    else:
        log.warning("best block [%d, %d) beats the runner-up [%d, %d) by only %.1f standard errors (< 2): "
                    "a coin toss; use more calibration texts (--dataset_size)", best, best + n, runner, runner + n, z)
    paths = result.write(args.output_dir, n)
    if ckpt:
        ckpt.remove(rank)
    for kind, path in paths.items():
        log.info("wrote %s: %s", kind, path)
    log.info("%s", result.summary(n))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    def command() -> int:
        import torch.distributed as dist

        try:
            run(args)
        finally:  # an undestroyed gloo group can abort the process at exit ("terminate called ...")
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        return 0

    return run_cli(command, debug_enabled(argv))


if __name__ == "__main__":
    sys.exit(main())
