"""`prune`'s report.md: the models side by side (perplexity, the standard suite's retained %, retained
above chance, ours against each method), the second corpus, the healing ledger, the budget curve, the
candidates, each stage's cost, and the two plots."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from compute_block_similarity.atomic import atomic_path, write_text
from compute_block_similarity.ranges import format_layers, format_ranges
from compute_block_similarity.report import plot_triangle
from compute_block_similarity.scanfile import ScanFile

from .benchmarks import above_chance, above_chance_tasks, compare, fmt, retained
from .methods import METHODS, OURS
from .prune_args import PruneArgs
from .records import BudgetRecord, HealLedger, Selection, TasksRecord
from .stage_cache import stage_lines

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One pruned model of the job as the report shows it: what it removes and how each form scores."""

    n: int
    name: str  # ours, or a method of methods.METHODS
    repair: str
    removed: list[int]
    ranges: list[tuple[int, int]]  # kept `layer_range`s
    source: float  # the dense model's held-out perplexity
    cut: float  # the plain cut's
    repaired: float | None = None
    healed: float | None = None
    ledger: HealLedger | None = None
    tokens: int = 0  # tokens scored per perplexity
    tasks: dict[str, TasksRecord] = field(default_factory=dict)  # form (cut, repaired, healed): lm-eval's scores
    shift: dict[str, float] = field(default_factory=dict)  # the second corpus: form -> perplexity
    dir: str = ""  # its folder under --work_dir
    same_as: str | None = None  # a baseline that removes what ours removes: that row


