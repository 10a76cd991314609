"""vLLM backend parity for the families whose tiny models vLLM's CPU build runs (docs/families.md).

One subprocess (this file as a script, engines in-process as in test_vllm_backend.py) extracts a
cache of each family's tiny model with the vLLM backend; the same data is then extracted with the
transformers backend: token ids, answer masks and hidden states must agree.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("vllm") is None:  # installed but broken must fail, not skip
    pytest.skip("vllm is not installed (CPU: scripts/setup.sh; GPU: pip install 'genrecal[vllm]')",
                allow_module_level=True)

# qwen2_vl, llava: test_vllm_backend.py; gemma3, paligemma, internvl are refused here (test_vllm_checks.py)
VLLM_FAMILIES = ["llava_onevision", "mistral3", "qwen2_5_vl", "qwen3_vl", "smolvlm"]


def _cfg(teacher: str, data: str, out: str, backend: str):
    from genrecal_cache.extract import ExtractConfig

    return ExtractConfig(context="full", topk_rows="all", teacher=teacher, data=data, out=out, backend=backend, topk=8, max_len=1024, batch_tokens=512,
                         hidden_codec="fp32", dtype="float32", device="cpu", progress=False,
                         vllm={"distributed_executor_backend": "uni"} if backend == "vllm" else {})


@pytest.fixture(scope="module")
def vllm_caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    from genrecal_cache.extract import extract
    from genrecal_cache.testing import build_tiny_family, write_mixed_size_dataset

    root = tmp_path_factory.mktemp("families_vllm")
    data = write_mixed_size_dataset(root / "data", n=8, seed=0)
    models = [build_tiny_family(f, root / f, seed=3) for f in VLLM_FAMILIES]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    args = [str(data), *(f"{m}={root / ('vllm-' + m.name)}" for m in models)]
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True,
                          timeout=300 * len(models))
    if proc.returncode != 0:
        pytest.fail(f"vLLM subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    out = {}
    for m in models:
        extract(_cfg(str(m), str(data), str(root / f"hf-{m.name}"), "transformers"))
        out[m.name] = (root / f"vllm-{m.name}", root / f"hf-{m.name}")
    return out


@pytest.mark.parametrize("family", VLLM_FAMILIES)
def test_vllm_cache_equals_transformers_cache(family: str, vllm_caches) -> None:
    from genrecal_cache import open_cache

    tv, th = (open_cache(p) for p in vllm_caches[family])
    assert tv.manifest.teacher["backend"] == "vllm" and len(tv) == len(th) == 8
    for i in range(len(th)):
        a, b = tv[i], th[i]
        assert a.status == b.status == "ok", (a.error, b.error)
        assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.answer_mask, b.answer_mask)
        np.testing.assert_allclose(a.hidden, b.hidden, atol=1e-4, rtol=1e-4)


if __name__ == "__main__":  # the vLLM subprocess of the fixture: <data> <model>=<out> ...
    from genrecal_cache.extract import extract

    for spec in sys.argv[2:]:
        model, out = spec.split("=", 1)
        extract(_cfg(model, sys.argv[1], out, "vllm"))
