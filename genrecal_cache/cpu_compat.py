"""The CPU compatibility shim (`compat/sitecustomize.py`, for machines without torchvision) applied where it
is needed: in this process, and in every Python process it starts (vLLM's engine core and workers are
fresh processes: they get it from `PYTHONPATH`, which runs a `sitecustomize` at start-up).

The entry points (`cli/__init__.py`) call `apply_compat_shim()`, so the installed commands work on a CPU
machine without torchvision with nothing set by the user. Inert where torchvision imports (GPU
machines): the shim then changes nothing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["COMPAT_DIR", "apply_compat_shim", "install_compat_shim"]

COMPAT_DIR = Path(__file__).parent / "compat"


def _shim() -> Any:
    """The shim module, loaded (its import hook installed) once per process."""
    module = sys.modules.get("sitecustomize")
    if module is not None and hasattr(module, "torchvision_missing"):  # ours, loaded at start-up (PYTHONPATH)
        return module
    name = "genrecal_compat_sitecustomize"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, COMPAT_DIR / "sitecustomize.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def install_compat_shim() -> bool:
    """Load the shim into this process if needed (idempotent); returns True when torchvision is missing
    (shim active). Imports torchvision to find out: `apply_compat_shim` does not."""
    module = _shim()
    module.install()
    return module.torchvision_missing()


def apply_compat_shim() -> None:
    """The shim for this process and the processes it starts: its folder first on `PYTHONPATH`, its import
    hook installed. Cheap (no torch, no transformers): for every command's start."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != COMPAT_DIR]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(COMPAT_DIR), *paths])
    _shim().install()
