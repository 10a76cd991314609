"""The vLLM backend on CPU, for real: parity with the transformers reference, and an independent
check of the exported head against the prompt logprobs of vLLM's own generate runner.

The vLLM side runs in one subprocess (this file, run as a script): the pooling engine inside
`extract(backend="vllm")`, then one generate engine; both in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
`distributed_executor_backend="uni"`): no engine-core and worker processes to spawn, each of which
imports vLLM again (~20 s instead of ~80 s per engine, cold, on a 2-core machine). The subprocess
keeps vLLM's CPU thread pinning and NUMA binding out of the pytest process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("vllm") is None:  # installed but broken must fail, not skip
    pytest.skip("vllm is not installed (CPU: scripts/setup.sh; GPU: pip install 'genrecal[vllm]')",
                allow_module_level=True)

K = 16  # top-k stored and checked
MAX_LEN = 1024
BATCH_TOKENS = 512  # several extract batches, i.e. several encode calls on one engine
ENGINE = {"distributed_executor_backend": "uni"}  # CPU test speed; GPUs use vLLM's defaults
TIE = 1e-5  # positions whose k-th and (k+1)-th logprobs are closer than this have no defined top-k


def _cfg(teacher: str, data: str, out: str, backend: str):
    from genrecal_cache.extract import ExtractConfig

    return ExtractConfig(context="full", topk_rows="all", teacher=teacher, data=data, out=out, backend=backend, topk=K, max_len=MAX_LEN,
                         batch_tokens=BATCH_TOKENS, hidden_codec="float32", dtype="float32", device="cpu",
                         progress=False, vllm=dict(ENGINE) if backend == "vllm" else {})


def _vllm_side(teacher: str, data: str, out: str, logprobs_json: str) -> None:
    """Subprocess body: extract with the vLLM backend, then prompt logprobs from a generate engine."""
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    from genrecal_cache.backends.vllm import cpu_kv_cache_bytes
    from genrecal_cache.data import decode_image, read_samples
    from genrecal_cache.extract import extract
    from genrecal_cache.families import adapter_for

    t0 = time.perf_counter()
    extract(_cfg(teacher, data, out, "vllm"))
    t1 = time.perf_counter()
    adapter = adapter_for(teacher)
    processor = adapter.load_processor(teacher)
    ids, requests = [], []
    for s in read_samples(data):
        images = [decode_image(b) for b in s.images]
        e = adapter.encode(processor, s, images, MAX_LEN)
        ids.append(s.id)
        requests.append({"prompt": e.prompt, **({"multi_modal_data": {"image": images}} if images else {})})
    # an explicit KV-cache size: vLLM's CPU default (node memory x 0.1 - RSS) fails on small NUMA nodes
    kv_bytes = cpu_kv_cache_bytes(AutoConfig.from_pretrained(teacher), MAX_LEN, torch.float32)
    llm = LLM(model=teacher, runner="generate", dtype="float32", max_model_len=MAX_LEN, max_logprobs=K,
              kv_cache_memory_bytes=kv_bytes, enforce_eager=True, limit_mm_per_prompt={"video": 0}, seed=0, **ENGINE)
    outs = llm.generate(requests, SamplingParams(prompt_logprobs=K, max_tokens=1, temperature=0.0), use_tqdm=False)
    result = {sid: {"prompt_token_ids": list(o.prompt_token_ids),
                    "prompt_logprobs": [None if d is None else [[t, lp.logprob, lp.rank] for t, lp in d.items()]
                                        for d in o.prompt_logprobs]}
              for sid, o in zip(ids, outs, strict=True)}
    Path(logprobs_json).write_text(json.dumps(result))
    print(f"TIMING extract_vllm_s={t1 - t0:.1f} generate_engine_and_run_s={time.perf_counter() - t1:.1f}", flush=True)


@pytest.fixture(scope="module")
def caches(teacher_dir: Path, demo_jsonl: Path, tmp_path_factory: pytest.TempPathFactory):
    """(vLLM cache, transformers cache, generate-runner prompt logprobs) for the same teacher and data."""
    from genrecal_cache.extract import extract
    from genrecal_cache import open_cache

    root = tmp_path_factory.mktemp("vllm_parity")
    out_vllm, out_hf, lp_json = root / "vllm", root / "hf", root / "prompt_logprobs.json"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, str(teacher_dir), str(demo_jsonl), str(out_vllm), str(lp_json)],
                          env=env, capture_output=True, text=True, timeout=400)
    if proc.returncode != 0:
        pytest.fail(f"vLLM subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    print(next((line for line in proc.stdout.splitlines() if line.startswith("TIMING")), ""))
    extract(_cfg(str(teacher_dir), str(demo_jsonl), str(out_hf), "transformers"))
    tv, th = open_cache(out_vllm), open_cache(out_hf)
    yield tv, th, json.loads(lp_json.read_text())
    tv.close()
    th.close()


def _pairs(caches):
    tv, th, _ = caches
    assert len(tv) == len(th) > 0
    for i in range(len(th)):
        ref = th[i]
        got = tv.by_id(ref.id)
        assert (got.status, ref.status) == ("ok", "ok"), (ref.id, got.error, ref.error)
        yield got, ref


def _tied(head, hidden: np.ndarray) -> np.ndarray:
    """[L] bool: the k-th and (k+1)-th reference logprobs are within TIE (top-k ids undefined there)."""
    logp = torch.log_softmax(head.logits(torch.from_numpy(hidden)).float(), dim=-1)
    top = torch.topk(logp, K + 1, dim=-1).values
    return ((top[:, K - 1] - top[:, K]) < TIE).numpy()


def test_same_samples_token_ids_and_answer_masks(caches):
    tv, th, _ = caches
    assert tv.manifest.counts == th.manifest.counts
    for got, ref in _pairs(caches):
        np.testing.assert_array_equal(got.token_ids, ref.token_ids, err_msg=ref.id)
        np.testing.assert_array_equal(got.answer_mask, ref.answer_mask, err_msg=ref.id)
        assert ref.answer_mask.any()


def test_both_backends_store_the_teacher_tokenizer(caches):
    tv, th, _ = caches
    files = tv.tokenizer_files()
    assert "tokenizer.json" in files and files == th.tokenizer_files()
    assert tv.teacher_tokenizer().backend_tokenizer.to_str() == th.teacher_tokenizer().backend_tokenizer.to_str()


def test_hidden_states_match_reference(caches):
    worst = max(float(np.abs(got.hidden - ref.hidden).max()) for got, ref in _pairs(caches))
    assert worst < 1e-4, f"max |h_vllm - h_transformers| = {worst:.3g}"


def test_head_read_from_safetensors_equals_exported_head(caches):
    hv, hh = caches[0].head(), caches[1].head()
    assert hv.config == hh.config
    assert torch.equal(hv.norm_weight, hh.norm_weight) and torch.equal(hv.lm_head_weight, hh.lm_head_weight)


def test_topk_match_on_non_tied_positions(caches):
    head = caches[1].head()
    checked = 0
    for got, ref in _pairs(caches):
        ok = ~_tied(head, ref.hidden)
        np.testing.assert_array_equal(got.topk_ids[ok], ref.topk_ids[ok], err_msg=ref.id)
        np.testing.assert_allclose(got.topk_logprobs, ref.topk_logprobs, atol=1e-4, rtol=0, err_msg=ref.id)
        checked += int(ok.sum())
    assert checked > 1000


def test_generate_runner_prompt_logprobs_agree_with_cache(caches):
    """vLLM's own lm_head + log_softmax (generate runner) vs our head on the cached states."""
    tv, th, prompt_lps = caches
    head = th.head()
    checked = 0
    for got, ref in _pairs(caches):
        res = prompt_lps[ref.id]
        assert res["prompt_token_ids"] == got.token_ids.tolist(), ref.id
        tied = _tied(head, ref.hidden)
        for t, entries in enumerate(res["prompt_logprobs"]):
            if entries is None:  # position 0 has no prediction
                assert t == 0
                continue
            top = {tok: lp for tok, lp, rank in entries if rank <= K}  # the k best (plus the prompt token)
            want = dict(zip(got.topk_ids[t - 1].tolist(), got.topk_logprobs[t - 1].tolist()))  # t-1 predicts t
            if not tied[t - 1]:
                assert set(top) == set(want), (ref.id, t)
            for tok in set(top) & set(want):
                assert abs(top[tok] - want[tok]) < 1e-3, (ref.id, t, tok, top[tok], want[tok])
            checked += 1
    assert checked > 500


