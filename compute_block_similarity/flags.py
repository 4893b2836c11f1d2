"""The flag machinery: CLI flags derived from pydantic option groups (the groups live in options.py and
beside their consumers).

Each field's default and ``description`` are the flag's default and help text (the parsers show
defaults with ArgumentDefaultsHelpFormatter), so a default is written in one place.
``add_flags(parser, Group)`` adds ``--field`` (or ``--{prefix}field``) for every field;
``from_args(Group, args)`` builds the validated group back from the parsed namespace.
A field's ``json_schema_extra`` may give ``"aliases"`` (other spellings of its flag) and ``"choices"``
(for a string validated against a registry).
Types map as: bool -> ``--flag`` (``--flag/--no-flag`` when it defaults to True); Literal -> choices;
``list[str]`` -> a comma list; ``X | None`` -> X with default None.
"""

from __future__ import annotations

import argparse
import contextlib
import types
import typing
from typing import Any, Iterable, Iterator, Literal, TypeVar

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


def group_of(annotation: Any) -> type[BaseModel] | None:
    """The option group a field holds, if it holds one (a nested pydantic model)."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _nested(f: Any) -> dict:
    """How a nested group's flags are named: ``json_schema_extra={"flags": {"prefix", "skip", "title"}}``."""
    return dict((f.json_schema_extra or {}).get("flags", {}))


def _defaults(defaults: BaseModel | dict | None) -> dict:
    if isinstance(defaults, BaseModel):
        return dict(defaults)
    return dict(defaults or {})


def add_flags(parser: argparse.ArgumentParser | Any, group: type[BaseModel], prefix: str = "",
              skip: Iterable[str] = (), title: str | None = None, defaults: BaseModel | dict | None = None,
              only: Iterable[str] | None = None, helps: dict[str, str] | None = None) -> None:
    """Add one flag per field of ``group`` (named ``--{prefix}{field}``) to ``parser``; a field that holds
    another group adds that group's flags (its own prefix, skip and title from its ``"flags"`` extra).
    ``defaults`` (an instance or a dict) replaces the fields' declared defaults, ``helps`` their help for
    this command; ``only`` keeps those fields."""
    skip, dflt = set(skip), _defaults(defaults)
    target = None
    for name, f in group.model_fields.items():
        if name in skip or (only is not None and name not in set(only)):
            continue
        default = dflt[name] if name in dflt else f.get_default(call_default_factory=True)
        sub = group_of(f.annotation)
        if sub is not None:
            nest = _nested(f)
            add_flags(parser, sub, prefix + nest.get("prefix", ""), nest.get("skip", ()), nest.get("title"), default,
                      helps=nest.get("helps"))
            continue
        target = target or parser.add_argument_group(title or (group.__doc__ or group.__name__).strip().splitlines()[0])
        more = f.json_schema_extra or {}
        flags = [f"--{prefix}{name}", *more.get("aliases", [])]
        help_ = ((helps or {}).get(name) or f.description or "").replace("%", "%%")
        if f.annotation is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            target.add_argument(*flags, dest=prefix + name, action=action, default=default, help=help_)
            continue
        typ, extra = _flag_type(f.annotation)
        if "choices" in more:
            extra["choices"] = more["choices"]
        target.add_argument(*flags, dest=prefix + name, type=typ, default=default, help=help_, **extra)


def values_from(group: type[BaseModel], args: argparse.Namespace, prefix: str = "",
                defaults: BaseModel | dict | None = None, skip: Iterable[str] = ()) -> dict:
    """The field values of ``group`` from parsed flags (nested groups built too); fields without a
    flag (or in ``skip``) keep ``defaults``' value, else their declared default."""
    dflt, out, skip = _defaults(defaults), {}, set(skip)
    for name, f in group.model_fields.items():
        sub = group_of(f.annotation)
        if sub is not None:
            nest = _nested(f)
            base, pre = dflt.get(name, f.get_default(call_default_factory=True)), prefix + nest.get("prefix", "")
            out[name] = _build(sub, values_from(sub, args, pre, base, nest.get("skip", ())), pre)
        elif name not in skip and hasattr(args, prefix + name):
            out[name] = getattr(args, prefix + name)
        elif name in dflt:
            out[name] = dflt[name]
    return out


def _build(group: type[G], values: dict, prefix: str) -> G:
    try:
        return group(**values)
    except ValidationError as e:
        raise UserError(flag_error(e, group, prefix)) from None


def from_args(group: type[G], args: argparse.Namespace, prefix: str = "", defaults: BaseModel | dict | None = None,
              **override: Any) -> G:
    """The validated ``group`` from parsed flags; a bad value is a one-line error naming its flag."""
    return _build(group, {**values_from(group, args, prefix, defaults), **override}, prefix)


def one_of(flag: str, registry: Iterable[str], value: str) -> str:
    """``value`` if the registry has it; else ValueError naming the flag and the choices."""
    if value not in registry:
        raise ValueError(f"{flag} {value!r} is unknown; choose one of: {', '.join(registry)}")
    return value


def flag_error(e: ValidationError, group: type[BaseModel], prefix: str = "") -> str:
    """One line naming the flag: "--batch_size must be >= 1, got 0"."""
    err = e.errors()[0]
    loc = str(err["loc"][0]) if err["loc"] else ""
    flag = f"--{prefix}{loc}" if loc else "the options"
    ctx, got = err.get("ctx", {}), err.get("input")
    for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx:
            return f"{flag} must be {op} {ctx[key]}, got {got}"
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith("--"):
        return msg
    field = group.model_fields.get(loc)
    hint = f" ({field.description})" if field is not None and field.description else ""
    return f"{flag}: {msg}, got {got!r}{hint}"


@contextlib.contextmanager
def progress_shown(show: bool = True) -> Iterator[None]:
    """``--no_progress`` (``show`` False): every progress bar this process draws is hidden while the block
    runs (ours, lm-eval's, the Trainer's, the Hub's: all tqdm), then restored."""
    import tqdm

    if show:
        yield
        return
    init = tqdm.tqdm.__init__

    def hidden(self: Any, *a: Any, **kw: Any) -> None:
        init(self, *a, **{**kw, "disable": True})

    tqdm.tqdm.__init__ = hidden
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = init
