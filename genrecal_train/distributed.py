"""Data-parallel strategies: DDP for small students, FSDP2 (`torch.distributed.fsdp.fully_shard`) for large ones.

    single  one process, plain module
    ddp     every rank holds the whole model, fp32 weights/grads/AdamW state (bf16 autocast on GPU)
    fsdp    weights, gradients and AdamW state sharded over the ranks (dim 0 of every parameter);
            one FSDP unit per decoder layer of the student and of the Recalibrator, one for the
            vision tower, the rest (embeddings, lm_head, projections) in the root unit.
            Compute in `param_dtype` (bf16 by default), gradient reduce-scatter and the optimizer
            in fp32 (MixedPrecisionPolicy); optional CPU offload of the sharded state
            (CPUOffloadPolicy); the frozen teacher head is a replicated buffer in `param_dtype`.
            Only rank 0 reads the student; the others build it on the meta device and receive
            their shards from rank 0 (`load_from_rank0`).

Everything here is PyTorch's own machinery; this module only decides what to wrap and how (and, `peer_lost`, reads
how a collective failed).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn

from genrecal_cache.dtypes import torch_dtype
from genrecal_train.config import STRATEGIES  # the names (TrainConfig checks values against them)


def resolve_strategy(strategy: str, world: int) -> str:
    """`auto` is DDP with more than one process (as before FSDP existed), a plain module otherwise."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        return "ddp" if world > 1 else "single"
    if strategy == "ddp" and world == 1:
        return "single"
    return strategy


# How a collective fails when another rank's process is gone (gloo's TCP pairs, NCCL, the TCP store)
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited")


def peer_lost(e: BaseException) -> str | None:
    """Which of `PEER_LOST` `e` says, when raised by torch in a multi-process run: a collective that failed because
    another rank stopped (that rank's own error says why; this one has nothing to add but that it stopped too).
    Torch raises a plain RuntimeError (gloo) or a DistError (NCCL, the store); the project's own RuntimeError
    subclasses (a remote read that met a reset connection, say) are not this."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not (type(e) is RuntimeError or isinstance(e, dist.DistError)):
        return None
    return next((p for p in PEER_LOST if p in str(e)), None)


def param_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `--param-dtype` name (config.PARAM_DTYPES; the map is genrecal_cache/dtypes.py)."""
    return torch_dtype(name)


def init_single_process_group(device: torch.device) -> None:
    """FSDP needs a process group even on one GPU (e.g. with CPU offload): a world of one, no network."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def vision_towers(model: nn.Module) -> list[nn.Module]:
    return [model.student.get_submodule(p.rstrip(".")) for p in model.adapter.vision_parameter_prefixes(model.student)]


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules that get their own FSDP unit (fully_shard is applied to them, then to the root):
    every decoder layer of the student's text model, of its vision tower and of the Recalibrator.

    Not the vision tower itself: transformers finds a model's output-capturing hooks by its exact
    class, which fully_shard replaces (LLaVA would lose the vision hidden states it selects from)."""
    student, adapter = model.student, model.adapter
    units = list(adapter.text_model(student).layers) + list(model.recalibrator.layers)
    for tower in vision_towers(model):
        # reversed: a list nested in a listed block is sharded before that block (fully_shard goes bottom-up)
        units += reversed([m for lst in tower.modules() if isinstance(lst, nn.ModuleList) for m in lst])
    return units


def _cast_floating_inputs(dtype: torch.dtype):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    return hook


def checkpoint_layers(layers: nn.ModuleList) -> None:
    """Activation checkpointing for plain layers (the Recalibrator's; the student's are checkpointed by
    transformers' gradient_checkpointing_enable): wrapped in place, before sharding, as torchtitan does."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)


def shard_model(model: nn.Module, dtype: torch.dtype, device: torch.device, cpu_offload: bool = False,
                checkpoint_recalibrator: bool = False) -> nn.Module:
    """Apply FSDP2 to a GenRecal in place (units from `fsdp_units`, then the root); returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if checkpoint_recalibrator:
        checkpoint_layers(model.recalibrator.layers)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # fp32 reduce-scatter and fp32 sharded parameters: the optimizer state and update stay fp32 while
    # the all-gathered copies used for compute are in `dtype`.
    kw = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
              offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy())
    # The head is frozen and only read: keep it once per rank in the compute dtype, not sharded.
    model.head.to(device=device, dtype=dtype)
    for unit in fsdp_units(model):
        fully_shard(unit, **kw)
    for tower in vision_towers(model):  # pixel values meet the patch embedding's weights in the compute dtype
        tower.register_forward_pre_hook(_cast_floating_inputs(dtype), with_kwargs=True)
    fully_shard(model, **kw)
    return model


def meta_student(adapter, path) -> nn.Module:
    """The student `adapter.load_model(path)` gives (its class and config, fp32), on the meta device:
    module tree and shapes, no memory. FSDP ranks other than 0 start from it (`load_from_rank0`)."""
    from transformers import AutoConfig

    with torch.device("meta"):
        return adapter.model_class()._from_config(AutoConfig.from_pretrained(path), dtype=torch.float32).eval()


