"""Where a cache is and what it is made of: a filesystem for a local path or fsspec URL, the cache's
manifest, its parts, and handles on its files (parquet index, zarr store). `locate` is the one place
that decides "one cache or a set of parts?" (the reader, `verify` and `pull` all ask it).
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import weakref
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core import sync as zarr_sync
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from ..format import safety
from ..format.manifest import FEATURES_NAME, MANIFEST_NAME, CacheFormatError, Manifest
from .remote import (changed_error, etag_of, is_http, is_s3, read_capped, read_capped_async, read_s3_if_match,
                     size_mismatch)
from .remote import url_to_fs as remote_url_to_fs
from .retry import join_read

__all__ = ["PART_RE", "find_parts", "load_manifest", "local_file", "locate", "open_fs", "open_parquet", "part_dir",
           "part_name", "zarr_store"]


def open_fs(path_or_url: str | os.PathLike, storage_options: dict[str, Any] | None = None
            ) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(filesystem, root path inside it, display name) for a local path or fsspec URL."""
    url = os.fspath(path_or_url)
    fs, root = remote_url_to_fs(url, storage_options)  # remote filesystems retry transient errors
    return fs, root.rstrip("/") or "/", url.rstrip("/")


def local_folder_problem(path: str) -> str | None:
    """Why the local `path` cannot be (made) a folder to write into, or None: a file is there, or where a parent
    folder should be (then every write under it fails with a traceback-worthy NotADirectoryError)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.path.isdir(probe):
        return None
    return f"{path}: {'a file is there' if probe == os.path.abspath(path) else f'{probe} is a file'}, not a folder"


def local_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """`path` on a local filesystem, fetched first when it is a read-through mirror (io/mirror.py)."""
    fetch = getattr(fs, "local_path", None)
    return fetch(path) if fetch is not None else path


def open_parquet(fs: fsspec.AbstractFileSystem, path: str, size: int | None = None) -> pq.ParquetFile:
    """ParquetFile reading only the column chunks it needs (by byte range when remote). A server
    that ignores HTTP Range makes fsspec refuse reads past the file's start: then read it whole into
    memory, bounded by `size` (the file's size in the manifest, when it lists one; a server stating or
    sending another size is refused), else the size the server declared, else `GENRECAL_MAX_READ_BYTES`."""
    try:
        return _open_parquet(fs, path, size)
    except KeyError as e:  # a column read_dictionary names is not there
        raise CacheFormatError(f"{path}: column {e.args[0]!r} is missing; the file is not a genrecal index; "
                               f"{safety.REFETCH}") from None


def _open_parquet(fs: fsspec.AbstractFileSystem, path: str, listed: int | None) -> pq.ParquetFile:
    dictionaries = {"read_dictionary": safety.DICTIONARY_COLUMNS}  # sizes are checked before values are decoded
    if isinstance(fs, LocalFileSystem):  # arrow's native reader: no Python file object in the loop
        return pq.ParquetFile(local_file(fs, path), **dictionaries)
    headers, size = {}, None
    if is_http(fs):  # every block read carries If-Match: a file replaced mid-run is an error (changed_error)
        info = fs.info(path)
        tag, size = etag_of(info), info.get("size")
        if listed is not None and size is not None and size != listed:
            raise size_mismatch(fs.unstrip_protocol(path), size, listed, "the server says the file has")
        size = listed if listed is not None else size  # a server that declares none is read by ranges too
        headers = {"If-Match": tag} if tag else {}
        f = fs.open(path, "rb", size=size, **({"headers": headers} if headers else {}))
    else:
        f = fs.open(path, "rb")
    try:
        return pq.ParquetFile(f, **dictionaries)
    except CacheFormatError:  # an answer longer than asked (io/remote.py): no second try
        f.close()
        raise
    except ValueError as e:  # fsspec: "...doesn't appear to support range requests", or for a server that
        f.close()             # says `Accept-Ranges: none`, "Cannot seek streaming HTTP file"
        if "range" not in str(e).lower() and "seek" not in str(e).lower():
            raise
    limit = size if isinstance(size, int) else safety.max_read_bytes()  # an endless answer is cut there
    data = read_capped(fs, path, limit, fs.unstrip_protocol(path), headers=headers, size=listed)
    return pq.ParquetFile(pa.BufferReader(data), **dictionaries)


def zarr_store(fs: fsspec.AbstractFileSystem, path: str, storage_options: dict[str, Any] | None,
               url: str, manifest: Manifest | None) -> zarr.abc.store.Store:
    """The cache's `features.zarr` as a read-only zarr store. Over HTTP every file read is bounded by
    what `manifest`'s layout allows that file (`safety.file_limit`), whatever the server sends."""
    if hasattr(fs, "zarr_store"):  # a read-through mirror fetches files as zarr asks for them
        return fs.zarr_store(path)
    if isinstance(fs, LocalFileSystem):
        return LocalStore(path, read_only=True)
    if fs.async_impl:
        # zarr drives the store from its own event loop and needs an asynchronous instance; a
        # separate one also keeps its aiohttp session away from the synchronous `fs`.
        afs, _ = remote_url_to_fs(url, storage_options, asynchronous=True, skip_instance_cache=True)
    else:
        afs = AsyncFileSystemWrapper(fs, asynchronous=True)
    store = _RangeTolerantFsspecStore(afs, read_only=True, path=path)
    store.manifest = manifest
    weakref.finalize(store, _close_session, afs)  # also when the caller never calls close()
    return store