def plot_ppl(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns, dense = [0] + [r.n for r in rows], [rows[0].source]
    ax.plot(ns, dense + [r.cut for r in rows], "o-", label="cut")
    if any(r.repaired for r in rows):
        ax.plot(ns, dense + [r.repaired for r in rows], "^-", label="cut + bridge (no training)")
    healed = [r for r in rows if r.healed]
    if healed:
        ax.plot([0] + [r.n for r in healed], dense + [r.healed for r in healed], "s--", label="pruned + healing")
    ax.set_xlabel("layers removed")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (ax.yaxis,):
        axis.set_major_formatter(FormatStrFormatter("%.3g"))
        axis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.set_title("held-out perplexity by number of layers removed", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def budget_lines(budget: BudgetRecord | None, scan: ScanFile) -> list[str]:
    if not budget:
        return []
    lines = ["", f"## How many layers can go: budget {budget.max_ratio}x the dense calibration perplexity", "",
             f"Answer: **{budget.n} of {scan.num_layers} layers** (dense calibration perplexity "
             f"{budget.dense:.3f}).", "", "| n removed | layers removed | calibration perplexity | x dense | within |",
             "|---|---|---|---|---|"]
    lines += [f"| {r.n} | {format_layers(r.removed)} | {r.perplexity:.3f} | {r.ratio:.3f} | "
              f"{'yes' if r.within else 'no'} |" for r in budget.curve]
    return lines


def candidate_lines(work: Path, rows: list[Row], scan: ScanFile) -> list[str]:
    """Every candidate block the selection scored, with its scan score; the chosen one marked."""
    lines = []
    for r in rows:
        sel = Selection.beside(work / r.dir / "sliced.yml")
        if not sel.exists():
            continue
        c = Selection.load(sel)
        lines += ["", f"### Candidates for n = {r.n} (`--select {c.strategy}`, {c.passes:.2f} calibration passes)", "",
                  "| block | scan score | calibration perplexity (windows) | loss - chosen's (nats/token) ± paired SE | "
                  "chosen |", "|---|---|---|---|---|"]
        for x in sorted((x for x in c.candidates if x.start is not None), key=lambda x: x.perplexity):
            block = list(range(x.start, x.start + r.n))
            gap = f"{x.nll_minus_chosen:+.4f} ± {x.se:.4f}" if x.se is not None else "-"
            seen = f" ({x.windows})" if x.windows is not None else ""
            score = f"{x.score:.4f}" if x.score is not None else "-"
            lines.append(f"| {format_layers(block)} | {score} | {x.perplexity:.3f}{seen} | {gap} | "
                         f"{'**yes**' if block == c.removed else ''} |")
        if c.bridge:
            b = c.bridge
            lines += ["", f"The chosen cut scores {b.plain_perplexity:.3f} plain and {b.bridged_perplexity:.3f} bridged "
                      f"({b.ratio:.2f}x) on its {b.windows} calibration windows"
                      + (": **bridge-dependent** (over 2x); a bridge rescues a badly damaged block less on other text, "
                         "so check the perplexity on a second corpus (`--eval_dataset`)." if b.dependent else ".")]
    return lines


def model_lines(rows: list[Row], src_tasks: TasksRecord | None) -> list[str]:
    """One row per model (dense; each choice's cut / repaired / healed form): perplexity and every
    task's headline score with its retained % of the dense model's, and retained above chance with its
    paired SE; then ours against each method, and where the documents came from."""
    if not src_tasks:
        return []
    tasks = src_tasks.top_level()
    heads = [f"{t} ({src_tasks.tasks[t].headline}, {src_tasks.tasks[t].num_fewshot}-shot)" for t in tasks]
    lines = ["", "## Models side by side: perplexity and benchmarks (lm-eval)", "",
             f"lm-eval {src_tasks.lm_eval_version}" + (f", --limit {src_tasks.limit:g}" if src_tasks.limit else "")
             + (f", tasks from `{src_tasks.include_path}`" if src_tasks.include_path else "")
             + ". Each cell: score (retained % of dense); retained % is pruned / dense for a higher-is-better metric, "
             "dense / pruned for a lower-is-better one, so 100 % = as good as dense. Above chance: the average over "
             "tasks of (pruned - chance) / (dense - chance), chance = the mean of 1 / choices, ± its paired SE "
             "against the dense model on the same documents" + left_out(src_tasks) + ".", "",
             "| model | layers removed | perplexity | " + " | ".join(heads) + " | retained % (average) | "
             "above chance % (average ± SE) |", "|---" * (len(tasks) + 5) + "|"]

    def row(label: str, layers: str, ppl: float | None, rec: TasksRecord) -> str:
        kept, above = retained(src_tasks, rec), above_chance(src_tasks, rec)
        cells = []
        for t in tasks:
            h = rec.tasks.get(t)
            cells.append("-" if not h else fmt(h.score) +
                         (f" ({kept[t]:.1f} %)" if t in kept else ""))
        avg = f"{kept['average']:.1f} %" if "average" in kept else "-"
        return (f"| {label} | {layers} | {f'{ppl:.2f}' if ppl else '-'} | " + " | ".join(cells) + f" | {avg} | "
                + (pm(*above["average"]) if "average" in above else "-") + " |")

    lines.append(row("dense", "-", rows[0].source, src_tasks))
    cuts = set()  # a plain cut is printed once per set of removed layers (ReplaceMe's cut is the angle cut)
    for r in rows:
        if r.same_as:
            continue
        for form in ("cut", "repaired", "healed"):
            key = (r.n, format_layers(r.removed))
            if form == "cut" and key in cuts:
                continue
            if form == "cut":
                cuts.add(key)
            if form in r.tasks:
                lines.append(row(f"{r.name} n={r.n}, {form}", format_layers(r.removed), getattr(r, form), r.tasks[form]))
    return lines + versus_lines(rows, src_tasks) + split_lines(src_tasks)


def left_out(src_tasks: TasksRecord) -> str:
    """The tasks left out of retained above chance, and why (`above_chance_tasks`)."""
    out = {t: why for t, why in above_chance_tasks(src_tasks).items() if why}
    return ("; left out of it: " + ", ".join(f"`{t}` ({why})" for t, why in out.items())) if out else ""


def pm(v: float, se: float | None) -> str:
    return f"{v:.1f} ± {se:.1f}" if se is not None else f"{v:.1f}"


def training_free(r: Row) -> str | None:
    """The form a row ends with before any training: repaired where a repair ran, else the cut."""
    return "repaired" if "repaired" in r.tasks else "cut" if "cut" in r.tasks else None


def versus_lines(rows: list[Row], src_tasks: TasksRecord) -> list[str]:
    """Ours minus each method in average retained above chance, paired over the same documents: training-free
    forms against each other, and healed against healed."""
    out = []
    for ours in (r for r in rows if r.name == OURS):
        for r in rows:
            if r.n != ours.n or r.name == OURS or r.same_as:
                continue
            for label, fa, fb in (("training-free", training_free(ours), training_free(r)), ("healed", "healed", "healed")):
                if fa in ours.tasks and fb in r.tasks:
                    c = compare(src_tasks, ours.tasks[fa], r.tasks[fb])
                    if c:
                        z = c[0] / c[1] if c[1] > 0 else float("inf") * (1 if c[0] > 0 else -1)
                        verdict = "ours better" if z > 2 else "ours worse" if z < -2 else "within 2 SE"
                        out.append(f"| n={ours.n} | {label} | ours {fa} vs {r.name} {fb} | {c[0]:+.1f} ± {c[1]:.1f} | "
                                   f"{z:+.1f} | {verdict} |")
    if not out:
        return []
    return ["", "### Ours against each method (average retained above chance, points; paired over the same documents)",
            "", "| n | form | models | ours - method ± SE | SE | verdict |", "|---|---|---|---|---|---|"] + out


def split_lines(src_tasks: TasksRecord) -> list[str]:
    """Where each task's documents came from, when it is a task of the offline suite."""
    known = [(t, src_tasks.tasks[t].split) for t in src_tasks.top_level() if src_tasks.tasks[t].split]
    if not known:
        return []
    return ["", "Documents: " + "; ".join(f"`{t}` {s.split} (stock task: {s.stock_split}; {s.data}, {s.licence})"
                                          for t, s in known) + "."]


def shift_lines(a: PruneArgs, rows: list[Row]) -> list[str]:
    """The same models on the second held-out corpus (--eval_dataset), beside the calibration domain's."""
    if not any(r.shift for r in rows):
        return []
    lines = ["", f"## On another corpus: `{a.eval_dataset}` (split `{a.eval_dataset_subset}`)", "",
             "Held-out perplexity on text of another kind than the calibration text, which neither the choice nor "
             "the bridge saw; x dense in brackets. A cut that holds up here holds up on text it was not tuned on.", "",
             "| model | layers removed | dense | cut | repaired | healed |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = r.shift
        if not s or r.same_as:
            continue
        cell = lambda k: f"{s[k]:.2f} ({s[k] / s['source']:.2f}x)" if k in s else "-"  # noqa: E731
        lines.append(f"| {r.name} n={r.n} | {format_layers(r.removed)} | {s['source']:.2f} | {cell('cut')} | "
                     f"{cell('repaired')} | {cell('healed')} |")
    return lines


def healing_ledger_lines(rows: list[Row]) -> list[str]:
    """What each healing run spent: tokens, steps, wall time, devices, precision, data."""
    done = [r for r in rows if r.ledger and not r.same_as]
    if not done:
        return []
    lines = ["", "## Healing ledger", "", "| model | optimizer steps | training tokens | wall time | devices | "
             "precision | training data | perplexity by step (on the held-out texts that pick the step) |", "|---|---|---|---|---|---|---|---|"]
    for r in done:
        g = r.ledger
        curve = ", ".join(f"{h.step}: {h.perplexity:.2f}" for h in g.history)
        lines.append(f"| {r.name} n={r.n} | {g.optimizer_steps} | {g.training_tokens:,} | {g.wall_s:.0f} s | "
                     f"{g.world_size} x {g.device} | {g.precision} | {g.data} | {curve} |")
    return lines


def write_report(work: Path, a: PruneArgs, rows: list[Row], scan: ScanFile, budget: BudgetRecord | None = None,
                 src_tasks: TasksRecord | None = None) -> None:
    ours = [r for r in rows if r.name == OURS]
    with atomic_path(work / "heatmap.png") as tmp:  # the scan's heatmap with the chosen cuts boxed
        plot_triangle(scan.distances, scan.num_layers, scan.metric, Path(a.model).name,
                      {n: scan.best_start(n) for n in scan.distances}, str(tmp),
                      chosen={r.n: r.removed for r in ours})
    plot_ppl(ours, work / "perplexity_vs_layers.png")
    L = scan.num_layers
    lines = [f"# Depth-pruning report: `{a.model}`", "",
             f"{L} decoder layers. Scan: `{scan.metric}` on {scan.num_samples} texts ({scan.num_tokens} tokens) "
             f"of `{a.data.dataset}`; selection: `{a.choice.select}`. Perplexity: held-out split `{a.eval_subset}` "
             f"({a.eval_size} texts, {rows[0].tokens} tokens scored, window {a.data.max_length}).",
             "Layers are 0-based; ranges are half-open `[start, end)` as in MergeKit's `layer_range`.", "",
             "Repair: `none` (the plain cut)." if a.repair == "none" else
             f"Repair: `{a.repair}` (a least-squares bridge folded into the layer before each cut; "
             "see `n*/model/repair.safetensors`).", ""]
    if a.baselines:
        lines += ["Baselines, built and evaluated exactly like our choice: "
                  + "; ".join(f"`{b}`: {METHODS[b].does} ({METHODS[b].cite})" for b in a.baselines) + ".", ""]
    lines += ["| model | n removed | layers removed | kept `layer_range`s | repair | perplexity dense | cut | repaired | "
              "healed | checkpoint |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        healed = f"{r.healed:.2f}" if r.healed else "-"
        repaired = f"{r.repaired:.2f}" if r.repaired else "-"
        where = (f"same as {r.same_as}" if r.same_as else
                 f"`{r.dir}/{'healed' if r.healed else 'model'}`")
        lines.append(f"| {r.name} | {r.n} | {format_layers(r.removed)} | {format_ranges(r.ranges)} | "
                     f"{r.repair} | {r.source:.2f} | {r.cut:.2f} | {repaired} | {healed} | {where} |")
    lines += shift_lines(a, rows) + model_lines(rows, src_tasks) + healing_ledger_lines(rows)
    lines += budget_lines(budget, scan) + candidate_lines(work, ours, scan) + stage_lines(work)
    lines += ["", "![heatmap](heatmap.png)", "", "![perplexity](perplexity_vs_layers.png)", ""]
    write_text(work / "report.md", "\n".join(lines))
    log.info("report: %s", work / "report.md")
