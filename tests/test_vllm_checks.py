"""The vLLM backend's head check against vLLM's own log-probabilities, on CPU, for real.

The tiny LLaVA's text model is Llama, whose vLLM implementation multiplies the logits by the
config's `logit_scale`. With `logit_scale: 8` in the checkpoint's config:
* the stock LLaVA adapter declares no scale: a wrong head declaration; `extract` must stop with
  `HeadCheckError` before anything is cached;
* an adapter that declares the scale reproduces vLLM's log-probabilities to float32 precision.
(Gemma 3, the family with a soft-cap, is refused by the vLLM backend on CPU: vLLM's CPU attention
cannot make its image tokens bidirectional, see docs/families.md; the refusals are tested below.)

Both runs are in one subprocess (this file as a script), each starting vLLM's generate and pooling
engines in-process, as in test_vllm_backend.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:  # installed but broken must fail, not skip
    pytest.skip("vllm is not installed (CPU: scripts/setup.sh; GPU: pip install 'genrecal[vllm]')",
                allow_module_level=True)

SCALE = 8.0


def _scaled_llava(out: Path) -> Path:
    from genrecal_cache.testing import build_tiny_family

    path = build_tiny_family("llava", out, seed=5)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["logit_scale"] = SCALE  # read by vLLM's Llama, ignored by transformers' Llama
    (path / "config.json").write_text(json.dumps(config))
    return path


def _vllm_side(model: str, data: str, out: str, result: str) -> None:
    """Subprocess body: extract with the stock adapter (must fail), then check the head with the scale declared."""
    from genrecal_cache.backends.vllm import VLLMBackend
    from genrecal_cache.data import decode_image, read_samples
    from genrecal_cache.extract import ExtractConfig, extract
    from genrecal_cache.families import HeadCheckError, LlavaAdapter

    report: dict = {}
    try:
        extract(ExtractConfig(context="full", topk_rows="all", teacher=model, data=data, out=out, backend="vllm", topk=8, max_len=1024,
                              hidden_codec="fp32", dtype="float32", device="cpu", progress=False,
                              vllm={"distributed_executor_backend": "uni"}))
        report["stock"] = "no error"
    except HeadCheckError as e:
        report["stock"] = str(e)

    class ScaledLlava(LlavaAdapter):  # what an adapter for this checkpoint would declare
        def logit_scale(self, text_config) -> float:
            return float(text_config.logit_scale)

    adapter = ScaledLlava()
    processor = adapter.load_processor(model)
    batch = [adapter.encode(processor, s, [decode_image(b) for b in s.images], 1024) for s in read_samples(data)][:4]
    backend = VLLMBackend(adapter, model, dtype="float32", max_len=1024, distributed_executor_backend="uni")
    try:
        backend.check_head(batch)
    finally:
        backend.close()
    report["declared"] = backend.head_logprob_error
    report["declared_scale"] = backend.head.config.logit_scale
    Path(result).write_text(json.dumps(report))


@pytest.fixture(scope="module")
def head_check(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    from genrecal_cache.testing import write_mixed_size_dataset

    root = tmp_path_factory.mktemp("vllm_head_check")
    model, data = _scaled_llava(root / "llava-scaled"), write_mixed_size_dataset(root / "data", n=4, seed=0)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    out, result = root / "cache", root / "result.json"
    proc = subprocess.run([sys.executable, __file__, str(model), str(data), str(out), str(result)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"vLLM subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    report = json.loads(result.read_text())
    print(f"head check: stock adapter -> {report['stock'][:160]}...; scale declared -> max |diff| "
          f"{report['declared']:.3g} nats")
    return report, out


def test_undeclared_logit_scale_stops_extraction_before_anything_is_cached(head_check) -> None:
    from genrecal_cache import open_cache
    from genrecal_cache.format.manifest import CacheFormatError

    report, out = head_check
    assert "llava: the exported teacher head does not reproduce vLLM's own log-probabilities" in report["stock"]
    assert "Nothing was cached" in report["stock"] and "logit_scale" in report["stock"]
    assert not (out / "manifest.json").exists()  # written last: the head check stopped the run before it
    with pytest.raises(CacheFormatError, match="an extraction is running here or was interrupted"):
        open_cache(out)


def test_declared_logit_scale_reproduces_vllm_logprobs(head_check) -> None:
    report, _ = head_check
    assert report["declared_scale"] == SCALE
    assert report["declared"] < 1e-4, report  # float32: measured ~1e-6


def test_refusals_name_the_reason_and_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Families whose attention vLLM cannot reproduce here are refused before any engine starts."""
    from genrecal_cache.backends import vllm as vb
    from genrecal_cache.families import Gemma3Adapter, InternVLAdapter, PaliGemmaAdapter, Qwen2VLAdapter

    assert vb.vllm_refusal(Qwen2VLAdapter(), on_gpu=False) is None
    assert "bidirectional" in vb.vllm_refusal(PaliGemmaAdapter(), on_gpu=True)
    assert "CPU attention" in vb.vllm_refusal(Gemma3Adapter(), on_gpu=False)
    assert vb.vllm_refusal(Gemma3Adapter(), on_gpu=True) is None
    monkeypatch.setattr(vb, "_torchvision_works", lambda: False)  # as on this CPU set-up
    assert "torchvision" in vb.vllm_refusal(InternVLAdapter(), on_gpu=True)
    with pytest.raises(ValueError, match=r"internvl: the vLLM backend cannot extract .*torchvision.*--backend transformers"):
        vb.VLLMBackend(InternVLAdapter(), "unused")


if __name__ == "__main__":  # the vLLM subprocess of the `head_check` fixture
    _vllm_side(*sys.argv[1:5])


def test_extract_refuses_gemma3_on_cpu_before_writing_and_auto_picks_transformers(tmp_path: Path) -> None:
    from genrecal_cache.extract import ExtractConfig, extract
    from genrecal_cache import open_cache
    from genrecal_cache.testing import build_tiny_family, write_mixed_size_dataset

    model, data = build_tiny_family("gemma3", tmp_path / "gemma3", seed=3), write_mixed_size_dataset(tmp_path / "d", n=2)

    def cfg(backend: str, out: str) -> ExtractConfig:
        return ExtractConfig(context="full", topk_rows="all", teacher=str(model), data=str(data), out=str(tmp_path / out), backend=backend, topk=4,
                             hidden_codec="fp32", device="cpu", progress=False)

    with pytest.raises(ValueError, match=r"gemma3: the vLLM backend cannot extract .*CPU attention.*--backend transformers"):
        extract(cfg("vllm", "refused"))
    assert [p.name for p in (tmp_path / "refused").iterdir()] == ["_lock"]  # refused before the writer existed
    manifest = extract(cfg("auto", "auto"))  # vLLM is installed here, but not exact for Gemma 3 on CPU
    assert manifest.teacher["backend"] == "transformers" and manifest.counts["ok"] == 2
    assert open_cache(tmp_path / "auto").manifest.teacher["model_type"] == "gemma3"
