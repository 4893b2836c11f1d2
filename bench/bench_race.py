"""The default choice's cost against the scan's, in wall time on the same texts: the scan, then
`plan --select race` with the plain cut (plan's default) and repair-aware (`--repair linear`, prune's
default), each as a user runs it (one process each, the model loaded in each).

    python bench/bench_race.py [--model smollm2|gemma3|PATH] [--texts 32] [--max_length 256] [--n 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return time.perf_counter() - t0, out.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3 (both embedded), or a checkpoint path")
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--n", type=int, default=4, help="block size")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_nll import model_path

    model = model_path(args.model)
    py = sys.executable
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        scan_s, _ = timed([py, "-m", "compute_block_similarity", "--model_path", model, "--dataset_size", str(args.texts),
                           "--max_length", str(args.max_length), "--layers_to_skip", str(args.n), "--no_progress",
                           "--output_dir", tmp])
        rows["scan"] = (scan_s, "")
        for repair in ("none", "linear"):
            s, err = timed([py, "-m", "slice_with_mergekit", "--scan", f"{tmp}/block_distances.json", "-o",
                            f"{tmp}/sliced-{repair}.yml", "--select", "race", "--repair", repair])
            sel = json.loads(Path(f"{tmp}/sliced-{repair}.select.json").read_text())
            rows[f"race, --repair {repair}"] = (s, f"{sel['removed'][0]}-{sel['removed'][-1] + 1}, "
                                                   f"{sel['passes']:.2f} calibration passes")
    print(f"# bench_race: {args.model}, {args.texts} texts, max_length {args.max_length}, n = {args.n}; "
          f"{platform.machine()}, {os.cpu_count()} CPUs")
    print("| step | wall s | x scan | choice |")
    print("|---|---|---|---|")
    for name, (s, what) in rows.items():
        print(f"| {name} | {s:.1f} | {s / scan_s:.2f} | {what} |")


if __name__ == "__main__":
    main()
