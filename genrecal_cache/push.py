"""`genrecal-cache push`: publish a complete local cache to any fsspec URL, the manifest(s) last.

Every file a manifest lists is uploaded first (in parallel threads), each checked after upload by its
size and, unless `read_back=False`, by the sha256 of the bytes read back from the store; only then are
the manifests written (a cache in parts: every part's files, then every part's manifest), so a reader
never finds a manifest before all the files it lists. Re-running after an interruption keeps the files
already there with the right size (and sha256). A different cache already at the URL (a manifest that
differs, or files that are not this cache's) is refused: readers holding its manifest would see new
files under old names. `replace=True` takes it down first -- its manifests, then its other files -- so
new readers see no cache until the new one is complete, and old readers stop on the changed files. The
push ends with `verify` run against the URL.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .config import PushConfig
from .format import safety
from .format.manifest import MANIFEST_NAME, CacheFormatError, Manifest, sha256_file
from .io.durable import atomic_write, rename_durable
from .io.locate import local_folder_problem, open_fs
from .io.remote import read_capped
from .io.retry import RetryPolicy, retry_call
from .reader import find_cache
from .verify import file_sha256, verify

__all__ = ["PushError", "PushReport", "push"]


class PushError(RuntimeError):
    """A push refused (another cache at the URL) or an upload that did not arrive intact."""


@dataclass(frozen=True)
class _File:
    rel: str       # path under the URL ("part-00000-of-00002/features.zarr/..." for parts)
    local: str
    sha256: str
    size: int


@dataclass
class PushReport:
    url: str
    files: int                 # files uploaded or kept, manifests included
    uploaded: int              # of those, sent by this call
    bytes: int                 # bytes sent by this call
    faults: list[str] = field(default_factory=list)  # verify's findings at the URL ([] = published and sound)


def push(cache: str | os.PathLike, url: str, storage_options: dict[str, Any] | None = None, *,
         replace: bool = PushConfig.replace, workers: int = PushConfig.workers,
         read_back: bool = PushConfig.read_back,
         progress: Callable[[int], None] | None = None, total: Callable[[int], None] | None = None) -> PushReport:
    """Upload the complete local cache `cache` to `url` (see the module doc). `progress(n)` is called with
    the bytes of each file as it is done (uploaded or found there), `total(n)` once with the bytes of all."""
    files, manifests = _local_cache(cache)
    fs, root, name = open_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem) and (problem := local_folder_problem(root)) is not None:
        raise PushError(f"{problem}; push to a folder (new, or holding an earlier push of this cache)")
    policy = getattr(fs, "genrecal_retry", None) or RetryPolicy.from_options(storage_options)[0]
    if total is not None:
        total(sum(f.size for f in files) + sum(len(t) for t in manifests.values()))
    published = _clear_the_way(fs, root, name, files, manifests, replace, policy)

    def send(f: _File) -> int:
        sent = 0
        if not _arrived(fs, root, f, read_back):
            _check_local(f)
            retry_call(policy, f"{name}/{f.rel}", lambda: _put(fs, f.local, f"{root}/{f.rel}"))
            if not _arrived(fs, root, f, read_back):
                raise PushError(f"{name}/{f.rel}: the upload did not arrive intact (size or sha256 differs from the "
                                f"manifest's after it was sent); run push again")
            sent = f.size
        if progress is not None:
            progress(f.size)
        return sent

    with ThreadPoolExecutor(max(1, workers)) as pool:
        sent = list(pool.map(send, files))
    for rel, text in manifests.items():  # last: the cache becomes visible only now
        if rel not in published:
            retry_call(policy, f"{name}/{rel}", lambda: _put(fs, text, f"{root}/{rel}"))
            sent.append(len(text))
        if progress is not None:
            progress(len(text))
    _forget_listings(fs, root)
    return PushReport(url=name, files=len(files) + len(manifests), uploaded=sum(1 for n in sent if n),
                      bytes=sum(sent), faults=verify(url, storage_options))


def _local_cache(cache: str | os.PathLike) -> tuple[list[_File], dict[str, bytes]]:
    """(the files to upload, {manifest path under the URL: its bytes}) of a complete local cache."""
    fs, root, name, found = find_cache(cache, None)
    if not isinstance(fs, LocalFileSystem):
        raise PushError(f"{name}: push uploads a local cache; to copy a remote one, `genrecal-cache pull` it first")
    parts = found if isinstance(found, list) else [""]
    files, manifests = [], {}
    for part in parts:
        folder = posixpath.join(root, part) if part else root
        text = safety.read_regular(f"{folder}/{MANIFEST_NAME}", safety.MAX_MANIFEST_BYTES, f"{folder}/{MANIFEST_NAME}")
        m = Manifest.from_json(text, source=f"{folder}/{MANIFEST_NAME}")
        sizes = safety.check_local_files(folder, m.checksums, folder)  # regular files, no links out of the cache
        for rel, digest in sorted(m.checksums.items()):
            if rel not in sizes:
                raise CacheFormatError(f"{folder}/{rel}: listed in the manifest but missing: the local cache is "
                                       f"incomplete; re-extract or re-download it before pushing")
            files.append(_File(posixpath.join(part, rel) if part else rel, f"{folder}/{rel}", digest,
                               m.sizes.get(rel, sizes[rel])))
        manifests[posixpath.join(part, MANIFEST_NAME) if part else MANIFEST_NAME] = text
    return files, manifests


def _put(fs: fsspec.AbstractFileSystem, source: str | bytes, path: str) -> None:
    """Store a local file (or bytes) at `path`; on a local filesystem atomically, its folder made first."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(source, bytes):
            atomic_write(path, source)
        else:
            shutil.copyfile(source, path + ".tmp")
            rename_durable(path + ".tmp", path)
    elif isinstance(source, bytes):
        fs.pipe_file(path, source)
    else:
        fs.put_file(source, path)