def full_weights(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Rank 0's student and Recalibrator state dicts (references, no copy), taken before `shard_model`
    replaces the parameters by shards; `load_from_rank0` sends them to the other ranks' shards."""
    return {"student": model.student.state_dict(), "recalibrator": model.recalibrator.state_dict()}


def load_from_rank0(model: nn.Module, full: dict[str, dict[str, torch.Tensor]], device: torch.device,
                    cpu_offload: bool = False) -> None:
    """Fill a sharded GenRecal from rank 0's weights (a collective; `full` is {} on the other ranks).

    Rank 0 loaded the student (and initialised the Recalibrator) on the CPU; every other rank built
    them on the meta device, so no rank but 0 ever holds the whole model: torch broadcasts one tensor
    at a time and each rank keeps its shard (`set_model_state_dict(broadcast_from_rank0=True)`, as
    torchtune loads a model). Buffers outside the state dict (RoPE `inv_freq`, position ids) are
    computed at construction, which the meta device skips: rank 0's are broadcast as well. The
    teacher head is not touched: every rank reads it from the cache. A key or buffer that rank 0's
    model has and this rank's has not (or the reverse) is an error (strict loading)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dist.get_rank() != 0:
        _allocate_meta(model, device, cpu_offload)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for name in ("student", "recalibrator"):
        set_model_state_dict(getattr(model, name), full.get(name, {}), options=options)
        _broadcast_non_persistent_buffers(getattr(model, name))


def _allocate_meta(model: nn.Module, device: torch.device, cpu_offload: bool) -> None:
    """Give every meta shard and buffer real (uninitialised) memory where FSDP keeps it, in place.

    So that loading copies into the parameters instead of replacing them (`assign`), which would
    untie tied ones (embed_tokens / lm_head of a tied student) on this rank only. FSDP's `_apply`
    re-registers its padded shards afterwards, as it does for `to_empty`."""
    def empty(t: torch.Tensor) -> torch.Tensor:
        if not t.is_meta:
            return t
        return torch.empty_like(t, device="cpu" if cpu_offload and isinstance(t, nn.Parameter) else device)

    model._apply(empty)


def _broadcast_non_persistent_buffers(module: nn.Module) -> None:
    """Rank 0's non-persistent buffers of `module` into every rank's."""
    bufs = [(m, n, b) for m in module.modules() for n, b in m._buffers.items()
            if b is not None and n in m._non_persistent_buffers_set]
    layout = [(type(m).__name__, n, tuple(b.shape), b.dtype) for m, n, b in bufs]
    ref = [layout]
    dist.broadcast_object_list(ref, src=0)
    if ref[0] != layout:
        raise RuntimeError(f"rank {dist.get_rank()}: the model's buffers differ from rank 0's (same --student on "
                           f"every rank?): {layout} vs {ref[0]}")
    for _, _, b in bufs:
        dist.broadcast(b, src=0)


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ for plain and FSDP-sharded (DTensor) gradients alike; returns the total norm.

    With DTensor gradients the norm is a partial sum over shards: reduce it to the full norm before
    scaling, so every rank applies the same factor (the factor single-process training would use)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm)
    return norm


def full_state_dict(module: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of `module` on CPU, on rank 0 (other ranks get {}); a collective.

    Tensors are cast to `dtype` when given (floating point only): the saved student is in the
    compute dtype, e.g. bf16, as released checkpoints are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def save_pretrained(student: nn.Module, folder, dtype: torch.dtype) -> None:
    """Gather an FSDP-sharded student and save it with `save_pretrained` on rank 0 (a collective):
    a normal transformers checkpoint in `dtype`, loadable with from_pretrained or vLLM."""
    sd = full_state_dict(student, dtype)
    if dist.get_rank() == 0:
        # A plain (unsharded) copy holding the gathered tensors: saved as any transformers model, its
        # config says `dtype` (built on the meta device: no second allocation of the weights).
        with torch.device("meta"):
            plain = type(student)._from_config(copy.deepcopy(student.config), dtype=dtype)
        plain.load_state_dict(sd, assign=True)
        plain.save_pretrained(folder)
    dist.barrier()


def remap_positions(positions: list[int], world: int) -> list[int]:
    """Stream positions for `world` ranks from a checkpoint written by len(positions) ranks.

    Each rank reads a contiguous slice (about N / world samples) of every epoch's shuffled order,
    so an exact replay is impossible with another world size. Every new rank starts at the same
    fraction of its own slice as the old ranks had reached on average (same epoch, same progress
    through it): a few samples near the cut may be seen twice or skipped in this epoch only."""
    old = len(positions)
    pos = round(sum(positions) / old * old / world)
    return [pos] * world


def refresh_trainable(model: nn.Module) -> None:
    """Call after changing which parameters train (a new stage) under FSDP.

    fully_shard fixes each unit's gradient-reduction dtype from the parameters that require grad at
    the first forward; a unit frozen then (the student in stage 1) would reduce-scatter its stage-2
    gradients in bf16 and fail to store them in the fp32 shards. Recompute it for the new stage."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                group._init_mp_dtypes()


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor counts its local shard's storage,
    which FSDP pads to the size of rank 0's shard)."""
    sizes: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "to_local"):
            t = t.to_local()
        st = t.untyped_storage()
        sizes[st.data_ptr() or id(t)] = st.nbytes()
    return sum(sizes.values())


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds now: weights, gradients, AdamW state and teacher head, in bytes.

    Logged once per stage (after its first step, gradients still present) so a run can be compared
    with `genrecal-train plan` (tests/test_plan.py does, for every rank of an FSDP run)."""
    head = set(id(b) for b in model.head.buffers())
    params = list(model.parameters())
    out = {"params": _storage_bytes(params),
           "grads": _storage_bytes(p.grad for p in params),
           "optimizer": _storage_bytes(v for s in optimizer.state.values() for v in s.values()
                                       if isinstance(v, torch.Tensor)),
           "head": _storage_bytes(b for b in model.buffers() if id(b) in head)}
    if model.head.lm_head_weight.is_cuda:  # everything the step allocated at its peak (activations included)
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    return out
