"""Every option of every command is typed once: its default and help live in a config dataclass field
(genrecal_cache/options.py), and the command's flag is generated from it (cli/options.py). This walks every
typer app's commands and compares each flag with the field it comes from; a flag with a default of its own
(`typer.Option(8, ...)`) fails."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import pytest
import typer
from typer.models import OptionInfo

from cli import cache_cli, eval_cli, train_cli
from cli.options import flag_help, given, option_fields, options_from
from genrecal_cache.options import REQUIRED, field_default, flag_decls, option

APPS = {"genrecal-cache": cache_cli.app, "genrecal-train": train_cli.app, "genrecal-train plan": train_cli.plan_app,
        "genrecal-eval": eval_cli.app}
# options that are not a config's fields: train's --config (the file the fields' values are read from)
NOT_A_FIELD = {("genrecal-train", "train", "config")}


def _faults(tool: str, app: typer.Typer) -> list[str]:
    """What is wrong with the flags of `app`'s commands: a flag with a default of its own, a flag that is no
    config field, a help or default that is not its field's."""
    faults = []
    for command in app.registered_commands:
        fn = command.callback
        configs = getattr(fn, "__options__", ())
        fields = {f.name: f for c in configs for f in option_fields(c)}
        for p in inspect.signature(fn).parameters.values():
            info = p.default
            if not isinstance(info, OptionInfo):
                continue
            where = f"{tool} {fn.__name__} --{p.name.replace('_', '-')}"
            f = fields.get(p.name)
            if f is None:
                if (tool, fn.__name__, p.name) not in NOT_A_FIELD and info.default is not ...:
                    faults.append(f"{where}: no config field; give the command a dataclass field (options_from)")
                continue
            required = field_default(f) is REQUIRED
            if info.default is not (... if required else None):
                faults.append(f"{where}: default {info.default!r} typed in the CLI; the field's is "
                              f"{field_default(f)!r}")
            if info.help != flag_help(f):
                faults.append(f"{where}: help {info.help!r} is not the field's {flag_help(f)!r}")
            if info.param_decls and tuple(info.param_decls) != flag_decls(f):
                faults.append(f"{where}: flag {info.param_decls} is not the field's {flag_decls(f)}")
    return faults


@pytest.mark.parametrize("tool", sorted(APPS))
def test_every_flag_comes_from_a_config_field(tool: str) -> None:
    app = APPS[tool]
    assert app.registered_commands
    assert _faults(tool, app) == []


def test_the_configs_cover_every_flag_of_every_command() -> None:
    """Each command with flags names its configs, and each config field with a help is one of its flags."""
    for tool, app in APPS.items():
        for command in app.registered_commands:
            fn = command.callback
            names = set(inspect.signature(fn).parameters)
            for c in getattr(fn, "__options__", ()):
                missing = [f.name for f in option_fields(c) if f.name not in names]
                assert not missing, f"{tool} {fn.__name__}: fields {missing} of {c.__name__} have no flag"


def test_a_default_typed_in_the_cli_is_found() -> None:
    """The check above can fail: a literal default, a help of its own and a flag with no field are each found."""

    @dataclass
    class Config:
        workers: int = option(8, "Files in parallel.")

    bad = typer.Typer()

    @bad.command()
    @options_from(Config)
    def good(**flags: Any) -> None: ...

    @bad.command()
    def literal(workers: int = typer.Option(8, help="Files in parallel. [default: 8]")) -> None: ...

    literal.__options__ = (Config,)  # type: ignore[attr-defined]

    @bad.command()
    def other_help(workers: int = typer.Option(None, help="How many.")) -> None: ...

    other_help.__options__ = (Config,)  # type: ignore[attr-defined]

    @bad.command()
    def stray(seed: int = typer.Option(0)) -> None: ...

    faults = _faults("bad", bad)
    assert [x.split(":")[0] for x in faults] == ["bad literal --workers", "bad other_help --workers",
                                                 "bad stray --seed"], faults
    assert "default 8 typed in the CLI" in faults[0]


def test_given_flags_become_field_values() -> None:
    @dataclass
    class Config:
        n: int = option(3, "N.")
        on: bool = option(True, "Turn it off.", flag="--no-on")
        read_back: bool = option(True, "Both ways.", flag="--read-back/--no-read-back")

    assert given(Config, {"n": None, "on": None, "read_back": None}) == {}
    assert given(Config, {"n": 5, "on": True, "read_back": False}) == {"n": 5, "on": False, "read_back": False}
    assert [f.name for f in dataclasses.fields(Config)] == ["n", "on", "read_back"]


def test_flags_users_rely_on_are_still_there() -> None:
    """The flag names the README, docs and tests use (generated from the fields' names, or their `flag`)."""
    from typer.main import get_command

    def flags(app: typer.Typer, name: str | None = None) -> set[str]:
        cmd = get_command(app)
        cmd = cmd.commands[name] if name else cmd  # type: ignore[attr-defined]
        return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}

    assert {"--teacher", "--data", "--out", "--hidden-codec", "--hidden-dtype", "--context", "--context-rank",
            "--topk-rows", "--num-shards", "--shard-index", "--kv-cache-gib", "--trust-remote-code",
            "--max-model-len", "--commit-seconds"} <= flags(cache_cli.app, "extract")
    assert {"--tokens", "--hidden-size", "--vocab", "--codec", "--json", "--sample", "--image-token-id"} \
        <= flags(cache_cli.app, "plan")
    assert {"--replace", "--force", "--workers", "--read-back", "--no-read-back", "--quiet"} \
        <= flags(cache_cli.app, "push")
    assert {"--local-cache", "--errors", "--json"} <= flags(cache_cli.app, "info")
    assert {"--student", "--cache", "--gpus", "--gpu-memory", "--batch-size", "--max-len", "--recal-layers",
            "--recal-context", "--param-dtype"} == flags(train_cli.plan_app) - {"--help"}
    assert {"--compare", "--model", "--data", "--image-root", "--out", "--limit", "--max-new-tokens", "--device"} \
        == flags(eval_cli.app) - {"--help"}
    assert {"--no-reg-pass", "--resume", "--config", "--max-steps", "--stages"} <= flags(train_cli.app)


def test_help_shows_the_defaults() -> None:
    """`--help` prints each flag's default as its field's help carries it (no markup swallows `[default: ...]`)."""
    from typer.testing import CliRunner

    for app, args, shown in ((cache_cli.app, ["extract", "--help"], "[default: 64]"),
                             (cache_cli.app, ["plan", "--help"], "[default: tokens / 512]"),
                             (train_cli.plan_app, ["--help"], "[default: 80.0]"),
                             (eval_cli.app, ["--help"], "[default: 8]"),
                             (train_cli.app, ["--help"], "[default: 100]")):
        r = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
        assert r.exit_code == 0 and shown in " ".join(r.output.split()), (args, r.output[-2000:])  # text wraps
