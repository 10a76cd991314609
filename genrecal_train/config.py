"""Training configuration: one plain dataclass, loadable from YAML/TOML, overridden by CLI flags."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    cache: str = ""  # cache folder or fsspec URL
    local_cache: str | None = None  # folder keeping verified copies of a remote cache's files (read once)
    student: str = ""  # student model folder or hub id
    out: str = ""  # run folder: checkpoints/, metrics.jsonl, final/
    stages: list[int] = field(default_factory=lambda: [1, 2, 3])
    max_steps: int = 100  # optimizer steps per stage (ignored when epochs or stage_steps is set)
    stage_steps: list[int] | None = None  # optimizer steps of each stage in --stages order (overrides the rest)
    epochs: float | None = None  # passes over the cache per stage, instead of max_steps
    batch_size: int = 4  # samples per micro-batch (per rank)
    grad_accum: int = 1
    lr: float = 1e-4  # each stage decays linearly from lr to lr_end
    lr_end: float = 1e-5
    warmup: float = 0.0  # fraction of each stage's steps over which the LR first rises linearly from 0 to lr
    weight_decay: float = 0.0
    recal_layers: int = 2
    freeze_recalibrator_in_stage2: bool = False
    use_reg_pass: bool = True  # the regularization pass Rec([Proj-pre(z_ql), Proj-pre(z_al)])
    w_ar: float = 1.0
    w_kl: float = 1.0
    w_student: float = 1.0
    w_uld: float = 0.0  # stage 3: + w_uld * ULD (sorted-Wasserstein logit KD, genrecal_train/uld.py), a baseline
    temperature: float = 1.0
    max_len: int = 2048  # student tokens; longer samples are skipped with a warning
    gradient_checkpointing: bool = False
    train_vision: bool = False  # also train the vision encoder in stages 2-3 (e.g. a from-scratch model)
    checkpoint_every: int = 50  # optimizer steps; a checkpoint is also written at the end of each stage
    seed: int = 0
    prefetch: int = 8  # batches prepared ahead by the background thread
    loss_chunk: int = 512  # tokens per chunk of full-vocabulary logits
    resume: bool = False
    expect_teacher: str | None = None  # teacher folder/id the cache must have been extracted from
    device: str = "auto"
    log_every: int = 1
    skip_errors: bool = True  # cached samples with status 'error' are never used; this only silences the count


def _read_file(path: str) -> dict[str, Any]:
    p = Path(path)
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif p.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file {path}: unknown extension {p.suffix!r} (use .yaml, .yml, .toml or .json)")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: top level must be a mapping of option names to values")
    return data


def load_config(path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults <- config file <- explicit overrides (flags given on the command line)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    if path:
        data = {k.replace("-", "_"): v for k, v in _read_file(path).items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config file {path}: unknown option(s) {unknown}; known: {sorted(known)}")
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("stages", "stage_steps"):
        if isinstance(values.get(key), str):
            values[key] = [int(s) for s in values[key].split(",") if s.strip()]
    cfg = TrainConfig(**values)
    if cfg.stage_steps is not None and len(cfg.stage_steps) != len(cfg.stages):
        raise ValueError(f"stage_steps {cfg.stage_steps} must give one step count per stage of {cfg.stages}")
    bad = [s for s in cfg.stages if s not in (1, 2, 3)]
    if bad or not cfg.stages:
        raise ValueError(f"stages must be a comma-separated subset of 1,2,3 (got {cfg.stages})")
    for name in ("cache", "student", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required (flag or config file)")
    return cfg
