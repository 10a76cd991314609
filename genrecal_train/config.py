"""Training configuration: one plain dataclass, loadable from YAML/TOML, overridden by CLI flags."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genrecal_cache.options import REQUIRED, option

__all__ = ["ConfigError", "EvalConfig", "LOSS_CHUNK", "PARAM_DTYPES", "PlanConfig", "RECAL_CONTEXTS", "STRATEGIES", "TrainConfig", "check_values", "flag_of", "load_config", "opt",
           "split_steps"]

STRATEGIES = ("auto", "single", "ddp", "fsdp")  # genrecal_train/distributed.py
PARAM_DTYPES = ("bfloat16", "bf16", "float16", "fp16", "float32", "fp32")
LOSS_CHUNK = 512  # tokens per chunk of full-vocabulary logits: 512 x 152k fp32 logits ~ 0.3 GB (losses.py, plan.py)
RECAL_CONTEXTS = ("question", "none")  # what the Recalibrator attends to before the answer rows (model.py)


def opt(default: Any, help: str, *, flag: str | None = None, at_least: float | None = None,
        above: float | None = None, below: float | None = None, choices: tuple[Any, ...] | None = None,
        same_on_resume: bool = False) -> Any:
    """A TrainConfig field with its default, its help and its valid values: the one place they live (the CLI
    flags, `--help` and the config file's option names are generated from the fields, genrecal_cache/options.py,
    and every value is checked against them, `check_values`).
    `flag` renames the CLI flag (a bool defaulting to True gets a flag that turns it off). `at_least`,
    `above`, `below` and `choices` bound a number (each item of a list); `same_on_resume`: a stage resumed
    part way must keep the value (it decides which samples, steps or updates the stage makes)."""
    bounds = {k: v for k, v in dict(at_least=at_least, above=above, below=below, choices=choices).items()
              if v is not None}
    return option(default, help, flag=flag, same_on_resume=same_on_resume, bounds=bounds)


@dataclass
class TrainConfig:
    cache: str = opt("", "Cache folder or fsspec URL (https://, s3://, gs://).")
    local_cache: str | None = opt(None, "Folder keeping a verified local copy of each file of a remote --cache as it "
                                        "is first read (later epochs/runs read it from disk).")
    student: str = opt("", "Student model folder or hub id.")
    out: str = opt("", "Run folder: checkpoints/, metrics.jsonl, final/.")
    stages: list[int] = opt([1, 2, 3], "Comma-separated stages to run, in order.", choices=(1, 2, 3))
    max_steps: int = opt(100, "Optimizer steps per stage (ignored when --epochs or --stage-steps is set).",
                         at_least=1)
    stage_steps: list[int] | None = opt(None, "Steps of each stage, comma-separated in --stages order "
                                              "(e.g. 200,400,200); overrides --max-steps/--epochs.", at_least=1)
    total_steps: int | None = opt(None, "Steps of all --stages together, shared out by --stage-split "
                                        "(instead of --max-steps per stage).", at_least=1)
    stage_split: list[float] = opt([0.04, 0.76, 0.2], "Shares of stages 1,2,3 in --total-steps.", at_least=0)
    epochs: float | None = opt(None, "Passes over the cache per stage (instead of --max-steps).", above=0)
    batch_size: int = opt(4, "Samples per micro-batch per rank.", at_least=1, same_on_resume=True)
    grad_accum: int = opt(1, "Micro-batches per optimizer step.", at_least=1, same_on_resume=True)
    lr: float = opt(1e-4, "Start LR of each stage; decays linearly to --lr-end.", above=0, same_on_resume=True)
    lr_end: float = opt(1e-5, "End LR of each stage.", at_least=0, same_on_resume=True)
    warmup: float = opt(0.1, "Fraction of each stage's steps over which the LR first rises linearly from 0 to --lr "
                             "(0.1: the quality suite's GenRecal setting; 0 for none).", at_least=0, below=1,
                    same_on_resume=True)
    weight_decay: float = opt(0.0, "AdamW weight decay.", at_least=0, same_on_resume=True)
    recal_layers: int = opt(2, "Decoder blocks in the Recalibrator.", at_least=1, same_on_resume=True)
    freeze_recalibrator_in_stage2: bool = opt(False, "Keep the Recalibrator fixed in stage 2.", same_on_resume=True)
    use_reg_pass: bool = opt(True, "Drop the regularization pass Rec([Proj-pre(z_ql), Proj-pre(z_al)]) (ablation).",
                             flag="--no-reg-pass", same_on_resume=True)
    main_pass_answer: str = opt("student_aligned", "Main-pass answer rows: student_aligned (the student's own answer "
                                                   "states, aligned to the teacher's answer tokens by text; better on "
                                                   "the quality suite) or teacher (the paper's Proj-pre(teacher "
                                                   "states)); docs/method.md.",
                                 choices=("student_aligned", "teacher"), same_on_resume=True)
    recal_context: str = opt("question", "What the Recalibrator attends to before the answer rows: question (the "
                                         "paper: the student's question states in the main pass, the teacher's "
                                         "in the regularization pass) or none (answer rows only).",
                             choices=RECAL_CONTEXTS, same_on_resume=True)
    teacher_tokenizer: str | None = opt(None, "Teacher tokenizer folder/hub id for student_aligned [default: the "
                                              "one stored in the cache; for older caches, the teacher it was "
                                              "extracted from].", same_on_resume=True)
    w_ar: float = opt(1.0, "Weight of L_ar (main and regularization pass): CE of the recalibrated answer states "
                           "through the teacher head.", at_least=0, same_on_resume=True)
    w_kl: float = opt(1.0, "Weight of L_kl (main and regularization pass): KL(teacher || recalibrated) on the "
                           "answer tokens.", at_least=0, same_on_resume=True)
    w_student: float = opt(1.0, "Weight of L_s, the student's own CE in its tokenizer (stages 2-3).",
                           at_least=0, same_on_resume=True)
    w_uld: float = opt(0.0, "Stage 3: + w_uld x ULD (sorted-Wasserstein logit KD, genrecal_train/uld.py), a baseline.",
                       at_least=0, same_on_resume=True)
    temperature: float = opt(1.0, "Temperature of the KL (and ULD) terms.", above=0, same_on_resume=True)
    max_len: int = opt(2048, "Student tokens; longer samples are skipped with a warning.", at_least=1,
                       same_on_resume=True)
    gradient_checkpointing: bool = opt(False, "Recompute student activations in backward.")
    train_vision: bool = opt(False, "Also train the vision encoder in stages 2-3 (e.g. a from-scratch model).",
                              same_on_resume=True)
    checkpoint_every: int = opt(50, "Checkpoint every N optimizer steps (and at the end of each stage).", at_least=1)
    seed: int = opt(0, "Seed for data order and initialisation.", at_least=0, same_on_resume=True)
    prefetch: int = opt(8, "Batches prepared ahead by the background thread.", at_least=1)
    loss_chunk: int = opt(LOSS_CHUNK, "Tokens per chunk of full-vocabulary logits in the losses.", at_least=1)
    resume: bool = opt(False, "Continue from the latest checkpoint in --out (with none there yet, start from the "
                              "beginning, saying so).")
    expect_teacher: str | None = opt(None, "Teacher folder/id the cache must come from (tokenizer, shapes and head "
                                           "rows are compared).")
    device: str = opt("auto", "auto, cpu, cuda ...")
    log_every: int = opt(1, "Log metrics every N optimizer steps.", at_least=1)
    # Scale (genrecal_train/distributed.py, docs/training.md; `genrecal-train plan` sizes a run):
    strategy: str = opt("auto", "auto (ddp with >1 process, else single), single, ddp, or fsdp (weights, grads and "
                                "AdamW state sharded over the ranks; see `genrecal-train plan`).",
                                choices=STRATEGIES)
    param_dtype: str = opt("bfloat16", "fsdp: compute dtype of the weights, the teacher head and the saved student; "
                                       "gradients reduce and AdamW runs in fp32.",
                                       choices=PARAM_DTYPES)
    cpu_offload: bool = opt(False, "fsdp: keep the sharded weights, gradients and AdamW state in host memory.")

    def __post_init__(self) -> None:
        check_values(self)
        if not self.stages:
            raise ConfigError("stages", "must name at least one of the stages 1, 2, 3 (e.g. 1,2,3)")
        if self.total_steps is not None and self.stage_steps is None:
            self.stage_steps = split_steps(self.total_steps, self.stages, self.stage_split)
        if self.stage_steps is not None and len(self.stage_steps) != len(self.stages):
            raise ConfigError("stage_steps", f"{self.stage_steps} must give one step count per stage of "
                                             f"{self.stages}")

    def resume_settings(self) -> dict[str, Any]:
        """The values a stage resumed part way must keep (the fields marked `same_on_resume`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("same_on_resume")}

    def reads_context(self, stage: int) -> bool:
        """Whether a step of `stage` reads the teacher's context rows: only the regularization pass's prefix
        (Proj-pre(z_ql)) does. Otherwise the data thread neither reads nor gathers them."""
        return stage in (1, 2) and self.recal_context == "question" and self.use_reg_pass


