"""Publish a pruned checkpoint with huggingface_hub: a model card, then only the files a model repo needs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import BaseModel, Field

from compute_block_similarity import scanfile
from compute_block_similarity.atomic import write_text
from compute_block_similarity.errors import UserError, first_line

from .card import model_card

log = logging.getLogger(__name__)


class PushOptions(BaseModel):
    """Upload"""

    plan: str | None = Field(None, description="sliced.yml (default: MODEL/mergekit_config.yml)")
    scan: str | None = Field(None, description="block_distances.json, for the card's scores")
    private: bool = Field(False, description="create the repository private")
    base_model: str | None = Field(None, description="Hub id of the source for the card's base_model (default: the "
                                   "plan's model if it is a Hub id, else the id its config came from; left out if unknown)")
    revision: str | None = Field(None, description="branch to push to (created if missing)")
    dry_run: bool = Field(False, description="write the card and list what would be uploaded, upload nothing",
                          json_schema_extra={"aliases": ["--dry-run"]})

UPLOAD_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".md", ".yml", ".yaml", ".gguf")
NEVER = ("block_distances.json",)


def files_to_upload(out: Path) -> list[str]:
    """Top-level files of a model repository: weights, configs, tokenizer, card. No caches,
    sub-folders (healing checkpoints), hidden files or scan temporaries."""
    return sorted(p.name for p in out.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix in UPLOAD_SUFFIXES
                  and p.name not in NEVER and not p.name.endswith((".tmp", ".partial")))


def check_repo_id(repo_id: str) -> None:
    """The Hub's own rules for 'org/name', applied before anything is written or sent."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1:
        raise ValueError(f"repo id {repo_id!r} must look like 'org/name'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"repo id {repo_id!r} is not valid on the Hub ({first_line(e)})") from None


def push(out_path: str, repo_id: str, *, plan_path: str | None = None, scan_path: str | None = None,
         private: bool = False, revision: str | None = None, dry_run: bool = False,
         base_model: str | None = None) -> list[str]:
    out = Path(out_path)
    if not (out / "config.json").exists():
        raise UserError(f"{out} is not a checkpoint folder (no config.json); materialize it first")
    check_repo_id(repo_id)
    plan = Path(plan_path) if plan_path else out / "mergekit_config.yml"
    if not plan.exists():
        raise UserError(f"no plan at {plan}; pass --plan sliced.yml")
    scan = scanfile.load(scan_path) if scan_path else None
    from huggingface_hub import HfApi, get_token

    if not dry_run and not get_token():  # checked before the card replaces anything
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
    card = model_card(out, plan, scan, repo_id=repo_id, base_model=base_model)
    write_text(out / "README.md", card)
    files = files_to_upload(out)
    if dry_run:
        log.info("dry run: would upload %d files to %s%s", len(files), repo_id, f"@{revision}" if revision else "")
        return files
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(out), repo_id=repo_id, revision=revision, allow_patterns=files,
                                 commit_message=f"Upload depth-pruned model ({len(files)} files)")
    except (OSError, ValueError) as e:  # HfHubHTTPError and OfflineModeIsEnabled are OSErrors
        first = first_line(e)
        raise UserError(f"push to {repo_id} failed: {first}") from None
    log.info("pushed %d files to %s: %s", len(files), repo_id, getattr(info, "commit_url", info))
    return files
