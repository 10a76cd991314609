"""Crash-safe training checkpoints: write to a temp folder, fsync, rename, then move `latest`.

A checkpoint holds the student and Recalibrator weights (safetensors), the optimizer state
(`torch.save`, loaded back with `weights_only=True`) and `state.json` (stage, step, data position).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from genrecal_cache.format.manifest import Manifest, identity
from genrecal_cache.io.durable import atomic_write, fsync_path, rename_durable

__all__ = ["cache_identity", "describe", "latest_checkpoint", "load_optimizer", "load_state", "load_weights",
           "save_checkpoint"]


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone: tied weights share storage and safetensors refuses shared tensors
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: Path, name: str, *, student: torch.nn.Module, recalibrator: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int = 2) -> Path:
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(_state_dict(student), str(tmp / "student.safetensors"))
        if recalibrator is not None:
            save_file(_state_dict(recalibrator), str(tmp / "recalibrator.safetensors"))
        with open(tmp / "optimizer.pt", "wb") as f:  # a Python file: a failed write keeps its OSError (errno)
            torch.save(optimizer.state_dict(), f)
        return publish(tmp, name, state, keep)
    except BaseException:  # a full disk, an interrupt: the partial checkpoint goes (its space with it)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, name: str, state: dict[str, Any], keep: int = 2) -> Path:
    """Write state.json into the filled temp folder `tmp`, fsync it all, rename it to `name`, move
    `latest`, prune older checkpoints (shared by the safetensors and the sharded DCP formats)."""
    ckpt_root = tmp.parent
    final = ckpt_root / name
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        fsync_path(f)
    fsync_path(tmp)
    shutil.rmtree(final, ignore_errors=True)
    rename_durable(tmp, final)
    atomic_write(ckpt_root / "latest", name.encode())
    # prune older checkpoints of this run, never the one just written
    others = sorted((p for p in ckpt_root.iterdir() if p.is_dir() and not p.name.startswith(".") and p != final),
                    key=lambda p: p.stat().st_mtime)
    for old in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def cache_identity(m: Manifest) -> dict[str, Any]:
    """What a checkpoint records of the cache it trained on, to refuse a resume on another one: its teacher,
    tokenizer, codec, top-k and head (`manifest.identity`), its counts, and a digest of every file's sha256
    (the features and the samples themselves)."""
    files = hashlib.sha256(json.dumps(sorted(m.checksums.items())).encode()).hexdigest()
    return {**identity(m), **{f"counts.{k}": v for k, v in m.counts.items()}, "files sha256": files}


def describe(path: Path | None) -> str:
    """A checkpoint for a message: "checkpoint RUN/checkpoints/stage2-step0000004 (stage 2 step 4)"."""
    if path is None:
        return "no checkpoint yet"
    try:
        st = load_state(path)
        return f"checkpoint {path} (stage {st['stage']} step {st['step']})"
    except (OSError, ValueError, KeyError):
        return f"checkpoint {path}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{pointer} points at {path}, which is incomplete or gone; delete {pointer} "
                                "to start over, or restore the checkpoint folder")
    return path


def load_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


def load_weights(path: Path, *, student: torch.nn.Module, recalibrator: torch.nn.Module | None) -> None:
    student.load_state_dict(load_file(str(path / "student.safetensors")), strict=True)
    rec_file = path / "recalibrator.safetensors"
    if recalibrator is not None and rec_file.exists():
        recalibrator.load_state_dict(load_file(str(rec_file)), strict=True)


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
