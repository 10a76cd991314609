"""Local copies of a remote cache: the read-through mirror behind `open_cache(url,
local_cache=DIR)` and the folder `pull` fills.

`Mirror` copies the files a manifest lists into a local folder, each one verified against its size
(when the manifest lists sizes) and sha256 before it becomes visible (io/download.py); partial files
are resumed. Read through a `MirrorFileSystem`, every file is downloaded once, on first use, and the
folder becomes a plain local cache (manifest written last) once all files are there. Downloads run
on threads (zarr asks for files from its event loop); a batch whose read failed stops its other
downloads, and `Mirror.close` stops every one still running and waits for them, so nothing is sent
after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..format import safety
from ..format.manifest import MANIFEST_NAME, CacheFormatError, Manifest, relpath_problem, sha256_bytes
from .download import download
from .durable import atomic_write
from .retry import ReadCancelled, join_read

__all__ = ["Mirror", "MirrorFileSystem", "complete_mirror", "mirror_key", "read_through", "safe_relpath"]


def safe_relpath(rel: str) -> str:
    """`rel` if it is a plain relative path inside a cache folder; CacheFormatError otherwise."""
    problem = relpath_problem(rel)
    if problem:
        raise CacheFormatError(f"path {rel!r:.100} is not a file inside the cache: {problem}")
    return rel


def mirror_key(manifest_text: bytes | str) -> str:
    """Folder name of a cache inside a local cache directory: its manifest's hash (a changed cache
    gets a new folder, never a mix of old and new files)."""
    return sha256_bytes(manifest_text.encode() if isinstance(manifest_text, str) else manifest_text)[:20]


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
        self._closing = threading.Event()
        self._active = 0  # downloads running
        self._idle = threading.Condition()

    def __reduce__(self):  # locks and events do not pickle: a copy starts with none running
        return Mirror, (self.fs, self.root, self.url, self.manifest, self.local_dir, self.lock_dir)

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

    def ensure(self, rel: str, stop: threading.Event | None = None) -> str:
        """Local path of `rel`, downloading and verifying it first if needed. FileNotFoundError for
        a file the manifest does not list (nothing else is ever fetched). `stop` (or `close`) set:
        the download ends at its next request or retry wait with ReadCancelled."""
        path = self.local(rel)
        if os.path.isfile(path):
            return path
        expected = self.manifest.checksums.get(rel)
        if expected is None:
            raise FileNotFoundError(f"{self.url}/{rel}: not listed in the manifest")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock = (os.path.join(self.lock_dir, sha256_bytes(path.encode())[:32] + ".lock") if self.lock_dir else None)
        with self._running(f"{self.url}/{rel}"), _file_lock(lock) if lock else contextlib.nullcontext():
            if not os.path.isfile(path):  # another process may have finished it while we waited
                download(self.fs, f"{self.root}/{rel}", path, expected, f"{self.url}/{rel}",
                         safety.file_limit(rel, self.manifest),
                         lambda: self._closing.is_set() or (stop is not None and stop.is_set()),
                         size=self.manifest.sizes.get(rel))
                self._missing -= 1
                if self._missing == 0:  # the last file: the folder is now a complete local cache
                    complete_mirror(self)
        return path

    def remote_size(self, rel: str) -> int | None:
        """The size of `rel`: the manifest's when it lists one (no request), else the one the server
        declares (its retries stop when the mirror closes)."""
        if rel in self.manifest.sizes:
            return self.manifest.sizes[rel]
        rpath = f"{self.root}/{rel}"
        with self._running(f"{self.url}/{rel}"):
            if hasattr(self.fs, "info_cancellable"):
                return self.fs.info_cancellable(rpath, self._closing.is_set).get("size")
            return self.fs.size(rpath)

    @contextlib.contextmanager
    def _running(self, where: str) -> Iterator[None]:
        with self._idle:
            if self._closing.is_set():
                raise ReadCancelled(f"{where}: cancelled (the cache is being closed)")
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def close(self) -> None:
        """Stop the downloads running (each at its next request or retry wait; one request in flight
        ends within the read timeout) and wait for them. The mirror stays usable afterwards."""
        with self._idle:
            self._closing.set()
            self._idle.wait_for(lambda: self._active == 0)
            self._closing.clear()


def complete_mirror(mirror: Mirror) -> bool:
    """Write the manifest into the mirror folder (last, atomically) if every file is there."""
    if not all(mirror.present(rel) for rel in mirror.manifest.checksums):
        return False
    path = os.path.join(mirror.local_dir, MANIFEST_NAME)
    atomic_write(path, mirror.manifest.to_json().encode())
    return True


class MirrorFileSystem(LocalFileSystem):
    """The local folder of a Mirror, filled on demand: reading a listed file downloads it first."""

    cachable = False

    def __init__(self, mirror: Mirror) -> None:
        super().__init__()
        self.mirror = mirror

    def __reduce__(self):
        return MirrorFileSystem, (self.mirror,)

    def local_path(self, path: str, stop: threading.Event | None = None) -> str:
        rel = self.mirror.rel(path)
        if rel is not None and rel in self.mirror.manifest.checksums:
            self.mirror.ensure(rel, stop)
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
            return {"name": path, "size": self.mirror.remote_size(rel), "type": "file"}  # not fetched yet
        return super().info(path, **kwargs)

    def zarr_store(self, path: str) -> Any:
        return _mirror_store(self, path)


def _mirror_store(mfs: MirrorFileSystem, path: str) -> Any:
    from zarr.storage import LocalStore

    class MirrorStore(LocalStore):
        async def _ensure(self, key: str) -> None:
            join_read(key)  # cancelled with the read it serves
            stop = threading.Event()
            try:
                await asyncio.to_thread(mfs.local_path, os.path.join(path, key), stop)
            except asyncio.CancelledError:
                stop.set()  # the thread stops at its next request or retry wait; Mirror.close waits for it
                raise

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
