"""Option groups declared once, as pydantic models, with the CLI flags derived from them.

Each field's default and ``description`` are the flag's default and help text (the parsers show
defaults with ArgumentDefaultsHelpFormatter), so a default is written in one place.
``add_flags(parser, Group)`` adds ``--field`` (or ``--{prefix}field``) for every field;
``from_args(Group, args)`` builds the validated group back from the parsed namespace.
Types map as: bool -> ``--flag/--no-flag``; Literal -> choices; ``list[str]`` -> a comma list;
``X | None`` -> X with default None.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Iterable, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import UserError

G = TypeVar("G", bound=BaseModel)


def _comma_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _flag_type(annotation: Any) -> tuple[Any, dict]:
    """argparse ``type`` and extra kwargs for a field's annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0])
    if origin is Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), {"choices": choices}
    if origin is list:
        return _comma_list, {"metavar": "A,B,..."}
    return annotation, {}


def add_flags(parser: argparse.ArgumentParser | Any, group: type[BaseModel], prefix: str = "",
              skip: Iterable[str] = (), title: str | None = None) -> None:
    """Add one flag per field of ``group`` (named ``--{prefix}{field}``) to ``parser``."""
    skip = set(skip)
    target = parser.add_argument_group(title or (group.__doc__ or group.__name__).strip().splitlines()[0])
    for name, f in group.model_fields.items():
        if name in skip:
            continue
        flag = f"--{prefix}{name}"
        help_ = (f.description or "").replace("%", "%%")
        if f.annotation is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            continue
        typ, extra = _flag_type(f.annotation)
        target.add_argument(flag, type=typ, default=f.default, help=help_, **extra)


def from_args(group: type[G], args: argparse.Namespace, prefix: str = "", **override: Any) -> G:
    """The validated ``group`` from parsed flags; a bad value is a one-line error naming its flag."""
    values = {name: getattr(args, prefix + name) for name in group.model_fields if hasattr(args, prefix + name)}
    values.update(override)
    try:
        return group(**values)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"][0] if err["loc"] else ""
        flag = f"--{prefix}{loc}" if loc else group.__name__
        raise UserError(f"{flag}: {err['msg']}") from None
