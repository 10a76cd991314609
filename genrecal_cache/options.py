"""An option of a tool: a field of a config dataclass with its default and its help, the one place both live.

The command-line flags are generated from these fields (cli/options.py: `--max-len` from `max_len`, its help and
its `[default: ...]` from the field), and Python callers get the same defaults from the dataclass, so no default
or help text is typed twice (tests/test_cli_options.py walks every command and compares).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

__all__ = ["REQUIRED", "field_default", "flag_decls", "option"]

REQUIRED: Any = dataclasses.MISSING  # `option(REQUIRED, help)`: a field (and flag) without a default


def option(default: Any, help: str, *, flag: str | tuple[str, ...] | None = None, hidden: bool = False,
           **meta: Any) -> Any:
    """A dataclass field that is also a command-line option. `flag`: the flag's name(s) when not the field's
    (`--json` for `as_json`; a bool's `--x/--no-x`; a bool defaulting to True may name a flag that turns it
    off, `--no-reg-pass`); `hidden`: left out of `--help` (an old name still accepted); `meta`: more metadata
    for the config's own checks (genrecal_train/config.py's bounds)."""
    metadata = {"help": help, **({"flag": flag} if flag else {}), **({"hidden": True} if hidden else {}), **meta}
    if default is REQUIRED:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_default(f: dataclasses.Field) -> Any:
    """The default of field `f` (a fresh copy for a list); REQUIRED when it has none."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def flag_decls(f: dataclasses.Field) -> tuple[str, ...]:
    """The flag name(s) of field `f`: its `flag`, else `--` and the name with dashes (`max_len` -> `--max-len`)."""
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return (flag,) if isinstance(flag, str) else tuple(flag)
