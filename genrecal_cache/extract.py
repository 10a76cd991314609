"""The extraction loop shared by all backends: samples -> teacher tokens -> forward -> top-k -> cache.

Reading/encoding happens here on the CPU, the backend runs the teacher, top-k is computed on
the backend's device from the hidden states and the exported head, and the `CacheWriter`
drains results on a background thread, so the run goes at the speed of the teacher forward.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from genrecal_cache.backends.hf import HFBackend
from genrecal_cache.backends.vllm import VLLMBackend, vllm_refusal
from genrecal_cache.config import DEFAULT_MAX_LEN, ExtractConfig
from genrecal_cache.dtypes import torch_dtype
from genrecal_cache.data import ImageError, Sample, decode_image, read_samples
from genrecal_cache.families import EncodeError, Encoded, FamilyAdapter, adapter_for, model_config
from genrecal_cache.format.manifest import (
    COMMITS_DIR, MANIFEST_NAME, PROGRESS_NAME, SAMPLES_NAME, Manifest, identity, identity_diff, sha256_text,
)
from genrecal_cache.format.head import TeacherHead
from genrecal_cache.format.roles import FLAG_TOPK, Storage, default_rank, row_flags
from genrecal_cache.format.tokenizer import tokenizer_files, tokenizer_sha256
from genrecal_cache.io.locate import part_dir
from genrecal_cache.io.prefetch import prefetch
from genrecal_cache.journal import DirLock
from genrecal_cache.stops import Position, command_line, stopped_runs
from genrecal_cache.writer import CacheWriter, SampleArrays, SampleRecord

__all__ = ["DEFAULT_MAX_LEN", "ExtractConfig", "ExtractError", "count_samples", "extract", "make_backend",
           "pick_backend", "resolve_max_len"]


class ExtractError(ValueError):
    """An extraction that cannot go on, or that made nothing usable; the message says what to do."""


def pick_backend(name: str) -> str:
    if name != "auto":
        return name
    try:
        import vllm  # noqa: F401
    except Exception:
        return "transformers"
    return "vllm"


def make_backend(cfg: ExtractConfig, adapter: FamilyAdapter, pad_id: int):
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    backend = pick_backend(cfg.backend)
    if cfg.backend == "auto" and backend == "vllm":
        if vllm_refusal(adapter, device.startswith("cuda")):  # `--backend vllm` says why; auto picks what works
            backend = "transformers"
    if backend == "transformers":
        return HFBackend(adapter, cfg.teacher, torch_dtype(dtype), device, pad_id)
    if backend == "vllm":  # (vLLM itself is imported only when its engine starts: it is optional)
        opts = dict(cfg.vllm)
        # the engine's context may be longer than --max-len (which only marks samples as too long)
        engine_len = opts.pop("max_model_len", None) or cfg.max_len
        return VLLMBackend(adapter, cfg.teacher, dtype=dtype, max_len=engine_len, **opts)
    raise ValueError(f"unknown backend {cfg.backend!r}: use 'transformers', 'vllm' or 'auto'")


def resolve_max_len(max_len: int | None, config: Any) -> int:
    """`max_len`, or by default 4096 capped at the teacher's context (`max_position_embeddings`): the
    vLLM engine refuses a `max_model_len` beyond it, and no sample that long could be run anyway."""
    if max_len is not None:
        return max_len
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    return min(DEFAULT_MAX_LEN, context) if isinstance(context, int) and context > 0 else DEFAULT_MAX_LEN


def _record(s: Sample, status: str = "ok", error: str | None = None) -> SampleRecord:
    return SampleRecord(id=s.id, messages=s.messages, images=s.images, image_refs=s.image_refs,
                        status=status, error=error, extra=getattr(s, "extra", {}) or {})


def count_samples(path: str, limit: int | None) -> int | None:
    """How many samples a data file holds (for the progress bar's ETA); None when unknown cheaply."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        n = pq.ParquetFile(path).metadata.num_rows
    elif path.endswith(".jsonl"):
        with open(path, "rb") as f:
            n = sum(1 for line in f if line.strip())
    else:
        return limit
    return n if limit is None else min(n, limit)


def _encode_all(samples: Iterator[Sample], adapter: FamilyAdapter, processor, max_len: int, data: str
                ) -> Iterator[tuple[Sample, Encoded | None, str | None]]:
    """(sample, its teacher encoding, None) or (sample, None, why it cannot be used), in input order.

    Queued encodings hold no decoded images: a sample keeps its encoded files (`Sample.images`) and the
    processor's output, so memory is bounded by what the processor uses, not by the images' resolution
    (12 images of 8192x8192 were 4.4 GB). A backend that needs the images decodes them per batch.
    A text too long for `max_len` tokens by its characters alone is refused before it is tokenized."""
    max_chars = max_len * 2 * _longest_token_chars(processor.tokenizer)
    for s in samples:
        where = f"sample {s.id!r} ({data}, {s.where})"
        if s.error:
            yield s, None, s.error
            continue
        chars = sum(len(m["content"]) for m in s.messages)
        if chars > max_chars:
            yield s, None, (f"{where}: {chars} characters of text cannot fit in max_len={max_len} tokens (at most "
                            f"{max_chars}); shorten or drop the sample, or raise --max-len")
            continue
        try:
            enc = adapter.encode(processor, s, [decode_image(b) for b in s.images], max_len)
        except ImageError as e:
            yield s, None, f"{where}: {e}"
            continue
        except EncodeError as e:  # its message begins "sample 'id' (family): "
            own = f"sample {s.id!r} ("
            text = str(e)
            yield s, None, text.replace(own, f"{where[:-1]}, ", 1) if text.startswith(own) else f"{where}: {text}"
            continue
        except Exception as e:  # noqa: BLE001 - a processor failing on one sample must not stop the run
            yield s, None, f"{where}: the processor failed: {type(e).__name__}: {e}"
            continue
        yield s, dataclasses.replace(enc, images=[]), None


def _longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token of `tokenizer` stands for (byte-level tokens: bytes, at least one per
    character), so that a text of more than `max_len` times this many characters (twice, for
    normalisation) cannot fit in `max_len` tokens."""
    return max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))


def extract(cfg: ExtractConfig) -> Manifest:
    """Run the teacher over `cfg.data` once and write a verified cache to `cfg.out` (or to its part
    `cfg.out/part-<i>-of-<n>` with `num_shards`). An interrupted run in the same place is resumed from
    its last commit; a complete one is returned as it is."""
    if not 0 <= cfg.shard_index < cfg.num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards={cfg.num_shards}), got {cfg.shard_index}")
    try:  # before the output folder is made: an unreadable input leaves nothing behind
        inputs = read_samples(cfg.data, limit=cfg.limit, image_root=cfg.image_root)  # lazy but for these checks
    except (OSError, ValueError) as e:
        raise ExtractError(f"{e}; nothing was written to {cfg.out}") from e
    out = part_dir(cfg.out, cfg.shard_index, cfg.num_shards) if cfg.num_shards > 1 else cfg.out
    try:
        config = model_config(cfg.teacher, "--teacher")
    except ValueError as e:
        raise ExtractError(f"{e}; nothing was written to {cfg.out}") from None
    cfg = dataclasses.replace(cfg, max_len=resolve_max_len(cfg.max_len, config))
    # one writer per directory (a second run would delete the first one's shards); a full disk or an
    # interrupt ends in one line saying what is kept and how to resume (stops.py)
    with stopped_runs(out, "extraction") as position, DirLock(out):
        manifest = _extract_locked(cfg, out, config, inputs, position)
    c = manifest.counts
    if c["ok"] == 0 and (cfg.num_shards == 1 or c["samples"] > 0):  # an empty part of a tiny input is fine
        raise ExtractError(f"{out}: no usable sample: {c['samples']} sample(s) read from {cfg.data}, "
                           f"{c['error']} recorded as errors{_first_errors(out)}. The cache holds no teacher "
                           f"features; fix the input (`genrecal-cache info {out}` lists the errors), delete {out} "
                           f"and extract again")
    return manifest


def _first_errors(out: str | Path, n: int = 2) -> str:
    import pyarrow.parquet as pq

    errors = pq.read_table(Path(out) / SAMPLES_NAME, columns=["error"]).column("error").drop_null().to_pylist()
    return f" (first: {'; '.join(e[:300] for e in errors[:n])})" if errors else ""


def _extract_locked(cfg: ExtractConfig, out: str | Path, config: Any, inputs: Iterator[Sample],
                    position: Position) -> Manifest:
    adapter = adapter_for(config)
    processor = adapter.load_processor(cfg.teacher)
    tokenizer = processor.tokenizer
    done = _complete_cache(out, cfg, config, tokenizer)
    if done is not None:
        return done
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    backend = make_backend(cfg, adapter, pad_id)
    head = backend.head
    chat_template = getattr(processor, "chat_template", None) or tokenizer.chat_template
    storage = storage_for(cfg, head.hidden_size, config, tokenizer)
    writer = CacheWriter(
        out,
        storage=storage, basis_fit_rows=cfg.context_fit_rows,
        hidden_size=head.hidden_size,
        vocab_size=head.vocab_size,
        topk=cfg.topk,
        hidden_codec=cfg.codec,
        teacher={"id": cfg.teacher, "revision": getattr(config, "_commit_hash", None) or "local",
                 "config_sha256": sha256_text(config.to_json_string()), "model_type": config.model_type,
                 "backend": backend.name},
        tokenizer_sha256=tokenizer_sha256(tokenizer),
        chat_template_sha256=sha256_text(chat_template),
        tokenizer_files=tokenizer_files(tokenizer, chat_template),  # trainers align answers by text without the teacher
        head=head,
        command=command_line(),
        extra={"extract": {"max_len": cfg.max_len, "num_shards": cfg.num_shards, "shard_index": cfg.shard_index}},
        resume=True, commit_seconds=cfg.commit_seconds, shard_tokens=cfg.shard_tokens,
    )
    skip = list(writer.committed_ids)  # a resumed run: these inputs are in the cache already
    position.samples = len(skip)
    n_ok = n_err = n_tok = 0
    t0 = time.perf_counter()
    bar = tqdm(desc="extract", unit="sample", total=count_samples(cfg.data, cfg.limit), disable=not cfg.progress,
               dynamic_ncols=True)

    def run(batch: list[tuple[Sample, Encoded]]) -> None:
        nonlocal n_ok, n_err, n_tok
        if getattr(backend, "needs_images", False):  # decoded for this batch only (see _encode_all)
            batch = [(s, dataclasses.replace(e, images=[decode_image(b) for b in s.images])) for s, e in batch]
        if n_ok == 0:  # before anything is cached: the exported head must reproduce the teacher's own forward
            backend.check_head([e for _, e in batch])
        hidden = backend.hidden_states([e for _, e in batch])
        topk = _batch_topk(head, hidden, [e for _, e in batch], storage, cfg.topk)
        for (s, e), h, (ids, lps) in zip(batch, hidden, topk):
            try:
                writer.add(_record(s), SampleArrays(
                    token_ids=e.input_ids.to(torch.int32).numpy(),
                    answer_mask=e.answer_mask.numpy(),
                    hidden=h,  # the writer casts on h's device: a bf16 GPU batch crosses to the host at half size
                    topk_ids=ids,
                    topk_logprobs=lps,
                ), commit=False)  # commits between batches only (see below)
            except ValueError as err:  # refused by the writer's checks (e.g. NaN states): an error row
                writer.add(_record(s, "error", str(err)), None, commit=False)
                n_err += 1
                continue
            n_ok += 1
            n_tok += int(e.input_ids.shape[0])
        elapsed = time.perf_counter() - t0
        bar.update(len(batch))
        bar.set_postfix(ok=n_ok, err=n_err, tok_s=f"{n_tok / max(elapsed, 1e-9):.0f}")

    queued = None
    try:
        batch: list[tuple[Sample, Encoded]] = []
        deferred: list[tuple[Sample, str]] = []  # error rows after the batch: rows go in input order
        longest = 0
        samples = _my_samples(inputs, cfg, skip, str(out))
        bar.update(len(skip))
        queued = prefetch(_encode_all(samples, adapter, processor, cfg.max_len, cfg.data), 256)
        # Commits happen between batches only (`commit=False` inside, `commit_point()` after each), so a
        # resumed run starts at a batch boundary and cuts the same batches as an uninterrupted one: batch
        # composition changes the numerics, and a resumed cache must be bit-identical.
        for s, enc, err in queued:
            position.samples += 1
            if err is not None:
                if batch:
                    deferred.append((s, err))
                else:
                    writer.add(_record(s, "error", err), None)
                n_err += 1
                bar.update(1)
                continue
            n = int(enc.input_ids.shape[0])
            # Budget counts padded tokens: the batch costs len(batch) * longest positions.
            if batch and (deferred or (len(batch) + 1) * max(longest, n) > cfg.batch_tokens):
                run(batch)
                for d, derr in deferred:
                    writer.add(_record(d, "error", derr), None, commit=False)
                writer.commit_point()
                batch, deferred, longest = [], [], 0
            batch.append((s, enc))
            longest = max(longest, n)
        if batch:
            run(batch)
        for d, derr in deferred:
            writer.add(_record(d, "error", derr), None)
        manifest = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if queued is not None:  # stops and joins the reader thread now, also after an error
            queued.close()
        bar.close()
        backend.close()
    return manifest


def _batch_topk(head: TeacherHead, hidden: list[torch.Tensor], encoded: list[Encoded], storage: Storage,
                k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sample, the top-k (ids int32, logprobs float32) [L, k] at the rows `storage` keeps top-k at (zeros
    elsewhere). One pass over the batch's kept rows (chunked inside: far fewer small kernels than one per sample),
    and only those: with top-k at answer rows, the head's [rows, vocab] GEMM skips the context, most of a sample."""
    if storage.topk_rows == "all":
        rows = [None] * len(hidden)
        kept = hidden
    else:
        rows = [(row_flags(e.input_ids.numpy(), e.answer_mask.numpy(), storage) & FLAG_TOPK) > 0 for e in encoded]
        kept = [h[torch.from_numpy(r).to(h.device)] for h, r in zip(hidden, rows)]
    all_ids, all_lps = head.topk_logprobs(torch.cat(kept) if len(kept) > 1 else kept[0], k)
    splits = np.cumsum([int(h.shape[0]) for h in kept])[:-1]
    out = []
    for h, r, ids, lps in zip(hidden, rows, np.split(all_ids.cpu().numpy(), splits),
                              np.split(all_lps.cpu().numpy(), splits)):
        if r is not None:
            full_ids, full_lps = np.zeros((h.shape[0], k), np.int32), np.zeros((h.shape[0], k), np.float32)
            full_ids[r], full_lps[r] = ids, lps
            ids, lps = full_ids, full_lps
        out.append((ids, lps))
    return out


def storage_for(cfg: ExtractConfig, hidden_size: int, config: Any, tokenizer: Any) -> Storage:
    """The role-aware storage of this extraction: its policy, the basis rank and, for 'text', the image tokens."""
    image_ids = []
    if cfg.context == "text":
        ids = {getattr(config, k, None) for k in ("image_token_id", "image_token_index")}
        token = getattr(tokenizer, "image_token", None)
        if token:
            ids.add(tokenizer.convert_tokens_to_ids(token))
        image_ids = sorted(i for i in ids if isinstance(i, int) and i >= 0)
        if not image_ids:
            raise ExtractError(f"--context text: the teacher {cfg.teacher} names no image token (config image_token_id)"
                               f"; use --context lowrank or none")
    rank = (cfg.context_rank or default_rank(hidden_size)) if cfg.context == "lowrank" else None
    try:
        return Storage(context=cfg.context, rank=rank, topk_rows=cfg.topk_rows, image_token_ids=image_ids)
    except ValueError as e:
        raise ExtractError(str(e)) from None


def _my_samples(samples: Iterator[Sample], cfg: ExtractConfig, skip: list[str], out: str) -> Iterator[Sample]:
    """This job's inputs (index % num_shards == shard_index), without the first `skip` ones, which a
    resumed cache already holds (their ids must match: the data must not change between runs)."""
    j = 0
    for i, s in enumerate(samples):
        if i % cfg.num_shards != cfg.shard_index:
            continue
        if j < len(skip):
            if s.id != skip[j]:
                raise ExtractError(f"{out}: cannot resume: input #{j} of this job is {s.id!r} but the interrupted run "
                                 f"committed {skip[j]!r} there; the data file (or --limit/--num-shards) changed. "
                                 f"Use the same data, or a new output directory")
            j += 1
            continue
        yield s
    if j < len(skip):
        raise ExtractError(f"{out}: cannot resume: the interrupted run committed {len(skip)} samples but the data now "
                         f"has only {j} for this job; the data file changed")


def _complete_cache(out, cfg: ExtractConfig, config, tokenizer) -> Manifest | None:
    """The manifest when `out` already holds a complete cache of this teacher (a re-run after success,
    or after a crash between the manifest and the journal's removal), else None."""
    path = Path(out) / MANIFEST_NAME
    if not path.exists():
        return None
    m = Manifest.from_json(path.read_bytes(), source=str(path))
    want = {"teacher.config_sha256": sha256_text(config.to_json_string()),
            "tokenizer_sha256": tokenizer_sha256(tokenizer), "topk": cfg.topk,
            "hidden_codec": cfg.hidden_codec,
            "storage": storage_for(cfg, m.hidden_size, config, tokenizer).as_dict()}
    got = {k: v for k, v in identity(m).items() if k in want}
    diff = [f"{k}: cache has {a!r}, this run {b!r}" for k, a, b in identity_diff(got, want)]
    if diff:
        raise ValueError(f"{out} already holds a complete cache made differently ({'; '.join(diff)}); choose a new "
                         f"output directory")
    (Path(out) / PROGRESS_NAME).unlink(missing_ok=True)  # leftovers of a crash right after the manifest
    shutil.rmtree(Path(out) / COMMITS_DIR, ignore_errors=True)
    return m
