"""genrecal-train's flags are generated from TrainConfig: every field is reachable, with its help and default."""

from __future__ import annotations

import dataclasses

import typer

from cli.options import given
from cli.train_cli import app
from genrecal_train.config import TrainConfig, load_config

REQUIRED = ["--cache", "c", "--student", "s", "--out", "o"]


def _parse(args: list[str]) -> TrainConfig:
    params = typer.main.get_command(app).make_context("genrecal-train", REQUIRED + args).params
    return load_config(params.pop("config"), given(TrainConfig, params))


def test_every_option_is_a_flag_with_the_fields_help() -> None:
    params = {p.name: p for p in typer.main.get_command(app).params}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in params, f"TrainConfig.{f.name} has no flag"
        assert f.metadata.get("help") and f.metadata["help"] in params[f.name].help, f"TrainConfig.{f.name}: no help"


def test_flags_set_fields_and_omitted_flags_keep_the_dataclass_defaults() -> None:
    assert _parse([]) == TrainConfig(cache="c", student="s", out="o")
    cfg = _parse(["--max-steps", "7", "--stages", "1,3", "--stage-split", "0.1,0.5,0.4", "--no-reg-pass",
                  "--resume", "--w-uld", "0.5", "--local-cache", "lc", "--log-every", "3"])
    assert (cfg.max_steps, cfg.stages, cfg.stage_split, cfg.use_reg_pass, cfg.resume, cfg.w_uld, cfg.local_cache,
            cfg.log_every) == (7, [1, 3], [0.1, 0.5, 0.4], False, True, 0.5, "lc", 3)
