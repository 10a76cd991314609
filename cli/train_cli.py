"""`genrecal-train`: train the Recalibrator and the student from a teacher cache (stages 1-3).

Every field of `TrainConfig` is a flag (`max_steps` -> `--max-steps`), with the field's help and
default: the flags are generated from the dataclass, so a new option needs no CLI code.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import shlex
import sys
import types
import typing
from pathlib import Path
from typing import Any, Optional

import typer

from cli.errors import clean_errors, debugging, fail
from genrecal_train.config import TrainConfig

app = typer.Typer(add_completion=False, rich_markup_mode=None)


def _flag_type(hint: Any) -> type:
    """What the flag parses: bool, int, float or str (lists are given comma-separated: `--stages 1,3`)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint if hint in (bool, int, float) else str


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "" if value in (None, "") else str(value)


def _parameter(f: dataclasses.Field, hint: Any) -> inspect.Parameter:
    kind = _flag_type(hint)
    default = _default_text(f)
    help_ = f.metadata.get("help", "") + (f" [default: {default}]" if default and kind is not bool else "")
    decls = [f.metadata.get("flag", "--" + f.name.replace("_", "-"))] if kind is bool else []
    # default None: a flag overrides --config only when given
    option = typer.Option(None, *decls, help=help_, show_default=False)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind])


def _overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """Flag values as TrainConfig values: a bool field whose default is True has a flag that turns it off."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        value = flags.get(f.name)
        out[f.name] = (not value) if value is not None and f.default is True else value
    return out


def train(config: Optional[Path] = None, **flags: Any) -> None:
    from genrecal_train.config import load_config

    try:
        cfg = load_config(str(config) if config else None, _overrides(flags))
    except ValueError as e:  # a bad value, file or flag: one line, status 2, before anything is written
        if debugging():
            raise
        fail(str(e))
    from genrecal_cache.stops import raise_on_signals
    from genrecal_train import checkpoint as ckpt
    from genrecal_train.errors import OutOfSpace, RunInterrupted, RunRefused, TrainError
    from genrecal_train.trainer import train as run_train  # torch/transformers: imported only to run

    # a refused cache, a locked --out, a resume that does not fit its checkpoint: one line, status 2
    with clean_errors(cfg.cache, also=(RunRefused,)), raise_on_signals():
        try:
            final = run_train(cfg)
        except RunInterrupted as e:  # SIGINT or SIGTERM: where, what was saved, how to go on (130, 143)
            if os.environ.get("RANK", "0") != "0":  # under torchrun every rank stops; rank 0 says so
                raise typer.Exit(128 + e.signum) from None
            fail(f"{cfg.out}: training {e}; saved: {ckpt.describe(e.saved)}; resume with: {_resume_command()}",
                 128 + e.signum)
        except OutOfSpace as e:
            if debugging():
                raise
            fail(f"{e}; free some space (or give another --out), then resume with: {_resume_command()}")
        except TrainError as e:  # the run stopped for a reason it names: one line, status 1
            if debugging() or isinstance(e, RunRefused):
                raise
            fail(str(e), 1)
    typer.echo(f"final student: {final}")


def _resume_command() -> str:
    """The command line that continues this run: the one given, with --resume."""
    args = sys.argv[1:]
    return shlex.join(["genrecal-train", *args, *([] if "--resume" in args else ["--resume"])])


_hints = typing.get_type_hints(TrainConfig)
train.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                      default=typer.Option(None, help="YAML/TOML/JSON file with any of these options (flag names, "
                                                      "- or _); flags given override it.")),
    *(_parameter(f, _hints[f.name]) for f in dataclasses.fields(TrainConfig)),
])
app.command(help="Distil a student VLM from a teacher cache with GenRecal (stages 1, 2, 3). "
                 "Flags override values from --config (YAML or TOML). The teacher body is never loaded: "
                 "only its head, from the cache.")(train)


plan_app = typer.Typer(add_completion=False, rich_markup_mode=None)


@plan_app.command(help="Per-GPU memory of weights, gradients, AdamW state, teacher head and activations for DDP "
                       "and FSDP (with/without activation checkpointing and CPU offload), from a student config "
                       "alone (meta device, nothing downloaded), and what to change when it does not fit.")
def plan(
    student: str = typer.Option(..., help="Student model folder, its config.json, or a builtin: qwen2-vl-7b."),
    cache: str = typer.Option(..., help="Teacher cache folder (its head's size is read), HIDDENxVOCAB "
                                        "(e.g. 8192x152064), or a builtin teacher: qwen2-vl-72b, qwen2-vl-7b."),
    gpus: int = typer.Option(1, help="Number of GPUs (FSDP shards over all of them)."),
    gpu_memory: float = typer.Option(80.0, help="Memory per GPU, GB (GiB)."),
    batch_size: int = typer.Option(1, help="Samples per micro-batch per GPU."),
    max_len: int = typer.Option(2048, help="Tokens per sample."),
    recal_layers: int = typer.Option(2, help="Decoder blocks in the Recalibrator."),
    param_dtype: str = typer.Option("bfloat16", help="FSDP compute dtype."),
) -> None:
    from genrecal_train.plan import PlanConfig, format_plan
    from genrecal_train.plan import plan as make_plan

    cfg = PlanConfig(student=student, teacher=cache, gpus=gpus, gpu_memory_gb=gpu_memory, batch_size=batch_size,
                     max_len=max_len, recal_layers=recal_layers, param_dtype=param_dtype)
    try:
        sizes, info = make_plan(cfg)
    except ValueError as e:
        raise typer.BadParameter(str(e))
    typer.echo(format_plan(sizes, info, cfg))


def main() -> None:
    """`genrecal-train [flags]` trains; `genrecal-train plan [flags]` sizes a run."""
    if len(sys.argv) > 1 and sys.argv[1] == "plan":
        plan_app(sys.argv[2:], prog_name="genrecal-train plan")
    else:
        app()


if __name__ == "__main__":
    main()
