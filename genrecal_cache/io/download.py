"""One cache file downloaded to disk: verified, resumable, bounded, cancellable (the read-through
mirror's and `pull`'s).

The file is written to `<file>.part` and renamed when complete and its sha256 matches the manifest,
so it is never visible half-written or wrong; a `.part` left by an earlier try is continued. Over
HTTP each request asks for the next DOWNLOAD_BLOCK bytes and is bounded (io/remote.py): a range by
its length; a whole-file answer (a server that ignores Range) by the file's size in the manifest when
it lists one (a server that states or sends another size is refused, `remote.size_mismatch`), else by
the size the server declares, else by the caller's limit (`safety.file_limit`: what the manifest's
layout allows). `cancelled` is
looked at before every request (the size probe included) and during every wait to retry: a reader
that closes, or whose batch failed, sends nothing more.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import fsspec
from aiohttp import ClientResponseError
from fsspec.asyn import sync

from ..format.manifest import CacheFormatError, sha256_file
from .durable import rename_durable
from .remote import download_capped, get_capped_async, is_http, size_mismatch, too_big
from .retry import ReadCancelled, RemoteReadError, RetryPolicy, retry_call

__all__ = ["DOWNLOAD_BLOCK", "download"]

DOWNLOAD_BLOCK = 16 << 20  # bytes per ranged request


def download(fs: fsspec.AbstractFileSystem, rpath: str, path: str, sha256: str, where: str, limit: int,
             cancelled: Callable[[], bool] | None = None, size: int | None = None) -> int:
    """Copy `rpath` to `path` if its sha256 matches, refusing more than `limit` bytes, and unless it has
    exactly `size` bytes when the manifest lists its size (then `limit` is `size`). Returns the bytes
    transferred by this call. The file appears under `path` only once verified."""
    part = path + ".part"
    if size is not None:
        limit = size
    got = (_fetch_http if is_http(fs) else _fetch_ranges)(fs, rpath, part, limit, where, cancelled, size)
    if size is not None and (n := os.path.getsize(part)) != size:  # cheap, before the hash
        os.remove(part)
        raise size_mismatch(where, n, size, "the download has")
    digest = sha256_file(part)
    if digest != sha256:
        os.remove(part)
        raise CacheFormatError(f"{where}: downloaded file has sha256 {digest}, the manifest says {sha256}: the remote "
                               f"copy is corrupt or changed during the download; run `genrecal-cache verify` on it")
    rename_durable(part, path)
    return got


def _fetch_http(fs: fsspec.AbstractFileSystem, rpath: str, part: str, limit: int, where: str,
                cancelled: Callable[[], bool] | None, listed: int | None) -> int:
    """Append the rest of `rpath` to `part`, one retried request per block; a retry resumes from
    what arrived. Returns the bytes received."""
    policy = getattr(fs, "genrecal_retry", RetryPolicy())
    info = fs.info_cancellable(rpath, cancelled) if hasattr(fs, "info_cancellable") else fs.info(rpath)
    size: int | None = info.get("size")  # what the server declares (else: once an answer says it)
    if listed is not None and size is not None and size != listed:
        raise size_mismatch(where, size, listed, "the server says the file has")
    if size is not None and size > limit:
        raise too_big(where, limit)
    size = listed if listed is not None else size
    got, ranged = 0, True
    with open(part, "ab") as out:
        def restart() -> None:
            out.seek(0)
            out.truncate()

        def begin(is_range: bool, total: int | None) -> None:
            nonlocal size, ranged
            ranged = is_range
            if not ranged:  # the whole file follows (Range ignored): start the part again
                restart()
            if total is not None:
                if total > limit:
                    raise too_big(where, limit)
                size = total

        def write(block: bytes) -> None:
            nonlocal got
            out.write(block)
            got += len(block)

        def request() -> bool:
            """The next block; True once the file is complete."""
            have = out.tell()
            end = have + DOWNLOAD_BLOCK if size is None else min(size, have + DOWNLOAD_BLOCK)
            try:
                n = sync(fs.loop, get_capped_async, fs, rpath, limit if size is None else size, where, write,
                         start=have, end=end, begin=begin, size=listed)
            except ClientResponseError as e:
                if e.status != 416:
                    raise
                if have == 0:  # an empty file
                    return True
                restart()  # a stale part longer than the file
                return False
            return not ranged or out.tell() == size or n < end - have

        if size is not None and out.tell() > size:  # a stale part of another version
            restart()
        while out.tell() != size and not retry_call(policy, where, request, cancelled):
            pass
        out.flush()
        os.fsync(out.fileno())
    return got


def _fetch_ranges(fs: fsspec.AbstractFileSystem, rpath: str, part: str, limit: int, where: str,
                  cancelled: Callable[[], bool] | None, listed: int | None) -> int:
    """Object stores and local paths: they report a true size and honour ranges."""
    size = fs.size(rpath)
    if size is None:  # not said: one whole, bounded download
        download_capped(fs, rpath, part, limit, where, size=listed)
        return os.path.getsize(part)
    if listed is not None and size != listed:
        raise size_mismatch(where, size, listed, "the store says the file has")
    if size > limit:
        raise too_big(where, limit)
    got = 0
    with open(part, "ab") as out:
        if out.tell() > size:  # a stale partial file of another version: start again
            out.seek(0)
            out.truncate()
        while (have := out.tell()) < size:
            if cancelled is not None and cancelled():
                raise ReadCancelled(f"{where}: cancelled (the cache was closed, or another read failed)")
            data = fs.cat_file(rpath, start=have, end=min(have + DOWNLOAD_BLOCK, size))
            if not data or len(data) > DOWNLOAD_BLOCK:
                raise RemoteReadError(f"{where}: asked for bytes {have}-{min(have + DOWNLOAD_BLOCK, size)} of {size}, "
                                      f"got {len(data)}; the store does not serve ranges as it should")
            out.write(data)
            got += len(data)
        out.flush()
        os.fsync(out.fileno())
    return got
