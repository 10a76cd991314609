"""vLLM extraction backend: one engine per run, the pooling runner's `token_embed` task.

`LLM(runner="pooling", convert="embed", pooler_config={"task": "token_embed"})` returns, for every
prompt position (image tokens included), the teacher's last hidden state *after* its final norm,
i.e. exactly what `lm_head` reads. The answer is part of the prompt (teacher forcing), so one
prefill per sample gives everything the cache stores; top-k is then taken by the extraction loop
from these states and the exported head.

vLLM gets the rendered chat text (`Encoded.prompt`, one unexpanded placeholder per image) plus the
decoded images and expands the placeholders itself. The token ids it ends up with must equal the
ids the cache records (`Encoded.input_ids`); any difference is an error, never a silent shift.

The head is read from the checkpoint's safetensors (final norm + lm_head only), so a 72B teacher
is never loaded a second time outside the engine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from genrecal_cache.backends import DTYPES
from genrecal_cache.families import Encoded, FamilyAdapter
from genrecal_cache.format.head import TeacherHead

__all__ = ["VLLMBackend", "cpu_kv_cache_bytes", "head_from_checkpoint", "read_tensors"]


def read_tensors(path: str | Path, names: Mapping[str, Sequence[str]]) -> dict[str, torch.Tensor]:
    """Read a few tensors from a safetensors checkpoint (folder or hub id) without loading the rest.

    `names` maps a key to candidate tensor names (the first present wins); the shard holding each
    one comes from `model.safetensors.index.json` (or the single `model.safetensors`).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():  # a hub id: the files vLLM loads anyway, into the same HF cache
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"]))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    elif (path / "model.safetensors").is_file():
        with safe_open(path / "model.safetensors", framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors(.index.json); the vLLM backend reads the teacher "
                                f"head from a safetensors checkpoint")
    out: dict[str, torch.Tensor] = {}
    for key, candidates in names.items():
        name = next((n for n in candidates if n in weight_map), None)
        if name is None:
            raise KeyError(f"{path}: none of {list(candidates)} is in the checkpoint (needed for {key})")
        with safe_open(path / weight_map[name], framework="pt") as f:
            out[key] = f.get_tensor(name)
    return out


def head_from_checkpoint(path: str | Path, config: Any, dtype: torch.dtype, adapter: FamilyAdapter) -> TeacherHead:
    """The teacher head of a HF checkpoint, read tensor by tensor; what it computes (norm formula,
    logit scale, soft-cap) and where its tensors are come from the family adapter."""
    names = adapter.head_tensor_names
    wanted = {"norm.weight": names["norm.weight"],
              "lm_head.weight": names["embed_tokens.weight" if adapter.tied_head(config) else "lm_head.weight"]}
    if names.get("norm.bias"):
        wanted["norm.bias"] = names["norm.bias"]
    t = read_tensors(path, wanted)
    bias = t.get("norm.bias")
    return TeacherHead(adapter.head_config(config), t["norm.weight"].to(dtype), t["lm_head.weight"].to(dtype),
                       None if bias is None else bias.to(dtype))


def cpu_kv_cache_bytes(config: Any, max_len: int, dtype: torch.dtype, sequences: int = 4) -> int:
    """KV-cache bytes for `sequences` sequences of `max_len` tokens of this model, for vLLM on CPU.

    vLLM's CPU worker otherwise sizes the cache as a fraction of the NUMA node's memory minus the
    process' RSS, which is negative on a small node (7 GiB x 0.1 < the RSS of torch + vLLM) and
    depends on what else runs. Extraction only prefills, so a few full-length sequences is room enough.
    """
    text = config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype.itemsize  # K and V of every layer
    return per_token * sequences * max_len + (64 << 20)  # + slack for block rounding


