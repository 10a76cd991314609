"""`genrecal-cache`: build, inspect and check teacher-feature caches."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from cli.errors import clean_errors, debugging, fail  # the one home of the CLIs' one-line errors
from cli.options import given, options_from
from genrecal_cache.config import (  # light: the flags are built without loading what the commands run
    BACKENDS, AuditConfig, CachePlanConfig, DemoDataConfig, ExtractConfig, InfoConfig, PushConfig, TinyModelsConfig,
    VLLMOptions,
)
from genrecal_cache.options import option

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Run a teacher VLM once and store what GenRecal distillation needs in a shareable cache.")


@dataclass
class AsJson:
    """A command that prints a summary can print it as JSON instead."""
    as_json: bool = option(False, "Print it as JSON.", flag="--json")


@dataclass
class Quiet:
    """A command that shows its progress can keep quiet."""
    quiet: bool = option(False, "Show no progress (files as they arrive, progress bar).", flag="--quiet")


def _check_storage(context: str, rank: int | None, topk_rows: str) -> None:
    from genrecal_cache.format.roles import CONTEXT_POLICIES, TOPK_ROWS

    if context not in CONTEXT_POLICIES:
        raise typer.BadParameter(f"{context!r} is not one of {', '.join(CONTEXT_POLICIES)}", param_hint="--context")
    if rank is not None and (rank < 1 or context != "lowrank"):
        raise typer.BadParameter("must be >= 1, with --context lowrank", param_hint="--context-rank")
    if topk_rows not in TOPK_ROWS:
        raise typer.BadParameter(f"{topk_rows!r} is not one of {', '.join(TOPK_ROWS)}", param_hint="--topk-rows")


@app.command()
@options_from(ExtractConfig, VLLMOptions)
def extract(**flags: Any) -> None:
    """Run the teacher over DATA once and write a cache to OUT (hidden states, top-k, head, samples).

    Re-running the same command on the same OUT after a crash resumes from the last commit."""
    from genrecal_cache.extract import extract as run_extract

    values = given(ExtractConfig, flags)
    if "num_shards" not in values and "shard_index" not in values:
        num_shards, shard_index, source = shard_from_env(os.environ)
        if source:
            typer.echo(f"shard {shard_index} of {num_shards} (from {source})", err=True)
            values.update(num_shards=num_shards, shard_index=shard_index)
    num_shards, shard_index = values.get("num_shards", ExtractConfig.num_shards), \
        values.get("shard_index", ExtractConfig.shard_index)
    if not 0 <= shard_index < num_shards:
        raise typer.BadParameter(f"must be in [0, --num-shards={num_shards})", param_hint="--shard-index")
    _check_storage(values.get("context", ExtractConfig.context), values.get("context_rank"),
                   values.get("topk_rows", ExtractConfig.topk_rows))
    if (backend := values.get("backend", ExtractConfig.backend)) not in BACKENDS:
        raise typer.BadParameter(f"{backend!r} is not one of {', '.join(BACKENDS)}", param_hint="--backend")
    try:
        cfg = ExtractConfig(**values, vllm=VLLMOptions(**given(VLLMOptions, flags)).engine_options())
    except ValueError as e:  # the codec (--hidden-codec, or its old name --hidden-dtype)
        raise typer.BadParameter(str(e), param_hint="--hidden-codec") from e
    with stoppable(cfg.out):
        m = run_extract(cfg)
    c = m.counts
    typer.echo(f"wrote {cfg.out}: {c['samples']} samples ({c['ok']} ok, {c['error']} error), {c['tokens']} tokens")


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
@options_from(InfoConfig, AsJson)
def info(cache: str = typer.Argument(..., help="Cache folder or fsspec URL."), **flags: Any) -> None:
    """Counts, bytes per token, teacher, dtypes, codecs and errors of a cache."""
    import json as _json

    from genrecal_cache.info import format_summary, summarize
    from genrecal_cache import open_cache

    cfg, how = InfoConfig(**given(InfoConfig, flags)), AsJson(**given(AsJson, flags))
    with clean_errors(cache), open_cache(cache, local_cache=cfg.local_cache) as tc:
        s = summarize(tc, max_errors=cfg.errors)
    typer.echo(_json.dumps(s, indent=1, default=str) if how.as_json else format_summary(s))


@app.command()
@options_from(CachePlanConfig, AsJson)
def plan(**flags: Any) -> None:
    """Estimate the size of a cache before extracting it (same layout and codecs as the writer), per row role."""
    import json as _json

    from genrecal_cache import open_cache
    from genrecal_cache.format.roles import Storage, default_rank
    from genrecal_cache.plan import estimate_cache_size, sample_rows

    cfg, how = CachePlanConfig(**given(CachePlanConfig, flags)), AsJson(**given(AsJson, flags))
    tokens, hidden_size, vocab, topk, context, context_rank, topk_rows, sample = (
        cfg.tokens, cfg.hidden_size, cfg.vocab, cfg.topk, cfg.context, cfg.context_rank, cfg.topk_rows, cfg.sample)
    _check_storage(context, context_rank, topk_rows)
    rows = None
    if sample is not None:
        with clean_errors(sample), open_cache(sample) as pilot:
            m = pilot.manifest
            if (m.hidden_size, m.vocab_size) != (hidden_size, vocab) or m.topk < topk:
                raise typer.BadParameter(f"the pilot cache has hidden {m.hidden_size}, vocab {m.vocab_size}, top-k "
                                         f"{m.topk}: another teacher or fewer top-k than planned", param_hint="--sample")
            rows = sample_rows(pilot, cfg.image_token_id or m.roles.image_token_ids)
            rows = {r: {k: v[:, :topk] if k.startswith("topk") else v for k, v in p.items()} for r, p in rows.items()}
    try:
        storage = Storage(context, (context_rank or default_rank(hidden_size)) if context == "lowrank" else None,
                          topk_rows)
        est = estimate_cache_size(tokens, hidden_size, vocab, topk, cfg.codec, cfg.samples,
                                  text_bytes_per_sample=cfg.text_bytes, image_bytes_per_sample=cfg.image_bytes,
                                  head_dtype=cfg.head_dtype, storage=storage, answer_fraction=cfg.answer_fraction,
                                  image_fraction=cfg.image_fraction, sample=rows)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    typer.echo(_json.dumps(est.as_dict(), indent=1) if how.as_json else est.format())


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
@options_from(Quiet)
def pull(url: str = typer.Argument(..., help="Cache URL (https://, s3://, gs://, ...) or folder to copy."),
         out: Path = typer.Argument(..., help="Local folder to download it into (created; resumable)."),
         **flags: Any) -> None:
    """Download a cache: every file its manifest lists, each verified by sha256, the manifest last.
    Run it again after an interruption to continue; files already verified are kept."""
    from genrecal_cache.io.pull import pull as run_pull

    quiet = Quiet(**given(Quiet, flags)).quiet

    def progress(rel: str, nbytes: int) -> None:
        if not quiet:
            typer.echo(f"  {rel} ({nbytes / 2**20:.1f} MiB so far)")

    with clean_errors(url):
        r = run_pull(url, out, progress=progress)
    typer.echo(f"{url} -> {r.path}: {r.files} files, {r.fetched} downloaded ({r.bytes / 2**20:.1f} MiB), "
               f"{r.files - r.fetched} already there; all verified")


@app.command()
@options_from(AuditConfig)
def audit(cache: str = typer.Argument(..., help="Cache folder or fsspec URL."), **flags: Any) -> None:
    """Recompute N samples with the transformers backend and compare them with the cache (token ids, masks,
    hidden states against the codec's bound, head, top-1): PASS, or FAIL naming what differs (exit 1)."""
    from genrecal_cache.audit import audit as run_audit

    from genrecal_cache.families import ModelNotFound

    with clean_errors(cache, also=(ModelNotFound,)):  # a --teacher that is not there
        cfg = AuditConfig(**given(AuditConfig, flags))
        report = run_audit(cache, cfg.teacher, samples=cfg.samples, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
                           tolerance=cfg.tolerance, min_top1=cfg.min_top1)
    typer.echo(report.format())
    if not report.passed:
        raise typer.Exit(1)


@app.command()
@options_from(PushConfig, Quiet)
def push(cache: Path = typer.Argument(..., help="Complete local cache folder (single or in parts)."),
         url: str = typer.Argument(..., help="Where to publish it: s3://, gs://, hf://, a local or mounted path ..."),
         **flags: Any) -> None:
    """Upload a cache to any fsspec URL: its files first (parallel, each checked), the manifest last, then
    verify it there. Run it again after an interruption to continue; files already there and intact are kept."""
    from tqdm import tqdm

    from genrecal_cache.push import PushError
    from genrecal_cache.push import push as run_push

    cfg, quiet = PushConfig(**given(PushConfig, flags)), Quiet(**given(Quiet, flags)).quiet
    with clean_errors(url, also=(PushError,)), tqdm(unit="B", unit_scale=True, desc="push", disable=quiet) as bar:
        r = run_push(cache, url, replace=cfg.replace, workers=cfg.workers, read_back=cfg.read_back, progress=bar.update,
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
@options_from(DemoDataConfig)
def demo_data(**flags: Any) -> None:
    """Write a synthetic visual-question dataset (shapes, colours, counts, positions)."""
    from genrecal_cache.demo_data import write_demo_dataset

    cfg = DemoDataConfig(**given(DemoDataConfig, flags))
    path = write_demo_dataset(cfg.out, n=cfg.n, seed=cfg.seed)
    typer.echo(f"wrote {path}")


@app.command("tiny-models")
@options_from(TinyModelsConfig)
def tiny_models(**flags: Any) -> None:
    """Build the tiny offline teacher (Qwen2-VL architecture) and student (LLaVA) used by the demo and tests."""
    from genrecal_cache.testing import tiny_pair

    cfg = TinyModelsConfig(**given(TinyModelsConfig, flags))
    with clean_errors(cfg.out, also=(OSError,)):  # an --out that cannot be written: one line
        teacher, student = tiny_pair(cfg.out, seed=cfg.seed)
    typer.echo(f"teacher: {teacher}\nstudent: {student}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
