"""Training configuration: one plain dataclass, loadable from YAML/TOML, overridden by CLI flags."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "load_config", "opt", "split_steps"]


def opt(default: Any, help: str, *, flag: str | None = None) -> Any:
    """A TrainConfig field with its default and its help: the one place both live (the CLI flags,
    `--help` and the config file's option names are generated from the fields, as TRL's configs do).
    `flag` renames the CLI flag (a bool defaulting to True gets a flag that turns it off)."""
    meta = {"help": help, **({"flag": flag} if flag else {})}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    cache: str = opt("", "Cache folder or fsspec URL (https://, s3://, gs://).")
    local_cache: str | None = opt(None, "Folder keeping a verified local copy of each file of a remote --cache as it "
                                        "is first read (later epochs/runs read it from disk).")
    student: str = opt("", "Student model folder or hub id.")
    out: str = opt("", "Run folder: checkpoints/, metrics.jsonl, final/.")
    stages: list[int] = opt([1, 2, 3], "Comma-separated stages to run, in order.")
    max_steps: int = opt(100, "Optimizer steps per stage (ignored when --epochs or --stage-steps is set).")
    stage_steps: list[int] | None = opt(None, "Steps of each stage, comma-separated in --stages order "
                                              "(e.g. 200,400,200); overrides --max-steps/--epochs.")
    total_steps: int | None = opt(None, "Steps of all --stages together, shared out by --stage-split "
                                        "(instead of --max-steps per stage).")
    stage_split: list[float] = opt([0.04, 0.76, 0.2], "Shares of stages 1,2,3 in --total-steps.")
    epochs: float | None = opt(None, "Passes over the cache per stage (instead of --max-steps).")
    batch_size: int = opt(4, "Samples per micro-batch per rank.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    lr: float = opt(1e-4, "Start LR of each stage; decays linearly to --lr-end.")
    lr_end: float = opt(1e-5, "End LR of each stage.")
    warmup: float = opt(0.1, "Fraction of each stage's steps over which the LR first rises linearly from 0 to --lr "
                             "(0.1: the quality suite's GenRecal setting; 0 for none).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    recal_layers: int = opt(2, "Decoder blocks in the Recalibrator.")
    freeze_recalibrator_in_stage2: bool = opt(False, "Keep the Recalibrator fixed in stage 2.")
    use_reg_pass: bool = opt(True, "Drop the regularization pass Rec([Proj-pre(z_ql), Proj-pre(z_al)]) (ablation).",
                             flag="--no-reg-pass")
    main_pass_answer: str = opt("student_aligned", "Main-pass answer rows: student_aligned (the student's own answer "
                                                   "states, aligned to the teacher's answer tokens by text; better on "
                                                   "the quality suite) or teacher (the paper's Proj-pre(teacher "
                                                   "states)); docs/method.md.")
    teacher_tokenizer: str | None = opt(None, "Teacher tokenizer folder/hub id for student_aligned [default: the "
                                              "one stored in the cache; for older caches, the teacher it was "
                                              "extracted from].")
    w_ar: float = opt(1.0, "Weight of L_ar (main and regularization pass): CE of the recalibrated answer states "
                                   "through the teacher head.")
    w_kl: float = opt(1.0, "Weight of L_kl (main and regularization pass): KL(teacher || recalibrated) on the "
                                   "answer tokens.")
    w_student: float = opt(1.0, "Weight of L_s, the student's own CE in its tokenizer (stages 2-3).")
    w_uld: float = opt(0.0, "Stage 3: + w_uld x ULD (sorted-Wasserstein logit KD, genrecal_train/uld.py), a baseline.")
    temperature: float = opt(1.0, "Temperature of the KL (and ULD) terms.")
    max_len: int = opt(2048, "Student tokens; longer samples are skipped with a warning.")
    gradient_checkpointing: bool = opt(False, "Recompute student activations in backward.")
    train_vision: bool = opt(False, "Also train the vision encoder in stages 2-3 (e.g. a from-scratch model).")
    checkpoint_every: int = opt(50, "Checkpoint every N optimizer steps (and at the end of each stage).")
    seed: int = opt(0, "Seed for data order and initialisation.")
    prefetch: int = opt(8, "Batches prepared ahead by the background thread.")
    loss_chunk: int = opt(512, "Tokens per chunk of full-vocabulary logits in the losses.")
    resume: bool = opt(False, "Continue from the latest checkpoint in --out.")
    expect_teacher: str | None = opt(None, "Teacher folder/id the cache must come from (tokenizer, shapes and head "
                                           "rows are compared).")
    device: str = opt("auto", "auto, cpu, cuda ...")
    log_every: int = opt(1, "Log metrics every N optimizer steps.")
    # Scale (genrecal_train/distributed.py, docs/training.md; `genrecal-train plan` sizes a run):
    strategy: str = opt("auto", "auto (ddp with >1 process, else single), single, ddp, or fsdp (weights, grads and "
                                "AdamW state sharded over the ranks; see `genrecal-train plan`).")
    param_dtype: str = opt("bfloat16", "fsdp: compute dtype of the weights, the teacher head and the saved student; "
                                       "gradients reduce and AdamW runs in fp32.")
    cpu_offload: bool = opt(False, "fsdp: keep the sharded weights, gradients and AdamW state in host memory.")

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
    while total - sum(steps) < 1:  # tiny totals: rounding up the first stages left the last none
        steps[steps.index(max(steps))] -= 1
    return steps + [total - sum(steps)]


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