class _RangeTolerantFsspecStore(FsspecStore):
    """FsspecStore that survives servers which ignore HTTP Range (Python's http.server, some static
    hosts): they answer 200 with the whole file, and fsspec's `_cat_file` hands that body back as
    if it were the range. Zarr's sharding codec reads a shard index with a suffix range and inner
    chunks with byte ranges, so without this a partial shard read fails its crc32c check.

    Over HTTP every read is bounded (an endless zarr.json or shard answer is cut at what the file
    may hold, a range answer at its length) and every data request carries `If-Match` (the ETag
    first seen; over S3 GetObject's `IfMatch`), so a file replaced mid-run is an error. Each request
    joins the read it serves (io/retry.py `gather_cancelling`): a failed read cancels its other requests."""

    manifest: Manifest | None = None
    _etags: dict[str, tuple[str | None, int | None]]

    async def get(self, key, prototype, byte_range=None):
        path = f"{self.path}/{key}"
        join_read(self.fs.unstrip_protocol(path))
        if byte_range is None and key.endswith("zarr.json"):  # metadata: read whole, but bounded
            rel = f"{FEATURES_NAME}/{key}"
            try:
                data = await read_capped_async(self.fs, path, safety.file_limit(rel, self.manifest),
                                               self.fs.unstrip_protocol(path),
                                               size=self.manifest.sizes.get(rel) if self.manifest else None)
            except FileNotFoundError:
                return None
            return prototype.buffer.from_bytes(data)
        if is_http(self.fs) or is_s3(self.fs):
            buf = await self._get_if_unchanged(key, path, prototype, byte_range)
        else:
            buf = await super().get(key, prototype, byte_range)
        if buf is None or byte_range is None:
            return buf
        if isinstance(byte_range, RangeByteRequest) and len(buf) > byte_range.end - byte_range.start:
            return buf[byte_range.start:byte_range.end]
        if isinstance(byte_range, SuffixByteRequest) and len(buf) > byte_range.suffix:
            return buf[len(buf) - byte_range.suffix:]
        if isinstance(byte_range, OffsetByteRequest) and byte_range.offset and len(buf) == await self.getsize(key):
            return buf[byte_range.offset:]
        return buf

    async def _get_if_unchanged(self, key: str, path: str, prototype: Any, byte_range: Any) -> Any:
        """GET with `If-Match: <the ETag this store first saw>`: a file replaced mid-run is an error
        (HTTP 412), not a silent mix of two versions. Bounded: a whole-file answer by the size the
        server declared and what the manifest allows the file, a range answer by its length."""
        if not hasattr(self, "_etags"):
            self._etags = {}
        if path not in self._etags:
            try:
                info = await self.fs._info(path)
            except FileNotFoundError:
                return None
            self._etags[path] = etag_of(info), info.get("size")
        tag, size = self._etags[path]
        rel = f"{FEATURES_NAME}/{key}"
        limit = safety.file_limit(rel, self.manifest)
        listed = self.manifest.sizes.get(rel) if self.manifest is not None else None
        if listed is not None and isinstance(size, int) and size != listed:
            raise size_mismatch(self.fs.unstrip_protocol(path), size, listed, "the server says the file has")
        if isinstance(size, int):
            limit = min(limit, size)
        start = end = None
        if isinstance(byte_range, RangeByteRequest):
            start, end = byte_range.start, byte_range.end
        elif isinstance(byte_range, OffsetByteRequest):
            start = byte_range.offset
        elif isinstance(byte_range, SuffixByteRequest):
            start = -byte_range.suffix
        where = self.fs.unstrip_protocol(path)
        try:
            if is_s3(self.fs):
                data = await read_s3_if_match(self.fs, path, tag, limit, where, start=start, end=end)
            else:
                data = await read_capped_async(self.fs, path, limit, where, start=start, end=end,
                                               headers={"If-Match": tag} if tag else None, size=listed)
        except FileNotFoundError:
            return None
        except Exception as e:
            changed = changed_error(e, self.fs.unstrip_protocol(path))
            if changed is not None:
                raise changed from None
            raise
        return prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    def close(self) -> None:
        super().close()
        _close_session(self.fs)