class VLLMBackend:
    """Post-norm final hidden states of every prompt token from a vLLM pooling engine."""

    name = "vllm"
    needs_images = True  # vLLM runs the image processor itself: the extraction loop decodes them per batch

    def __init__(self, adapter: FamilyAdapter, path: str, *, dtype: str = "bfloat16", max_len: int = 4096,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, data_parallel_size: int = 1,
                 gpu_memory_utilization: float | None = None, max_num_batched_tokens: int | None = None,
                 limit_mm_per_prompt: dict[str, int] | None = None, trust_remote_code: bool = False,
                 enforce_eager: bool | None = None, **engine_kwargs: Any):
        from transformers import AutoConfig
        from vllm import LLM

        if data_parallel_size != 1:
            raise ValueError(
                f"data_parallel_size={data_parallel_size}: vLLM's offline LLM runs one data-parallel rank per "
                f"process, so run {data_parallel_size} extraction workers instead, each on its own GPUs "
                f"(CUDA_VISIBLE_DEVICES) and its own part of the data (--num-shards/--shard-index)")
        on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        # the head first: a broken checkpoint fails in seconds, not after the engine start
        head = head_from_checkpoint(path, config, DTYPES[dtype], adapter)
        adapter.check_norm(config, head)  # the family's own norm module on the checkpoint's weights
        overrides = {"head_dtype": "model", **engine_kwargs.pop("hf_overrides", {})}
        if not on_gpu and engine_kwargs.get("kv_cache_memory_bytes") is None \
                and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # the env var, when set, is vLLM's to apply
            engine_kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(config, max_len, DTYPES[dtype])
        self.llm = LLM(
            model=str(path), runner="pooling", convert="embed", pooler_config={"task": "token_embed"},
            dtype=dtype, max_model_len=max_len, seed=engine_kwargs.pop("seed", 0),
            tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization or (0.9 if on_gpu else 0.1),
            max_num_batched_tokens=max_num_batched_tokens,
            # images only: no video profiling or warm-up (and no video processor needed)
            limit_mm_per_prompt={"video": 0, **(limit_mm_per_prompt or {})},
            trust_remote_code=trust_remote_code,
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
            # pooling heads upcast to fp32 by default; the states are model-dtype already: keep them so
            hf_overrides=overrides, **engine_kwargs,
        )
        # after the engine: its start profiles free GPU memory, and must find CUDA untouched to fork workers
        self.head = head.to(self.device)
        tokenizer = self.llm.get_tokenizer()
        self._bos = getattr(tokenizer, "bos_token", None)

    def check_head(self, batch: list[Encoded]) -> None:
        """Nothing more to check per batch: the norm was checked against the family's own module at start;
        the logit scale and soft-cap are the adapter's, checked against a transformers forward in the tests."""

    @staticmethod
    def _request(e: Encoded) -> dict[str, Any]:
        """Text with one placeholder per image + the decoded images: vLLM expands the placeholders."""
        request: dict[str, Any] = {"prompt": e.prompt}
        if e.images:
            request["multi_modal_data"] = {"image": list(e.images)}
        return request

    def encode(self, batch: list[Encoded]) -> list[Any]:
        """One `llm.encode` call for the whole batch (vLLM keeps its scheduler full from it)."""
        from vllm import PoolingParams

        # as the adapters tokenize: the template writes BOS itself when the family wants one
        add_special = self._bos is not None and not all(e.prompt.startswith(self._bos) for e in batch)
        return self.llm.encode(
            [self._request(e) for e in batch], pooling_task="token_embed",
            pooling_params=PoolingParams(use_activation=False),  # no L2 normalisation: raw states
            tokenization_kwargs={"add_special_tokens": add_special}, use_tqdm=False,
        )

    def hidden_states(self, batch: list[Encoded]) -> list[torch.Tensor]:
        """[L_i, d] post-norm states per sample, checked against the recorded token ids."""
        if not batch:
            return []
        outputs = self.encode(batch)
        hidden = []
        for i, (e, out) in enumerate(zip(batch, outputs, strict=True)):
            if out.error is not None:
                raise RuntimeError(f"vLLM failed on batch position {i}: {out.error}")
            self._check_ids(i, e, out.prompt_token_ids)
            h = out.outputs.data
            if h.shape != (len(e.input_ids), self.head.hidden_size):
                raise RuntimeError(f"vLLM returned hidden states of shape {tuple(h.shape)} for batch position "
                                   f"{i}; expected ({len(e.input_ids)}, {self.head.hidden_size})")
            hidden.append(h.to(self.device))
        return hidden

    @staticmethod
    def _check_ids(i: int, e: Encoded, used: Sequence[int]) -> None:
        expected = e.input_ids.tolist()
        if list(used) == expected:
            return
        first = next((j for j, (a, b) in enumerate(zip(used, expected)) if a != b), min(len(used), len(expected)))
        n_img = len(e.images)
        raise RuntimeError(
            f"vLLM tokenized batch position {i} differently from the cache's teacher tokenization: "
            f"{len(used)} vs {len(expected)} tokens, first difference at index {first} "
            f"(vLLM {list(used[first:first + 8])} vs cache {expected[first:first + 8]}; {n_img} image(s)). "
            f"The hidden states would not belong to the recorded token ids, so the run stops. Usual causes: "
            f"the prompt is re-tokenized differently, or vLLM's image processor gives another image-token count.")

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
