"""The flag table (docs/flags.md) is the truth: every flag it lists exists on each command it names, with
the default it states, and every flag of every command is listed."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

FLAGS_PAGE = Path(__file__).parents[1] / "docs" / "flags.md"


def parsers() -> dict[str, argparse.ArgumentParser]:
    from compute_block_similarity.cli import build_parser as scan_parser
    from slice_with_mergekit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {"scan": scan_parser(), **sub.choices}


def shown(action: argparse.Action) -> str:
    d = action.default
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        return "on" if d else "off"
    if isinstance(d, list):
        return ",".join(map(str, d))
    return "-" if d is None else str(d)


def table() -> list[tuple[str, list[str], str]]:
    body = FLAGS_PAGE.read_text()
    rows = []
    for m in re.finditer(r"^\| `(--[\w<>]+)` \| ([\w, ]+) \| `([^`]*)` \|", body, re.M):
        rows.append((m.group(1), [c.strip() for c in m.group(2).split(",")], m.group(3)))
    return rows


def test_every_flag_in_the_readme_exists_with_its_default():
    ps = parsers()
    rows = table()
    assert len(rows) > 50
    for flag, cmds, default in rows:
        if flag == "--heal_<flag>":
            continue
        for cmd in cmds:
            action = next((a for a in ps[cmd]._actions if flag in a.option_strings), None)
            assert action is not None, f"docs/flags.md: {flag} is not a flag of {cmd}"
            assert shown(action) == default, f"docs/flags.md: {cmd} {flag} defaults to {shown(action)}, not {default}"


def flags() -> list[tuple[str, str, argparse.Action]]:
    """(command, canonical flag, action) for every flag the table must list (prune's --heal_* are one row)."""
    from slice_with_mergekit.heal import HealConfig

    recipe = {f"--heal_{name}" for name in HealConfig.model_fields}
    out = []
    for cmd, p in parsers().items():
        for a in p._actions:
            if not a.option_strings or a.dest == "help" or isinstance(a, argparse._SubParsersAction):
                continue
            if not (cmd == "prune" and a.option_strings[0] in recipe):
                out.append((cmd, a.option_strings[0], a))
    return out


def test_every_flag_is_in_the_readme():
    listed = {(flag, cmd) for flag, cmds, _ in table() for cmd in cmds}
    for cmd, flag, _ in flags():
        assert (flag, cmd) in listed, f"{cmd} {flag} is missing from the flag table in docs/flags.md"


def test_prune_heal_flags_mirror_the_heal_command():
    from slice_with_mergekit.heal import HealConfig

    prune = {a.dest: a for a in parsers()["prune"]._actions}
    for name, f in HealConfig.model_fields.items():
        if name != "max_length":
            assert prune[f"heal_{name}"].default == f.default, name
