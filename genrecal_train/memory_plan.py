"""Memory plan: what one GPU holds while training GenRecal, per strategy, before buying anything.

Built from a student config alone: the student and the Recalibrator are instantiated on the meta
device (shapes, no memory) and the stage-2 trainable set (the largest: student body +
Recalibrator) is taken from `GenRecal.set_stage`, as the trainer does. Per GPU:

    weights     ddp: every parameter, fp32.  fsdp: rank 0's shard of every parameter, fp32
                (FSDP pads every rank's shard to rank 0's size: rows = ceil(rows / world)).
    grads       the trainable parameters, as the weights (ddp also keeps a bucket copy).
    optimizer   AdamW exp_avg + exp_avg_sq (fp32, the unpadded local shard) + a 4-byte step each.
    head        the frozen teacher head [vocab x d_teacher] + its norm: fp32 (ddp) or param dtype (fsdp).
    gathered    fsdp only: the root unit (embeddings, lm_head, projections) and two decoder layers
                (one prefetched) all-gathered in the param dtype, with their unsharded grads.
    activations an estimate of what the forward keeps for backward plus the largest transient
                (see `activation_bytes`).

weights/grads/optimizer/head are exact: tests/test_plan.py compares them with the local shards
of a real FSDP run. With --cpu-offload the first three live in host memory instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn

from genrecal_cache.families import adapter_for, looks_like_hub_id, model_config
from genrecal_cache.families.flagships import FLAGSHIPS, flagship_config, flagship_name
from genrecal_cache.format.head import HeadConfig, TeacherHead
from genrecal_cache import open_cache
from genrecal_train.config import PlanConfig, TrainConfig
from genrecal_train.distributed import fsdp_units
from genrecal_train.distributed import param_dtype as to_dtype
from genrecal_train.model import GenRecal

# short names `plan` takes for flagship checkpoints whose configs genrecal_cache/families/flagships.py holds (their
# names and hub ids work too: Qwen/Qwen2-VL-7B-Instruct)
BUILTINS = {"qwen2-vl-72b": "Qwen2-VL-72B-Instruct", "qwen2-vl-7b": "Qwen2-VL-7B-Instruct",
            "qwen2-vl-2b": "Qwen2-VL-2B-Instruct"}
GiB = 1024 ** 3
HEADROOM = 0.9  # of a GPU's memory usable for tensors (CUDA context, allocator fragmentation)


@dataclass
class Sizes:
    """Per-GPU bytes of one configuration."""
    name: str
    weights: int
    grads: int
    optimizer: int
    head: int
    gathered: int
    activations: int
    offloaded: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_total(self) -> int:
        on_gpu = self.head + self.gathered + self.activations
        return on_gpu if self.offloaded else on_gpu + self.weights + self.grads + self.optimizer

    @property
    def host_total(self) -> int:
        return self.weights + self.grads + self.optimizer if self.offloaded else 0


# ---- the model, on the meta device ----------------------------------------------------------------

def builtin_flagship(spec: str) -> str | None:
    """The flagship `spec` names: a builtin short name, or what `flagship_name` takes (its name or hub id)."""
    return flagship_name(BUILTINS.get(spec.lower(), spec))


def config_for_plan(spec: str, flag: str):
    """A model's transformers config: a builtin short name, a model folder or its config.json, a flagship by name or
    hub id (built offline), or any other hub id (its config.json alone is fetched, as `from_pretrained` does)."""
    from transformers import AutoConfig, PretrainedConfig

    path = Path(spec)
    if spec.lower() not in BUILTINS and path.is_file():  # a config.json
        try:
            data = json.loads(path.read_text())
            cls = AutoConfig.for_model(data["model_type"]).__class__
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{flag} {spec}: not a model's config.json ({type(e).__name__}: {e})") from None
        cfg: PretrainedConfig = cls(**{k: v for k, v in data.items() if k != "model_type"})
        return cfg
    if (spec.lower() in BUILTINS or not path.exists()) and (name := builtin_flagship(spec)) is not None:
        return flagship_config(name)
    try:
        return model_config(spec, flag)
    except ValueError as e:
        raise ValueError(f"{e}; or a builtin ({', '.join([*BUILTINS, *FLAGSHIPS])})") from None


def teacher_dims(spec: str) -> tuple[int, int]:
    """(hidden, vocab) of the teacher head: from 'HIDDENxVOCAB', a cache (its manifest; a folder or URL), or the
    teacher's model config (`config_for_plan`: a builtin, a model folder or its config.json, a flagship, a hub id)."""
    if "x" in spec and all(p.isdigit() for p in spec.lower().split("x")):
        h, v = spec.lower().split("x")
        return int(h), int(v)
    path = Path(spec)
    if spec.lower() in BUILTINS:
        is_model = True
    elif path.exists():  # a config.json, or a model folder (a cache folder holds manifest.json, parts no config)
        is_model = path.is_file() or ((path / "config.json").is_file() and not (path / "manifest.json").is_file())
    else:  # a flagship or another hub id ('org/name'); a URL or a missing folder is for open_cache to say
        is_model = builtin_flagship(spec) is not None or ("/" in spec and looks_like_hub_id(spec))
    if not is_model:
        m = open_cache(spec).manifest
        return m.hidden_size, m.vocab_size
    try:
        text = config_for_plan(spec, "--cache").get_text_config()
    except ValueError as e:
        raise ValueError(f"{e}; or a cache folder or URL, or HIDDENxVOCAB") from None
    return text.hidden_size, text.vocab_size