def _check_local(f: _File) -> None:
    """The local file is the one its manifest lists (else the upload would publish a corrupt cache)."""
    if os.path.getsize(f.local) != f.size or sha256_file(f.local) != f.sha256:
        raise CacheFormatError(f"{f.local}: does not match its manifest (size or sha256): the local cache is corrupt; "
                               f"run `genrecal-cache verify` on it and re-extract or re-download it before pushing")


def _remote_files(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, int]:
    """{path under root: size} of what is stored at the URL now (listings are not cached)."""
    _forget_listings(fs, root)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {p[len(root.rstrip('/')) + 1:]: int(info.get("size") or 0) for p, info in found.items()
            if info.get("type", "file") == "file" and p != root}


def _forget_listings(fs: fsspec.AbstractFileSystem, root: str) -> None:
    invalidate = getattr(fs, "invalidate_cache", None)
    if invalidate is not None:
        invalidate(root)


def _clear_the_way(fs: fsspec.AbstractFileSystem, root: str, name: str, files: list[_File],
                   manifests: dict[str, bytes], replace: bool, policy: RetryPolicy) -> set[str]:
    """Refuse to upload over another cache (unless `replace`: then remove it, manifests first). Returns
    the manifests already published there (this cache's, from an earlier push)."""
    stored = retry_call(policy, name, lambda: _remote_files(fs, root))
    ours = {f.rel for f in files} | set(manifests)
    other_manifests = [rel for rel in stored if posixpath.basename(rel) == MANIFEST_NAME
                       and (rel not in manifests or not _same_manifest(fs, f"{root}/{rel}", manifests[rel]))]
    leftovers = [rel for rel in stored if rel.endswith(".tmp") and rel[:-4] in ours]  # a local copy cut short
    strays = sorted(set(stored) - ours - set(leftovers))
    if not replace and other_manifests:
        raise PushError(f"{name} already holds a different cache ({other_manifests[0]} differs from this cache's); "
                        f"readers holding its manifest would see new files under old names: push to a new URL, or "
                        f"pass --replace to take it down and replace it")
    if not replace and strays:
        raise PushError(f"{name} holds {len(strays)} file(s) that are not part of this cache (e.g. {strays[0]}): "
                        f"push to an empty location, or pass --replace to delete them")
    if other_manifests:  # new readers see no cache from here on; old ones stop on the first changed file
        retry_call(policy, name, lambda: fs.rm([f"{root}/{rel}" for rel in other_manifests]))
    if strays or leftovers:
        doomed = [f"{root}/{rel}" for rel in [*strays, *leftovers] if rel not in other_manifests]
        retry_call(policy, name, lambda: fs.rm(doomed))
    _forget_listings(fs, root)
    return {rel for rel in stored if rel in manifests and rel not in other_manifests}


def _same_manifest(fs: fsspec.AbstractFileSystem, path: str, text: bytes) -> bool:
    try:
        theirs = read_capped(fs, path, safety.MAX_MANIFEST_BYTES, path)
        return Manifest.from_json(theirs, source=path) == Manifest.from_json(text, source=path)
    except (CacheFormatError, FileNotFoundError):
        return False


def _arrived(fs: fsspec.AbstractFileSystem, root: str, f: _File, read_back: bool) -> bool:
    """`f` is at the URL with its size (and, read back, its sha256)."""
    path = f"{root}/{f.rel}"
    try:
        if fs.info(path).get("size") != f.size:
            return False
        return not read_back or file_sha256(fs, path, f.size, f.rel, f.size) == f.sha256
    except (FileNotFoundError, CacheFormatError):
        return False
