"""What the SmolLM2 benchmarks share: the calibration / held-out flags, logging, and loading the
model with its train-split calibration texts and test-split held-out texts."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def add_data_flags(p: argparse.ArgumentParser, calib: int) -> None:
    p.add_argument("--model_path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--calib", type=int, default=calib, help="calibration texts (train split)")
    p.add_argument("--heldout", type=int, default=64, help="held-out texts (test split)")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--json", default=None, help="also write the figures here")


def load(args: argparse.Namespace) -> tuple[Any, Any, list[str], list[str]]:
    """(model in float32, tokenizer, calibration texts, held-out texts), with logging set up."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from compute_block_similarity.data import load_texts
    from compute_block_similarity.model import default_model_dir, load_model

    model, tok = load_model(args.model_path or default_model_dir(), dtype="float32", device="auto")
    return model, tok, load_texts(size=args.calib), load_texts(split="test", size=args.heldout)


JUDGE_VERSION = "readmes2"  # the READMEs judge in hash order (every package), not by package name


def judged_key(path: Any, calib: int, judge: int, max_length: int, removed: Any, dataset: str = "") -> str:
    """bench_transfer.py's --cache key of a block judged under its final bridge (fitted on ``calib``
    texts of ``dataset``, "" for the default corpus); bench_race_rules.py reads the same keys."""
    data = f"{dataset}|" if dataset else ""
    return f"{path}|{data}{calib}|{judge}|{JUDGE_VERSION}|{max_length}|{','.join(map(str, removed))}"