def meta_model(student_cfg, d_teacher: int, vocab: int, recal_layers: int):
    """GenRecal on the meta device (no memory), stage-2 trainable set applied."""
    adapter = adapter_for(student_cfg)
    with torch.device("meta"):
        student = getattr(transformers, adapter.model_class_name)._from_config(student_cfg)
        head = TeacherHead(HeadConfig(hidden_size=d_teacher, vocab_size=vocab), torch.empty(d_teacher),
                           torch.empty(vocab, d_teacher))
        # the main-pass mode adds no parameters; 'teacher' needs no tokenizers, which a plan from a config has not
        model = GenRecal(student, adapter, head, TrainConfig(recal_layers=recal_layers, main_pass_answer="teacher"))
    model.set_stage(2)
    return model


# ---- exact state sizes ----------------------------------------------------------------------------

def _rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """(rows held, rows allocated) of a dim-0 size-n parameter on `rank`: torch.chunk's split, each
    rank's storage padded to rank 0's chunk (FSDP2's layout)."""
    chunk = math.ceil(n / world) if n else 0
    return max(0, min(chunk, n - rank * chunk)), min(chunk, n)


def state_bytes(model: nn.Module, strategy: str, world: int, rank: int = 0,
                param_dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Exact per-rank bytes of weights, grads, optimizer state and teacher head (fp32 master weights)."""
    w = g = o = 0
    for p in model.parameters():
        rest = p[0].numel() if p.dim() else 1
        if strategy == "fsdp":
            held, alloc = _rows(p.shape[0] if p.dim() else 1, world, rank)
        else:
            held = alloc = p.shape[0] if p.dim() else 1
        w += alloc * rest * 4
        if p.requires_grad:
            g += alloc * rest * 4
            o += held * rest * 8 + 4  # exp_avg, exp_avg_sq, step
    head_dtype = param_dtype if strategy == "fsdp" else torch.float32
    head = sum(b.numel() for b in model.head.buffers()) * head_dtype.itemsize
    return {"params": w, "grads": g, "optimizer": o, "head": head}


# ---- activations ----------------------------------------------------------------------------------

def _layer_token_bytes(text_cfg, b: int) -> int:
    """Bytes a Llama/Qwen2-style decoder layer keeps for backward per token: input + norm outputs
    (~6 x d), q and attention output (2 x d), k and v (2 x kv), the MLP's gate, up, act and product
    (4 x ffn); attention itself with a fused kernel (flash / memory-efficient) keeps O(L), not O(L^2)."""
    d, ff = text_cfg.hidden_size, text_cfg.intermediate_size
    heads = text_cfg.num_attention_heads
    head_dim = getattr(text_cfg, "head_dim", None) or d // heads
    kv = text_cfg.num_key_value_heads * head_dim
    return (8 * d + 2 * kv + 4 * ff) * b


def activation_bytes(model: nn.Module, tokens: int, rec_tokens: int, answer_tokens: int, loss_chunk: int,
                     checkpointing: bool, b: int) -> int:
    """Stage 2, one micro-batch: what the student's and the Recalibrator's layers keep for backward
    (all of it, or with checkpointing only each layer's input plus one layer recomputed), plus the
    largest transient: one loss chunk's fp32 logits, log-probabilities and their gradient (student
    vocabulary for L_s, over answer rows only; the teacher head for the answer losses: the teacher's log-probabilities, shared by
    both passes, and each pass's log-probabilities and gradients, held together).

    `tokens`: the student's padded batch x length; `rec_tokens`: the Recalibrator's, both passes
    (padded batch x (question + answer) length, twice); `answer_tokens`: answer tokens of the batch."""
    text = model.adapter.text_config(model.student)
    n_layers, d = text.num_hidden_layers, text.hidden_size
    per_tok = _layer_token_bytes(text, b)
    if checkpointing:
        kept = (n_layers * tokens + model.cfg.recal_layers * rec_tokens) * d * b + max(tokens, rec_tokens) * per_tok
    else:
        kept = (n_layers * tokens + model.cfg.recal_layers * rec_tokens) * per_tok
    v_s = model.adapter.lm_head(model.student).weight.shape[0]
    transient = max(min(loss_chunk, answer_tokens) * v_s * 4 * 3,  # L_s: the student's head at labelled rows only
                    min(loss_chunk, answer_tokens) * model.head.vocab_size * 4 * 8)
    return kept + transient


def plan_activation_bytes(model: nn.Module, cfg: PlanConfig, checkpointing: bool, b: int) -> int:
    """`activation_bytes` for batches of `cfg.batch_size` samples of `cfg.max_len` tokens (teacher
    sequences taken as long as the student's; `answer_frac` of them answer; with recal_context 'none' the
    Recalibrator's passes hold the answer rows only)."""
    tokens = cfg.batch_size * cfg.max_len
    answer = max(1, int(tokens * cfg.answer_frac))
    return activation_bytes(model, tokens, 2 * (tokens if cfg.recal_context == "question" else answer), answer,
                            cfg.loss_chunk, checkpointing, b)


def _gathered_bytes(model: nn.Module, b: int) -> int:
    units = fsdp_units(model)
    in_units = {id(p) for u in units for p in u.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_units)
    largest = max(sum(p.numel() for p in u.parameters()) for u in units)
    return (root + 2 * largest) * b + (root + largest) * (b + 4)


def load_host_bytes(model: nn.Module) -> dict[str, int]:
    """Host memory that building the model takes (trainer.build_model), before training starts:
    "load_full": the fp32 student + Recalibrator, which every DDP rank and FSDP's rank 0 read;
    "load_other": what another FSDP rank holds of them, one full tensor of rank 0's in flight
    (the largest). The teacher head comes on top on every rank, as the cache stores it."""
    sizes = [p.numel() * 4 for p in model.parameters()]
    return {"load_full": sum(sizes), "load_other": max(sizes)}


# ---- the plan -------------------------------------------------------------------------------------

def plan(cfg: PlanConfig) -> tuple[list[Sizes], dict]:
    d_t, vocab = teacher_dims(cfg.teacher)
    model = meta_model(config_for_plan(cfg.student, "--student"), d_t, vocab, cfg.recal_layers)
    pdt = to_dtype(cfg.param_dtype)
    info = {"params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "teacher_head": [vocab, d_t], **load_host_bytes(model)}
    out = []
    ddp = state_bytes(model, "ddp", cfg.gpus)
    out.append(Sizes("ddp fp32", ddp["params"], 2 * ddp["grads"], ddp["optimizer"], ddp["head"], 0,
                     plan_activation_bytes(model, cfg, False, 4), notes=["grads x2: DDP's bucket copy"]))
    fs = state_bytes(model, "fsdp", cfg.gpus, 0, pdt)
    gathered = _gathered_bytes(model, pdt.itemsize)
    for offload in (False, True):  # in order of preference: offload costs more time than recomputation
        for ckpt in (False, True):
            act = plan_activation_bytes(model, cfg, ckpt, pdt.itemsize)
            name = f"fsdp {cfg.param_dtype}" + (" +ckpt" if ckpt else "") + (" +offload" if offload else "")
            out.append(Sizes(name, fs["params"], fs["grads"], fs["optimizer"], fs["head"], gathered, act,
                             offloaded=offload))
    return out, info


def advice(sizes: list[Sizes], cfg: PlanConfig) -> list[str]:
    budget = cfg.gpu_memory_gb * GiB * HEADROOM
    fits = [s for s in sizes if s.gpu_total <= budget]
    if fits:
        best = fits[0]
        flags = {"ddp fp32": "--strategy ddp"}.get(best.name, "--strategy fsdp" + (
            " --gradient-checkpointing" if "ckpt" in best.name else "") + (" --cpu-offload" if "offload" in best.name
                                                                          else ""))
        return [f"fits: {best.name} ({flags}), {best.gpu_total / GiB:.1f} of {cfg.gpu_memory_gb:g} GB per GPU"]
    tips = ["does not fit in any configuration; what to change:"]
    tightest = min(sizes, key=lambda s: s.gpu_total)
    if tightest.activations > 0.3 * budget:
        tips.append(f"- activations are {tightest.activations / GiB:.1f} GB: lower --batch-size (keep the global "
                    "batch with --grad-accum) or --max-len")
    if tightest.head > 0.3 * budget:
        tips.append(f"- the teacher head alone is {tightest.head / GiB:.1f} GB")
    state = sizes[1].weights + sizes[1].grads + sizes[1].optimizer
    tips.append(f"- more GPUs: fsdp state is {state / GiB:.1f} GB per GPU at {cfg.gpus}, ~{state * cfg.gpus / GiB:.0f} GB "
                "in total, divided by the number of GPUs")
    tips.append("- bigger GPUs, or --cpu-offload with enough host memory")
    return tips


def format_plan(sizes: list[Sizes], info: dict, cfg: PlanConfig) -> str:
    gb = lambda x: f"{x / GiB:8.2f}"  # noqa: E731
    lines = [f"student {cfg.student}: {info['params'] / 1e9:.2f}B parameters, {info['trainable'] / 1e9:.2f}B trained "
             f"in stage 2 (with the Recalibrator); teacher head {info['teacher_head'][0]} x {info['teacher_head'][1]}",
             f"{cfg.gpus} GPU(s) x {cfg.gpu_memory_gb:g} GB, batch {cfg.batch_size} per GPU x {cfg.max_len} tokens; "
             f"GB per GPU (usable: {HEADROOM:.0%}):",
             f"{'configuration':32s}{'weights':>9s}{'grads':>9s}{'optim':>9s}{'head':>9s}{'gather':>9s}"
             f"{'activ':>9s}{'GPU':>9s}{'host':>9s}  fits"]
    budget = cfg.gpu_memory_gb * GiB * HEADROOM
    for s in sizes:
        lines.append(f"{s.name:32s}{gb(s.weights)} {gb(s.grads)} {gb(s.optimizer)} {gb(s.head)} {gb(s.gathered)} "
                     f"{gb(s.activations)} {gb(s.gpu_total)} {gb(s.host_total)}  "
                     f"{'yes' if s.gpu_total <= budget else 'no'}")
    lines.append(f"loading, host GB: {info['load_full'] / GiB:.2f} on fsdp rank 0 and every ddp rank (fp32 student + "
                 f"Recalibrator, until sharded); {info['load_other'] / GiB:.2f} on other fsdp ranks (one tensor in "
                 f"flight, on the GPU if any); + the teacher head on every rank")
    lines += advice(sizes, cfg)
    return "\n".join(lines)
