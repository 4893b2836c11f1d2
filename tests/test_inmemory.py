"""The in-memory cut equals the checkpoint MergeKit writes."""

from __future__ import annotations

import pytest
import torch
from conftest import TEXTS, load

from slice_with_mergekit.cli import main as slice_main
from slice_with_mergekit.inmemory import removed_layers


@pytest.mark.parametrize("arch,remove", [("llama", "1-2"), ("qwen3", "3,6"), ("gemma3", "0"), ("gpt2", "4")])
def test_in_memory_cut_equals_mergekit_checkpoint(tiny_models, tmp_path, arch, remove):
    from compute_block_similarity.ranges import parse_layers
    from slice_with_mergekit.plan import build_config, write_config

    src = tiny_models[arch]
    model, tok = load(src)
    L = model.config.get_text_config().num_hidden_layers
    plan = tmp_path / "s.yml"
    write_config(build_config(str(src), L, parse_layers(remove), "float32"), plan)
    assert slice_main(["materialize", str(plan), str(tmp_path / "out")]) == 0
    cut, _ = load(tmp_path / "out")
    ids = tok(TEXTS[3], return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
        with removed_layers(model, parse_layers(remove)):
            inmem = model(ids).logits
            gen = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=2)
        want = cut(ids).logits
        want_gen = cut.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=2)
        after = model(ids).logits
    torch.testing.assert_close(inmem, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, want_gen)  # KV-cache layer indices renumbered
    torch.testing.assert_close(after, before)  # restored
    assert model.config.get_text_config().num_hidden_layers == L
