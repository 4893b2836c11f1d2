"""User mistakes and environment failures become one line on stderr and a non-zero exit; real bugs
keep their traceback. Both command-line tools run their command through ``run_cli``.

``--debug`` (or DEPTH_PRUNE_DEBUG=1) shows the traceback of every error."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


class UserError(Exception):
    """Bad input a user can fix. The message names the problem and the fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def looks_local(path: str) -> bool:
    """A path, not a Hub id ("org/name"): it must then exist."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1


def environment_error(e: BaseException) -> str | None:
    """The one-line message for a failure of the environment (permissions, a path of the wrong kind,
    a full disk, a truncated or corrupt file), or None for anything else, which is a bug."""
    where = getattr(e, "filename", None)
    if isinstance(e, PermissionError):
        return f"permission denied on {where}: choose a folder you can write to, or fix its permissions"
    if isinstance(e, IsADirectoryError):
        return f"{where} is a folder where a file was expected; give a file path"
    if isinstance(e, NotADirectoryError):
        return f"a part of {where} is a file where a folder was expected; give a folder path"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full (writing {where}); free some space and rerun: earlier outputs were left as they were"
    name = type(e).__name__
    if name == "SafetensorError":
        return f"a .safetensors file is truncated or corrupt ({first_line(e)}); rebuild or re-download it"
    if name == "UnpicklingError":
        return ("a pickle checkpoint (.bin) was refused by torch's safe loader, which runs none of its code; only "
                "safetensors weights are read safely: convert it with save_pretrained(..., safe_serialization=True) "
                "where you trust its source, or use the model's .safetensors release")
    if name in ("YAMLError", "ScannerError", "ParserError") or isinstance(e, json.JSONDecodeError):
        return f"a config file is not valid {'JSON' if isinstance(e, json.JSONDecodeError) else 'YAML'} ({first_line(e)})"
    return None


def debug_enabled(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("DEPTH_PRUNE_DEBUG", "") not in ("", "0")


def run_cli(command: Callable[[], int], debug: bool) -> int:
    """Run a command: UserError/ValueError and environment failures print one line and exit 2,
    Ctrl-C exits 130 with its message; with ``debug`` every error keeps its traceback."""
    try:
        return command()
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"error: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except (UserError, ValueError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        message = environment_error(e)
        if message is None or debug:
            raise
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Before any work: ``path`` must be a folder (or not exist yet) that we can write into."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is a file, not a folder; give a folder path")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag} {p}: {probe} is a file, not a folder; give a folder path")
    if not writable(probe):
        raise UserError(f"{flag} {p}: {probe} is not writable; choose a folder you can write to")


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """Before any work: ``path`` must not be a folder, and its folder must be writable."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p} is a folder; give a file path")
    check_output_dir(p.parent if str(p.parent) else Path("."), flag)


def writable(folder: Path) -> bool:
    """Can a file be created in ``folder``? (os.access ignores read-only mounts; a probe does not.)"""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            return True
    except OSError:
        return False
