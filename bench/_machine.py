"""The line every bench prints first: what the figures after it were measured on."""

from __future__ import annotations

import datetime as dt
import os
import platform

import torch

__all__ = ["machine"]


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}; {dt.date.today().isoformat()}; "
            f"load average {os.getloadavg()[0]:.1f}")
