"""`python -m slice_with_mergekit`: scan -> sliced.yml, and the commands that follow it.

  python -m slice_with_mergekit --scan scan/block_distances.json [--layers_to_skip n | --start s | --remove 21-28,30]
  python -m slice_with_mergekit materialize sliced.yml out/
  python -m slice_with_mergekit verify out/ --plan sliced.yml [--source MODEL]
  python -m slice_with_mergekit push out/ org/name [--private] [--revision R] [--dry-run]
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from compute_block_similarity.errors import UserError

log = logging.getLogger("slice_with_mergekit")


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import plan, write_config

    choices: list = []
    config = plan(args.scan, layers_to_skip=args.layers_to_skip, start=args.start, remove=args.remove,
                  model=args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                  select=args.select, top_k=args.top_k, select_texts=args.select_texts, choice_out=choices)
    write_config(config, args.output)
    if choices:
        import dataclasses
        import json
        from pathlib import Path

        from compute_block_similarity.atomic import write_text

        sel = Path(args.output).with_suffix(".select.json")
        write_text(sel, json.dumps(dataclasses.asdict(choices[0]), indent=1) + "\n")
        log.info("wrote the selection details to %s", sel)
    log.info("wrote %s; build the pruned model with: mergekit-yaml %s out/", args.output, args.output)
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    from .materialize import materialize

    materialize(args.plan, args.out, device=args.device, trust_remote_code=args.trust_remote_code)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    report = verify(args.out, args.plan, source=args.source)
    print(report.render())
    return 0 if report.ok else 1


def cmd_push(args: argparse.Namespace) -> int:
    from .push import push

    push(args.out, args.repo_id, plan_path=args.plan, scan_path=args.scan, private=args.private,
         revision=args.revision, dry_run=args.dry_run)
    return 0


def plan_parser(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--scan", default="block_distances.json", help="block_distances.json written by compute_block_similarity")
    a("--output", "-o", default="sliced.yml", help="where to write the MergeKit config")
    a("--layers_to_skip", type=int, default=None, help="remove the scan's best block of n layers (default: the scan's n)")
    a("--start", type=int, default=None, help="remove the block [start, start+n) instead of the best one")
    a("--remove", default=None, help="remove any set of 0-based layers, e.g. '21-28,30' (inclusive runs)")
    a("--model", default=None, help="source model path or id; default: the one the scan recorded")
    a("--dtype", default=None, help="output dtype; default: the source model's")
    a("--select", default="angle", choices=["angle", "ppl", "iterative", "deepest"],
      help="angle: the scan's best block; ppl: re-rank the scan's top-k blocks by the real perplexity of the "
      "model without them; iterative: remove one layer at a time (SLEB); deepest: the n deepest but the last")
    a("--top_k", type=int, default=5, help="candidates that --select ppl re-ranks")
    a("--select_texts", type=int, default=None, help="calibration texts for --select ppl/iterative (default: the scan's)")
    a("--trust_remote_code", action="store_true", help="allow model code from the Hub")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "plan": (cmd_plan, "write sliced.yml from a scan (the default command)"),
    "materialize": (cmd_materialize, "run sliced.yml through MergeKit and fix per-layer config, tied embeddings, tokenizer"),
    "verify": (cmd_verify, "check a pruned checkpoint against its source and plan"),
    "push": (cmd_push, "write a model card and upload the checkpoint to the Hugging Face Hub"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slice_with_mergekit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    parsers = {name: sub.add_parser(name, help=h, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
               for name, (_, h) in COMMANDS.items()}
    plan_parser(parsers["plan"])
    m = parsers["materialize"]
    m.add_argument("plan", help="sliced.yml")
    m.add_argument("out", help="output folder")
    m.add_argument("--device", default="cpu", help="device MergeKit computes on")
    m.add_argument("--trust_remote_code", action="store_true")
    v = parsers["verify"]
    v.add_argument("out", help="pruned checkpoint folder")
    v.add_argument("--plan", default="sliced.yml", help="the sliced.yml it was built from")
    v.add_argument("--source", default=None, help="source model; default: the plan's")
    u = parsers["push"]
    u.add_argument("out", help="pruned checkpoint folder")
    u.add_argument("repo_id", help="org/name on the Hub")
    u.add_argument("--plan", default=None, help="sliced.yml (default: out/mergekit_config.yml)")
    u.add_argument("--scan", default=None, help="block_distances.json, for the card's scores")
    u.add_argument("--private", action="store_true", help="create the repository private")
    u.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    u.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="write the card and list what would be uploaded, upload nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["plan", *argv]
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][0](args)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
