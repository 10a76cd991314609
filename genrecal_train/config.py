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
    total_steps: int | None = None  # optimizer steps of all --stages together, shared out by stage_split
    stage_split: list[float] = field(default_factory=lambda: [0.04, 0.76, 0.2])  # shares of stages 1, 2, 3
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
    # Main pass answer rows: "student_aligned" = the student's own answer states, aligned to the teacher's
    # answer tokens by character offsets; "teacher" = the paper's Proj-pre(teacher states) (docs/method.md)
    main_pass_answer: str = "teacher"
    teacher_tokenizer: str | None = None  # for student_aligned; default: the teacher the cache was made from
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


    def __post_init__(self) -> None:
        if self.total_steps is not None and self.stage_steps is None:
            self.stage_steps = split_steps(self.total_steps, self.stages, self.stage_split)


def split_steps(total: int, stages: list[int], split: list[float]) -> list[int]:
    """Steps of each of `stages` out of `total`, by their shares in `split` (renormalised over the stages
    run); every stage gets at least one step and the steps add up to `total`."""
    if len(split) != 3 or any(x < 0 for x in split):
        raise ValueError(f"stage_split {split}: give three shares >= 0, for stages 1, 2 and 3")
    shares = [split[s - 1] for s in stages]
    if sum(shares) <= 0:
        raise ValueError(f"stage_split {split} gives stages {stages} no steps")
    if total < len(stages):
        raise ValueError(f"total_steps={total} is fewer than one step per stage of {stages}")
    steps = [max(1, round(total * x / sum(shares))) for x in shares[:-1]]
    return steps + [max(1, total - sum(steps))]


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
    for key, kind in (("stages", int), ("stage_steps", int), ("stage_split", float)):
        if isinstance(values.get(key), str):
            values[key] = [kind(s) for s in values[key].split(",") if s.strip()]
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