def _close_session(afs: fsspec.AbstractFileSystem) -> None:
    """Close the aiohttp session of an asynchronous fsspec instance (fsspec only does that for
    synchronous ones; s3fs: its client's); it lives in zarr's event loop. If that loop is gone (interpreter exit),
    drop the connector directly, as fsspec itself does."""
    client = getattr(afs, "_s3", None)  # s3fs: its aiobotocore client holds the aiohttp session
    session = getattr(afs, "_session", None)
    if client is None and (session is None or session.closed):
        return
    zarr_loop = zarr_sync.loop[0]
    # collected on zarr's own thread (a garbage collection there) it cannot wait for the loop: force it
    io_thread = zarr_sync.iothread[0]
    if zarr_loop is not None and zarr_loop.is_running() and threading.current_thread() is not io_thread:
        try:
            sync(client.close() if client is not None else session.close(), timeout=5)
            if client is not None:
                afs._s3 = None
            return
        except Exception:  # noqa: BLE001 - fall through to the forced close
            pass
    if session is None:
        return
    connector = getattr(session, "_connector", None)
    if connector is not None:
        connector._close()


def load_manifest(fs: fsspec.AbstractFileSystem, root: str, url: str) -> Manifest:
    where = f"{url}/{MANIFEST_NAME}"
    try:
        if isinstance(fs, LocalFileSystem):
            text = safety.read_regular(f"{root}/{MANIFEST_NAME}", safety.MAX_MANIFEST_BYTES, where)
        else:  # bounded: a server may answer with an endless body
            text = read_capped(fs, f"{root}/{MANIFEST_NAME}", safety.MAX_MANIFEST_BYTES, where)
    except NotADirectoryError as e:  # a local path that is a file (or under one)
        raise CacheFormatError(f"{url}: not a cache folder ({local_folder_problem(root) or e}); give the folder "
                               f"that holds manifest.json") from e
    except FileNotFoundError as e:
        if not _exists(fs, root):
            raise CacheFormatError(f"{url}: no cache here (the directory does not exist)") from e
        raise CacheFormatError(
            f"{where}: missing, so the cache is incomplete (manifest.json is written last: the extraction did "
            f"not finish, or the copy/upload is partial). Finish or re-run the extraction, or copy the cache again") from e
    return Manifest.from_json(text, source=where)


def _exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    try:
        return fs.exists(path)
    except Exception:  # noqa: BLE001 - some servers refuse directory probes; assume it exists
        return True


PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})$")


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def part_dir(out: str | os.PathLike, index: int, count: int) -> str:
    return os.path.join(os.fspath(out), part_name(index, count))


def find_parts(fs: fsspec.AbstractFileSystem, root: str, url: str) -> list[str] | None:
    """Names of the part directories under `root`, in part order; None when there are none. Raises when
    the set is incomplete or mixes part counts."""
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except Exception:  # noqa: BLE001 - not a directory, or a server without listings
        return None
    found = {n: PART_RE.match(n) for n in names}
    parts = sorted(n for n, m in found.items() if m)
    if not parts:
        return None
    counts = {int(found[n].group(2)) for n in parts}  # type: ignore[union-attr]
    if len(counts) != 1:
        raise CacheFormatError(f"{url}: parts of different part counts ({', '.join(parts)}); a cache's parts come "
                               f"from one `--num-shards` value: move the others away")
    n = counts.pop()
    missing = [part_name(i, n) for i in range(n) if part_name(i, n) not in parts]
    if missing:
        raise CacheFormatError(f"{url}: {len(missing)} of {n} parts missing ({', '.join(missing[:5])}); run their "
                               f"extraction jobs (`--num-shards {n} --shard-index i`) before reading the cache")
    return parts


def locate(fs: fsspec.AbstractFileSystem, root: str, url: str) -> Manifest | list[str]:
    """The manifest of the single cache at `root`, or the names of its parts (a cache written with
    `--num-shards`, docs/cache-format.md "Parts"). Raises CacheFormatError when it is neither: the
    manifest's error, or why the set of parts is incomplete."""
    try:
        return load_manifest(fs, root, url)
    except CacheFormatError:
        names = find_parts(fs, root, url)
        if names is None:
            raise
        return names
