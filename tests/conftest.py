"""Shared fixtures: tiny real models built offline once per session, and demo data.

At import time this also makes the CPU compatibility shim (genrecal_cache/compat/sitecustomize.py)
reach every process: it is prepended to PYTHONPATH, so subprocesses (vLLM workers, CLI runs)
import it at start-up, and it is installed into this process too. It is inert where torchvision
works (GPU machines).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPAT_DIR = REPO / "genrecal_cache" / "compat"

_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != COMPAT_DIR]
os.environ["PYTHONPATH"] = os.pathsep.join([str(COMPAT_DIR), *_paths])

from genrecal_cache.testing import install_compat_shim, tiny_pair as _build_tiny_pair  # noqa: E402

install_compat_shim()


class Loaded(NamedTuple):
    """A tiny model loaded through its family adapter. Shared by the session: do not modify it."""

    path: Path
    adapter: Any  # genrecal_cache.families.FamilyAdapter
    processor: Any
    model: Any


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(teacher_dir, student_dir): Qwen2-VL-architecture teacher and LLaVA student, saved like hub models."""
    return _build_tiny_pair(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def teacher_dir(tiny_pair: tuple[Path, Path]) -> Path:
    return tiny_pair[0]


@pytest.fixture(scope="session")
def student_dir(tiny_pair: tuple[Path, Path]) -> Path:
    return tiny_pair[1]


def _load(path: Path) -> Loaded:
    from genrecal_cache.families import adapter_for

    adapter = adapter_for(path)
    return Loaded(path, adapter, adapter.load_processor(path), adapter.load_model(path))


@pytest.fixture(scope="session")
def teacher(teacher_dir: Path) -> Loaded:
    """The tiny teacher loaded (eval mode, float32, CPU). Read-only: load your own copy to train it."""
    return _load(teacher_dir)


@pytest.fixture(scope="session")
def student(student_dir: Path) -> Loaded:
    """The tiny student loaded (eval mode, float32, CPU). Read-only: load your own copy to train it."""
    return _load(student_dir)


@pytest.fixture(scope="session")
def demo_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-sample shape-question dataset (every question type, 56x56 images); path of its train.jsonl."""
    from genrecal_cache.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n=24, seed=0)


def _extract_demo_cache(root: Path, teacher_dir: Path, n: int, seed: int) -> Path:
    from genrecal_cache.demo_data import write_demo_dataset
    from genrecal_cache.extract import ExtractConfig, extract

    data = write_demo_dataset(root / "data", n=n, seed=seed)
    extract(ExtractConfig(teacher=str(teacher_dir), data=str(data), out=str(root / "cache"), backend="transformers",
                          hidden_codec="float32", progress=False))
    return root / "cache"


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> Path:
    """A float32 cache of the tiny teacher over 32 demo samples (seed 1): what the trainer tests train on."""
    return _extract_demo_cache(tmp_path_factory.mktemp("train_cache"), teacher_dir, n=32, seed=1)


@pytest.fixture(scope="session")
def heldout_cache(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> Path:
    """A float32 cache of the tiny teacher over 12 other demo samples (seed 2), never trained on."""
    return _extract_demo_cache(tmp_path_factory.mktemp("heldout_cache"), teacher_dir, n=12, seed=2)