@dataclass
class PlanConfig:
    """What `genrecal-train plan` sizes (its flags are these fields'; `teacher` is `--cache`)."""
    student: str = option(REQUIRED, "Student model folder, its config.json, a hub id (its config alone is read) or a "
                                    "builtin: qwen2-vl-7b, qwen2-vl-2b, or a flagship's name or hub id "
                                    "(Qwen/Qwen2-VL-7B-Instruct, ...: built offline).")
    teacher: str = option(REQUIRED, "Teacher cache folder or URL (its head's size is read), HIDDENxVOCAB (e.g. "
                                    "8192x152064), or the teacher as --student takes a model (qwen2-vl-72b, "
                                    "Qwen/Qwen2-VL-72B-Instruct, a folder or hub id).", flag="--cache")
    gpus: int = option(1, "Number of GPUs (FSDP shards over all of them).")
    gpu_memory_gb: float = option(80.0, "Memory per GPU, GB (GiB).", flag="--gpu-memory")
    batch_size: int = option(1, "Samples per micro-batch per GPU.")
    max_len: int = option(TrainConfig.max_len, "Tokens per sample (the teacher's are taken as the same).")
    answer_frac: float = 0.25  # share of the tokens that are answer tokens (teacher-head losses)
    recal_layers: int = option(TrainConfig.recal_layers, "Decoder blocks in the Recalibrator.")
    recal_context: str = opt(TrainConfig.recal_context, "What the Recalibrator attends to: question (its passes as "
                                                        "long as the samples) or none (answer rows only).",
                             choices=RECAL_CONTEXTS)
    loss_chunk: int = LOSS_CHUNK
    param_dtype: str = option(TrainConfig.param_dtype, "FSDP compute dtype.")

    def __post_init__(self) -> None:
        check_values(self)


