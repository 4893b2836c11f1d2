"""Failures a user can cause: one line, a non-zero exit, no traceback, nothing good destroyed,
and no foreign state merged."""

from __future__ import annotations

import pytest
import torch

from compute_block_similarity import scan_model
from compute_block_similarity.cli import main as scan_main
from compute_block_similarity.errors import UserError
from compute_block_similarity.scan import Accumulator, Checkpoint
from slice_with_mergekit.cli import main as slice_main
from conftest import TEXTS, build_tiny, load, write_jsonl

MANY = [f"{t} ({i})" * (1 + i % 4) for i, t in enumerate(TEXTS * 6)]


def one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resume_refuses_the_state_of_another_model_of_the_same_shape(tiny_llama, tmp_path):
    """Same config, same tokenizer, other weights: the saved sums must not be merged in."""
    other = build_tiny("llama", tmp_path / "other", seed=1)
    ck = Checkpoint(str(tmp_path / "state.pt"), every=1)
    m_other, tok = load(other)
    scan_model(m_other, tok, MANY, batch_size=4, progress=False, checkpoint=ck)
    assert torch.load(ck.path, weights_only=True)["done"] > 0
    model, tok = load(tiny_llama)
    with pytest.raises(UserError, match="belongs to a scan with other inputs"):
        scan_model(model, tok, MANY, batch_size=4, progress=False, checkpoint=Checkpoint(ck.path, 1, resume=True))
    resumed = scan_model(m_other, tok, MANY, batch_size=4, progress=False, checkpoint=Checkpoint(ck.path, 1, resume=True))
    assert resumed.num_samples == len(MANY)  # its own model resumes


def test_ctrl_c_saves_progress_and_says_how_to_resume(tiny_llama, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in MANY])
    common = ["--model_path", str(tiny_llama), "--dataset", str(data), "--batch_size", "4", "--layers_to_skip", "2",
              "--no_progress"]
    args = common + ["--output_dir", str(tmp_path / "scan"), "--checkpoint_every", "100"]
    real_add, calls = Accumulator.add, {"n": 0}

    def interrupted_add(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_add(self, *a, **k)

    monkeypatch.setattr(Accumulator, "add", interrupted_add)
    assert scan_main(args) == 130
    line = one_error_line(capsys.readouterr().err)
    assert "after 3 of 11 batches" in line and "--resume" in line and "scan_state.pt" in line
    monkeypatch.setattr(Accumulator, "add", real_add)
    assert scan_main(args + ["--resume"]) == 0
    resumed = (tmp_path / "scan" / "layer_distances.csv").read_text()
    assert scan_main(common + ["--output_dir", str(tmp_path / "clean")]) == 0
    assert resumed == (tmp_path / "clean" / "layer_distances.csv").read_text()


@pytest.fixture
def built(tiny_llama, tmp_path):
    from slice_with_mergekit.plan import build_config, write_config

    plan = tmp_path / "sliced.yml"
    write_config(build_config(str(tiny_llama), 6, [2, 3], "float32"), plan)
    assert slice_main(["materialize", str(plan), str(tmp_path / "out")]) == 0
    return plan, tmp_path / "out"


@pytest.mark.parametrize("repo,token,message", [("org/bad name", "hf_x", "not valid on the Hub"),
                                                ("org/ok", None, "no Hugging Face token")])
def test_push_checks_before_replacing_the_card(built, monkeypatch, capsys, tmp_path, repo, token, message):
    plan, out = built
    before = (out / "README.md").read_bytes()  # MergeKit's card
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    assert slice_main(["push", str(out), repo, "--plan", str(plan)]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert (out / "README.md").read_bytes() == before


def test_push_dry_run_refuses_a_repo_id_the_hub_would(built, capsys):
    plan, out = built
    before = (out / "README.md").read_bytes()
    assert slice_main(["push", str(out), "org/-bad-", "--plan", str(plan), "--dry-run"]) == 2
    assert "not valid on the Hub" in one_error_line(capsys.readouterr().err)
    assert (out / "README.md").read_bytes() == before


def test_prune_layers_to_skip_typo_is_one_line(tiny_llama, tmp_path, capsys):
    assert slice_main(["prune", str(tiny_llama), "--layers_to_skip", "x,2", "--work_dir", str(tmp_path / "w")]) == 2
    assert "'2,4,6,8'" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "w").exists()
