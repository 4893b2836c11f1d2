"""The scan as a job: option groups -> texts and model -> scan_model -> the files in --output_dir.
Used by the scan's CLI and by `prune`; it joins a torchrun / accelerate process group if there is one."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from .errors import check_output_dir
from .model import default_model_dir
from .options import DataOptions, ModelOptions, ScanOptions, metric_names
from .scan import ScanSettings, scan_model
from .sums import Checkpoint

log = logging.getLogger("compute_block_similarity")


def init_distributed(device: str) -> str:
    """Join the process group that torchrun / accelerate launch describe in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    use_cuda = device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def run_scan(mo: ModelOptions, do: DataOptions, so: ScanOptions) -> dict[str, str]:
    """Scan and write layer_distances.csv, block_distances.json and the heatmap to ``so.output_dir``.
    Returns {kind: path} (empty on ranks other than 0 under torchrun)."""
    check_output_dir(so.output_dir, "--output_dir")
    device = init_distributed(mo.device)
    model_path = mo.model_path or default_model_dir()
    texts = do.texts()
    model, tok = mo.load(model_path, device=device)
    L = model.config.get_text_config().num_hidden_layers
    if so.layers_to_skip >= L:
        raise ValueError(f"--layers_to_skip {so.layers_to_skip} must be < the model's {L} layers")
    provenance = {
        "model": model_path, "gguf_file": mo.gguf_file, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "load_in_4bit": mo.load_in_4bit,
        "dataset": {"name": do.dataset, "config": do.dataset_config, "split": do.dataset_subset,
                    "column": do.dataset_column, "size": do.dataset_size, "max_length": do.max_length},
        "tokens_per_text": so.tokens_per_text,
    }
    ckpt = None
    if so.checkpoint_every or so.resume:
        ckpt = Checkpoint(os.path.join(so.output_dir, "scan_state.pt"), so.checkpoint_every or 50, so.resume)
    settings = ScanSettings(metric=so.metric, metrics=metric_names(so.metrics), batch_size=do.batch_size,
                            max_length=do.max_length, padding_side=so.padding_side, progress=not so.no_progress,
                            tokens_per_text=so.tokens_per_text, gram_bytes=so.gram_bytes)
    result = scan_model(model, tok, texts, settings, provenance=provenance, checkpoint=ckpt)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank != 0:
        if ckpt:
            ckpt.remove(rank)
        return {}
    n = so.layers_to_skip
    best, runner, z = result.separation(n)
    if runner is None:
        log.info("only one candidate block of %d layers", n)
    elif z > 2:
        log.info("by the scan's metric, block [%d, %d) beats the runner-up [%d, %d) by %.1f standard errors: a clear winner",
                 best, best + n, runner, runner + n, z)
    else:
        log.warning("by the scan's metric, block [%d, %d) beats the runner-up [%d, %d) by only %.1f standard errors "
                    "(< 2): a coin toss; use more calibration texts (--dataset_size)", best, best + n, runner, runner + n, z)
    paths = result.write(so.output_dir, n)
    if ckpt:
        ckpt.remove(rank)
    for kind, path in paths.items():
        log.info("wrote %s: %s", kind, path)
    log.info("%s", result.summary(n))
    return paths