@dataclass
class EvalConfig:
    """What `genrecal-eval` evaluates, and how (`genrecal_train/evaluate.py`)."""
    model: str | None = option(None, "Model folder (teacher or student).")
    data: str | None = option(None, "LLaVA-style JSONL or Parquet; the last answer is the reference. With --compare: "
                                    "evaluates run folders that have no eval.json.")
    image_root: str | None = option(None, "Folder the data's image paths are under (default: the data file's "
                                          "folder); an image outside it is refused.")
    limit: int | None = option(None, "Only the first N samples.")
    max_new_tokens: int = option(8, "Generation length limit.")
    device: str = option("cpu", "cpu, cuda, ...")


class ConfigError(ValueError):
    """A configuration value that cannot be used: `field` is its name, the message what is wrong with it."""

    def __init__(self, name: str, problem: str, where: str | None = None):
        """`where`: how the user gave it (a flag, a file's option) when not the field's name."""
        super().__init__(f"{where or name}: {problem}")
        self.field, self.problem = name, problem


def check_values(cfg: Any) -> None:
    """Check (and convert: "3" or 3.0 to 3, 1 to 1.0, "1,2" to [1, 2]) every field's value of a config dataclass
    (TrainConfig, PlanConfig) against its type and its bounds (`opt`): the one place config files, flags and Python
    callers are checked. Raises ConfigError."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        try:
            setattr(cfg, f.name, _valid(hints[f.name], value, f.metadata.get("bounds", {})))
        except _Invalid as e:
            raise ConfigError(f.name, f"got {value!r}, must be {e}") from None


class _Invalid(ValueError):
    """What a valid value would be (for ConfigError's message)."""


def _valid(hint: Any, value: Any, bounds: dict[str, Any]) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        inner = next(a for a in typing.get_args(hint) if a is not type(None))
        return None if value is None else _valid(inner, value, bounds)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        try:
            return [_valid(item, v, bounds) for v in value]
        except _Invalid as e:
            raise _Invalid(f"a comma-separated list, each {e}") from None
    converted = _scalar(hint, value)
    if converted is None or not _in_bounds(converted, bounds):
        raise _Invalid(_describe(hint, bounds))
    return converted


def _scalar(kind: type, value: Any) -> Any:
    """`value` as a `kind` (bool, int, float or str), None if it is not one; strings of numbers count (YAML reads
    `1e-4` as text, and flags arrive as text in lists)."""
    if kind is str:
        return value if isinstance(value, str) else None
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value if isinstance(value, bool) else None
    number = value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = int(value) if kind is int and value.strip().lstrip("+-").isdigit() else float(value)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        return None
    if kind is int:
        return int(number) if float(number).is_integer() else None
    return float(number)


def _in_bounds(value: Any, bounds: dict[str, Any]) -> bool:
    lo, above, below, choices = (bounds.get(k) for k in ("at_least", "above", "below", "choices"))
    return not ((choices is not None and value not in choices) or (lo is not None and value < lo)
                or (above is not None and value <= above) or (below is not None and value >= below))


def _describe(kind: type, bounds: dict[str, Any]) -> str:
    """What a valid value is, in words: "a whole number >= 1", "one of auto, single", "true or false"."""
    if "choices" in bounds:
        return f"one of {', '.join(map(str, bounds['choices']))}"
    if kind in (str, bool):
        return "text" if kind is str else "true or false"
    limits = [f"{op} {bounds[k]}" for k, op in (("at_least", ">="), ("above", ">"), ("below", "<")) if k in bounds]
    return ("a whole number" if kind is int else "a number") + (" " + " and ".join(limits) if limits else "")


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


_FORMATS = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".json": "JSON"}


