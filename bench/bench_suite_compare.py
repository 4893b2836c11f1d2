"""One more model against a bench_suite run: its suite scores set beside the run's dense model and rows,
with the report's own measures (retained %, retained above chance ± paired SE, ours minus a row).

For a model built outside ``prune`` (say, the run's repaired checkpoint healed on other text with
``heal --dataset ...``, then ``evaluate --tasks zero-shot --limit N --name NAME``):

    python bench/bench_suite_compare.py bench_work/suite_qwen25_n6_heal qwen_heal_readmes/eval.json \
        --name healed_readmes --against n6/tasks_repaired.json,n6/tasks_healed.json

Or one of a run's own rows against another (a prune eval.json names its forms: source, cut, repaired, healed):

    python bench/bench_suite_compare.py bench_work/suite_qwen25_n6_readmes \
        bench_work/suite_qwen25_n6_readmes/n6/healed/eval.json --name healed --against n6/tasks_repaired.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slice_with_mergekit.benchmarks import above_chance, compare, retained
from slice_with_mergekit.records import EvalFile, HealRecord, TasksRecord


def accuracy_share(dense: TasksRecord, model: TasksRecord, leave_out: str = "") -> float:
    """The model's average accuracy over the dense model's, tasks named with ``leave_out`` left out."""
    tasks = [t for t in dense.top_level() if not (leave_out and leave_out in t)]
    return sum(model.tasks[t].score for t in tasks) / sum(dense.tasks[t].score for t in tasks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path, help="bench_suite's work folder (its source_tasks.json is the dense model)")
    p.add_argument("eval_json", type=Path, help="the other model's eval.json, written by evaluate --tasks")
    p.add_argument("--name", required=True, help="its entry in eval.json (evaluate --name)")
    p.add_argument("--against", default="", help="comma-separated tasks records under WORK to compare with, paired")
    a = p.parse_args()

    dense = TasksRecord.load(a.work / "source_tasks.json")
    models = EvalFile.load(a.eval_json).models
    if a.name not in models:
        p.error(f"--name {a.name!r} is not in {a.eval_json}; it holds {', '.join(sorted(models))}")
    entry = models[a.name]
    heal = a.eval_json.with_name("heal.json")
    if heal.exists():
        h = HealRecord.load(heal)
        print(f"healing: best step {h.best_step}; held-out perplexity by step "
              + ", ".join(f"{s.step}: {s.perplexity:.2f}" for s in h.history))
    print(f"perplexity {entry.perplexity:.2f} " + ("(prune's held-out texts)" if entry.num_texts is None else
          f"({entry.num_texts} texts, {entry.tokens_scored} tokens, max_length {entry.max_length})"))
    model = entry.lm_eval
    for task in dense.top_level():
        print(f"{task:24s} {model.tasks[task].score:.4f}  (dense {dense.tasks[task].score:.4f})")
    ac = above_chance(dense, model)["average"]
    print(f"retained % (average of tasks) {retained(dense, model)['average']:.1f}; above chance {ac[0]:.1f} ± {ac[1]:.1f}")
    print(f"average accuracy over dense's: {100 * accuracy_share(dense, model):.1f} %, "
          f"without BoolQ {100 * accuracy_share(dense, model, 'boolq'):.1f} %")
    for rel in filter(None, a.against.split(",")):
        diff = compare(dense, model, TasksRecord.load(a.work / rel))
        print(f"{a.name} - {rel}: {diff[0]:+.1f} ± {diff[1]:.1f} points above chance (paired)")


if __name__ == "__main__":
    main()
