"""Which race rule picks a cut that transfers? Replays the default choice (`--select race --repair
linear`, cross-fitted bridges, `--max_bridge_gain 5`) under several race rules (`Race` fields) and
several shuffled window orders (the Scorer's seed), and judges each winner by bench_transfer's
exhaustive table: every contiguous block cut and bridged on the same calibration text, judged on the
stdlib test split (in-domain) and on python-package-readmes (out-of-domain).

    python bench/bench_race_rules.py --judged TRANSFER_CACHE [--sizes 4,8] [--seeds 8] [--cache F]
        [--rules "loss:tie_break=loss;w66:min_windows=66,tie_break=loss;all:first_share=1;scan:"]

TRANSFER_CACHE is bench_transfer.py's --cache file at the same --calib (it holds the exhaustive
judgement). The race is the library's own `select_race`; only the forwards are replayed: each
(cut, window) loss, bridged or plain, is run once and kept in --cache, so many rules and orders cost
little more than one full table. Passes are counted as the live race counts them (a bridge fit
included). One simplification: the set-aside test (log_gain() on the first share) always reads the
windows of seed 0's order, so every order sets aside the same cuts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slice_with_mergekit.scoring import ScoreSettings, Scorer  # noqa: E402
from slice_with_mergekit.race import Race  # noqa: E402


class Replay(Scorer):
    """A Scorer whose per-window losses come from ``table`` when it has them (and go into it when
    not), still counting the tokens as run; its bridges are shared between replays."""

    table: dict[str, list[float]]
    save: Any
    fit_tokens: float = 0  # tokens_run spent on bridge fits

    def _run(self, key: tuple[int, ...], part: list[int], bridge: Any) -> list[tuple[float, int]]:
        kind = "p" if isinstance(bridge, nullcontext) else "b"
        name = lambda i: f"{','.join(map(str, key))}|{kind}|{i}"  # noqa: E731
        miss = [i for i in part if name(i) not in self.table]
        if miss:
            for i, r in zip(miss, Scorer._run(self, key, miss, bridge)):  # counts the tokens it ran
                self.table[name(i)] = list(r)
            self.save()
        self.tokens_run += sum(len(self.wins[i][0]) for i in part if i not in miss)
        return [(self.table[name(i)][0], int(self.table[name(i)][1])) for i in part]

    def prepare(self, cuts: Any) -> None:
        if self.repair == "none":
            return
        todo = [c for c in dict.fromkeys(tuple(sorted(c)) for c in cuts if c) if c not in self.fitted]
        if not todo:
            return
        before = self.tokens_run
        if missing := [c for c in todo if (c, 0) not in self.bridges]:
            self._fit(missing)  # counts its pass
        else:
            self.tokens_run += sum(self.total_tokens * len(self.bridge_texts(f)) / len(self.texts)
                                   for f in range(self.folds))
        self.fit_tokens += self.tokens_run - before
        self.fitted |= set(todo)

    def log_gain(self, removed: Any, idx: Any) -> tuple[float, float]:
        return super().log_gain(removed, sorted(self.gain_order[: len(idx)]))


def replay(master: Replay, seed: int) -> Replay:
    """A fresh scorer with ``master``'s windows, bridges and table, the windows in ``seed``'s order."""
    s = copy.copy(master)
    s.windows, s.bridged, s._plain, s.tokens_run, s.fitted, s.fit_tokens = {}, {}, None, 0, set(), 0
    s.order = list(range(len(s.wins)))
    random.Random(seed).shuffle(s.order)
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3 (both embedded), or a checkpoint path")
    p.add_argument("--sizes", default="4,8")
    p.add_argument("--calib", type=int, default=256, help="calibration texts (train split), as in --judged")
    p.add_argument("--judge", type=int, default=32, help="texts of each judging corpus, as in --judged")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--seeds", type=int, default=8, help="window orders per rule (seed 0 is the live default's)")
    p.add_argument("--rules", default="loss:tie_break=loss;w33:min_windows=33,tie_break=loss;scan:tie_break=scan",
                   help="name:field=value,... (Race fields: first_share, z, min_windows, max_gain, tie_break, tie_margin), separated by ';'; first_share=1 scores every candidate "
                   "on every window (one order)")
    p.add_argument("--judged", required=True, help="bench_transfer.py --cache file with the exhaustive judgement")
    p.add_argument("--cache", default=None, help="JSON file keeping the per-window calibration losses")
    p.add_argument("--json", default=None, help="also write every replay's winner and passes here")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_nll import model_path
    from common import judged_key

    from compute_block_similarity import ScanSettings, scan_model
    from compute_block_similarity.data import load_texts
    from compute_block_similarity.model import load_model
    from compute_block_similarity.ranges import format_layers
    from compute_block_similarity.report import json_payload
    from compute_block_similarity.scanfile import ScanFile
    from slice_with_mergekit.select import bridge_dependence, select_race

    path = model_path(args.model)
    judged = json.loads(Path(args.judged).read_text())
    model, tok = load_model(path, dtype="float32", device="auto")
    calib = load_texts("python-stdlib-docs", split="train", size=args.calib)
    ml = args.max_length
    cache_id = f"{Path(path).name}|{args.calib}|{ml}"
    store = json.loads(Path(args.cache).read_text()) if args.cache and os.path.exists(args.cache) else {}
    table = store.setdefault(cache_id, {})

    def save() -> None:
        if args.cache:
            tmp = Path(args.cache + ".tmp")
            tmp.write_text(json.dumps(store))
            os.replace(tmp, args.cache)

    rules = {}  # name -> Race (prune's defaults but the fields given)
    for item in filter(None, (r.strip() for r in args.rules.split(";"))):
        name, _, kv = item.partition(":")
        fields = dict(x.split("=") for x in kv.split(",") if x)
        rules[name] = Race(**{k: type(getattr(Race, k))(v) for k, v in fields.items()})

    t0 = time.perf_counter()
    res = scan_model(model, tok, calib, ScanSettings(batch_size=8, max_length=ml, progress=False))
    scan = ScanFile.model_validate({**json_payload(res, 1), "model": str(path)})
    L = res.num_layers
    master = Replay(model, tok, calib, ScoreSettings(max_length=ml, stride=ml, repair="linear"))
    master.table, master.save, master.fitted, master.gain_order = table, save, set(), list(master.order)
    rows = []
    for n in map(int, args.sizes.split(",")):
        ex = {s: judged[judged_key(path, args.calib, args.judge, ml, range(s, s + n))] for s in range(L - n + 1)}
        judges = list(ex[0])
        best = {k: min(v[k] for v in ex.values()) for k in judges}
        exhaustive = (L - n + 1) + sum(len(master.bridge_texts(f)) for f in range(2)) / len(calib)
        for name, cfg in rules.items():
            for seed in range(1 if cfg.first_share >= 1 else args.seeds):  # every window first: order moot
                sc = replay(master, seed)
                c = bridge_dependence(sc, select_race(scan, n, sc, 16, cfg), cfg)  # as choose() runs it
                fit, plain = sc.fit_tokens / sc.total_tokens, sc.plain().tokens_run / sc.total_tokens
                rows.append({"n": n, "rule": name, "seed": seed, "ours": format_layers(c.removed), "passes": c.passes,
                             "cost": c.passes / exhaustive, "fit": fit, "plain": plain,
                             "windows": {x["removed"]: x["windows"] for x in c.candidates},
                             **{k: ex[c.removed[0]][k] / best[k] for k in judges}})
                print(f"n={n} {name} seed {seed}: {rows[-1]['ours']} passes {c.passes:.2f} = bridge fits {fit:.2f} + "
                      f"bridged {c.passes - fit - plain:.2f} + plain {plain:.2f} ({len(table)} losses kept, "
                      f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {dev} ({platform.machine()}), torch {torch.__version__}; {time.perf_counter() - t0:.0f} s")
    print(f"model: {Path(path).name}, {L} layers; calibration {args.calib} python-stdlib-docs texts (train split), "
          f"max_length {ml}, {master.num_windows} windows; --select race --repair linear --max_bridge_gain 5; "
          f"{args.seeds} window orders per rule; judges: {args.judge} texts each, ratio = the winner's perplexity "
          "over the best block's (cut and bridged on the same calibration text)")
    for name, cfg in rules.items():
        print(f"rule {name}: {cfg}")
    short = {judges[0]: "in-domain", judges[1]: "out-of-domain"}
    print(f"{'n':>2} {'rule':<6} {'winners (orders)':<40} " + " ".join(f"{short[k] + ' mean/max':>22}" for k in judges)
          + f" {'both <= 1.05':>12} {'cost mean/max':>14}")
    for n in map(int, args.sizes.split(",")):
        for name in rules:
            rs = [r for r in rows if r["n"] == n and r["rule"] == name]
            wins = ", ".join(f"{b} x{k}" for b, k in Counter(r["ours"] for r in rs).most_common())
            both = sum(all(r[k] <= 1.05 for k in judges) for r in rs)
            print(f"{n:>2} {name:<6} {wins:<40} " + " ".join(
                f"{statistics.mean(r[k] for r in rs):>14.3f} / {max(r[k] for r in rs):.3f}" for k in judges)
                + f" {both:>7} of {len(rs):<2} {statistics.mean(r['cost'] for r in rs):>7.0%} / "
                f"{max(r['cost'] for r in rs):.0%}")


if __name__ == "__main__":
    main()
