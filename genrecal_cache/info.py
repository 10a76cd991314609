"""`genrecal-cache info`: what is in a cache, how big each part is per token, and what failed."""

from __future__ import annotations

from collections import Counter

import numpy as np

from genrecal_cache.config import InfoConfig
from genrecal_cache.format.codecs import hidden_codec
from genrecal_cache.format.manifest import TOKENIZER_DIR
from genrecal_cache.format.roles import CONTEXT_CODEC
from genrecal_cache.parts import MultiPartCache
from genrecal_cache.reader import TeacherCache

__all__ = ["format_summary", "summarize"]


def _counts(m) -> dict:
    c = m.counts
    return dict(c) if isinstance(c, dict) else dict(vars(c))


def summarize(cache: TeacherCache | MultiPartCache, max_errors: int = InfoConfig.errors) -> dict:
    """A plain dict (JSON-able) describing `cache`. Stored sizes are the manifest's (`verify` checks them
    against the files; a remote cache of thousands of shards then needs no request per file), or, for
    caches written before sizes were recorded, the files' own."""
    m = cache.manifest
    counts = _counts(m)
    files = list(m.checksums)
    listed = m.sizes
    sizes = ({f: listed[f] for f in files} if set(files) <= set(listed)
             else dict(zip(files, cache.fs.sizes([f"{cache.root}/{f}" for f in files]))))
    per_array = {name: sum(s for f, s in sizes.items() if f"/{f}".split("/features.zarr/")[-1].startswith(f"{name}/"))
                 for name in m.arrays}
    tokens = max(counts["tokens"], 1)
    # raw = bytes per token before compression: the stored dtype, or for hidden what its codec encodes
    # (fp8: d codes + a 4-byte scale; ecq: d codes + step + outliers)
    raw = {name: int(np.prod(spec["shape_tail"], dtype=np.int64)) * np.dtype(spec["stored_dtype"]).itemsize
           for name, spec in m.arrays.items()}
    codec = hidden_codec(m.hidden_codec)
    if "hidden" in raw:
        raw["hidden"] = codec.row_bytes(m.hidden_size)
    if "context" in raw:
        raw["context"] = CONTEXT_CODEC.row_bytes(m.roles.rank)
    status = cache.index.column("status").to_pylist()
    errors = [(sid, err) for sid, st, err in zip(cache.index.column("id").to_pylist(), status,
                                                  cache.index.column("error").to_pylist()) if st == "error"]
    reasons = Counter(_reason(e) for _, e in errors)
    return {
        "url": cache.url,
        "format_version": m.format_version,
        "teacher": dict(m.teacher),
        "hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "topk": m.topk,
        "counts": counts,
        "hidden_codec": codec.name, "hidden_codec_description": codec.description, "storage": m.storage,
        # the bf16 baseline: what a 16-bit teacher's states take uncompressed (2 bytes per value)
        "hidden_vs_raw_bf16": per_array.get("hidden", 0) / tokens / (2 * m.hidden_size) if m.hidden_size else 0.0,
        "tokenizer_sha256": m.tokenizer_sha256, "chat_template_sha256": m.chat_template_sha256,
        # the teacher tokenizer's files in the cache (of the first part that has them); [] in older caches
        "tokenizer_files": sorted({f.split(f"{TOKENIZER_DIR}/", 1)[1] for f in files
                                   if f.startswith(f"{TOKENIZER_DIR}/") or f"/{TOKENIZER_DIR}/" in f}),
        "arrays": {name: {**dict(spec), "bytes": per_array[name], "bytes_per_token": per_array[name] / tokens,
                          "raw_bytes_per_token": raw[name]}
                   for name, spec in m.arrays.items()},
        "bytes_total": sum(sizes.values()),
        "bytes_per_token": sum(per_array.values()) / tokens,
        "error_reasons": dict(reasons.most_common()),
        "errors": [{"id": sid, "error": err} for sid, err in errors[:max_errors]],
        "created": m.created, "tool_version": m.tool_version, "command": m.command,
    }


def _reason(error: str | None) -> str:
    """A coarse category for counting: the text after the sample name, up to the first colon."""
    text = (error or "").split(": ", 1)[-1]
    return text.split(":")[0][:60] or "unknown"


def format_summary(s: dict) -> str:
    c = s["counts"]
    t = s["teacher"]
    raw = sum(a["raw_bytes_per_token"] for a in s["arrays"].values())
    lines = [
        f"cache        {s['url']} (format v{s['format_version']}, genrecal {s['tool_version']}, {s['created']})",
        f"teacher      {t.get('id')} ({t.get('model_type')}, revision {t.get('revision')}, backend {t.get('backend', '?')})",
        f"dims         hidden {s['hidden_size']}, vocab {s['vocab_size']}, top-k {s['topk']}",
        f"hidden codec {s['hidden_codec']}: {s['hidden_codec_description']}; stored at {s['hidden_vs_raw_bf16']:.3f}x "
        f"of raw bf16 ({2 * s['hidden_size']} B/token)",
        f"storage      context rows {s['storage']['context']}"
        + (f" (rank {s['storage']['rank']} basis, fp8 coefficients)" if s["storage"]["rank"] else "")
        + f", top-k at {s['storage']['topk_rows']} rows (docs/cache-format.md, row roles)",
        f"samples      {c['samples']} ({c['ok']} ok, {c['error']} error)",
        f"tokens       {c['tokens']} ({c['answer_tokens']} answer tokens)",
        f"tokenizer    sha256 {s['tokenizer_sha256'][:16]}, chat template sha256 {(s['chat_template_sha256'] or '-')[:16]}; "
        + (f"stored in {TOKENIZER_DIR}/ ({', '.join(s['tokenizer_files'])})" if s["tokenizer_files"] else
           "not stored (an older cache: --main-pass-answer student_aligned needs the teacher or --teacher-tokenizer)"),
        f"stored       {s['bytes_total'] / 2**20:.2f} MiB in all, {s['bytes_per_token']:.1f} bytes/token of features "
        f"({raw / max(s['bytes_per_token'], 1e-9):.2f}x compression of {raw:g} raw)",
        "arrays       name            dtype          stored     raw B/tok  stored B/tok  chunk/shard tokens  codec",
    ]
    for name, a in s["arrays"].items():
        lines.append(f"             {name:<15} {a['dtype']:<14} {a['stored_dtype']:<10} {a['raw_bytes_per_token']:>9g} "
                     f"{a['bytes_per_token']:>13.1f}  {a['chunk_tokens']:>7}/{a['shard_tokens']:<10} {a['codec']}")
    if s["error_reasons"]:
        lines.append("errors       " + "; ".join(f"{n} x {r}" for r, n in s["error_reasons"].items()))
        for e in s["errors"]:
            lines.append(f"  - {e['id']}: {e['error']}")
    return "\n".join(lines)
