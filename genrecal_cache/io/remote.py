"""Remote caches: retries on transient errors, a local read-through cache, and `pull`.

Every read the reader and `verify` make goes through an fsspec filesystem from `url_to_fs`. For
remote protocols (http(s), s3, gs, ...) that filesystem is the protocol's own class with a thin
retry layer on top: every request it sends (whole-file and ranged reads, HEAD/size probes,
listings, downloads, and the block fetches of files opened with `fs.open`) is retried on transient
errors -- connection refused/reset/dropped, truncated bodies, timeouts, HTTP 408/425/429/5xx --
with exponential backoff and jitter. When the attempts run out it raises `RemoteReadError`
naming the URL. The policy comes from storage_options (`genrecal_retries`,
`genrecal_retry_backoff`, `genrecal_retry_max_backoff`; popped before fsspec sees them) or the
environment (`GENRECAL_RETRIES`, `GENRECAL_RETRY_BACKOFF`); default 5 retries from 0.5 s,
doubling, at most 20 s apart.

`Mirror` copies the files a manifest lists into a local folder, each one verified against its
sha256 before it becomes visible (written to `<file>.part`, renamed when complete); partial files
are resumed. `TeacherCache.open(url, local_cache=DIR)` reads through a mirror under DIR, so every
file is downloaded once, on first use; `pull(url, DIR)` mirrors a whole cache eagerly.

Long because retries, the retrying filesystem classes, capped/If-Match reads and mirrors share
`RetryPolicy` and `RemoteReadError`; finding a cache is io/locate.py, `pull` io/pull.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import split_protocol
from fsspec.implementations.local import LocalFileSystem

from .durable import atomic_write, rename_durable
from ..format.manifest import MANIFEST_NAME, CacheFormatError, Manifest, relpath_problem, sha256_bytes

__all__ = ["DOWNLOAD_BLOCK", "Mirror", "MirrorFileSystem", "RemoteReadError", "RetryPolicy", "changed_error",
           "complete_mirror", "download", "download_capped", "etag_of", "is_http", "is_transient", "mirror_key",
           "read_capped", "read_capped_async", "read_through", "retry_async", "retry_call", "retrying_class",
           "safe_relpath", "url_to_fs"]

log = logging.getLogger("genrecal.remote")

ENV_RETRIES, ENV_BACKOFF, ENV_READ_TIMEOUT = "GENRECAL_RETRIES", "GENRECAL_RETRY_BACKOFF", "GENRECAL_READ_TIMEOUT"
_OPTIONS = {"genrecal_retries": "retries", "genrecal_retry_backoff": "backoff",
            "genrecal_retry_max_backoff": "max_backoff", "genrecal_read_timeout": "read_timeout"}
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
DOWNLOAD_BLOCK = 16 << 20  # bytes per ranged request when mirroring a file


class RemoteReadError(RuntimeError):
    """A remote read kept failing after every retry: the server or the network is at fault, not the cache."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5             # attempts after the first one
    backoff: float = 0.5         # seconds before the first retry; doubles after each
    max_backoff: float = 20.0    # ceiling of one wait
    read_timeout: float = 30.0   # HTTP(S): seconds to connect, and between two reads of an answer (0: none)

    def delays(self) -> list[float]:
        return [min(self.max_backoff, self.backoff * 2 ** k) * random.uniform(0.8, 1.2) for k in range(self.retries)]

    @classmethod
    def from_options(cls, storage_options: dict[str, Any] | None) -> tuple[RetryPolicy, dict[str, Any]]:
        """The policy (storage_options keys, else environment, else defaults) and the options left for fsspec."""
        options = dict(storage_options or {})
        values: dict[str, Any] = {}
        if os.environ.get(ENV_RETRIES):
            values["retries"] = os.environ[ENV_RETRIES]
        if os.environ.get(ENV_BACKOFF):
            values["backoff"] = os.environ[ENV_BACKOFF]
        if os.environ.get(ENV_READ_TIMEOUT):
            values["read_timeout"] = os.environ[ENV_READ_TIMEOUT]
        for key, name in _OPTIONS.items():
            if key in options:
                values[name] = options.pop(key)
        try:
            policy = cls(retries=int(values.get("retries", cls.retries)),
                         backoff=float(values.get("backoff", cls.backoff)),
                         max_backoff=float(values.get("max_backoff", cls.max_backoff)),
                         read_timeout=float(values.get("read_timeout", cls.read_timeout)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid retry setting {values} ({ENV_RETRIES}/{ENV_BACKOFF}/{ENV_READ_TIMEOUT} or "
                             f"storage_options {sorted(_OPTIONS)}): {e}") from None
        if min(policy.retries, policy.backoff, policy.max_backoff, policy.read_timeout) < 0:
            raise ValueError(f"retry settings must be >= 0, got {policy}")
        return policy, options


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection trouble, timeouts, truncated bodies, 408/425/429/5xx.

    fsspec's HTTP size probe turns every failure into FileNotFoundError; its cause tells them apart."""
    import aiohttp

    e: BaseException | None = exc
    for _ in range(4):
        if e is None or isinstance(e, RemoteReadError):
            return False
        status = getattr(e, "status", None)
        if not isinstance(status, int):
            status = getattr(e, "code", None)  # gcsfs HttpError, urllib HTTPError
        if isinstance(status, int) and not isinstance(status, bool) and (status in (408, 425, 429)
                                                                          or 500 <= status < 600):
            return True
        if isinstance(e, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError,
                          TimeoutError, asyncio.TimeoutError)):
            return True
        if isinstance(e, aiohttp.ClientResponseError):
            return False
        e = e.__cause__
    return False


def _describe(e: BaseException) -> str:
    text = str(e) or repr(e)
    cause = e.__cause__
    if isinstance(e, FileNotFoundError) and cause is not None:
        text = f"{type(cause).__name__}: {cause}"
    return f"{type(e).__name__}: {text}"[:300]


def _give_up(where: str, attempts: int, started: float, last: BaseException) -> RemoteReadError:
    return RemoteReadError(f"{where}: still failing after {attempts} attempts over {time.monotonic() - started:.1f}s "
                           f"(last error {_describe(last)}); the server or network is unavailable. Try again later, "
                           f"or raise {ENV_RETRIES} / storage_options genrecal_retries")


def _retry_delay(e: Exception, where: str, attempt: int, delays: list[float], started: float) -> float:
    """Seconds to wait before retrying after failure number `attempt` (0-based); raises `e` when it is not
    transient, and RemoteReadError when the retries are spent."""
    if not is_transient(e):
        raise e
    if attempt == len(delays):
        raise _give_up(where, attempt + 1, started, e) from e
    log.warning("%s: %s; retry %d/%d in %.1fs", where, _describe(e), attempt + 1, len(delays), delays[attempt])
    return delays[attempt]


def retry_call(policy: RetryPolicy, where: str, fn: Callable[[], Any]) -> Any:
    """`fn()` with retries on transient errors (synchronous callers)."""
    started, delays = time.monotonic(), policy.delays()
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified by _retry_delay
            time.sleep(_retry_delay(e, where, attempt, delays, started))


async def retry_async(policy: RetryPolicy, where: str, fn: Callable[[], Any]) -> Any:
    """`await fn()` with retries on transient errors."""
    started, delays = time.monotonic(), policy.delays()
    for attempt in range(len(delays) + 1):
        try:
            return await fn()
        except Exception as e:  # noqa: BLE001 - classified by _retry_delay
            await asyncio.sleep(_retry_delay(e, where, attempt, delays, started))


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
            cache.fetcher = lambda start, end: retry_call(policy, f"{where} [bytes {start}-{end}]",
                                                          lambda: fetch(start, end))
        return f


class _AsyncRetrying(_RetryingMixin):
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
    return type(f"Retrying{base.__name__}", (mixin, base), {"_genrecal_base": base, "__module__": __name__})


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
    return retrying_class(cls)(genrecal_retry=policy, **options), cls._strip_protocol(url)


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
    first saw (requests carry `If-Match`), i.e. it was replaced on the server during the run."""
    for _ in range(4):
        if e is None:
            return None
        if getattr(e, "status", None) == 412:
            return CacheFormatError(f"{where}: changed on the server since this run first read it (its ETag no "
                                    f"longer matches); the cache was replaced while in use, and a run must not mix "
                                    f"two versions. Restart the run (publish new versions under a new name)")
        e = e.__cause__ or e.__context__
    return None


def _too_big(where: str, limit: int) -> CacheFormatError:
    return CacheFormatError(f"{where}: larger than the {limit}-byte limit for this file (an endless or hostile "
                            f"answer); the server or the cache is broken, re-download or re-extract the cache")


def read_capped(fs: fsspec.AbstractFileSystem, path: str, limit: int, where: str) -> bytes:
    """The whole file, refused past `limit` bytes without reading further (retried like every read). Over
    HTTP the body is streamed, so a server sending an endless answer costs `limit` bytes, not all memory;
    object stores (s3, gs) report a true size, checked first."""
    policy = getattr(fs, "genrecal_retry", RetryPolicy())
    if not is_http(fs):
        size = fs.size(path)
        if size is not None and size > limit:
            raise _too_big(where, limit)
        return fs.cat_file(path)

    def stream() -> bytes:
        chunks, n = [], 0
        with fs.open(path, "rb", block_size=0, size=limit) as f:  # a stream: no size probe, no Range
            while block := f.read(min(1 << 20, limit + 1 - n)):
                chunks.append(block)
                n += len(block)
                if n > limit:
                    raise _too_big(where, limit)
        return b"".join(chunks)
    return retry_call(policy, where, stream)


def download_capped(fs: fsspec.AbstractFileSystem, path: str, local: str, limit: int, where: str) -> None:
    """Copy the file to `local`, refused past `limit` bytes (streamed over HTTP; retried)."""
    if not is_http(fs):
        size = fs.size(path)
        if size is not None and size > limit:
            raise _too_big(where, limit)
        fs.get_file(path, local)
        return

    def stream() -> None:
        n = 0
        with fs.open(path, "rb", block_size=0, size=limit) as f, open(local, "wb") as out:
            while block := f.read(8 << 20):
                n += len(block)
                if n > limit:
                    raise _too_big(where, limit)
                out.write(block)
    retry_call(getattr(fs, "genrecal_retry", RetryPolicy()), where, stream)


async def read_capped_async(afs: fsspec.AbstractFileSystem, path: str, limit: int, where: str) -> bytes:
    """`read_capped` for an asynchronous filesystem (zarr's store)."""
    policy = getattr(afs, "genrecal_retry", RetryPolicy())
    if not is_http(afs):
        size = await afs._size(path)
        if size is not None and size > limit:
            raise _too_big(where, limit)
        return await afs._cat_file(path)

    async def stream() -> bytes:
        chunks, n = [], 0
        f = await afs.open_async(path, "rb", size=limit)  # size given: no probe first
        try:
            while block := await f.read(min(1 << 20, limit + 1 - n)):
                chunks.append(block)
                n += len(block)
                if n > limit:
                    raise _too_big(where, limit)
        finally:
            await f.close()
        return b"".join(chunks)
    return await retry_async(policy, where, stream)


# ---- mirrors: local read-through cache and pull ----------------------------------------------------

def safe_relpath(rel: str) -> str:
    """`rel` if it is a plain relative path inside a cache folder; CacheFormatError otherwise."""
    problem = relpath_problem(rel)
    if problem:
        raise CacheFormatError(f"path {rel!r:.100} is not a file inside the cache: {problem}")
    return rel


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive lock between processes (and threads) downloading the same file."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; downloads are still atomic (rename), at worst duplicated
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Mirror:
    """Local copies of a remote cache's files under `local_dir`, each verified against the manifest."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str, manifest: Manifest, local_dir: str,
                 lock_dir: str | None = None) -> None:
        self.fs, self.root, self.url, self.manifest = fs, root.rstrip("/"), url.rstrip("/"), manifest
        self.local_dir = os.path.abspath(local_dir)
        self.lock_dir = lock_dir
        os.makedirs(self.local_dir, exist_ok=True)
        if lock_dir:
            os.makedirs(lock_dir, exist_ok=True)
        self._missing = sum(not self.present(rel) for rel in manifest.checksums) if lock_dir else -1

    def __repr__(self) -> str:
        return f"Mirror({self.url!r} -> {self.local_dir!r})"

    def local(self, rel: str) -> str:
        path = os.path.join(self.local_dir, *safe_relpath(rel).split("/"))
        if os.path.commonpath([self.local_dir, os.path.abspath(path)]) != self.local_dir:  # belt and braces
            raise CacheFormatError(f"{rel!r}: resolves outside {self.local_dir}")
        return path

    def rel(self, local_path: str) -> str | None:
        """The cache-relative name of a path inside the mirror folder (None outside it)."""
        p = os.path.abspath(local_path)
        if p == self.local_dir or os.path.commonpath([self.local_dir, p]) != self.local_dir:
            return None
        return os.path.relpath(p, self.local_dir).replace(os.sep, "/")

    def present(self, rel: str) -> bool:
        return os.path.isfile(self.local(rel))

    def ensure(self, rel: str) -> str:
        """Local path of `rel`, downloading and verifying it first if needed. FileNotFoundError for
        a file the manifest does not list (nothing else is ever fetched)."""
        path = self.local(rel)
        if os.path.isfile(path):
            return path
        expected = self.manifest.checksums.get(rel)
        if expected is None:
            raise FileNotFoundError(f"{self.url}/{rel}: not listed in the manifest")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock = (os.path.join(self.lock_dir, sha256_bytes(path.encode())[:32] + ".lock") if self.lock_dir else None)
        with _file_lock(lock) if lock else contextlib.nullcontext():
            if not os.path.isfile(path):  # another process may have finished it while we waited
                download(self.fs, f"{self.root}/{rel}", path, expected, f"{self.url}/{rel}")
                self._missing -= 1
                if self._missing == 0:  # the last file: the folder is now a complete local cache
                    complete_mirror(self)
        return path


def download(fs: fsspec.AbstractFileSystem, rpath: str, path: str, sha256: str, where: str) -> int:
    """Copy `rpath` to `path` if its sha256 matches; resumes a `<path>.part` left by an earlier try.
    Returns the bytes transferred. The file appears under `path` only once verified."""
    part = path + ".part"
    h, have = hashlib.sha256(), 0
    if os.path.exists(part):
        with open(part, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
                have += len(block)
    size = fs.size(rpath)
    got = 0
    if size is None:  # the server does not say: one whole download
        fs.get_file(rpath, part)
        with open(part, "rb") as f:
            h = hashlib.sha256()
            while block := f.read(8 << 20):
                h.update(block)
                got += len(block)
    else:
        if have > size:  # a stale partial file of another version: start again
            h, have = hashlib.sha256(), 0
            open(part, "wb").close()
        with open(part, "ab") as out:
            while have < size:
                end = min(have + DOWNLOAD_BLOCK, size)
                data = fs.cat_file(rpath, start=have, end=end)
                if len(data) > end - have:  # the server ignored Range and sent the whole file
                    if len(data) != size:
                        raise RemoteReadError(f"{where}: server sent {len(data)} bytes for a file of {size}")
                    out.seek(0)
                    out.truncate()
                    h, have = hashlib.sha256(), 0
                if not data:
                    raise RemoteReadError(f"{where}: server sent no data for bytes {have}-{end} of {size}")
                out.write(data)
                h.update(data)
                have += len(data)
                got += len(data)
            out.flush()
            os.fsync(out.fileno())
    digest = h.hexdigest()
    if digest != sha256:
        os.remove(part)
        raise CacheFormatError(f"{where}: downloaded file has sha256 {digest}, the manifest says {sha256}: the remote "
                               f"copy is corrupt or changed during the download; run `genrecal-cache verify` on it")
    rename_durable(part, path)
    return got


def mirror_key(manifest_text: bytes | str) -> str:
    """Folder name of a cache inside a local cache directory: its manifest's hash (a changed cache
    gets a new folder, never a mix of old and new files)."""
    return sha256_bytes(manifest_text.encode() if isinstance(manifest_text, str) else manifest_text)[:20]


class MirrorFileSystem(LocalFileSystem):
    """The local folder of a Mirror, filled on demand: reading a listed file downloads it first."""

    cachable = False

    def __init__(self, mirror: Mirror) -> None:
        super().__init__()
        self.mirror = mirror

    def __reduce__(self):
        return MirrorFileSystem, (self.mirror,)

    def local_path(self, path: str) -> str:
        rel = self.mirror.rel(path)
        if rel is not None and rel in self.mirror.manifest.checksums:
            self.mirror.ensure(rel)
        return path

    def _open(self, path, mode="rb", *args, **kwargs):
        if "r" in mode:
            self.local_path(path)
        return super()._open(path, mode, *args, **kwargs)

    def get_file(self, path1, path2, *args, **kwargs):
        self.local_path(path1)
        return super().get_file(path1, path2, *args, **kwargs)

    def info(self, path, **kwargs):
        rel = self.mirror.rel(path)
        if rel is not None and rel in self.mirror.manifest.checksums and not self.mirror.present(rel):
            size = self.mirror.fs.size(f"{self.mirror.root}/{rel}")  # not fetched yet: ask the server
            return {"name": path, "size": size, "type": "file"}
        return super().info(path, **kwargs)

    def zarr_store(self, path: str):
        return _mirror_store(self, path)


def _mirror_store(mfs: MirrorFileSystem, path: str):
    from zarr.storage import LocalStore

    class MirrorStore(LocalStore):
        async def _ensure(self, key: str) -> None:
            await asyncio.to_thread(mfs.local_path, os.path.join(path, key))

        async def get(self, key, prototype=None, byte_range=None):
            await self._ensure(key)
            return await super().get(key, prototype, byte_range)

        async def get_partial_values(self, prototype, key_ranges):
            key_ranges = list(key_ranges)
            await asyncio.gather(*(self._ensure(k) for k in {k for k, _ in key_ranges}))
            return await super().get_partial_values(prototype, key_ranges)

        async def exists(self, key):
            await self._ensure(key)
            return await super().exists(key)

        async def getsize(self, key):
            await self._ensure(key)
            return await super().getsize(key)

    os.makedirs(path, exist_ok=True)
    return MirrorStore(path, read_only=True)


def read_through(fs: fsspec.AbstractFileSystem, root: str, url: str, manifest: Manifest, local_cache: str | os.PathLike
                 ) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root) reading the cache at `url` through a local folder under `local_cache`.

    A local cache is used as it is. A complete mirror (all files fetched, manifest written) is opened
    as a plain local cache."""
    if isinstance(fs, LocalFileSystem):
        return fs, root
    local_cache = os.path.abspath(os.fspath(local_cache))
    text = manifest.to_json()
    folder = os.path.join(local_cache, mirror_key(text))
    if os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
        return LocalFileSystem(), folder
    mirror = Mirror(fs, root, url, manifest, folder, lock_dir=os.path.join(local_cache, ".locks"))
    return MirrorFileSystem(mirror), folder


def complete_mirror(mirror: Mirror) -> bool:
    """Write the manifest into the mirror folder (last, atomically) if every file is there."""
    if not all(mirror.present(rel) for rel in mirror.manifest.checksums):
        return False
    path = os.path.join(mirror.local_dir, MANIFEST_NAME)
    atomic_write(path, mirror.manifest.to_json().encode())
    return True
