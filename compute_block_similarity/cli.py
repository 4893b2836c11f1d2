"""`python -m compute_block_similarity`: PruneMe's flags, plus ours. A thin layer over scan_model."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from .errors import debug_enabled, run_cli
from .flags import add_flags, from_args, progress_shown
from .job import run_scan
from .options import DataOptions, ModelOptions, ScanOptions

log = logging.getLogger("compute_block_similarity")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compute_block_similarity",
        description="Score every block of consecutive decoder layers by how little it changes the hidden state, "
        "and report the best block to remove. Layers are 0-based; blocks are half-open [start, end).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # PruneMe's flags (--model_path, --dataset, --dataset_column, --batch_size, --max_length, --layers_to_skip,
    # --dataset_size, --dataset_subset) keep their names and defaults; every flag comes from an option group
    for group in (ModelOptions, DataOptions, ScanOptions):
        add_flags(p, group)
    p.add_argument("--debug", action="store_true", help="show the traceback of every error (also: DEPTH_PRUNE_DEBUG=1)")
    return p


def run(args: argparse.Namespace) -> dict[str, str]:
    """The CLI: parsed flags -> option groups -> scan()."""
    return run_scan(from_args(ModelOptions, args), from_args(DataOptions, args), from_args(ScanOptions, args))


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

    with progress_shown(not getattr(args, "no_progress", False)):  # --no_progress: every bar, not only the scan's
        return run_cli(command, debug_enabled(argv))


if __name__ == "__main__":
    sys.exit(main())
