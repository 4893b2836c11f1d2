"""Held-out perplexity against training tokens for healing recipes, on SmolLM2-135M-Instruct with a
block removed (default [12,20), i.e. layers 12-19).

Each recipe heals the plain cut or the repaired cut (the least-squares bridge, fitted on the train
split) for --steps steps of 4 x 256 tokens, on the train split. Printed per recipe: perplexity on
the first --heldout test texts at steps 0/25/50/100 (fixed steps, no selection), the share of the
cut-to-dense gap closed at the last step, and the best kept model (chosen on those texts) judged on
the remaining test texts, which no choice saw, and the share of the unseen gap it closes: the
figure the defaults are tuned by (target: 90% in 100 steps from the repaired cut).

    python bench/bench_heal.py [--recipes lm,kd,lm@repaired,kd@repaired] [--remove 12-20] [--steps 100]

A recipe is a name from RECIPES, '@repaired' to start from the repaired cut, and ':k=v' overrides of
heal.HealConfig, e.g. 'kd@repaired:lr=3e-4:alpha=8'.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

RECIPES = {  # name -> HealConfig overrides
    "lm": {"loss": "lm"},  # HealConfig's defaults: LoRA on every linear layer but the LM head, lr 2e-3
    "lm_mlp": {"loss": "lm", "target_modules": ["mlp"], "lr": 1e-3},  # the default before: LoRA on the MLP only
    "kd": {"loss": "kd"},
    "lm+kd": {"loss": "lm+kd"},
    "layers": {"loss": "lm", "train_layers": "auto", "lr": 1e-4},
    "lm_all": {"loss": "lm", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"], "lr": 1e-3},
    "kd_all": {"loss": "kd", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]},
    "paper": {"loss": "lm", "alpha": 8, "lr": 3e-4, "dropout": 0.05},  # the old default (Gromov et al.)
}


def parse_recipe(spec: str) -> tuple[str, bool, dict]:
    name, *kvs = spec.split(":")
    base, _, start = name.partition("@")
    if base not in RECIPES or start not in ("", "repaired"):
        raise SystemExit(f"unknown recipe {spec!r}; names: {', '.join(RECIPES)} (+ '@repaired', ':key=value')")
    over = dict(RECIPES[base])
    for kv in kvs:
        k, v = kv.split("=", 1)
        over[k] = json.loads(v) if v[:1].isdigit() or v in ("true", "false", "null") else v
    return name, start == "repaired", over


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None)
    p.add_argument("--remove", default="12-20", help="half-open block start-end")
    p.add_argument("--recipes", default="lm,kd,lm@repaired,kd@repaired")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--report_steps", default="25,50,100")
    p.add_argument("--heldout", type=int, default=64, help="test texts the best step is chosen on")
    p.add_argument("--work", default=None, help="keep checkpoints here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from compute_block_similarity.data import load_texts
    from compute_block_similarity.model import default_model_dir
    from slice_with_mergekit.evaluate import WindowSettings, perplexity
    from slice_with_mergekit.heal import HealConfig, heal
    from slice_with_mergekit.materialize import materialize
    from slice_with_mergekit.repair_fit import FitOptions
    from slice_with_mergekit.plan import build_config, write_config
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = args.model_path or default_model_dir()
    s, e = (int(x) for x in args.remove.split("-"))
    L = AutoConfig.from_pretrained(src).num_hidden_layers
    test = load_texts(split="test")
    select, unseen = test[: args.heldout], test[args.heldout:]
    train = load_texts(split="train")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_heal_"))
    work.mkdir(parents=True, exist_ok=True)
    write_config(build_config(src, L, list(range(s, e)), None), work / "sliced.yml")
    ckpt = {"cut": work / "cut", "repaired": work / "repaired"}
    if not ckpt["cut"].exists():
        materialize(str(work / "sliced.yml"), str(ckpt["cut"]))
    if not ckpt["repaired"].exists():
        materialize(str(work / "sliced.yml"), str(ckpt["repaired"]), repair=FitOptions(max_length=256),
                    repair_texts=load_texts(size=256))

    def ppl(path: Path | str, texts: list[str]) -> float:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return perplexity(m, AutoTokenizer.from_pretrained(path), texts, WindowSettings(max_length=256, stride=256), batch_size=8).perplexity

    base = {k: {"select": ppl(v, select), "unseen": ppl(v, unseen)} for k, v in
            {"dense": src, "cut": ckpt["cut"], "repaired": ckpt["repaired"]}.items()}
    report = [int(x) for x in args.report_steps.split(",")]
    rows = []
    for spec in args.recipes.split(","):
        name, repaired, over = parse_recipe(spec)
        cfg = HealConfig(**{"steps": args.steps, "eval_every": 25, **over})
        out = work / f"healed-{name.replace('@', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(f"{out}.work", ignore_errors=True)
        t0 = time.perf_counter()
        summ = heal(str(ckpt["repaired" if repaired else "cut"]), train, select, str(out), cfg, progress=False)
        wall = time.perf_counter() - t0
        at = {h.step: h.perplexity for h in summ.history}
        last = at[max(at)]
        gap = (base["cut"]["select"] - last) / (base["cut"]["select"] - base["dense"]["select"])
        unseen_ppl = ppl(out, unseen)
        unseen_gap = (base["cut"]["unseen"] - unseen_ppl) / (base["cut"]["unseen"] - base["dense"]["unseen"])
        rows.append({"recipe": spec, "start": "repaired" if repaired else "cut", "config": cfg.model_dump(),
                     "perplexity_at": at, "gap_closed_last": gap, "best_step": summ.best_step,
                     "best_unseen": unseen_ppl,
                     "unseen_gap_closed": unseen_gap, "tokens_per_step": summ.tokens_per_step, "wall_s": wall})
        shutil.rmtree(f"{out}.work", ignore_errors=True)
        logging.info("%s: %s", spec, rows[-1])

    print(f"SmolLM2-135M-Instruct, [{s}, {e}) removed ({e - s} of {L} layers); {platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"train: {len(train)} train-split texts packed in 256-token blocks; perplexity on test texts [0, "
          f"{len(select)}) (the best step is chosen on these) and, for the kept model, on the unseen test texts "
          f"[{len(select)}, {len(test)})")
    print(f"dense {base['dense']['select']:.2f} / {base['dense']['unseen']:.2f} unseen; cut "
          f"{base['cut']['select']:.2f} / {base['cut']['unseen']:.2f}; repaired {base['repaired']['select']:.2f} / "
          f"{base['repaired']['unseen']:.2f}")
    hdr = " | ".join(f"step {k} ({k * rows[0]['tokens_per_step'] // 1000}k tok)" for k in report) if rows else ""
    print(f"| recipe | start (step 0) | {hdr} | gap closed at {args.steps} | kept model, unseen | unseen gap closed | wall |")
    print("|---|---|" + "---|" * len(report) + "---|---|---|---|")
    for r in rows:
        at = r["perplexity_at"]
        cells = " | ".join(f"{at[k]:.2f}" if k in at else "-" for k in report)
        print(f"| {r['recipe']} | {at[0]:.2f} | {cells} | {100 * r['gap_closed_last']:.1f}% | "
              f"{r['best_unseen']:.2f} (step {r['best_step']}) | "
              f"{100 * r['unseen_gap_closed']:.1f}% | {r['wall_s']:.0f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps({"base": base, "rows": rows, "remove": [s, e]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
