"""Tiny random models built in fixtures (as MergeKit's tests build "picollama"), saved with a
byte-level tokenizer so MergeKit and transformers can load them from a local folder."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Depth pruning removes whole decoder layers.",
    "a",
    "Layer similarity is measured on the residual stream, before the final norm, for every block.",
    "Short text.",
    "MergeKit passthrough copies tensors and renumbers the layers it keeps, in order.",
    "Calibration data should look like the data the model will see.",
]


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(sorted(alphabet))})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing

    tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")


VOCAB = 3 + 256


def tiny_config(arch: str):
    from transformers import AutoConfig

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "llama":
        return AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    tie_word_embeddings=False, architectures=["LlamaForCausalLM"], **common)
    if arch == "qwen3":
        return AutoConfig.for_model("qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=256, use_sliding_window=True, sliding_window=16,
                                    max_window_layers=4, tie_word_embeddings=True,
                                    architectures=["Qwen3ForCausalLM"], **common)
    if arch == "gemma3":
        return AutoConfig.for_model("gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=256, sliding_window=16, sliding_window_pattern=2,
                                    architectures=["Gemma3ForCausalLM"], **common)
    if arch == "olmo2":  # post-norm layers with plain-w RMS norms (Gemma's are 1 + w)
        return AutoConfig.for_model("olmo2", hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    tie_word_embeddings=False, architectures=["Olmo2ForCausalLM"], **common)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=5, n_head=4, n_positions=256, vocab_size=VOCAB,
                                    bos_token_id=0, eos_token_id=1, architectures=["GPT2LMHeadModel"])
    raise ValueError(arch)


def build_tiny(arch: str, path: Path, seed: int = 0, dtype=torch.float32) -> Path:
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).to(dtype)
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0; perturb so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, max_new_tokens=8).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {a: build_tiny(a, root / a) for a in ("llama", "qwen3", "gemma3", "gpt2")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from compute_block_similarity.model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def gemma3_dir() -> str:
    """Gemma-3-270M, converted once from the GGUF its registry packages ship (scripts/bootstrap.sh installs them)."""
    from compute_block_similarity.model import gemma3_model_dir

    return gemma3_model_dir()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MERGEKIT_YAML = str(Path(sys.executable).with_name("mergekit-yaml"))


@pytest.fixture(scope="session")
def scans(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Every tiny model scanned once (n = 2), for the plan, materialize, verify and push tests."""
    from compute_block_similarity.cli import main as scan_main

    root = tmp_path_factory.mktemp("scans")
    data = write_jsonl(root / "d.jsonl", [{"text": t} for t in TEXTS])
    out = {}
    for arch, path in tiny_models.items():
        assert scan_main(["--model_path", str(path), "--dataset", str(data), "--layers_to_skip", "2",
                          "--output_dir", str(root / arch), "--no_progress"]) == 0
        out[arch] = root / arch / "block_distances.json"
    return out


def make_plan(scan: Path, tmp_path: Path, *args: str) -> Path:
    from slice_with_mergekit.cli import main as slice_main

    out = tmp_path / "sliced.yml"
    pick = [] if "--select" in args else ["--select", "angle"]  # the scan's best, no model loaded
    assert slice_main(["--scan", str(scan), "-o", str(out), *pick, *args]) == 0
    return out


def ranges(plan: Path) -> list[list[int]]:
    cfg = MergeConfiguration.model_validate(yaml.safe_load(plan.read_text()))
    assert cfg.merge_method == "passthrough"
    return [list(s.sources[0].layer_range) for s in cfg.slices]


# a local multiple-choice task and a local rolling-perplexity task for lm-eval (no Hub data)
MC_DOCS = [
    ("The sun rises in the", ["east", "west", "sea"], 0), ("Water freezes at zero degrees", ["Celsius", "Kelvin", "pounds"], 0),
    ("A week has seven", ["days", "months", "meters"], 0), ("Cats often chase", ["mice", "clouds", "numbers"], 0),
    ("The opposite of hot is", ["warm", "cold", "red"], 1), ("Bread is baked in an", ["ocean", "oven", "opera"], 1),
    ("People read books in a", ["library", "volcano", "river"], 0), ("Two plus two equals", ["five", "four", "ten"], 1),
    ("Fish live in", ["water", "sand", "fire"], 0), ("At night the sky is", ["bright", "dark", "loud"], 1),
    ("We hear with our", ["ears", "knees", "teeth"], 0), ("Snow is usually", ["green", "white", "purple"], 1),
]
PPL_DOCS = ["The quick brown fox jumps over the lazy dog near the river bank.",
            "Depth pruning removes whole decoder layers from a language model and keeps the rest.",
            "A library lends books, and its readers bring them back a few weeks later."]


def write_local_tasks(root: Path) -> Path:
    """``local_mc`` (12 questions, 3 choices) and ``local_ppl`` (3 texts) as lm-eval task YAMLs in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    mc = write_jsonl(root / "mc.jsonl", [{"question": q, "choices": c, "label": y} for q, c, y in MC_DOCS])
    ppl = write_jsonl(root / "ppl.jsonl", [{"text": t} for t in PPL_DOCS])
    common = {"dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0}}
    tasks = {
        "local_mc": {"dataset_kwargs": {"data_files": {"test": str(mc)}}, "output_type": "multiple_choice",
                     "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
                     "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                     {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]},
        "local_ppl": {"dataset_kwargs": {"data_files": {"test": str(ppl)}}, "output_type": "loglikelihood_rolling",
                      "doc_to_text": "", "doc_to_target": "{{text}}",
                      "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity",
                                       "higher_is_better": False}]},
    }
    for name, t in tasks.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **common, **t}, sort_keys=False))
    return root


@pytest.fixture(scope="session")
def local_tasks(tmp_path_factory) -> Path:
    return write_local_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))
