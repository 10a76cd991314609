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
- the arrays: dtypes, shapes, shard and chunk lengths match the manifest before any data is read;
- local files (here): every file a reader opens is a regular file inside the cache folder, reached
  without symbolic links, so a cache cannot point the reader at files outside it, /dev/zero or a FIFO;
- declared sizes (here): the token count must be backed by shard files the manifest lists, and no read
  decodes more than a bounded number of bytes (see `check_read_budget`).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from .manifest import FEATURES_NAME, CacheFormatError, Manifest, layout_limit

__all__ = ["DECODED_FLOOR", "DECODED_PER_STORED", "DICTIONARY_COLUMNS", "ENV_MAX_READ_BYTES",
           "INDEX_FLOOR", "MAX_IMAGE_BYTES", "MAX_INDEX_EXPANSION", "MAX_MANIFEST_BYTES",
           "MAX_READ_BYTES", "MAX_ROW_GROUP_IMAGE_BYTES", "REFETCH", "check_index",
           "check_local_files", "check_read_budget", "check_row_group_size", "check_schema",
           "decoded_bytes_per_token", "decoded_nbytes", "file_limit", "listed_feature_bytes",
           "local_file_problem", "max_read_bytes", "open_regular", "parse_extra", "parse_messages",
           "read_images", "read_index", "read_regular", "shard_files"]

# 256 MiB per encoded image file: extraction checks it before an image file is read or decoded,
# a reader of an untrusted cache before an image is handed to PIL.
MAX_IMAGE_BYTES = 256 << 20

# Bytes of images one parquet row group may hold (writers cut row groups at 16 MiB of images).
MAX_ROW_GROUP_IMAGE_BYTES = 1 << 30
REFETCH = "re-download or re-extract the cache"
MAX_MANIFEST_BYTES = 64 << 20    # manifest.json (a 10 TB cache lists ~400k files: ~40 MB)


# ---- local files: regular files inside the cache, no links -------------------------------------------

def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def local_file_problem(root: str, rel: str, cache: dict[str, os.stat_result] | None = None) -> str | None:
    """Why the cache file `rel` under `root` must not be opened (None: a regular file reached without links,
    or missing, which the caller reports as missing). Every path part below `root` is checked with lstat."""
    path = root
    parts = rel.split("/")
    for k, part in enumerate(parts):
        path = os.path.join(path, part)
        st = cache.get(path) if cache is not None else None
        if st is None:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return None
            if cache is not None:
                cache[path] = st
        last = k == len(parts) - 1
        if stat.S_ISLNK(st.st_mode) or not (stat.S_ISREG(st.st_mode) if last else stat.S_ISDIR(st.st_mode)):
            target = f" (to {os.readlink(path)!r:.120})" if stat.S_ISLNK(st.st_mode) else ""
            return f"{'/'.join(parts[:k + 1])} is {_kind(st.st_mode)}{target}"
    return None


def check_local_files(root: str, rels: Iterable[str], where: str) -> dict[str, int]:
    """Sizes of the cache files `rels` (missing ones left out); CacheFormatError if one is a link or not a
    regular file: a cache is data from elsewhere and may not make the reader open anything outside it."""
    seen: dict[str, os.stat_result] = {}
    sizes = {}
    for rel in rels:
        problem = local_file_problem(root, rel, seen)
        if problem:
            raise CacheFormatError(f"{where}/{problem}: a cache holds only regular files (no links, FIFOs or devices); "
                                   f"the cache is corrupt or hostile, {REFETCH}")
        st = seen.get(os.path.join(root, *rel.split("/")))
        if st is not None:
            sizes[rel] = st.st_size
    return sizes


def file_limit(rel: str, m: Manifest | None) -> int:
    """Most bytes a reader reads or downloads of a cache file before refusing it: its exact size when the
    manifest lists one (`extra.sizes`, checked against `layout_limit` when parsed), else `layout_limit`."""
    listed = m.sizes.get(rel) if m is not None else None
    return listed if listed is not None else layout_limit(rel, m)


