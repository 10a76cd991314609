"""`genrecal-cache`: build, inspect and check teacher-feature caches."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Optional

import typer

from cli.errors import clean_errors, debugging, fail  # the one home of the CLIs' one-line errors (clean_errors
# is also imported from here)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run a teacher VLM once and store what GenRecal distillation needs in a shareable cache.")


CONTEXT_HELP = ("How context rows (image tokens, question: read only by the regularization pass) are stored: lowrank "
                "(coefficients on a basis fitted on the run's first states, fp8: ~r+4 bytes/row), full (as answer "
                "rows), text (image-token rows dropped, text rows in full) or none. See docs/cache-format.md.")
RANK_HELP = "Rank of the low-rank context basis [default: hidden size / 8, at most 64]."
TOPK_ROWS_HELP = "Rows whose top-k logprobs are stored: answer (the trainer's targets) or all."


def _check_storage(context: str, rank: int | None, topk_rows: str) -> None:
    from genrecal_cache.format.roles import CONTEXT_POLICIES, TOPK_ROWS

    if context not in CONTEXT_POLICIES:
        raise typer.BadParameter(f"{context!r} is not one of {', '.join(CONTEXT_POLICIES)}", param_hint="--context")
    if rank is not None and (rank < 1 or context != "lowrank"):
        raise typer.BadParameter("must be >= 1, with --context lowrank", param_hint="--context-rank")
    if topk_rows not in TOPK_ROWS:
        raise typer.BadParameter(f"{topk_rows!r} is not one of {', '.join(TOPK_ROWS)}", param_hint="--topk-rows")


@app.command()
def extract(
    teacher: str = typer.Option(..., help="Teacher model folder or hub id (e.g. Qwen/Qwen2-VL-72B-Instruct)."),
    data: str = typer.Option(..., help="LLaVA-style JSONL or Parquet with embedded images."),
    out: Path = typer.Option(..., help="Cache folder to create."),
    backend: str = typer.Option("auto", help="'auto': vllm where installed and exact for the teacher's family "
                                            "here, else transformers; 'vllm'; 'transformers' (reference)."),
    topk: int = typer.Option(64, help="Top-k teacher logprobs stored per token."),
    max_len: Optional[int] = typer.Option(None, help="Samples longer than this (teacher tokens) are recorded as "
                                                     "errors [default: 4096, or the teacher's context if shorter]."),
    batch_tokens: int = typer.Option(8192, help="Padded tokens per teacher forward (transformers backend)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N samples."),
    hidden_codec: Optional[str] = typer.Option(
        None, help="Storage of hidden states: bf16 (lossless, default), fp8 (e4m3 + per-token scale, ~0.44x of bf16), "
                   "ecq (int8 steps of 0.14 x token RMS, entropy-coded, ~0.3x) or fp32. See docs/cache-format.md."),
    hidden_dtype: Optional[str] = typer.Option(None, hidden=True, help="Old name of --hidden-codec (bfloat16, float32)."),
    context: str = typer.Option("lowrank", help=CONTEXT_HELP),
    context_rank: Optional[int] = typer.Option(None, help=RANK_HELP),
    topk_rows: str = typer.Option("answer", help=TOPK_ROWS_HELP),
    dtype: str = typer.Option("auto", help="Compute dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ... (transformers backend)."),
    image_root: Optional[str] = typer.Option(None, help="Folder image paths are relative to (default: the data file's folder)."),
    tensor_parallel_size: int = typer.Option(1, help="[vllm] GPUs per model replica (tensor parallel)."),
    pipeline_parallel_size: int = typer.Option(1, help="[vllm] Pipeline stages per replica."),
    data_parallel_size: int = typer.Option(1, help="[vllm] Must be 1 here: run one extraction per replica instead."),
    max_model_len: Optional[int] = typer.Option(None, help="[vllm] Engine context length [default: --max-len]."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, help="[vllm] Fraction of GPU memory [0.9 GPU, 0.1 CPU]."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, help="[vllm] Tokens per engine step."),
    kv_cache_gib: Optional[float] = typer.Option(None, help="[vllm] KV-cache size in GiB [GPU: from "
                                                           "--gpu-memory-utilization; CPU: 4 sequences of the "
                                                           "engine context, or VLLM_CPU_KVCACHE_SPACE]."),
    limit_mm_per_prompt: Optional[int] = typer.Option(None, help="[vllm] Max images per prompt."),
    trust_remote_code: bool = typer.Option(False, help="[vllm] Allow the model folder's own code to run."),
    num_shards: Optional[int] = typer.Option(
        None, help="Split the input among N independent jobs: this job takes the samples with index % N == "
                   "--shard-index and writes OUT/part-<i>-of-<N>/ [default: from a SLURM job array "
                   "(SLURM_ARRAY_TASK_COUNT) or torchrun-style WORLD_SIZE, else 1]."),
    shard_index: Optional[int] = typer.Option(
        None, help="This job's share of the input (0 .. N-1); see --num-shards [default: SLURM_ARRAY_TASK_ID - "
                   "SLURM_ARRAY_TASK_MIN, or RANK, else 0]."),
    shard_tokens: Optional[int] = typer.Option(None, help="Tokens per feature shard file [default: from the hidden "
                                                          "size, ~128 MiB files]."),
    commit_seconds: Optional[float] = typer.Option(None, help="Commit finished samples at most this often "
                                                              "[default: 60]; a crash loses at most this much work."),
) -> None:
    """Run the teacher over DATA once and write a cache to OUT (hidden states, top-k, head, samples).

    Re-running the same command on the same OUT after a crash resumes from the last commit."""
    from genrecal_cache.extract import ExtractConfig
    from genrecal_cache.extract import extract as run_extract
    from genrecal_cache.format.codecs import resolve_hidden_codec

    if num_shards is None and shard_index is None:
        num_shards, shard_index, source = shard_from_env(os.environ)
        if source:
            typer.echo(f"shard {shard_index} of {num_shards} (from {source})", err=True)
    num_shards, shard_index = num_shards or 1, shard_index or 0
    if not 0 <= shard_index < num_shards:
        raise typer.BadParameter(f"must be in [0, --num-shards={num_shards})", param_hint="--shard-index")
    _check_storage(context, context_rank, topk_rows)
    try:
        codec = resolve_hidden_codec(hidden_codec, hidden_dtype).name
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--hidden-codec") from e
    cfg = ExtractConfig(teacher=teacher, data=data, out=str(out), backend=backend, topk=topk, max_len=max_len,
                        batch_tokens=batch_tokens, limit=limit, hidden_codec=codec, context=context,
                        context_rank=context_rank, topk_rows=topk_rows,
                        dtype=dtype,
                        device=device, image_root=image_root, num_shards=num_shards, shard_index=shard_index,
                        commit_seconds=commit_seconds, shard_tokens=shard_tokens,
                        vllm=dict(tensor_parallel_size=tensor_parallel_size,
                                  pipeline_parallel_size=pipeline_parallel_size, data_parallel_size=data_parallel_size,
                                  gpu_memory_utilization=gpu_memory_utilization,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  kv_cache_memory_bytes=None if kv_cache_gib is None else int(kv_cache_gib * 2**30),
                                  limit_mm_per_prompt=None if limit_mm_per_prompt is None else {"image": limit_mm_per_prompt},
                                  trust_remote_code=trust_remote_code, **({"max_model_len": max_model_len} if max_model_len else {})))
    with stoppable(str(out)):
        m = run_extract(cfg)
    c = m.counts
    typer.echo(f"wrote {out}: {c['samples']} samples ({c['ok']} ok, {c['error']} error), {c['tokens']} tokens")


def shard_from_env(env: Mapping[str, str]) -> tuple[int, int, str]:
    """(num_shards, shard_index, where they came from) for a job started by a launcher: a SLURM job array
    (task ID minus the array's first ID, over its step; SLURM_ARRAY_TASK_COUNT tasks), else torchrun-style
    RANK / WORLD_SIZE; (1, 0, "") when neither is set."""
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        names = ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"]
        task, count = int(env[names[0]]), int(env[names[1]])
        index = (task - int(env.get(names[2], "0"))) // int(env.get(names[3], "1"))
    elif "RANK" in env and "WORLD_SIZE" in env:
        names = ["RANK", "WORLD_SIZE"]
        index, count = int(env["RANK"]), int(env["WORLD_SIZE"])
    else:
        return 1, 0, ""
    source = " ".join(f"{n}={env[n]}" for n in names if n in env)
    if not 0 <= index < count:
        raise typer.BadParameter(f"{source} gives shard {index} of {count}: use a contiguous array (e.g. "
                                 f"--array=0-{count - 1}) or pass --num-shards/--shard-index",
                                 param_hint="--shard-index")
    return count, index, source


@app.command()
def info(cache: str = typer.Argument(..., help="Cache folder or fsspec URL."),
         local_cache: Optional[str] = typer.Option(None, help="Folder keeping verified copies of the remote files read."),
         errors: int = typer.Option(10, help="How many error rows to list."),
         as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")) -> None:
    """Counts, bytes per token, teacher, dtypes, codecs and errors of a cache."""
    import json as _json

    from genrecal_cache.info import format_summary, summarize
    from genrecal_cache import open_cache

    with clean_errors(cache), open_cache(cache, local_cache=local_cache) as tc:
        s = summarize(tc, max_errors=errors)
    typer.echo(_json.dumps(s, indent=1, default=str) if as_json else format_summary(s))


@app.command()
def plan(tokens: int = typer.Option(..., help="Teacher tokens the cache will hold (all samples together)."),
         hidden_size: int = typer.Option(..., help="Teacher hidden size d (Qwen2-VL-72B: 8192)."),
         vocab: int = typer.Option(..., help="Teacher vocabulary size V (rows of lm_head; Qwen2-VL: 152064)."),
         codec: str = typer.Option("bf16", help="Hidden codec: bf16, fp8, ecq or fp32."),
         topk: int = typer.Option(64, help="Top-k logprobs per token."),
         samples: Optional[int] = typer.Option(None, help="Number of samples [default: tokens / 512]."),
         image_bytes: int = typer.Option(0, help="Average embedded image bytes per sample (samples.parquet)."),
         text_bytes: int = typer.Option(600, help="Average conversation text bytes per sample."),
         head_dtype: str = typer.Option("bfloat16", help="dtype of the teacher's lm_head as exported (bfloat16 on GPU)."),
         context: str = typer.Option("lowrank", help=CONTEXT_HELP),
         context_rank: Optional[int] = typer.Option(None, help=RANK_HELP),
         topk_rows: str = typer.Option("answer", help=TOPK_ROWS_HELP),
         answer_fraction: float = typer.Option(0.15, help="Share of the tokens that are answer tokens (the rows "
                                                          "predicting them are stored exactly)."),
         image_fraction: float = typer.Option(0.7, help="Share of the tokens that are image tokens (Qwen2-VL: "
                                                        "300-1500 per image)."),
         sample: Optional[str] = typer.Option(None, help="A pilot cache of the same teacher and data (e.g. "
                                                         "`extract --limit 500 --context full --topk-rows all`): its "
                                                         "real rows replace the synthetic ones where it has them."),
         image_token_id: Optional[list[int]] = typer.Option(None, help="With --sample: the teacher's image-token "
                                                                       "id(s) [default: the pilot's, if it names "
                                                                       "them]."),
         as_json: bool = typer.Option(False, "--json", help="Print the estimate as JSON.")) -> None:
    """Estimate the size of a cache before extracting it (same layout and codecs as the writer), per row role."""
    import json as _json

    from genrecal_cache import open_cache
    from genrecal_cache.format.roles import Storage, default_rank
    from genrecal_cache.plan import estimate_cache_size, sample_rows

    _check_storage(context, context_rank, topk_rows)
    rows = None
    if sample is not None:
        with clean_errors(sample), open_cache(sample) as pilot:
            m = pilot.manifest
            if (m.hidden_size, m.vocab_size) != (hidden_size, vocab) or m.topk < topk:
                raise typer.BadParameter(f"the pilot cache has hidden {m.hidden_size}, vocab {m.vocab_size}, top-k "
                                         f"{m.topk}: another teacher or fewer top-k than planned", param_hint="--sample")
            rows = sample_rows(pilot, image_token_id or m.roles.image_token_ids)
            rows = {r: {k: v[:, :topk] if k.startswith("topk") else v for k, v in p.items()} for r, p in rows.items()}
    try:
        storage = Storage(context, (context_rank or default_rank(hidden_size)) if context == "lowrank" else None,
                          topk_rows)
        est = estimate_cache_size(tokens, hidden_size, vocab, topk, codec, samples, text_bytes_per_sample=text_bytes,
                                  image_bytes_per_sample=image_bytes, head_dtype=head_dtype, storage=storage,
                                  answer_fraction=answer_fraction, image_fraction=image_fraction, sample=rows)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    typer.echo(_json.dumps(est.as_dict(), indent=1) if as_json else est.format())


@app.command()
def verify(cache: str = typer.Argument(..., help="Cache folder or fsspec URL.")) -> None:
    """Check every checksum and the structure of a cache; exit 1 with the faults if any."""
    from genrecal_cache.verify import verify as run_verify

    with clean_errors(cache):
        faults = run_verify(cache)
    if faults:
        for f in faults:
            typer.echo(f"FAULT: {f}", err=True)
        typer.echo(f"{cache}: {len(faults)} fault(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"{cache}: OK")


@app.command()
def merge(cache: str = typer.Argument(..., help="Cache written in parts (folder with part-*-of-*/) or fsspec URL."),
          out: Path = typer.Option(..., help="Folder for the single-part cache (must not exist or be empty).")) -> None:
    """Consolidate a cache written in parts into one single-part cache (same rows, same order, same features).

    Re-running the same command after a crash or an interrupt resumes from the last commit."""
    from genrecal_cache.merge import merge as run_merge

    with stoppable(str(out)):
        m = run_merge(cache, out)
    c = m.counts
    typer.echo(f"wrote {out}: {c['samples']} samples ({c['ok']} ok, {c['error']} error), {c['tokens']} tokens")


@app.command()
def pull(url: str = typer.Argument(..., help="Cache URL (https://, s3://, gs://, ...) or folder to copy."),
         out: Path = typer.Argument(..., help="Local folder to download it into (created; resumable)."),
         quiet: bool = typer.Option(False, "--quiet", help="Do not list the files as they arrive.")) -> None:
    """Download a cache: every file its manifest lists, each verified by sha256, the manifest last.
    Run it again after an interruption to continue; files already verified are kept."""
    from genrecal_cache.io.pull import pull as run_pull

    def progress(rel: str, nbytes: int) -> None:
        if not quiet:
            typer.echo(f"  {rel} ({nbytes / 2**20:.1f} MiB so far)")

    with clean_errors(url):
        r = run_pull(url, out, progress=progress)
    typer.echo(f"{url} -> {r.path}: {r.files} files, {r.fetched} downloaded ({r.bytes / 2**20:.1f} MiB), "
               f"{r.files - r.fetched} already there; all verified")


@app.command()
def audit(cache: str = typer.Argument(..., help="Cache folder or fsspec URL."),
          teacher: str = typer.Option(..., help="The teacher the cache says it comes from (folder or hub id)."),
          samples: int = typer.Option(8, help="Random ok samples to recompute."),
          seed: int = typer.Option(0, help="Which samples."),
          device: str = typer.Option("cpu", help="cpu, cuda, cuda:1 ..."),
          dtype: str = typer.Option("float32", help="Recompute dtype: float32, bfloat16 (match the extraction's "
                                                    "to keep the recomputation noise small)."),
          tolerance: float = typer.Option(0.05, help="Recomputation noise allowed on top of the codec's bound, "
                                                     "as a fraction of each token's RMS."),
          min_top1: Optional[float] = typer.Option(None, help="Least top-1 agreement [0.99 lossless codecs, "
                                                              "0.95 fp8/ecq].")) -> None:
    """Recompute N samples with the transformers backend and compare them with the cache (token ids, masks,
    hidden states against the codec's bound, head, top-1): PASS, or FAIL naming what differs (exit 1)."""
    from genrecal_cache.audit import audit as run_audit

    with clean_errors(cache):
        report = run_audit(cache, teacher, samples=samples, seed=seed, device=device, dtype=dtype,
                           tolerance=tolerance, min_top1=min_top1)
    typer.echo(report.format())
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def push(cache: Path = typer.Argument(..., help="Complete local cache folder (single or in parts)."),
         url: str = typer.Argument(..., help="Where to publish it: s3://, gs://, hf://, a local or mounted path ..."),
         replace: bool = typer.Option(False, "--replace", "--force", help="Take down a different cache already at "
                                      "URL (its manifests first, then its files) and publish this one instead."),
         workers: int = typer.Option(8, help="Files uploaded in parallel."),
         read_back: bool = typer.Option(True, help="Check each uploaded file by the sha256 of its bytes read back "
                                                   "(--no-read-back: by size only, where reading back costs egress)."),
         quiet: bool = typer.Option(False, "--quiet", help="No progress bar.")) -> None:
    """Upload a cache to any fsspec URL: its files first (parallel, each checked), the manifest last, then
    verify it there. Run it again after an interruption to continue; files already there and intact are kept."""
    from tqdm import tqdm

    from genrecal_cache.push import PushError
    from genrecal_cache.push import push as run_push

    with clean_errors(url, also=(PushError,)), tqdm(unit="B", unit_scale=True, desc="push", disable=quiet) as bar:
        r = run_push(cache, url, replace=replace, workers=workers, read_back=read_back, progress=bar.update,
                     total=lambda n: setattr(bar, "total", n))
    for f in r.faults:
        typer.echo(f"FAULT: {f}", err=True)
    if r.faults:
        typer.echo(f"{url}: pushed, but verify found {len(r.faults)} fault(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"{cache} -> {r.url}: {r.files} files, {r.uploaded} uploaded ({r.bytes / 2**20:.1f} MiB), "
               f"{r.files - r.uploaded} already there; verified at {r.url}: OK")


@contextlib.contextmanager
def stoppable(where: str) -> Iterator[None]:
    """A long run writing a folder (extract, merge): SIGINT and SIGTERM stop it cleanly, and a stop (an interrupt,
    a full disk) ends with one line saying what is kept and the command that resumes; exit status 130/143
    for an interrupt, 2 for a full disk. Other known failures as `clean_errors`."""
    from genrecal_cache.stops import RunStopped, raise_on_signals

    try:
        with raise_on_signals(), clean_errors(where):
            yield
    except RunStopped as e:
        if debugging():
            raise
        fail(str(e), e.exit_code)


@app.command("demo-data")
def demo_data(out: Path = typer.Option(..., help="Folder for images/ and train.jsonl."),
              n: int = typer.Option(200, help="Number of samples."),
              seed: int = typer.Option(0)) -> None:
    """Write a synthetic visual-question dataset (shapes, colours, counts, positions)."""
    from genrecal_cache.demo_data import write_demo_dataset

    path = write_demo_dataset(out, n=n, seed=seed)
    typer.echo(f"wrote {path}")


@app.command("tiny-models")
def tiny_models(out: Path = typer.Option(..., help="Folder to hold teacher/ and student/."),
                seed: int = typer.Option(0)) -> None:
    """Build the tiny offline teacher (Qwen2-VL architecture) and student (LLaVA) used by the demo and tests."""
    from genrecal_cache.testing import tiny_pair

    teacher, student = tiny_pair(out, seed=seed)
    typer.echo(f"teacher: {teacher}\nstudent: {student}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