def test_audit_passes_on_the_vllm_cache(caches, teacher_dir):
    """The vLLM cache, recomputed with the transformers backend (the reference) by `audit`, is faithful."""
    from genrecal_cache.audit import audit

    report = audit(caches[0].url, str(teacher_dir), samples=4)
    assert report.passed, report.format()


def test_token_mismatch_is_a_clear_error():
    """The id check names the batch position and the first differing index; it never shifts."""
    from genrecal_cache.backends.vllm import VLLMBackend
    from genrecal_cache.families import Encoded

    e = Encoded(input_ids=torch.tensor([1, 2, 3, 4, 5, 6]), answer_mask=torch.zeros(6, dtype=torch.bool),
                model_inputs={}, prompt="x")
    VLLMBackend._check_ids(0, e, [1, 2, 3, 4, 5, 6])
    with pytest.raises(RuntimeError, match=r"batch position 3.*6 vs 6 tokens, first difference at index 4"):
        VLLMBackend._check_ids(3, e, [1, 2, 3, 4, 9, 6])
    with pytest.raises(RuntimeError, match=r"7 vs 6 tokens, first difference at index 6"):
        VLLMBackend._check_ids(0, e, [1, 2, 3, 4, 5, 6, 7])


def test_head_from_checkpoint_matches_exported_head(teacher, student, tmp_path: Path):
    """Read tensor by tensor (sharded via the index json, as for a 72B teacher), in the layouts the
    families save: Qwen2-VL (`model.norm`), LLaVA (`language_model.model.norm`), tied embeddings."""
    from transformers import Qwen2VLForConditionalGeneration

    from genrecal_cache.backends.vllm import head_from_checkpoint

    sharded = tmp_path / "sharded"
    teacher.model.save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    config = teacher.model.config.to_dict()
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    tied_model = Qwen2VLForConditionalGeneration(type(teacher.model.config).from_dict(config)).eval()
    tied_model.save_pretrained(tmp_path / "tied")
    for path, loaded in [(sharded, teacher), (student.path, student), (tmp_path / "tied", teacher._replace(model=tied_model))]:
        head = head_from_checkpoint(path, loaded.model.config, torch.float32, loaded.adapter)
        ref = loaded.adapter.export_head(loaded.model)
        assert head.config == ref.config, path
        assert torch.equal(head.norm_weight, ref.norm_weight) and torch.equal(head.lm_head_weight, ref.lm_head_weight)


if __name__ == "__main__":  # the vLLM subprocess of the `caches` fixture
    _vllm_side(*sys.argv[1:5])
