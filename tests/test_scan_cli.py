"""The CLI: PruneMe's flags, the files it writes, and one-line errors with no output on bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import TEXTS, write_jsonl

from compute_block_similarity.cli import main


def run_cli(*args: str) -> int:
    return main([*map(str, args), "--no_progress"])


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)])


def test_writes_pruneme_csv_json_and_heatmap(tiny_llama, data, tmp_path):
    out = tmp_path / "out"
    assert run_cli("--model_path", tiny_llama, "--dataset", data, "--dataset_column", "text", "--batch_size", 3,
                   "--max_length", 64, "--layers_to_skip", 2, "--dataset_size", 5, "--dataset_subset", "train",
                   "--output_dir", out) == 0
    rows = list(csv.DictReader(open(out / "layer_distances.csv")))
    assert [(int(r["block_start"]), int(r["block_end"])) for r in rows] == [(l, l + 2) for l in range(5)]
    js = json.load(open(out / "block_distances.json"))
    L = js["num_layers"]
    assert L == 6 and js["num_samples"] == 5 and js["metric"] == "angular_last_token"
    assert sorted(js["distances"], key=int) == [str(n) for n in range(1, L)]
    assert all(len(js["distances"][str(n)]) == L - n + 1 for n in range(1, L))
    assert [float(r["average_distance"]) for r in rows] == js["distances"]["2"]
    s = js["best_start"]
    assert js["distances"]["2"][s] == min(js["distances"]["2"])
    assert js["removed_layers"] == [s, s + 1]
    assert js["kept_ranges"] == [r for r in ([0, s], [s + 2, L]) if r[0] < r[1]]
    assert js["dataset"]["name"] == str(data) and js["model"] == str(tiny_llama)
    assert set(js["all_metrics"]) >= {"block_influence", "angular_all_tokens", "relative_magnitude"}
    assert (out / "block_distances.png").read_bytes()[:4] == b"\x89PNG"
    assert not [f for f in os.listdir(out) if f.endswith(".tmp") or f.startswith(".")]


@pytest.mark.parametrize("fmt", ["csv", "txt", "parquet", "folder"])
def test_local_dataset_formats(tiny_llama, tmp_path, fmt):
    import datasets

    ds = datasets.Dataset.from_dict({"text": TEXTS[:4]})
    if fmt == "csv":
        path = tmp_path / "d.csv"; ds.to_csv(path)
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"; ds.to_parquet(path)
    elif fmt == "txt":
        path = tmp_path / "d.txt"; path.write_text("\n".join(TEXTS[:4]) + "\n")
    else:
        path = tmp_path / "folder"; path.mkdir(); ds.to_json(path / "part.jsonl")
    out = tmp_path / "o"
    assert run_cli("--model_path", tiny_llama, "--dataset", path, "--layers_to_skip", 1, "--output_dir", out) == 0
    assert json.load(open(out / "block_distances.json"))["num_samples"] == 4


@pytest.mark.parametrize("args,message", [
    (["--layers_to_skip", "0"], "--layers_to_skip must be >= 1"),
    (["--layers_to_skip", "6"], "--layers_to_skip 6 must be < the model's 6 layers"),
    (["--dataset_column", "body"], "--dataset_column 'body' is not in .*columns there: text, id"),
    (["--metric", "nope"], "--metric 'nope' is unknown; choose one of: angular_last_token"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--load_in_4bit"], "--load_in_4bit needs CUDA"),
    (["--dataset_subset", "validation"], "--dataset_subset 'validation' is not in"),
    (["--dataset", "./missing.jsonl"], "does not exist"),
])
def test_bad_input_one_line_error_no_output(tiny_llama, data, tmp_path, capsys, args, message):
    import re

    out = tmp_path / "out"
    code = run_cli("--model_path", tiny_llama, "--dataset", data, "--output_dir", out, *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert re.search(message, err[-1]), err[-1]
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_missing_model_path(tmp_path, data, capsys):
    assert run_cli("--model_path", tmp_path / "nope", "--dataset", data, "--output_dir", tmp_path / "o") == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_empty_dataset(tiny_llama, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_cli("--model_path", tiny_llama, "--dataset", empty, "--layers_to_skip", 2, "--output_dir", tmp_path / "o") == 2
    assert "empty" in capsys.readouterr().err.lower()
    assert not (tmp_path / "o").exists()


def test_all_texts_blank(tiny_llama, tmp_path, capsys):
    d = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": None}])
    assert run_cli("--model_path", tiny_llama, "--dataset", d, "--layers_to_skip", 2, "--output_dir", tmp_path / "o") == 2
    assert "no non-empty text" in capsys.readouterr().err


def test_help_lists_pruneme_flags():
    out = subprocess.run([sys.executable, "-m", "compute_block_similarity", "--help"], capture_output=True, text=True)
    for flag in ("--model_path", "--dataset", "--dataset_column", "--batch_size", "--max_length",
                 "--layers_to_skip", "--dataset_size", "--dataset_subset", "--metric", "--gguf_file"):
        assert flag in out.stdout


def test_builtin_calibration_text_is_deterministic():
    from compute_block_similarity.data import load_texts

    a = load_texts(size=50)
    assert a == load_texts(size=50) and len(a) == 50 and all(len(t) >= 200 for t in a)
    test = load_texts(split="test", size=20)
    assert not set(a) & set(test)


def test_the_first_python_docs_texts_sample_the_whole_stdlib_and_the_reference():
    from itertools import islice

    from compute_block_similarity.data import DOCS_DATASET, load_texts, reference_paragraphs, stdlib_paragraphs

    first = load_texts(DOCS_DATASET, size=64)
    early = set(islice(stdlib_paragraphs(), 300))  # the modules first by name
    assert len(set(first)) == 64
    assert len(set(first) & early) < 32  # not the alphabetically first modules
    assert set(first) & set(reference_paragraphs())  # the language reference is in the mix


def test_the_first_package_readme_texts_sample_many_packages_not_the_first_by_name():
    from itertools import islice

    from compute_block_similarity.data import READMES_DATASET, load_texts, package_paragraphs

    first = load_texts(READMES_DATASET, size=32)
    by_name = list(islice(package_paragraphs(), 100))  # the packages first by name
    assert len(set(first)) == 32 and set(first) <= set(package_paragraphs())
    assert len(set(first) & set(by_name)) < 16


def test_atomic_write_leaves_ordinary_permissions_and_no_temp(tmp_path):
    from compute_block_similarity.atomic import write_text

    write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0); os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["a.txt"]


def test_metrics_subset_captures_only_last_tokens(tiny_llama, data, tmp_path):
    out = tmp_path / "o"
    assert run_cli("--model_path", tiny_llama, "--dataset", data, "--layers_to_skip", 2, "--metrics", "last_token",
                   "--output_dir", out) == 0
    js = json.load(open(out / "block_distances.json"))
    assert set(js["all_metrics"]) == {"relative_magnitude", "euclidean_last_token"}
    assert run_cli("--model_path", tiny_llama, "--dataset", data, "--metrics", "angular,typo", "--output_dir", out) == 2


def test_pruneme_script_name_still_works(tiny_llama, data, tmp_path):
    from pathlib import Path

    import compute_block_similarity

    script = Path(compute_block_similarity.__file__).with_name("layer_similarity.py")
    r = subprocess.run([sys.executable, str(script), "--model_path", str(tiny_llama), "--dataset", str(data),
                        "--dataset_column", "text", "--batch_size", "8", "--max_length", "1024", "--layers_to_skip", "2",
                        "--dataset_size", "4", "--dataset_subset", "train", "--output_dir", str(tmp_path / "p"),
                        "--no_progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "p" / "layer_distances.csv").exists()