# ---- declared sizes ------------------------------------------------------------------------------------

MAX_READ_BYTES = 4 << 30         # decoded bytes of one read (a group of samples): see check_read_budget
ENV_MAX_READ_BYTES = "GENRECAL_MAX_READ_BYTES"
DECODED_PER_STORED = 64          # a real cache decodes to < 8x its stored feature bytes (fp8/ecq -> float32)
DECODED_FLOOR = 64 << 20


def shard_files(m: Manifest, where: str) -> list[tuple[str, str, int]]:
    """(path, array, shard number) of every shard file the token count implies, each of which the manifest
    must list. Refused at once
    when there are more than the manifest lists files (a hostile `counts.tokens` of 2^40 would otherwise
    make this a loop over billions of names)."""
    T = m.counts["tokens"]
    n = sum(-(-T // spec["shard_tokens"]) for spec in m.arrays.values())
    if n > len(m.checksums):
        raise CacheFormatError(f"{where}: counts.tokens={T} needs {n} shard files but the manifest lists only "
                               f"{len(m.checksums)} files; the manifest is corrupt or hostile, {REFETCH}")
    return [(f"{FEATURES_NAME}/{name}/c/{s}" + ("/0" if spec["shape_tail"] else ""), name, s)
            for name, spec in m.arrays.items() for s in range(-(-T // spec["shard_tokens"]))]


def listed_feature_bytes(m: Manifest) -> int | None:
    """Bytes of the feature files by the sizes the manifest lists (None unless it lists every one's): what
    `check_read_budget` compares the token count with for a remote cache, whose reads are capped at them."""
    rels = [rel for rel in m.checksums if rel.startswith(f"{FEATURES_NAME}/")]
    if not rels or any(rel not in m.sizes for rel in rels):
        return None
    return sum(m.sizes[rel] for rel in rels)


def decoded_bytes_per_token(m: Manifest) -> int:
    """Bytes a reader holds per token once decoded (hidden float32, int32 ids, bool mask, top-k; version 3:
    row flags and low-rank coefficients)."""
    return 4 * m.hidden_size + 4 + 1 + 8 * m.topk + (1 + 4 * (m.roles.rank or 0) if m.format_version >= 3 else 0)


def max_read_bytes() -> int:
    value = os.environ.get(ENV_MAX_READ_BYTES)
    try:
        return int(float(value)) if value else MAX_READ_BYTES
    except ValueError:
        raise ValueError(f"{ENV_MAX_READ_BYTES}={value!r} is not a number of bytes") from None


def check_read_budget(m: Manifest, ids: list[str], lengths: np.ndarray, stored_bytes: int | None, where: str) -> None:
    """Refuse a cache whose declared sizes would make a reader allocate without bound, before any read:

    - one read decodes the samples starting in one shard: at most (shard + longest sample) tokens, which
      must fit `GENRECAL_MAX_READ_BYTES` (default 4 GiB: a 100k-token sample at d=8192 is 3.3 GiB);
    - when the feature files' sizes are known (local caches; remote ones whose manifest lists sizes, to
      which every read is held), the decoded size of all T tokens must be within 64x of them (real
      caches: under 8x), so a small cache cannot claim 2^24 tokens."""
    per_token = decoded_bytes_per_token(m)
    limit = max_read_bytes()
    T = m.counts["tokens"]
    if lengths.size:
        i = int(np.argmax(lengths))
        group = (min(m.arrays["hidden"]["shard_tokens"], T) + int(lengths[i])) * per_token
        if group > limit:
            raise CacheFormatError(
                f"{where}: row {i} (sample {ids[i]!r:.60}) has {int(lengths[i])} tokens; reading it takes "
                f"{group / 2**30:.1f} GiB decoded ({per_token} bytes per token), above the {limit / 2**30:.1f} GiB "
                f"limit. The index is corrupt or hostile ({REFETCH}); if the cache is genuine, raise "
                f"{ENV_MAX_READ_BYTES}")
    # rows a role-aware cache does not store are zeros that compress to almost nothing: count its answer rows
    # in full and its other rows at 1/16 (a lowrank context row decodes to ~d/8 stored bytes' worth)
    decoded = T * per_token if m.roles.is_full else (m.counts["answer_tokens"] + T // 16) * per_token
    if stored_bytes is not None and decoded > DECODED_PER_STORED * stored_bytes + DECODED_FLOOR:
        raise CacheFormatError(
            f"{where}: counts.tokens={T} would decode to {T * per_token / 2**30:.2f} GiB but the feature files hold "
            f"only {stored_bytes} bytes (more than {DECODED_PER_STORED}x; real caches stay under 8x); the cache is "
            f"corrupt or hostile, {REFETCH}")


def open_regular(path: str, where: str) -> int:
    """A read-only descriptor of `path` if it is a regular file (the last part not followed if it is a link)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CacheFormatError(f"{where}: a symbolic link; a cache holds only regular files, {REFETCH}") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CacheFormatError(f"{where}: {_kind(mode)}; a cache holds only regular files, {REFETCH}")
    return fd


def read_regular(path: str, limit: int, where: str) -> bytes:
    """The bytes of the regular file `path`, refused above `limit` bytes before any is read."""
    fd = open_regular(path, where)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CacheFormatError(f"{where}: {size} bytes, above the {limit}-byte limit for this file; the file is "
                                   f"corrupt or hostile, {REFETCH}")
        data = os.pread(fd, size + 1, 0)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise CacheFormatError(f"{where}: grew past {limit} bytes while being read; {REFETCH}")
    return data

def _value(t: pa.DataType) -> pa.DataType:
    """The type a column decodes to (readers keep string/binary columns dictionary-encoded until checked)."""
    return t.value_type if pa.types.is_dictionary(t) else t


def _str(t: pa.DataType) -> bool:
    t = _value(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _list_of(inner) -> Any:
    return lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and inner(t.value_type)


_INDEX_TYPES = {
    "index": pa.types.is_integer, "id": _str, "status": _str, "error": _str,
    "token_offset": pa.types.is_integer, "num_tokens": pa.types.is_integer,
    "answer_spans": _list_of(_list_of(pa.types.is_integer)), "messages": _str, "image_refs": _list_of(_str),
    "extra": _str, "images": _list_of(lambda t: pa.types.is_binary(_value(t)) or pa.types.is_large_binary(_value(t))),
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


# ---- samples.parquet: sizes before values ---------------------------------------------------------------
# Parquet can store one value once and reference it from every row (dictionary pages), and compress
# runs almost without bound: an 11 KB file can decode to gigabytes. Readers open it with every
# string/binary column kept dictionary-encoded (`DICTIONARY_COLUMNS`), add up what the rows would
# decode to, and refuse before decoding.

DICTIONARY_COLUMNS = ["id", "status", "error", "messages", "extra", "image_refs.list.element", "images.list.element"]
MAX_INDEX_EXPANSION = 1024       # decoded index / its stored bytes (real caches: under 30)
INDEX_FLOOR = 256 << 20          # ... or this much, whichever is more


def decoded_nbytes(col: pa.ChunkedArray | pa.Array) -> int:
    """Bytes `col` takes once its dictionaries are decoded, computed without decoding them."""
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        return sum(decoded_nbytes(c) for c in col.chunks)
    if pa.types.is_dictionary(col.type) and (pa.types.is_string(col.type.value_type)
                                              or pa.types.is_binary(col.type.value_type)):
        total = pc.sum(pc.take(pc.binary_length(col.dictionary), col.indices)).as_py() or 0
        return int(total) + 4 * len(col)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return decoded_nbytes(col.flatten()) + 8 * len(col)
    return col.nbytes


def _decoded(table: pa.Table) -> pa.Table:
    def plain(t: pa.DataType) -> pa.DataType:
        if pa.types.is_dictionary(t):
            return t.value_type
        if pa.types.is_list(t):
            return pa.list_(plain(t.value_type))
        return t
    return table.cast(pa.schema([pa.field(f.name, plain(f.type)) for f in table.schema]))


def read_index(pf: Any, columns: list[str], where: str) -> pa.Table:
    """`columns` of every row of a samples.parquet opened with `read_dictionary=DICTIONARY_COLUMNS`, refused
    (CacheFormatError) if the rows would decode to more than `MAX_INDEX_EXPANSION` x their stored bytes."""
    md = pf.metadata
    stored = uncompressed = 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for j in range(rg.num_columns):
            c = rg.column(j)
            if c.path_in_schema.split(".")[0] in columns:
                stored += c.total_compressed_size
                uncompressed += c.total_uncompressed_size
    limit = max(INDEX_FLOOR, MAX_INDEX_EXPANSION * stored)
    claimed = uncompressed + 8 * len(columns) * md.num_rows  # before reading: pages and rows as declared
    if claimed > limit:
        raise CacheFormatError(f"{where}: {md.num_rows} rows declaring {claimed} bytes in {stored} stored bytes, "
                               f"above the {limit}-byte limit; the file is corrupt or hostile, {REFETCH}")
    # One row group at a time: pyarrow cannot read nested dictionary columns (image_refs) of several row
    # groups into one table ("Nested data conversions not implemented for chunked array outputs").
    groups = [pf.read_row_group(g, columns=columns) for g in range(md.num_row_groups)] or [pf.read(columns=columns)]
    n = sum(decoded_nbytes(t.column(c)) for t in groups for c in columns)
    if n > limit:
        raise CacheFormatError(f"{where}: the index decodes to {n} bytes from {stored} stored bytes (a value stored "
                               f"once and repeated in many rows), above the {limit}-byte limit; the file is corrupt "
                               f"or hostile, {REFETCH}")
    return pa.concat_tables([_decoded(t) for t in groups])


def read_images(pf: Any, group: int, where: str) -> list[list[bytes]]:
    """The `images` of one row group, refused before decoding if they exceed the limits."""

    check_row_group_size(pf.metadata, group, where)
    col = pf.read_row_group(group, columns=["images"]).column("images")
    n = decoded_nbytes(col)
    if n > MAX_ROW_GROUP_IMAGE_BYTES:
        raise CacheFormatError(f"{where}: row group {group} holds {n} bytes of images once decoded, above the "
                               f"{MAX_ROW_GROUP_IMAGE_BYTES} limit (writers cut row groups at 16 MiB); the file is "
                               f"corrupt or hostile; {REFETCH}")
    images = _decoded(pa.table({"images": col})).column("images").to_pylist()
    for r, row in enumerate(images):
        for img in row or []:
            if len(img) > MAX_IMAGE_BYTES:
                raise CacheFormatError(f"{where}: row {r} of row group {group} has an image of {len(img)} bytes, above the "
                                       f"{MAX_IMAGE_BYTES}-byte limit extraction accepts; {REFETCH}")
    return images


def check_row_group_size(md: Any, group: int, where: str) -> None:
    """Refuse to load a row group whose images are absurdly large (a hostile or corrupt file)."""
    rg = md.row_group(group)
    for j in range(rg.num_columns):
        col = rg.column(j)
        if col.path_in_schema.split(".")[0] == "images" and col.total_uncompressed_size > MAX_ROW_GROUP_IMAGE_BYTES:
            raise CacheFormatError(f"{where}: row group {group} holds {col.total_uncompressed_size} bytes of images, "
                                   f"above the {MAX_ROW_GROUP_IMAGE_BYTES} limit (writers cut row groups at 16 MiB); "
                                   f"the file is corrupt or hostile; {REFETCH}")
