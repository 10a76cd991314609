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
is never loaded a second time outside the engine. Before anything is cached it is checked against
vLLM's own logits: a short-lived generate engine returns the prompt log-probabilities of the first
batch, and the head on the pooling engine's states must reproduce them at every answer position
(`check_head`). The generate engine is shut down before the pooling engine starts, so the two
never hold GPU memory at once; the price is one more engine start per run.

Families whose attention vLLM cannot reproduce on this machine are refused (`vllm_refusal`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from genrecal_cache.config import VLLMOptions
from genrecal_cache.dtypes import torch_dtype
from genrecal_cache.families import Encoded, FamilyAdapter
from genrecal_cache.format.head import TeacherHead

__all__ = ["LOGPROB_ATOL", "LOGPROB_CHECK_K", "VLLMBackend", "cpu_kv_cache_bytes", "head_from_checkpoint",
           "read_tensors", "vllm_refusal"]

LOGPROB_CHECK_K = 8  # vLLM's top-k prompt log-probabilities compared with the exported head
# Largest |head - vLLM| log-probability (nats) at a checked position. float32 agrees to ~1e-6 (measured,
# tests/test_vllm_checks.py); a bf16 logit of 30 is rounded by up to 0.06 in each of the two
# computations (vLLM's and the head's). A missed scale or soft-cap, a wrong norm or tensor is off by more.
LOGPROB_ATOL = {"float32": 1e-3, "float16": 0.05, "bfloat16": 0.25}


def vllm_refusal(adapter: FamilyAdapter, on_gpu: bool) -> str | None:
    """Why the vLLM backend cannot extract `adapter`'s family exactly on this machine, or None."""
    if adapter.attention == "prefix":
        return ("its prefix (images and question) attends bidirectionally, and vLLM makes only the image "
                "tokens bidirectional (and appends a newline to every prompt), so the cached states would "
                "not be the model's")
    if adapter.attention == "image" and not on_gpu:
        return ("its image tokens attend to each other bidirectionally, which vLLM's CPU attention does not "
                "support (it attends causally: states differ by ~0.3 at image tokens, measured on a tiny "
                "Gemma 3); vLLM's GPU attention backends do support it")
    if adapter.vllm_needs_torchvision and not _torchvision_works():
        return ("vLLM's processor for this family imports torchvision, which is not installed here (the CPU "
                "set-up removes it: the vLLM CPU wheel's torchvision breaks the CPU torch)")
    return None


def _torchvision_works() -> bool:
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a torchvision built for another torch fails in many ways
        return False
    return True


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
                 tensor_parallel_size: int = VLLMOptions.tensor_parallel_size,
                 pipeline_parallel_size: int = VLLMOptions.pipeline_parallel_size,
                 data_parallel_size: int = VLLMOptions.data_parallel_size,
                 gpu_memory_utilization: float | None = VLLMOptions.gpu_memory_utilization,
                 max_num_batched_tokens: int | None = VLLMOptions.max_num_batched_tokens,
                 limit_mm_per_prompt: dict[str, int] | None = None,
                 trust_remote_code: bool = VLLMOptions.trust_remote_code,
                 enforce_eager: bool | None = None, **engine_kwargs: Any):
        from transformers import AutoConfig

        if data_parallel_size != 1:
            raise ValueError(
                f"data_parallel_size={data_parallel_size}: vLLM's offline LLM runs one data-parallel rank per "
                f"process, so run {data_parallel_size} extraction workers instead, each on its own GPUs "
                f"(CUDA_VISIBLE_DEVICES) and its own part of the data (--num-shards/--shard-index)")
        on_gpu = torch.cuda.is_available()
        if refusal := vllm_refusal(adapter, on_gpu):
            raise ValueError(f"{adapter.model_type}: the vLLM backend cannot extract this family exactly here: "
                             f"{refusal}. Use --backend transformers (docs/families.md)")
        self.device = torch.device("cuda" if on_gpu else "cpu")
        self.adapter, self.dtype = adapter, dtype
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        # the head first: a broken checkpoint fails in seconds, not after the engine start
        self.head = head_from_checkpoint(path, config, torch_dtype(dtype), adapter)  # to the device after the engines
        adapter.check_norm(config, self.head)  # the family's own norm module on the checkpoint's weights
        self._overrides = engine_kwargs.pop("hf_overrides", {})
        if not on_gpu and engine_kwargs.get("kv_cache_memory_bytes") is None \
                and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # the env var, when set, is vLLM's to apply
            engine_kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(config, max_len, torch_dtype(dtype))
        self._engine_args = dict(
            model=str(path), dtype=dtype, max_model_len=max_len, seed=engine_kwargs.pop("seed", 0),
            tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization or (0.9 if on_gpu else 0.1),
            max_num_batched_tokens=max_num_batched_tokens,
            # images only: no video profiling or warm-up (and no video processor needed)
            limit_mm_per_prompt={"video": 0, **(limit_mm_per_prompt or {})},
            trust_remote_code=trust_remote_code, **engine_kwargs)
        self._enforce_eager = (not on_gpu) if enforce_eager is None else enforce_eager
        self.llm: Any = None  # the pooling engine, started after the head check's engine has gone
        self._bos: str | None = None
        self.head_logprob_error: float | None = None  # what check_head measured

    def _engine(self) -> Any:
        """The pooling engine (started on first use)."""
        from vllm import LLM

        if self.llm is None:
            self.llm = LLM(runner="pooling", convert="embed", pooler_config={"task": "token_embed"},
                           enforce_eager=self._enforce_eager,
                           # pooling heads upcast to fp32 by default; the states are model-dtype already: keep them so
                           hf_overrides={"head_dtype": "model", **self._overrides}, **self._engine_args)
            # after the engine: its start profiles free GPU memory, and must find CUDA untouched to fork workers
            self.head.to(self.device)  # in place: callers holding `self.head` see it moved
            self._bos = getattr(self.llm.get_tokenizer(), "bos_token", None)
        return self.llm

    def check_head(self, batch: list[Encoded]) -> None:
        """The exported head against vLLM's own logits, once, before anything is cached.

        A generate engine (eager, started and shut down here) returns the top-k prompt log-probabilities
        of the batch's first sample (as the transformers backend checks one: the whole batch would run
        through the pooling engine twice and return its every prompt position's top-k); the head on the
        pooling engine's states must reproduce them (`LOGPROB_ATOL`) at every position that predicts an
        answer token. This checks what `check_norm` cannot: the logit scale and
        soft-cap the adapter declares against what vLLM's model computes, and the pooled states."""
        if self.head_logprob_error is not None:
            return
        batch = batch[:1]
        reference = self._prompt_logprobs(batch)
        hidden = self.hidden_states(batch)
        states, ids, lps = [], [], []
        for e, h, ref in zip(batch, hidden, reference, strict=True):
            pos = (e.answer_mask[1:].nonzero().flatten()).tolist()  # position t-1 predicts answer token t
            entries = [sorted(ref[t + 1].items(), key=lambda kv: kv[1].rank)[:LOGPROB_CHECK_K] for t in pos]
            states.append(h[pos])
            ids.append(torch.tensor([[tok for tok, _ in en] for en in entries], dtype=torch.long).view(len(pos), -1))
            lps.append(torch.tensor([[lp.logprob for _, lp in en] for en in entries]).view(len(pos), -1))
        self.head_logprob_error = self.adapter.check_head_logprobs(self.head, states, ids, lps,
                                                                   LOGPROB_ATOL[self.dtype])

    def _prompt_logprobs(self, batch: list[Encoded]) -> list[list[Any]]:
        """vLLM's top-k prompt log-probabilities of `batch` from a generate engine that lives only here."""
        from vllm import LLM, SamplingParams

        if self.llm is not None:
            raise RuntimeError("the head check must run before the pooling engine starts (GPU memory)")
        llm = LLM(runner="generate", max_logprobs=LOGPROB_CHECK_K, enforce_eager=True,  # one batch: no graphs
                  hf_overrides=self._overrides, **self._engine_args)
        try:
            bos = getattr(llm.get_tokenizer(), "bos_token", None)
            outs = llm.generate([self._request(e) for e in batch],
                                SamplingParams(max_tokens=1, prompt_logprobs=LOGPROB_CHECK_K, detokenize=False),
                                tokenization_kwargs={"add_special_tokens": self._add_special(batch, bos)},
                                use_tqdm=False)
        finally:
            _shutdown(llm)
        for i, (e, out) in enumerate(zip(batch, outs, strict=True)):
            self._check_ids(i, e, out.prompt_token_ids)
        return [out.prompt_logprobs for out in outs]

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

        llm = self._engine()
        return llm.encode(
            [self._request(e) for e in batch], pooling_task="token_embed",
            pooling_params=PoolingParams(use_activation=False),  # no L2 normalisation: raw states
            tokenization_kwargs={"add_special_tokens": self._add_special(batch, self._bos)}, use_tqdm=False,
        )

    @staticmethod
    def _add_special(batch: list[Encoded], bos: str | None) -> bool:
        """As the adapters tokenize: the template writes BOS itself when the family wants one."""
        return bos is not None and not all(e.prompt.startswith(bos) for e in batch)

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
            _shutdown(llm)


def _shutdown(llm: Any) -> None:
    """Stop an engine now (its GPU memory is freed with its engine-core process), not at garbage collection."""
    llm.llm_engine.engine_core.shutdown()
