"""`genrecal-train`: train the Recalibrator and the student from a teacher cache (stages 1-3).

Every field of `TrainConfig` is a flag (`max_steps` -> `--max-steps`), with the field's help and
default: the flags are generated from the dataclass, so a new option needs no CLI code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from cli.errors import clean_errors, debugging, fail
from cli.options import given, options_from
from genrecal_train.config import ConfigError, PlanConfig, TrainConfig, flag_of

app = typer.Typer(add_completion=False, rich_markup_mode=None)


@app.command(help="Distil a student VLM from a teacher cache with GenRecal (stages 1, 2, 3). "
                  "Flags override values from --config (YAML or TOML). The teacher body is never loaded: "
                  "only its head, from the cache.")
@options_from(TrainConfig)
def train(config: Optional[Path] = typer.Option(None, help="YAML/TOML/JSON file with any of these options (flag "
                                                            "names, - or _); flags given override it."),
          **flags: Any) -> None:
    from genrecal_train.config import load_config

    try:
        cfg = load_config(str(config) if config else None, given(TrainConfig, flags))
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
        except RuntimeError as e:  # under torchrun: a collective failed because another rank stopped
            from genrecal_train.distributed import peer_lost

            lost = peer_lost(e)
            if debugging() or lost is None:
                raise  # clean_errors' known errors (a remote read, a locked folder) are RuntimeErrors too
            fail(f"rank {os.environ.get('RANK', '?')}: stopped because another rank did ({lost}); that rank's error "
                 f"says why", 1)
    typer.echo(f"final student: {final}")


def _resume_command() -> str:
    """The command line that continues this run: the one given (under torchrun, torchrun's), with --resume."""
    from genrecal_cache.stops import command_line

    cmd = command_line("genrecal-train", "train_cli.py") + ("" if "--resume" in sys.argv[1:] else " --resume")
    if "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("WORLD_SIZE") != os.environ.get("LOCAL_WORLD_SIZE"):
        cmd += " (and on each other node, its own torchrun command with --resume)"
    return cmd


plan_app = typer.Typer(add_completion=False, rich_markup_mode=None)


@plan_app.command(help="Per-GPU memory of weights, gradients, AdamW state, teacher head and activations for DDP "
                       "and FSDP (with/without activation checkpointing and CPU offload), from a student config "
                       "alone (meta device: no weights; a hub id other than a builtin flagship reads its config.json), "
                       "and what to change when it does not fit.")
@options_from(PlanConfig)
def plan(**flags: Any) -> None:
    from genrecal_train.memory_plan import format_plan
    from genrecal_train.memory_plan import plan as make_plan

    try:
        cfg = PlanConfig(**given(PlanConfig, flags))
    except ConfigError as e:  # a value out of its field's bounds: one line naming the flag
        raise typer.BadParameter(f"{flag_of(PlanConfig, e.field)}: {e.problem}")
    try:
        with clean_errors(cfg.teacher):  # a cache that cannot be read (an unreachable URL, a bad manifest): one line
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
