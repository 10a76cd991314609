"""The cache tools' configurations: what each `genrecal-cache` command takes, its flags generated from these
fields (`option`: default and help in one place; cli/options.py). This module is light (no torch, no
transformers): the CLI builds every command's flags from it without loading what the commands run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .format.codecs import DEFAULT_HIDDEN_CODEC, HiddenCodec, resolve_hidden_codec
from .format.roles import (
    CONTEXT_HELP, CONTEXT_POLICIES, NEW_CONTEXT, NEW_TOPK, NEW_TOPK_ROWS, RANK_HELP, TOPK_ROWS, TOPK_ROWS_HELP,
)
from .options import REQUIRED, option

BACKENDS = ("auto", "transformers", "vllm")  # extract.py's teacher runners

__all__ = ["AuditConfig", "BASIS_FIT_ROWS", "COMMIT_SECONDS", "CachePlanConfig", "DEFAULT_MAX_LEN", "DemoDataConfig",
           "ExtractConfig", "InfoConfig", "PushConfig", "TinyModelsConfig", "VLLMOptions"]

DEFAULT_MAX_LEN = 4096  # the default --max-len, lowered to the teacher's context when that is shorter
COMMIT_SECONDS = 60.0  # a writer commits finished samples at most this often unless told (extract --commit-seconds)
BASIS_FIT_ROWS = 4096  # context rows the low-rank basis is fitted on (d=8192: 128 MiB of float32 held back)


@dataclass
class ExtractConfig:
    """One extraction run (`genrecal-cache extract`: its flags are the fields with a help text)."""
    teacher: str = option(REQUIRED, "Teacher model folder or hub id (e.g. Qwen/Qwen2-VL-72B-Instruct).")
    data: str = option(REQUIRED, "LLaVA-style JSONL or Parquet with embedded images.")
    out: str = option(REQUIRED, "Cache folder to create.")
    backend: str = option("auto", "'auto': vllm where installed and exact for the teacher's family here, else "
                                  "transformers; 'vllm'; 'transformers' (reference).")
    topk: int = option(NEW_TOPK, "Top-k teacher logprobs stored per token.")
    max_len: int | None = option(None, "Samples longer than this (teacher tokens) are recorded as errors [default: "
                                       f"{DEFAULT_MAX_LEN}, or the teacher's context if shorter].")
    batch_tokens: int = option(8192, "Padded tokens per teacher forward (transformers backend).")
    limit: int | None = option(None, "Only the first N samples.")
    hidden_codec: str | None = option(None, "Storage of hidden states: bf16 (lossless, default), fp8 (e4m3 + "
                                            "per-token scale, ~0.44x of bf16), ecq (int8 steps of 0.14 x token RMS, "
                                            "entropy-coded, ~0.3x) or fp32. See docs/cache-format.md.")
    hidden_dtype: str | None = option(None, "Old name of --hidden-codec (bfloat16, float32).", hidden=True)
    # role-aware storage (format/roles.py)
    context: str = option(NEW_CONTEXT, CONTEXT_HELP)
    context_rank: int | None = option(None, RANK_HELP)
    context_fit_rows: int = BASIS_FIT_ROWS  # lowrank: the basis is fitted on the run's first this-many context rows
    topk_rows: str = option(NEW_TOPK_ROWS, TOPK_ROWS_HELP)
    dtype: str = option("auto", "Compute dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ... (transformers backend).")
    image_root: str | None = option(None, "Folder image paths are relative to (default: the data file's folder).")
    progress: bool = True
    # sharded extraction: this job takes the input samples with index % num_shards == shard_index and
    # writes the complete cache `out/part-<shard_index>-of-<num_shards>` (docs/cache-format.md, "Parts")
    num_shards: int = option(1, "Split the input among N independent jobs: this job takes the samples with index % "
                                "N == --shard-index and writes OUT/part-<i>-of-<N>/ [default: from a SLURM job array "
                                "(SLURM_ARRAY_TASK_COUNT) or torchrun-style WORLD_SIZE, else 1].")
    shard_index: int = option(0, "This job's share of the input (0 .. N-1); see --num-shards [default: "
                                 "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, or RANK, else 0].")
    shard_tokens: int | None = option(None, "Tokens per feature shard file [default: from the hidden size, ~128 MiB "
                                            "files].")
    commit_seconds: float | None = option(None, "Commit finished samples at most this often [default: "
                                                f"{COMMIT_SECONDS:g}]; a crash loses at most this much work.")
    vllm: dict = field(default_factory=dict)  # engine options for the vLLM backend (VLLMOptions.engine_options)
    codec: HiddenCodec = field(init=False, repr=False, compare=False)  # `hidden_codec` resolved, passed down whole

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        self.codec = resolve_hidden_codec(self.hidden_codec, self.hidden_dtype)  # the old name too; resolved once
        self.hidden_codec = self.codec.name
        if self.context not in CONTEXT_POLICIES:
            raise ValueError(f"context {self.context!r}: use one of {', '.join(CONTEXT_POLICIES)}")
        if self.topk_rows not in TOPK_ROWS:
            raise ValueError(f"topk_rows {self.topk_rows!r}: use one of {', '.join(TOPK_ROWS)}")
        if self.context_rank is not None and self.context_rank < 1 or self.context_fit_rows < 1:
            raise ValueError(f"context rank ({self.context_rank}) and fit rows ({self.context_fit_rows}) must be >= 1")

@dataclass
class VLLMOptions:
    """The engine options `genrecal-cache extract` takes for the vLLM backend (its `--tensor-parallel-size` ...
    flags); `engine_options()` gives them as `ExtractConfig.vllm` (the keywords of `VLLMBackend`)."""
    tensor_parallel_size: int = option(1, "[vllm] GPUs per model replica (tensor parallel).")
    pipeline_parallel_size: int = option(1, "[vllm] Pipeline stages per replica.")
    data_parallel_size: int = option(1, "[vllm] Must be 1 here: run one extraction per replica instead.")
    max_model_len: int | None = option(None, "[vllm] Engine context length [default: --max-len].")
    gpu_memory_utilization: float | None = option(None, "[vllm] Fraction of GPU memory [0.9 GPU, 0.1 CPU].")
    max_num_batched_tokens: int | None = option(None, "[vllm] Tokens per engine step.")
    kv_cache_gib: float | None = option(None, "[vllm] KV-cache size in GiB [GPU: from --gpu-memory-utilization; "
                                              "CPU: 4 sequences of the engine context, or VLLM_CPU_KVCACHE_SPACE].")
    limit_mm_per_prompt: int | None = option(None, "[vllm] Max images per prompt.")
    trust_remote_code: bool = option(False, "[vllm] Allow the model folder's own code to run.",
                                    flag="--trust-remote-code/--no-trust-remote-code")

    def engine_options(self) -> dict[str, Any]:
        """These options as `VLLMBackend` keywords (`max_model_len` only when set: it defaults to --max-len)."""
        return dict(tensor_parallel_size=self.tensor_parallel_size, pipeline_parallel_size=self.pipeline_parallel_size,
                    data_parallel_size=self.data_parallel_size, gpu_memory_utilization=self.gpu_memory_utilization,
                    max_num_batched_tokens=self.max_num_batched_tokens,
                    kv_cache_memory_bytes=None if self.kv_cache_gib is None else int(self.kv_cache_gib * 2**30),
                    limit_mm_per_prompt=None if self.limit_mm_per_prompt is None
                    else {"image": self.limit_mm_per_prompt},
                    trust_remote_code=self.trust_remote_code,
                    **({"max_model_len": self.max_model_len} if self.max_model_len else {}))

@dataclass
class CachePlanConfig:
    """What `genrecal-cache plan` estimates (its flags are these fields; `estimate_cache_size` takes them)."""
    tokens: int = option(REQUIRED, "Teacher tokens the cache will hold (all samples together).")
    hidden_size: int = option(REQUIRED, "Teacher hidden size d (Qwen2-VL-72B: 8192).")
    vocab: int = option(REQUIRED, "Teacher vocabulary size V (rows of lm_head; Qwen2-VL: 152064).")
    codec: str = option(DEFAULT_HIDDEN_CODEC, "Hidden codec: bf16, fp8, ecq or fp32.")
    topk: int = option(NEW_TOPK, "Top-k logprobs per token.")
    samples: int | None = option(None, "Number of samples [default: tokens / 512].")
    image_bytes: int = option(0, "Average embedded image bytes per sample (samples.parquet).")
    text_bytes: int = option(600, "Average conversation text bytes per sample.")
    head_dtype: str = option("bfloat16", "dtype of the teacher's lm_head as exported (bfloat16 on GPU).")
    context: str = option(NEW_CONTEXT, CONTEXT_HELP)
    context_rank: int | None = option(None, RANK_HELP)
    topk_rows: str = option(NEW_TOPK_ROWS, TOPK_ROWS_HELP)
    answer_fraction: float = option(0.15, "Share of the tokens that are answer tokens (the rows predicting them are "
                                          "stored exactly).")
    image_fraction: float = option(0.7, "Share of the tokens that are image tokens (Qwen2-VL: 300-1500 per image).")
    sample: str | None = option(None, "A pilot cache of the same teacher and data (e.g. `extract --limit 500 "
                                      "--context full --topk-rows all`): its real rows replace the synthetic ones "
                                      "where it has them.")
    image_token_id: list[int] | None = option(None, "With --sample: the teacher's image-token id(s) [default: the "
                                                    "pilot's, if it names them].", repeat=True)

@dataclass
class AuditConfig:
    """What `audit` recomputes and how close it must come (`genrecal-cache audit` flags)."""
    teacher: str = option(REQUIRED, "The teacher the cache says it comes from (folder or hub id).")
    samples: int = option(8, "Random ok samples to recompute.")
    seed: int = option(0, "Which samples.")
    device: str = option("cpu", "cpu, cuda, cuda:1 ...")
    dtype: str = option("float32", "Recompute dtype: float32, bfloat16 (match the extraction's to keep the "
                                   "recomputation noise small).")
    tolerance: float = option(0.05, "Recomputation noise allowed on top of the codec's bound, as a fraction of each "
                                    "token's RMS.")
    min_top1: float | None = option(None, "Least top-1 agreement [0.99 lossless codecs, 0.95 fp8/ecq].")

@dataclass
class PushConfig:
    """How `push` publishes a cache (`genrecal-cache push` flags)."""
    replace: bool = option(False, "Take down a different cache already at URL (its manifests first, then its files) "
                                  "and publish this one instead.", flag=("--replace", "--force"))
    workers: int = option(8, "Files uploaded in parallel.")
    read_back: bool = option(True, "Check each uploaded file by the sha256 of its bytes read back (--no-read-back: by "
                                   "size only, where reading back costs egress).", flag="--read-back/--no-read-back")

@dataclass
class InfoConfig:
    """How `genrecal-cache info` reads and summarizes a cache."""
    local_cache: str | None = option(None, "Folder keeping verified copies of the remote files read.")
    errors: int = option(10, "How many error rows to list.")

@dataclass
class DemoDataConfig:
    """The synthetic set `genrecal-cache demo-data` writes."""
    out: str = option(REQUIRED, "Folder for images/ and train.jsonl.")
    n: int = option(200, "Number of samples.")
    seed: int = option(0, "Seed of the images and questions.")

@dataclass
class TinyModelsConfig:
    """The tiny pair `genrecal-cache tiny-models` builds (`tiny_pair`)."""
    out: str = option(REQUIRED, "Folder to hold teacher/ and student/.")
    seed: int = option(0, "Seed of the weights.")
