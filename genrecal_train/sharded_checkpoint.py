"""Sharded checkpoints of an FSDP run with `torch.distributed.checkpoint` (DCP).

Every rank writes its own shards of the model and AdamW state into one folder (`*.distcp` +
`.metadata`); DCP re-shards on load, so a run can resume with another number of processes.
Publishing (state.json, atomic rename, `latest`, pruning) is `checkpoint.publish`, as for the
single-file format. The frozen teacher head is not saved: it comes from the cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from genrecal_train import checkpoint as ckpt

SKIP_PREFIX = "head."  # the teacher head: a buffer read from the cache, never trained


def is_sharded(path: Path) -> bool:
    return (path / ".metadata").exists()


def _model_sd(model: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in get_model_state_dict(model).items() if not k.startswith(SKIP_PREFIX)}


def save(run_dir: Path, name: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
         keep: int = 2) -> Path:
    """Collective: every rank calls it. Rank 0 publishes once all shards are on disk."""
    root = run_dir / "checkpoints"
    tmp = root / f".{name}.tmp"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dcp.save({"model": _model_sd(model), "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=tmp)
    final = root / name
    if dist.get_rank() == 0:
        ckpt.publish(tmp, name, state, keep)
    dist.barrier()  # no rank goes on (or may be killed) believing a checkpoint exists before it does
    return final


def load_model(path: Path, model: nn.Module) -> None:
    """Model weights (any sharding) into an already sharded model; collective."""
    sd = _model_sd(model)
    dcp.load({"model": sd}, checkpoint_id=path)
    set_model_state_dict(model, sd, options=StateDictOptions(strict=False))


def load_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """AdamW state (any sharding) into `optimizer` over `model`'s sharded parameters; collective."""
    osd = get_optimizer_state_dict(model, optimizer)  # materialises empty state to load into
    dcp.load({"optim": osd}, checkpoint_id=path)
    set_optimizer_state_dict(model, optimizer, osd)
