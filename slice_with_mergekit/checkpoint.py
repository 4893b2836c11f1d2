"""The lowest layer of slice_with_mergekit: checkpoints and plans, which every stage reads.

A plan (sliced.yml) is a single-source MergeKit passthrough config; output layer k of the pruned
checkpoint is source layer ``kept[k]``. Layers are 0-based, ranges half-open ``[start, end)``.
This module imports no stage.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mergekit.config import MergeConfiguration

from compute_block_similarity.errors import UserError, first_line, looks_local

REPAIR_FILE = "repair.safetensors"  # the bridges folded into a checkpoint, beside its weights
COMPANIONS = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json")
LAYER_KEY = re.compile(r"^(?P<prefix>.*?\.(?:layers|h|blocks))\.(?P<idx>\d+)\.(?P<rest>.+)$")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the plan


def read_plan(path: str | os.PathLike) -> MergeConfiguration:
    """sliced.yml as MergeKit's validated config; a missing or malformed file is one UserError."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; write it with `python -m slice_with_mergekit --scan ...`") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid YAML ({first_line(e)}); give the sliced.yml written by "
                        "`python -m slice_with_mergekit --scan ...`") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a MergeKit config (a YAML mapping with merge_method and slices)")
    try:
        return MergeConfiguration.model_validate(data)
    except Exception as e:
        raise UserError(f"{path} is not a valid MergeKit config ({str(e).splitlines()[0]})") from None


def kept_source_layers(config: MergeConfiguration) -> tuple[str, list[int]]:
    """(source model, the source layer behind each output layer) for a single-source passthrough plan."""
    if config.merge_method != "passthrough" or not config.slices:
        raise UserError("the plan must be a passthrough merge with slices")
    models = {str(s.model.model.path) for sl in config.slices for s in sl.sources}
    if len(models) != 1 or any(len(sl.sources) != 1 for sl in config.slices):
        raise UserError("the plan must slice one source model (one source per slice)")
    layers = [i for sl in config.slices for i in range(*sl.sources[0].layer_range)]
    return models.pop(), layers


def is_depth_cut(kept: Sequence[int]) -> bool:
    """Each output layer a later source layer than the one before: layers removed, none repeated or reordered."""
    return all(a < b for a, b in zip(kept, kept[1:]))


def kept_ranges_of(config: MergeConfiguration) -> list[list[int]]:
    """The plan's kept ``layer_range``s, in order."""
    return [list(s.sources[0].layer_range) for s in config.slices]


def local_source(model: str) -> Path:
    """The source checkpoint's folder: itself if local, else the Hub snapshot (configs, tokenizer, weights)."""
    if os.path.isdir(model):
        return Path(model)
    if looks_local(model):
        raise UserError(f"the plan's source model {model} does not exist (moved or deleted?); restore it or point "
                        "the plan's `model:` at it")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))


def num_layers_of(folder: str | os.PathLike, trust_remote_code: bool = False) -> int:
    """Decoder layers of a checkpoint folder, from its config.json alone."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code).get_text_config().num_hidden_layers


@dataclass(frozen=True)
class Lineage:
    """Where a pruned checkpoint comes from, built once from its plan."""

    source: str  # the plan's model (a path or Hub id)
    source_dir: Path  # the source's local folder
    kept: list[int]  # output layer k is source layer kept[k]
    num_layers: int  # the source's decoder layers

    @property
    def removed(self) -> list[int]:
        keep = set(self.kept)
        return [i for i in range(self.num_layers) if i not in keep]


def lineage(plan_path: str | os.PathLike, source: str | None = None, trust_remote_code: bool = False) -> Lineage:
    """The plan's lineage; ``source`` replaces the plan's model (a copy of it elsewhere)."""
    model, kept = kept_source_layers(read_plan(plan_path))
    if not is_depth_cut(kept):
        raise UserError(f"{plan_path} repeats or reorders layers (overlapping or out-of-order slices): a frankenmerge, "
                        "not a depth cut of its source; repair and verify apply to depth cuts only")
    src = local_source(source or model)
    return Lineage(source or model, src, kept, num_layers_of(src, trust_remote_code))


# ---------------------------------------------------------------- tensors and their names


def clean_leftovers(folder: Path) -> list[str]:
    """Remove what a killed atomic write left in ``folder`` (``.NAME.XXXX.tmp.EXT``, see atomic_path)."""
    gone = []
    for f in Path(folder).glob(".*.tmp*"):
        if f.is_file():
            f.unlink()
            gone.append(f.name)
    if gone:
        log.info("removed %d temporary file(s) a killed run left in %s: %s", len(gone), folder, ", ".join(gone))
    return gone


def tensor_files(folder: Path) -> list[Path]:
    """The checkpoint's weight shards (REPAIR_FILE holds bridges, not weights; a hidden file is an atomic
    write's temporary, never a shard, even when a kill left it behind)."""
    files = sorted(f for f in Path(folder).glob("*.safetensors") if f.name != REPAIR_FILE and not f.name.startswith("."))
    if not files:
        raise UserError(f"{folder} holds no .safetensors weights")
    return files


def tensor_index(folder: Path, stack: ExitStack) -> dict[str, Any]:
    """{tensor name: the open safetensors handle holding it} over every shard; ``stack`` closes them.
    Tensors are read one at a time through the handles, so a 70B checkpoint takes little memory."""
    from safetensors import safe_open

    index: dict[str, Any] = {}
    for f in tensor_files(folder):
        h = stack.enter_context(safe_open(str(f), "pt"))
        index.update(dict.fromkeys(h.keys(), h))
    return index


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to, or None (embeddings, final norm, LM head)."""
    m = LAYER_KEY.match(name)
    return int(m["idx"]) if m else None


def source_key(name: str, kept: Sequence[int]) -> str:
    """The source tensor an output tensor came from: output layer k is source layer kept[k]."""
    m = LAYER_KEY.match(name)
    return f"{m['prefix']}.{kept[int(m['idx'])]}.{m['rest']}" if m else name


def output_key(name: str, kept: Sequence[int]) -> str:
    """The inverse of source_key: source layer kept[k]'s tensor is output layer k's."""
    m = LAYER_KEY.match(name)
    return f"{m['prefix']}.{list(kept).index(int(m['idx']))}.{m['rest']}" if m else name


# ---------------------------------------------------------------- companion files


def copy_companions(src: Path, out: Path) -> list[str]:
    """Tokenizer, chat template and generation config; fail if the source has a tokenizer we can't bring."""
    copied = []
    for name in COMPANIONS:
        if (src / name).exists() and not (out / name).exists():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    from transformers import AutoTokenizer

    try:
        src_tok = AutoTokenizer.from_pretrained(src)
        out_tok = AutoTokenizer.from_pretrained(out)
    except Exception as e:
        raise UserError(f"the tokenizer could not be copied to {out} ({str(e).splitlines()[0]}); "
                        f"copy it from {src} by hand") from None
    if src_tok.get_vocab() != out_tok.get_vocab():
        raise UserError(f"the tokenizer in {out} differs from the source's; copy it from {src}")
    if getattr(src_tok, "chat_template", None) and getattr(out_tok, "chat_template", None) != src_tok.chat_template:
        raise UserError(f"the chat template was not carried over to {out}; copy it from {src}")
    if not (out / "generation_config.json").exists():
        from transformers import GenerationConfig

        try:
            GenerationConfig.from_pretrained(src).save_pretrained(out)
        except OSError:
            from transformers import AutoConfig

            GenerationConfig.from_model_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
        copied.append("generation_config.json")
    return copied
