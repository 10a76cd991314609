"""Remote filesystems: retrying, and bounded in what they read.

Every read the reader and `verify` make goes through an fsspec filesystem from `url_to_fs`. For
remote protocols (http(s), s3, gs, ...) that filesystem is the protocol's own class with a thin
retry layer on top (io/retry.py): every request it sends (whole-file and ranged reads, HEAD/size
probes, listings, downloads, and the block fetches of files opened with `fs.open`) is retried on
transient errors.

A server is not trusted to send what was asked: `get_capped_async` is the one HTTP GET that reads an
untrusted body, streamed and refused past its bound (a range's length when the server answers the
range, the file's limit when it ignores Range and sends the whole file with 200), so an endless or
oversized answer costs at most the bound plus one block. Every whole-file or ranged read of a cache
file over HTTP (`read_capped*`, `download_capped`, the zarr store's shard reads, mirror downloads)
goes through it. When the manifest lists the file's size (`extra.sizes`), that size is the bound,
and a file size the server states or a whole-file body that differs from it is refused
(`size_mismatch`): an endless answer then costs at most the file's listed size plus one block.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.asyn import sync
from fsspec.core import split_protocol
from fsspec.implementations.local import LocalFileSystem

from ..format.manifest import CacheFormatError
from .retry import RetryPolicy, retry_async, retry_call

__all__ = ["changed_error", "download_capped", "etag_of", "get_capped_async", "is_http", "is_s3", "read_capped",
           "read_capped_async", "read_s3_if_match", "retrying_class", "size_mismatch", "too_big", "url_to_fs"]

# packages fsspec needs per protocol (its own message does not say how credentials are found)
_PACKAGES = {"s3": ("s3fs", "credentials: AWS_PROFILE / AWS_ACCESS_KEY_ID, or storage_options={'anon': True} "
                            "for public buckets"),
             "s3a": ("s3fs", "credentials as for s3://"),
             "gs": ("gcsfs", "credentials: GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default "
                             "login`, or storage_options={'token': 'anon'} for public buckets"),
             "gcs": ("gcsfs", "credentials as for gs://"),
             "az": ("adlfs", "credentials: storage_options account_name/account_key or AZURE_* variables"),
             "abfs": ("adlfs", "credentials as for az://"),
             "hf": ("huggingface_hub", "credentials: HF_TOKEN")}
_BLOCK = 1 << 20  # bytes handed on at a time while a body streams in


# ---- retrying filesystems ------------------------------------------------------------------------

class _RetryingMixin:
    """Put in front of an fsspec filesystem class: retries every read request (see the module doc)."""

    _genrecal_base: type

    def __init__(self, *args: Any, genrecal_retry: RetryPolicy | None = None, **kwargs: Any) -> None:
        self.genrecal_retry = genrecal_retry or RetryPolicy()
        super().__init__(*args, **kwargs)

    def __reduce__(self):  # the class may be made at run time: rebuild it from the base class
        return _make_retrying, (self._genrecal_base, self.storage_args, self.storage_options)

    def _where(self, path: str) -> str:
        try:
            return self.unstrip_protocol(path)
        except Exception:  # noqa: BLE001 - only used in messages
            return str(path)

    def _open(self, path, mode="rb", *args, **kwargs):
        f = super()._open(path, mode, *args, **kwargs)
        cache = getattr(f, "cache", None)
        fetch = getattr(cache, "fetcher", None)
        if "r" in mode and fetch is not None:  # block reads of buffered files (parquet via fs.open)
            where, policy = self._where(path), self.genrecal_retry
            if is_http(self):  # fsspec reads a 206 answer whole, however long: bounded instead
                fetch = functools.partial(_fetch_block, self, path, where, f.kwargs.get("headers"))
            cache.fetcher = lambda start, end: retry_call(policy, f"{where} [bytes {start}-{end}]",
                                                          lambda: fetch(start, end))
        return f


def _fetch_block(fs: Any, path: str, where: str, headers: dict[str, str] | None, start: int, end: int) -> bytes:
    """Bytes [start, end) of an HTTP file opened with `fs.open`, refused past their length. A server
    that answers with the whole file (Range ignored) raises ValueError, as fsspec does, so that
    callers read the file whole instead (io/locate.py `open_parquet`)."""
    if start >= end:
        return b""
    chunks: list[bytes] = []

    def begin(ranged: bool, total: int | None) -> None:
        if not ranged and (start > 0 or total is None or total > end - start):
            raise ValueError(f"{where}: the HTTP server doesn't appear to support range requests")
    try:
        sync(fs.loop, get_capped_async, fs, path, end - start, where, chunks.append, start=start, end=end,
             headers=headers, begin=begin)
    except Exception as e:  # noqa: BLE001 - fsspec's answer to a range past the end of the file
        if getattr(e, "status", None) == 416:
            return b""
        raise
    return b"".join(chunks)


class _AsyncRetrying(_RetryingMixin):
    def info_cancellable(self, path: str, cancelled: Callable[[], bool] | None) -> dict[str, Any]:
        """`info`, whose retries stop once `cancelled()` is True (io/download.py)."""
        return sync(self.loop, retry_async, self.genrecal_retry, self._where(path),
                    lambda: super(_AsyncRetrying, self)._info(path), cancelled)

    async def _cat_file(self, path, start=None, end=None, **kw):
        return await retry_async(self.genrecal_retry, self._where(path),
                                 lambda: super(_AsyncRetrying, self)._cat_file(path, start=start, end=end, **kw))

    async def _get_file(self, rpath, lpath, **kw):
        return await retry_async(self.genrecal_retry, self._where(rpath),
                                 lambda: super(_AsyncRetrying, self)._get_file(rpath, lpath, **kw))

    async def _info(self, path, **kw):
        return await retry_async(self.genrecal_retry, self._where(path),
                                 lambda: super(_AsyncRetrying, self)._info(path, **kw))

    async def _ls(self, path, detail=True, **kw):
        return await retry_async(self.genrecal_retry, self._where(path),
                                 lambda: super(_AsyncRetrying, self)._ls(path, detail=detail, **kw))


class _SyncRetrying(_RetryingMixin):
    def cat_file(self, path, start=None, end=None, **kw):
        return retry_call(self.genrecal_retry, self._where(path),
                          lambda: super(_SyncRetrying, self).cat_file(path, start=start, end=end, **kw))

    def get_file(self, rpath, lpath, *args, **kw):
        return retry_call(self.genrecal_retry, self._where(rpath),
                          lambda: super(_SyncRetrying, self).get_file(rpath, lpath, *args, **kw))

    def info(self, path, **kw):
        return retry_call(self.genrecal_retry, self._where(path), lambda: super(_SyncRetrying, self).info(path, **kw))

    def ls(self, path, detail=True, **kw):
        return retry_call(self.genrecal_retry, self._where(path),
                          lambda: super(_SyncRetrying, self).ls(path, detail=detail, **kw))


@functools.lru_cache(maxsize=None)
def retrying_class(base: type) -> type:
    mixin = _AsyncRetrying if getattr(base, "async_impl", False) else _SyncRetrying
    own = {"retries": 1} if is_s3(base) else {}  # s3fs: one try per request, retried by the genrecal layer
    return type(f"Retrying{base.__name__}", (mixin, base), {"_genrecal_base": base, "__module__": __name__, **own})


def _make_retrying(base: type, args: tuple, kwargs: dict) -> fsspec.AbstractFileSystem:
    return retrying_class(base)(*args, **kwargs)


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None, **kwargs: Any
              ) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URL; remote ones retry transient errors.

    A protocol whose package is missing (s3fs for s3://, gcsfs for gs://) raises ImportError saying
    what to install. `kwargs` go to the filesystem (e.g. asynchronous=True)."""
    policy, options = RetryPolicy.from_options(storage_options)
    protocol = split_protocol(url)[0] or "file"
    if "::" in url:  # an explicit fsspec chain (e.g. simplecache::https://...): as the user wrote it
        return fsspec.core.url_to_fs(url, **options, **kwargs)
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        package, how = _PACKAGES.get(protocol, (None, ""))
        need = f"the `{package}` package: pip install {package}" if package else f"an fsspec backend ({e})"
        raise ImportError(f"{url}: reading {protocol}:// URLs needs {need}" + (f" ({how})" if how else "")) from e
    except ValueError as e:
        raise ValueError(f"{url}: unknown protocol {protocol!r} ({e})") from None
    if issubclass(cls, LocalFileSystem):
        return fsspec.core.url_to_fs(url, **options, **kwargs)
    options = {**cls._get_kwargs_from_urls(url), **options, **kwargs}
    if is_http(cls) and policy.read_timeout and "timeout" not in options.get("client_kwargs", {}):
        # aiohttp's default is 5 minutes for a whole answer, so a server that sends headers and then
        # nothing held a reader ~30 minutes over the retries; a stall now fails (and is retried) in seconds
        import aiohttp

        t = policy.read_timeout
        options["client_kwargs"] = {**options.get("client_kwargs", {}),
                                    "timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)}
    if is_s3(cls):
        options = _s3_options(options, policy)
    return retrying_class(cls)(genrecal_retry=policy, **options), cls._strip_protocol(url)


def _s3_options(options: dict[str, Any], policy: RetryPolicy) -> dict[str, Any]:
    """s3fs: botocore gets the same read timeout as HTTP (its default of 60 s per attempt, times its own
    retries and s3fs's, held a reader over an hour on a stalled connection), and few retries of its own:
    the genrecal retry layer retries on top (unless storage_options set `config_kwargs`); s3fs's own retry
    loop is off in `retrying_class`."""
    config = dict(options.get("config_kwargs") or {})
    if policy.read_timeout:
        config.setdefault("connect_timeout", policy.read_timeout)
        config.setdefault("read_timeout", policy.read_timeout)
    config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
    return {**options, "config_kwargs": config}


def is_s3(fs_or_cls: Any) -> bool:
    cls = fs_or_cls if isinstance(fs_or_cls, type) else type(fs_or_cls)
    return "s3" in (cls.protocol if isinstance(cls.protocol, (tuple, list)) else (cls.protocol,))


def is_http(fs_or_cls: Any) -> bool:
    from fsspec.implementations.http import HTTPFileSystem

    cls = fs_or_cls if isinstance(fs_or_cls, type) else type(fs_or_cls)
    return issubclass(cls, HTTPFileSystem)


def etag_of(info: dict[str, Any]) -> str | None:
    """The version tag a server gave a file (HTTP `ETag`, as nginx, Apache, S3 and GCS send it)."""
    tag = info.get("ETag") or info.get("etag")
    return tag if isinstance(tag, str) and tag else None


def changed_error(e: BaseException, where: str) -> CacheFormatError | None:
    """CacheFormatError if `e` (or its cause) is an HTTP 412: the file no longer has the ETag this run
    first saw (requests carry `If-Match`; S3: GetObject `IfMatch`), i.e. it was replaced on the server
    during the run."""
    for _ in range(4):
        if e is None:
            return None
        response = getattr(e, "response", None)  # botocore ClientError (s3fs): GetObject with IfMatch
        s3_status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
        if 412 in (getattr(e, "status", None), s3_status):
            return CacheFormatError(f"{where}: changed on the server since this run first read it (its ETag no "
                                    f"longer matches); the cache was replaced while in use, and a run must not mix "
                                    f"two versions. Restart the run (publish new versions under a new name)")
        e = e.__cause__ or e.__context__
    return None


# ---- bounded reads -------------------------------------------------------------------------------

def too_big(where: str, limit: int, what: str = "this file") -> CacheFormatError:
    return CacheFormatError(f"{where}: larger than the {limit}-byte limit for {what} (an endless, oversized or "
                            f"hostile answer); the server or the cache is broken: re-download or re-extract the "
                            f"cache, or read it from another server")


def size_mismatch(where: str, got: int, size: int, how: str) -> CacheFormatError:
    """A file whose size, as `how` states it ("the server sent", "the file has"), is not the manifest's."""
    return CacheFormatError(f"{where}: size mismatch ({how} {got} bytes, the manifest lists {size}): this copy is "
                            f"truncated, corrupt or from another version of the cache; re-download the cache (or "
                            f"read it from another server; its publisher must upload it again), or re-extract it")


def _range_header(start: int | None, end: int | None) -> str:
    if start is not None and start < 0:  # a suffix: the last -start bytes
        return f"bytes={start}"
    return f"bytes={start or 0}-" + ("" if end is None else str(end - 1))


def _total_size(content_range: str | None) -> int | None:
    """N of `Content-Range: bytes a-b/N` (None when absent or `*`)."""
    total = (content_range or "").rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def _asked(start: int | None, end: int | None, limit: int) -> int:
    """Most bytes a server may send for the range [start, end) of a file of at most `limit` bytes."""
    if start is not None and start < 0:
        return min(-start, limit)
    return min(limit, end if end is not None else limit) - (start or 0)


async def get_capped_async(afs: fsspec.AbstractFileSystem, url: str, limit: int, where: str,
                           write: Callable[[bytes], None], *, start: int | None = None, end: int | None = None,
                           headers: dict[str, str] | None = None,
                           begin: Callable[[bool, int | None], None] | None = None, size: int | None = None) -> int:
    """One HTTP GET of `url` (bytes [start, end) when either is given; a negative start is a suffix),
    its body handed to `write` block by block and refused past what was asked: the range's length
    when the server answers it (206), `limit` when it sends the whole file instead (200, Range
    ignored). `size`: the file's exact size when the manifest lists it (then `limit` is that size): a
    file size the answer states (Content-Length of a whole file, Content-Range's total) or a whole
    file's body that differs from it is refused (`size_mismatch`). `begin(ranged, the file's size if
    the answer says it)` is called before the first block. Returns the bytes received. 404 is
    FileNotFoundError; other statuses raise aiohttp's ClientResponseError (retried by the caller)."""
    kw = dict(afs.kwargs)
    hdrs = {**kw.pop("headers", {}), **(headers or {})}
    ranged_request = start is not None or end is not None
    if ranged_request:
        hdrs["Range"] = _range_header(start, end)
    session = await afs.set_session()
    async with session.get(afs.encode_url(url), headers=hdrs, **kw) as r:
        if r.status == 404:
            raise FileNotFoundError(url)
        r.raise_for_status()
        ranged = ranged_request and r.status == 206
        cap, what = ((_asked(start, end, limit), f"the range asked for ({hdrs['Range']})") if ranged
                     else (limit, "this file" + (", its size in the manifest" if size is not None else "")))
        declared = r.content_length if "Content-Encoding" not in r.headers else None
        total = _total_size(r.headers.get("Content-Range")) if ranged else declared
        if size is not None and total is not None and total != size:  # before a byte of the body is read
            raise size_mismatch(where, total, size, "the server says the file has")
        if begin is not None:  # first: it may turn a whole-file answer into a fallback (`_fetch_block`)
            begin(ranged, total)
        if declared is not None and declared > cap:
            raise too_big(where, cap, what)
        n = 0
        async for block in r.content.iter_chunked(_BLOCK):
            n += len(block)
            if n > cap:
                raise too_big(where, cap, what)
            write(block)
    if size is not None and not ranged and n != size:  # the whole file, ended early
        raise size_mismatch(where, n, size, "the server sent")
    return n


async def read_capped_async(afs: fsspec.AbstractFileSystem, path: str, limit: int, where: str, *,
                            start: int | None = None, end: int | None = None, headers: dict[str, str] | None = None,
                            cancelled: Callable[[], bool] | None = None, size: int | None = None) -> bytes:
    """The file, or its bytes [start, end), refused past `limit` bytes (a whole file; a range: its
    length) without reading further; retried like every read. Over HTTP a server that ignores Range
    answers with the whole file (up to `limit`): callers slice it. Object stores (s3, gs) report a
    true size, checked first. `size`: the exact size the manifest lists (`get_capped_async`)."""
    if not is_http(afs):
        whole = start is None and end is None
        if whole:
            _check_stated_size(await afs._size(path), limit, size, where)
        data = await afs._cat_file(path, start=start, end=end, **({"headers": headers} if headers else {}))
        if whole and size is not None and len(data) != size:
            raise size_mismatch(where, len(data), size, "the file has")
        return data

    async def get() -> bytes:
        chunks: list[bytes] = []
        await get_capped_async(afs, path, limit, where, chunks.append, start=start, end=end, headers=headers, size=size)
        return b"".join(chunks)
    return await retry_async(getattr(afs, "genrecal_retry", RetryPolicy()), where, get, cancelled)


def _check_stated_size(stated: int | None, limit: int, size: int | None, where: str) -> None:
    """A size an object store or local filesystem reports: the listed `size` when known, within `limit`."""
    if stated is None:
        return
    if size is not None and stated != size:
        raise size_mismatch(where, stated, size, "the file has")
    if stated > limit:
        raise too_big(where, limit)


async def read_s3_if_match(afs: fsspec.AbstractFileSystem, path: str, tag: str | None, limit: int, where: str, *,
                           start: int | None = None, end: int | None = None) -> bytes:
    """Bytes [start, end) (start < 0: the last -start bytes) of an S3 object while it still has the ETag
    `tag` (a replaced object answers 412, `changed_error`), refused past `limit` bytes; retried."""
    bucket, key, _ = afs.split_path(path)
    kw: dict[str, Any] = {"IfMatch": tag} if tag else {}
    if start is not None or end is not None:
        kw["Range"] = f"bytes=-{-start}" if start is not None and start < 0 else f"bytes={start or 0}-" + (
            "" if end is None else str(end - 1))

    async def get() -> bytes:
        answer = await afs._call_s3("get_object", Bucket=bucket, Key=key, **kw)
        try:
            if (answer.get("ContentLength") or 0) > limit:
                raise too_big(where, limit)
            return await answer["Body"].read()
        finally:
            answer["Body"].close()
    return await retry_async(getattr(afs, "genrecal_retry", RetryPolicy()), where, get)


def read_capped(fs: fsspec.AbstractFileSystem, path: str, limit: int, where: str, *, start: int | None = None,
                end: int | None = None, headers: dict[str, str] | None = None, size: int | None = None) -> bytes:
    """`read_capped_async` for a synchronous filesystem."""
    if not is_http(fs):
        whole = start is None and end is None
        if whole:
            _check_stated_size(fs.size(path), limit, size, where)
        data = fs.cat_file(path, start=start, end=end)
        if whole and size is not None and len(data) != size:
            raise size_mismatch(where, len(data), size, "the file has")
        return data
    return sync(fs.loop, read_capped_async, fs, path, limit, where, start=start, end=end, headers=headers, size=size)


def download_capped(fs: fsspec.AbstractFileSystem, path: str, local: str, limit: int, where: str,
                    size: int | None = None) -> None:
    """Copy the file to `local`, refused past `limit` bytes (streamed to disk over HTTP; retried), and
    unless it has exactly `size` bytes when the manifest lists its size."""
    if not is_http(fs):
        _check_stated_size(fs.size(path), limit, size, where)
        fs.get_file(path, local)
        if size is not None and os.path.getsize(local) != size:
            raise size_mismatch(where, os.path.getsize(local), size, "the file has")
        return

    async def get() -> None:
        with open(local, "wb") as out:  # a retry starts the file again
            await get_capped_async(fs, path, limit, where, out.write, size=size)
    sync(fs.loop, retry_async, getattr(fs, "genrecal_retry", RetryPolicy()), where, get)
