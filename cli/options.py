"""A command's flags, generated from the config dataclasses it takes (genrecal_cache/options.py).

    @app.command()
    @options_from(AuditConfig)
    def audit(cache: str = typer.Argument(...), **flags: Any) -> None:
        cfg = AuditConfig(**given(AuditConfig, flags))

Every field with a help text becomes a flag (`max_len` -> `--max-len`) with the field's help and, in `--help`,
its default; the flag's own default is None (required fields: none), so a flag left out leaves the field's
default (or a config file's value) in place: a default is typed once, in the dataclass.
tests/test_cli_options.py checks every command of every tool against its dataclasses.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer

from genrecal_cache.options import REQUIRED, field_default, flag_decls

__all__ = ["flag_help", "given", "option_fields", "options_from"]

F = TypeVar("F", bound=Callable[..., Any])


def option_fields(config: type) -> list[dataclasses.Field]:
    """The fields of dataclass `config` that are flags: those with a help text."""
    return [f for f in dataclasses.fields(config) if f.metadata.get("help")]


def flag_help(f: dataclasses.Field) -> str:
    """A flag's help: the field's, and its default when it has one that is not a switch's off (a help text
    that says its default itself, `[default: ...]`, is kept as it is)."""
    text, default = f.metadata["help"], field_default(f)
    if default is REQUIRED or isinstance(default, bool) or default in (None, "", []) or "[default:" in text:
        return text
    shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
    return f"{text} [default: {shown}]"


def _unwrap(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _annotation(f: dataclasses.Field, hint: Any) -> Any:
    """What the flag parses: bool, int, float, Path or str; a list is comma-separated text (`--stages 1,3`), or a
    repeated flag (`--image-token-id 5 --image-token-id 6`) for a field marked `repeat`."""
    hint = _unwrap(hint)
    if typing.get_origin(hint) is list and f.metadata.get("repeat"):
        return Optional[list[typing.get_args(hint)[0]]]
    return Optional[hint if hint in (bool, int, float, Path) else str]


def _parameter(f: dataclasses.Field, hint: Any) -> inspect.Parameter:
    annotation = _annotation(f, hint)
    custom = "flag" in f.metadata or annotation == Optional[bool]  # a switch names its flag: no --no-x twin
    decls = flag_decls(f) if custom else ()
    required = field_default(f) is REQUIRED
    option = typer.Option(... if required else None, *decls, help=flag_help(f), show_default=False,
                          hidden=bool(f.metadata.get("hidden")))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=annotation if not required else _unwrap(annotation))


def options_from(*configs: type) -> Callable[[F], F]:
    """Give the decorated command (`def cmd(<arguments>, **flags)`) one flag per option field of `configs`,
    after its own parameters; `cmd.__options__` names the configs (for tests/test_cli_options.py)."""

    def decorate(fn: F) -> F:
        hints = typing.get_type_hints(fn)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in inspect.signature(fn).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        generated = [_parameter(f, typing.get_type_hints(c)[f.name]) for c in configs for f in option_fields(c)]
        names = [p.name for p in own + generated]
        if len(set(names)) != len(names):
            raise TypeError(f"{fn.__name__}: two flags of the same name in {names}")
        fn.__signature__ = inspect.Signature(own + generated)  # type: ignore[attr-defined]
        fn.__options__ = configs  # type: ignore[attr-defined]
        return fn

    return decorate


def given(config: type, flags: dict[str, Any]) -> dict[str, Any]:
    """The flags given (not None) that are fields of `config`, as field values: a bool field defaulting to True
    whose one flag turns it off (`--no-reg-pass`) is False when that flag is given."""
    out = {}
    for f in option_fields(config):
        value = flags.get(f.name)
        if value is None:
            continue
        flips = field_default(f) is True and len(flag_decls(f)) == 1 and "/" not in flag_decls(f)[0]
        out[f.name] = (not value) if flips else value
    return out
