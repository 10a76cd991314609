"""Real sizes without downloads: flagship configs (written in code) built on the meta device pass the
adapter checks, and the Recalibrator for 72B -> 7B has the paper's size (~0.5B)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from genrecal_cache.families import adapter_for
from genrecal_cache.families.flagships import FLAGSHIPS, check_adapter_on_meta, flagship_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from recalibrator_size import recalibrator_params  # noqa: E402

# published parameter counts (model cards), in billions
PUBLISHED = {"Qwen2-VL-72B-Instruct": 73.4, "Qwen2-VL-7B-Instruct": 8.29, "Qwen2-VL-2B-Instruct": 2.21,
             "Qwen2.5-VL-72B-Instruct": 73.4, "InternVL2_5-78B": 78.4, "InternVL2_5-8B": 8.08,
             "gemma-3-27b-it": 27.4}


@pytest.mark.parametrize("name", sorted(FLAGSHIPS))
def test_flagship_builds_on_meta_and_passes_the_adapter_checks(name: str) -> None:
    config = flagship_config(name)
    adapter = adapter_for(config)
    found = check_adapter_on_meta(adapter, config)
    assert found["params"] / 1e9 == pytest.approx(PUBLISHED[name], rel=0.01)
    assert found["norm"] == ("rms_1p" if config.model_type == "gemma3" else "rms")


def test_recalibrator_for_72b_to_7b_is_about_half_a_billion() -> None:
    n = recalibrator_params("Qwen2-VL-72B-Instruct", "Qwen2-VL-7B-Instruct")
    # 2 x (d_s x d_t) projections + LayerNorm + two Qwen2-VL-7B decoder layers (233.1M each)
    d_s, d_t = 3584, 8192
    layer = 2 * d_s * d_s + 2 * d_s * 512 + (d_s + 2 * 512) + 3 * d_s * 18944 + 2 * d_s
    assert n == 2 * d_s * d_t + 2 * d_t + 2 * layer
    assert 0.5e9 < n < 0.55e9
