"""`python -m slice_with_mergekit`: scan -> sliced.yml, and the commands that follow it.

  python -m slice_with_mergekit --scan scan/block_distances.json [--layers_to_skip n | --start s | --remove 21-28,30]
  python -m slice_with_mergekit materialize sliced.yml out/
  python -m slice_with_mergekit repair out/ --plan sliced.yml
  python -m slice_with_mergekit verify out/ --plan sliced.yml [--source MODEL]
  python -m slice_with_mergekit evaluate out/ [--output DIR]
  python -m slice_with_mergekit heal out/ [--output out-healed]
  python -m slice_with_mergekit push out/ org/name [--private] [--revision R] [--dry_run]
  python -m slice_with_mergekit prune MODEL [--output prune_out]

Every command after the plan takes the checkpoint it acts on first (MODEL); where it writes is
--output (the scan keeps PruneMe's --output_dir; materialize takes PLAN OUTPUT as mergekit-yaml does).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from compute_block_similarity.errors import (
    check_output_dir,
    check_output_file,
    debug_enabled,
    run_cli,
)
from compute_block_similarity.flags import add_flags, from_args, progress_shown
from compute_block_similarity.options import PLACEMENT, DataOptions, ModelOptions

from .benchmarks import TaskOptions, run_tasks, task_manager
from .card import PLAN_FILE, write_card
from .evaluate import EvalOutput, SpeedOptions, WindowSettings, measure_speed, perplexity, write_eval
from .heal import HealConfig, HealRun, heal
from .materialize import materialize
from .pipeline import PruneArgs, prune
from .plan import PlanFlags, plan, write_config, write_selection
from .push import PushOptions, push
from .records import HeldOut
from .repair import repair_checkpoint
from .repair_fit import FitOptions, RepairOptions, summary
from .select import SelectOptions
from .verify import verify

log = logging.getLogger("slice_with_mergekit")


def cmd_plan(args: argparse.Namespace) -> int:
    o = from_args(PlanFlags, args)
    check_output_file(o.output, "--output")
    choices: list = []
    config = plan(o.scan, layers_to_skip=o.layers_to_skip, start=o.start, remove=o.remove,
                  model=o.model, dtype=o.dtype, load=from_args(ModelOptions, args, dtype="auto"),
                  choice=from_args(SelectOptions, args), repair=args.repair, choice_out=choices)
    write_config(config, o.output)
    if choices:
        log.info("wrote the selection details to %s", write_selection(o.output, choices[0]))
    log.info("wrote %s; build the pruned model with: mergekit-yaml %s out/", o.output, o.output)
    return 0


def repair_inputs(args: argparse.Namespace) -> tuple[list[str], dict]:
    return from_args(DataOptions, args).calibration()


def cmd_materialize(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "out")
    check_output_dir(os.path.dirname(os.path.abspath(args.out)), "out")  # the finished folder is renamed into place
    texts, cal = repair_inputs(args) if args.repair != "none" else ([], {})
    fit = FitOptions(method=args.repair, batch_size=args.batch_size, max_length=args.max_length)
    materialize(args.plan, args.out, device=args.device, trust_remote_code=args.trust_remote_code, repair=fit,
                repair_texts=texts, repair_calibration=cal, load=from_args(ModelOptions, args))
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    check_output_dir(args.model, "model")
    texts, cal = repair_inputs(args)
    fit = FitOptions(method=args.repair, batch_size=args.batch_size, max_length=args.max_length)
    res = repair_checkpoint(args.model, args.plan, texts, fit, source=args.source, load=from_args(ModelOptions, args),
                            calibration=cal)
    for b in res.bridges:
        print(f"  [{b.start}, {b.end}) -> {b.writer}: {b.decision}")
    print(f"repair {summary(res)}; recorded in {args.model.rstrip('/')}/repair.safetensors")
    write_card(Path(args.model), Path(args.plan) if args.plan else None)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify(args.model, args.plan, source=args.source, load=from_args(ModelOptions, args))
    print(report.render())
    return 0 if report.ok else 1


def cmd_push(args: argparse.Namespace) -> int:
    o = from_args(PushOptions, args)
    files = push(args.model, args.repo_id, plan_path=o.plan, scan_path=o.scan, private=o.private,
                 revision=o.revision, dry_run=o.dry_run, base_model=o.base_model)
    for f in files:
        print(f"  {f}  ({(Path(args.model) / f).stat().st_size:,} bytes)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    bench = from_args(TaskOptions, args)
    tm = task_manager(bench) if bench.tasks else None  # task names checked before the model loads
    texts = from_args(DataOptions, args).texts()
    model, tok = from_args(ModelOptions, args).load(args.model)
    res = perplexity(model, tok, texts, WindowSettings(args.max_length, args.stride), batch_size=args.batch_size,
                     progress=True, logits_bytes=args.logits_bytes)
    extra: dict = {}
    speed, where = from_args(SpeedOptions, args), from_args(EvalOutput, args)
    if speed.speed:
        import dataclasses

        sp = measure_speed(model, tok, texts, prompt_tokens=speed.speed_prompt_tokens,
                           new_tokens=speed.speed_new_tokens, repeats=speed.speed_repeats)
        extra["speed"] = dataclasses.asdict(sp)
        print(f"speed: prefill {sp.prefill_tokens_per_s:,.0f} tok/s, decode {sp.decode_tokens_per_s:,.1f} tok/s "
              f"(medians of {sp.repeats}; {sp.prompt_tokens}-token prompt, {sp.new_tokens} new tokens, {sp.device}); "
              f"weights {sp.weights_mib:,.0f} MiB, KV cache {sp.kv_cache_mib:,.1f} MiB"
              + (f", peak {sp.peak_mib:,.0f} MiB" if sp.peak_mib else ""))
    if bench.tasks:
        extra["lm_eval"] = rec = run_tasks(model, tok, bench, tm)
        for name, t in rec.tasks.items():
            print(f"{name}: {t.headline} {t.score:.4f} ({t.num_fewshot}-shot, {t.samples} documents)")
    print(f"perplexity {res.perplexity:.4f} over {res.tokens_scored} tokens ({res.num_texts} texts, "
          f"max_length {res.max_length}, stride {res.stride})")
    into = where.output or (args.model if os.path.isdir(args.model) else None)
    if into:
        held = HeldOut(name=args.dataset, split=args.dataset_subset, texts=res.num_texts)
        log.info("wrote %s", write_eval(into, where.name, res, held, **extra))
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    cfg, run = from_args(HealConfig, args), from_args(HealRun, args)
    data = from_args(DataOptions, args)
    train, held = data.texts(), data.texts(run.eval_subset, run.eval_size)
    out = run.output or args.model.rstrip("/") + "-healed"
    summary = heal(args.model, train, held, out, cfg, run=run, data=f"{args.dataset} (split {args.dataset_subset})",
                   teacher_load=from_args(ModelOptions, args, prefix="teacher_"))
    print(f"perplexity before healing {summary.after_cut:.3f} -> after healing {summary.after_heal:.3f} "
          f"(best step {summary.best_step}); merged model in {out}")
    write_card(Path(out), Path(args.model) / PLAN_FILE)  # with the healing ledger
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    a = from_args(PruneArgs, args)
    check_output_dir(a.work_dir, "--work_dir")
    print(f"report: {prune(a)}")
    return 0


def data_args(p: argparse.ArgumentParser, split: str = "train", batching: bool = False,
              helps: dict[str, str] | None = None, **defaults: object) -> None:
    """The data flags of DataOptions (with its batching flags if ``batching``), reading ``split`` by default."""
    skip = {"streaming"} | (set() if batching else {"batch_size", "max_length"})
    add_flags(p, DataOptions, skip=skip, title="Data", defaults={"dataset_subset": split, **defaults}, helps=helps)


def model_args(p: argparse.ArgumentParser, *names: str, helps: dict[str, str] | None = None, **defaults: object) -> None:
    """The named flags of ModelOptions (how the command loads a model), with the placement flags
    (--device_map, --max_memory, --offload_folder) for a model bigger than one device."""
    add_flags(p, ModelOptions, only=[*names, *PLACEMENT], title="Model loading and placement", defaults=defaults,
              helps=helps)


def repair_args(p: argparse.ArgumentParser, default: str) -> None:
    add_flags(p, RepairOptions, defaults={"repair": default})
    data_args(p, batching=True, dataset_size=256, max_length=256,
              helps={"max_length": "calibration tokens per text for the repair fit"})


def checkpoint_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """A pruned checkpoint and the plan and dense source it came from (repair, verify)."""
    p.add_argument("model", help=out_help)
    p.add_argument("--plan", default="sliced.yml", help="the sliced.yml it was built from")
    p.add_argument("--source", default=None, help="dense source model; default: the plan's")


def plan_parser(p: argparse.ArgumentParser) -> None:
    add_flags(p, PlanFlags)
    add_flags(p, SelectOptions)
    add_flags(p, RepairOptions, defaults={"repair": "none"}, title="Repair-aware selection: each candidate is scored "
              "after its bridge (sliced.yml stays the plain cut: bridge after the merge with the repair command)")
    model_args(p, "device", "trust_remote_code", helps={"device": "where the candidates are scored"})


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "plan": (cmd_plan, "write sliced.yml from a scan (the default command)"),
    "materialize": (cmd_materialize, "run sliced.yml through MergeKit and fix per-layer config, tied embeddings, tokenizer"),
    "repair": (cmd_repair, "fit a least-squares bridge over each cut and fold it into the checkpoint (no training)"),
    "verify": (cmd_verify, "check a pruned checkpoint against its source and plan"),
    "push": (cmd_push, "write a model card and upload the checkpoint to the Hugging Face Hub"),
    "evaluate": (cmd_evaluate, "token-weighted perplexity on held-out text (and lm-eval --tasks); writes eval.json"),
    "heal": (cmd_heal, "heal a pruned checkpoint (LoRA, or the layers at the cut; LM loss or distillation "
             "from the dense model) on transformers.Trainer, keep the best by held-out perplexity, merge"),
    "prune": (cmd_prune, "scan -> choose -> sliced.yml -> materialize -> verify -> evaluate -> (heal) -> report"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slice_with_mergekit", description=__doc__ + "\nAny command takes --debug "
                                "(or DEPTH_PRUNE_DEBUG=1) to show the traceback of an error, and --no_progress to "
                                "hide every progress bar.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    parsers = {name: sub.add_parser(name, help=h, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
               for name, (_, h) in COMMANDS.items()}
    plan_parser(parsers["plan"])
    m = parsers["materialize"]
    m.add_argument("plan", help="sliced.yml (positional, as mergekit-yaml takes it)")
    m.add_argument("out", metavar="output", help="output folder (positional, as mergekit-yaml takes it)")
    model_args(m, "device", "trust_remote_code", device="cpu", helps={"device": "device MergeKit computes on"})
    repair_args(m, default="none")
    f = parsers["repair"]
    checkpoint_args(f, "pruned checkpoint folder, from mergekit-yaml or materialize (patched in place)")
    model_args(f, "dtype", "device", "trust_remote_code",
               helps={"dtype": "dtype the source runs in for the fit (sums are float64)"})
    repair_args(f, default="linear")
    checkpoint_args(parsers["verify"], "pruned checkpoint folder")
    model_args(parsers["verify"])
    u = parsers["push"]
    u.add_argument("model", help="pruned checkpoint folder")
    u.add_argument("repo_id", help="org/name on the Hub")
    add_flags(u, PushOptions)
    e = parsers["evaluate"]
    e.add_argument("model", help="checkpoint folder or Hub id")
    data_args(e, split="test", batching=True, max_length=512, batch_size=4, helps={"max_length": "tokens per window"})
    e.add_argument("--stride", type=int, default=256, help="new tokens scored per window")
    add_flags(e, SelectOptions, only=["logits_bytes"], title="Scoring")
    model_args(e, "dtype", "device", "trust_remote_code")
    add_flags(e, TaskOptions)
    add_flags(e, EvalOutput)
    add_flags(e, SpeedOptions)
    h = parsers["heal"]
    h.add_argument("model", help="pruned (and repaired) checkpoint folder")
    data_args(h)
    add_flags(h, HealRun)
    add_flags(h, HealConfig)
    add_flags(h, ModelOptions, prefix="teacher_", only=PLACEMENT, title="Teacher placement (--loss kd): accelerate "
              "places the dense teacher instead of a whole copy per process")
    r = parsers["prune"]
    r.add_argument("model", help=PruneArgs.model_fields["model"].description)
    add_flags(r, PruneArgs, skip={"model"})
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["plan", *argv]
    debug, quiet = debug_enabled(argv), "--no_progress" in argv
    args = build_parser().parse_args([a for a in argv if a not in ("--debug", "--no_progress")])
    if quiet and hasattr(args, "no_progress"):
        args.no_progress = True
    with progress_shown(not quiet):
        return run_cli(lambda: COMMANDS[args.command][0](args), debug)


if __name__ == "__main__":
    sys.exit(main())
