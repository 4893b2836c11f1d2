"""prune's stage fingerprints come from the option groups that feed each stage: every field that can
change a stage's result changes its fingerprint."""

from __future__ import annotations

import pytest

from slice_with_mergekit.pipeline import PruneArgs, fingerprints

CHANGES = {  # group -> field -> another valid value
    "load": {"dtype": "bfloat16", "device": "cpu", "trust_remote_code": True},
    "data": {"dataset": "other.jsonl", "dataset_column": "body", "dataset_subset": "validation", "dataset_size": 128,
             "dataset_config": "en", "batch_size": 4, "max_length": 128},
    "scan": {"metric": "angular_mean_token", "metrics": "last_token", "tokens_per_text": 0, "gram_bytes": 2**20,
             "padding_side": "left"},
    "choice": {"select": "ppl", "top_k": 4, "select_texts": 32},
    "fix": {"repair": "none"},
}
FEEDS = {"scan": ["load", "data", "scan"], "select": ["load", "choice", "fix"], "materialize": ["fix", "data"],
         "eval": ["load", "data"]}


def changed(group: str, field: str) -> PruneArgs:
    a = PruneArgs(model="m")
    return a.model_copy(update={group: getattr(a, group).model_copy(update={field: CHANGES[group][field]})})


@pytest.mark.parametrize("stage,group,field", [(s, g, f) for s, gs in FEEDS.items() for g in gs for f in CHANGES[g]])
def test_every_input_of_a_stage_changes_its_fingerprint(stage, group, field):
    assert fingerprints(changed(group, field))[stage] != fingerprints(PruneArgs(model="m"))[stage], (group, field)


def test_a_group_that_does_not_feed_a_stage_leaves_it_alone():
    base = fingerprints(PruneArgs(model="m"))
    assert fingerprints(changed("choice", "top_k"))["scan"] == base["scan"]
    assert fingerprints(changed("scan", "metric"))["materialize"] == base["materialize"]


def test_every_field_of_the_groups_is_covered():
    a = PruneArgs(model="m")
    skip = {"scan": {"layers_to_skip", "output_dir", "no_progress", "checkpoint_every", "resume"},
            "load": {"model_path", "device_map", "gguf_file", "load_in_4bit"}, "data": {"streaming"}}
    for group, values in CHANGES.items():
        fields = set(type(getattr(a, group)).model_fields) - skip.get(group, set())
        assert fields == set(values), (group, fields ^ set(values))
