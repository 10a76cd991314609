"""Checks that let a reader open a cache from an untrusted source (docs/remote.md, "Safe loading").

Nothing in a cache is executed: the head is safetensors (no pickle), the arrays are Zarr v3 with
codecs from the installed registry, the index is Parquet, everything else is JSON. What remains is
bounding what a hostile or corrupt file can make the reader do; each check raises CacheFormatError
naming the file, the row or field and the fix:

- the manifest (manifest.py): schema, types, integers <= 2^53, known dtypes, shard/chunk >= 1, and
  `checksums` paths that are plain relative paths inside the cache (no `..`, absolute paths, URLs);
- `samples.parquet` (here, at open): column types, statuses, offsets/lengths inside the feature
  arrays and contiguous, error rows empty; per sample (when read): `messages`/`extra` JSON that parses
  to the documented shapes; per row group: image bytes below a limit before they are loaded;
- the head: safetensors header/config parsed defensively, shapes matched with the manifest;
- the arrays: dtypes, shapes, shard and chunk lengths match the manifest before any data is read.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from .manifest import CacheFormatError, Manifest

# Bytes of images one parquet row group may hold (writers cut row groups at 16 MiB of images).
MAX_ROW_GROUP_IMAGE_BYTES = 1 << 30
REFETCH = "re-download or re-extract the cache"

def _str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _list_of(inner) -> Any:
    return lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and inner(t.value_type)


_INDEX_TYPES = {
    "index": pa.types.is_integer, "id": _str, "status": _str, "error": _str,
    "token_offset": pa.types.is_integer, "num_tokens": pa.types.is_integer,
    "answer_spans": _list_of(_list_of(pa.types.is_integer)), "messages": _str, "image_refs": _list_of(_str),
    "extra": _str, "images": _list_of(lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
}


def check_schema(schema: pa.Schema, where: str) -> None:
    for name, ok in _INDEX_TYPES.items():
        if name not in schema.names:
            raise CacheFormatError(f"{where}: column {name!r} is missing; the file is not a genrecal index; {REFETCH}")
        if not ok(schema.field(name).type):
            raise CacheFormatError(f"{where}: column {name!r} has type {schema.field(name).type}, not the one "
                                   f"docs/cache-format.md gives; the file is corrupt or not a genrecal index; {REFETCH}")


def check_index(table: pa.Table, manifest: Manifest, where: str) -> None:
    """Rows the reader will index arrays with: every offset and length inside the feature arrays."""
    T = manifest.counts["tokens"]
    n = table.num_rows
    if table.column("id").null_count or table.column("status").null_count:
        raise CacheFormatError(f"{where}: null id or status; {REFETCH}")
    for col in ("token_offset", "num_tokens", "index"):
        if table.column(col).null_count:
            raise CacheFormatError(f"{where}: null values in {col!r}; {REFETCH}")
    status = np.asarray(table.column("status").to_pylist(), dtype=object)
    ok = status == "ok"
    bad = np.flatnonzero(~ok & (status != "error"))
    if bad.size:
        raise CacheFormatError(f"{where}: row {bad[0]} has status {status[bad[0]]!r:.40} (not 'ok' or 'error'); {REFETCH}")
    off = table.column("token_offset").to_numpy().astype(np.int64, copy=False)
    length = table.column("num_tokens").to_numpy().astype(np.int64, copy=False)
    bad = np.flatnonzero((off < 0) | (length < 0) | (off > T) | (length > T - np.minimum(off, T)))
    if bad.size:
        i = bad[0]
        raise CacheFormatError(f"{where}: row {i} has tokens [{off[i]}, {off[i] + length[i]}) outside the feature "
                               f"arrays' {T} tokens; {REFETCH}")
    bad = np.flatnonzero(~ok & ((off != 0) | (length != 0)))
    if bad.size:
        raise CacheFormatError(f"{where}: error row {bad[0]} has token_offset/num_tokens; {REFETCH}")
    ok_off, ok_len = off[ok], length[ok]
    expected = np.concatenate([[0], np.cumsum(ok_len)[:-1]]) if ok_len.size else ok_off
    if (ok_len < 1).any() or not np.array_equal(ok_off, expected) or int(ok_len.sum()) != T:
        raise CacheFormatError(f"{where}: the ok rows' token ranges are not contiguous from 0 to T={T}; {REFETCH}")
    if n and len(set(table.column("id").to_pylist())) != n:
        raise CacheFormatError(f"{where}: duplicate sample ids; {REFETCH}")


def parse_messages(text: Any, where: str) -> list[dict]:
    try:
        messages = json.loads(text)
    except (TypeError, ValueError, RecursionError) as e:
        raise CacheFormatError(f"{where}: 'messages' is not valid JSON ({str(e)[:120]}); {REFETCH}") from None
    if not (isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                               and isinstance(m.get("content"), str) for m in messages)):
        raise CacheFormatError(f"{where}: 'messages' must be a list of {{role, content}} strings; {REFETCH}")
    return messages


def parse_extra(text: Any, where: str) -> dict:
    try:
        extra = json.loads(text) if text is not None else {}
    except (TypeError, ValueError, RecursionError) as e:
        raise CacheFormatError(f"{where}: 'extra' is not valid JSON ({str(e)[:120]}); {REFETCH}") from None
    if not isinstance(extra, dict):
        raise CacheFormatError(f"{where}: 'extra' must be a JSON object; {REFETCH}")
    return extra


def check_row_group_size(md: Any, group: int, where: str) -> None:
    """Refuse to load a row group whose images are absurdly large (a hostile or corrupt file)."""
    rg = md.row_group(group)
    for j in range(rg.num_columns):
        col = rg.column(j)
        if col.path_in_schema.split(".")[0] == "images" and col.total_uncompressed_size > MAX_ROW_GROUP_IMAGE_BYTES:
            raise CacheFormatError(f"{where}: row group {group} holds {col.total_uncompressed_size} bytes of images, "
                                   f"above the {MAX_ROW_GROUP_IMAGE_BYTES} limit (writers cut row groups at 16 MiB); "
                                   f"the file is corrupt or hostile; {REFETCH}")