def _read_file(path: str) -> dict[str, Any]:
    """The option names and values of a YAML, TOML or JSON config file; one-line ValueErrors for a file that
    is missing, unreadable, malformed or not a mapping."""
    p = Path(path)
    kind = _FORMATS.get(p.suffix)
    if kind is None:
        raise ValueError(f"config file {path}: unknown extension {p.suffix!r} (use .yaml, .yml, .toml or .json)")
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ValueError(f"config file {path}: not found; check the path given to --config") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path}: cannot be read ({getattr(e, 'strerror', None) or e}); give a "
                         f"readable UTF-8 text file to --config") from None
    try:
        data = _parse(kind, text)
    except ValueError as e:
        raise ValueError(f"config file {path}: not valid {kind} ({e}); fix its syntax") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: top level must be a mapping of option names to values")
    return data


def _parse(kind: str, text: str) -> Any:
    """Parse a config file's text; a syntax error is a ValueError saying what and where, on one line."""
    if kind == "YAML":
        import yaml

        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"{getattr(e, 'problem', None) or e}{where}") from None
    try:
        if kind == "TOML":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except ValueError as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(" ".join(str(e).split())) from None


def flag_of(config: type, name: str) -> str:
    """The command-line flag of field `name` of a config dataclass (its `flag`, else `--` + the name with dashes)."""
    meta = next(f.metadata for f in dataclasses.fields(config) if f.name == name)
    return meta.get("flag", "--" + name.replace("_", "-"))


def load_config(path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults <- config file <- explicit overrides (flags given on the command line). Every problem is a
    one-line ValueError naming the file or flag and the value."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    if path:
        data = {k.replace("-", "_"): v for k, v in _read_file(path).items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config file {path}: unknown option(s) {unknown}; known: {sorted(known)}")
        values.update(data)
    flags = {k: v for k, v in overrides.items() if v is not None}
    values.update(flags)
    try:
        cfg = TrainConfig(**values)
    except ConfigError as e:
        flag = flag_of(TrainConfig, e.field)
        if e.field in flags:
            raise ConfigError(e.field, e.problem, flag) from None
        if path and e.field in values:
            raise ConfigError(e.field, f"{e.problem} (fix it in the file, or give {flag})",
                              f"config file {path}: {e.field}") from None
        raise
    for name in ("cache", "student", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required (flag or config file)")
    return cfg
