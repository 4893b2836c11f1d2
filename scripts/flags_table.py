"""Print the flag table of docs/flags.md from the parsers (tests/test_flags_doc.py checks the page against
them); `python scripts/flags_table.py --write` replaces the table in docs/flags.md."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
ORDER = ["scan", "plan", "materialize", "repair", "verify", "push", "evaluate", "heal", "prune"]


def meaning(action: argparse.Action) -> str:
    h = (action.help or "").replace("%%", "%")
    depth, cut = 0, len(h)
    for i, ch in enumerate(h):  # the first clause: up to a '; ' outside parentheses
        depth += ch == "("
        depth -= ch == ")"
        if h.startswith("; ", i) and depth == 0:
            cut = i
            break
    return h[:cut].replace("|", "/")


def rows() -> list[str]:
    from test_flags_doc import flags, shown

    seen: dict[tuple[str, str], dict] = {}
    for cmd, flag, a in sorted(flags(), key=lambda x: ORDER.index(x[0])):
        r = seen.setdefault((flag, shown(a)), {"cmds": [], "helps": {}})
        r["cmds"].append(cmd)
        if meaning(a):
            r["helps"].setdefault(meaning(a), []).append(cmd)
    for (f, _), r in seen.items():  # one help, or each command's own when they differ
        hs = r["helps"] or next((x["helps"] for (g, _), x in seen.items() if g == f and x["helps"]), {})
        r["help"] = next(iter(hs), "") if len(hs) <= 1 else "; ".join(f"{', '.join(c)}: {h}" for h, c in hs.items())
    out = [f"| `{f}` | {', '.join(r['cmds'])} | `{d}` | {r['help']} |" for (f, d), r in sorted(seen.items())]
    return out + ["| `--heal_<flag>` | prune | as `heal` | every recipe flag of `heal` (`--heal_loss`, `--heal_lr`, "
                  "`--heal_steps`, ...), used with `--heal` |"]


def main() -> None:
    table = "\n".join(["| flag | commands | default | meaning |", "|---|---|---|---|", *rows()])
    if "--write" not in sys.argv:
        print(table)
        return
    page = ROOT / "docs" / "flags.md"
    new = re.sub(r"\| flag \| commands \| default \| meaning \|\n(\|.*\|\n)+", table + "\n", page.read_text(), count=1)
    page.write_text(new)


if __name__ == "__main__":
    main()
