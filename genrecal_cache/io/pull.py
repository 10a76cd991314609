"""`genrecal-cache pull`: a verified local copy of a (remote) cache, resumable, the manifest last."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..format import safety
from ..format.manifest import MANIFEST_NAME, CacheFormatError
from .download import download
from .locate import local_folder_problem, locate, open_fs
from .mirror import Mirror, complete_mirror, mirror_key

__all__ = ["PullReport", "pull"]


@dataclass
class PullReport:
    files: int          # files the manifest lists
    fetched: int        # of those, downloaded by this call (the rest were already there)
    bytes: int          # bytes transferred by this call
    path: str


def pull(url: str | os.PathLike, out: str | os.PathLike, storage_options: dict[str, Any] | None = None,
         progress: Callable[[str, int], None] | None = None) -> PullReport:
    """Download the cache at `url` into the folder `out`: every file the manifest lists, each verified
    against its size (exactly the one the manifest lists, else what its layout allows the file) and its
    sha256 (io/download.py), the manifest last.
    Re-running resumes: verified files are kept, partial ones continued. A folder holding another
    cache is refused."""
    fs, root, name = open_fs(url, storage_options)
    out = os.path.abspath(os.fspath(out))
    if (problem := local_folder_problem(out)) is not None:
        raise CacheFormatError(f"{problem}; pull into a folder (new, or holding an earlier pull of this cache)")
    manifest = locate(fs, root, name)
    if isinstance(manifest, list):  # a cache written in parts (genrecal_cache/parts.py): pull each part
        names = manifest
        reports = [pull(f"{name}/{n}", os.path.join(out, n), storage_options, progress) for n in names]
        return PullReport(files=sum(r.files for r in reports), fetched=sum(r.fetched for r in reports),
                          bytes=sum(r.bytes for r in reports), path=out)
    existing = os.path.join(out, MANIFEST_NAME)
    if os.path.isfile(existing):
        with open(existing, "rb") as f:
            old = f.read()
        if mirror_key(old) != mirror_key(manifest.to_json()):
            raise CacheFormatError(f"{out} already holds another cache (its manifest differs from {name}'s); "
                                   f"pull into an empty folder")
    mirror = Mirror(fs, root, name, manifest, out)
    fetched = nbytes = 0
    for rel in sorted(manifest.checksums):
        if mirror.present(rel):
            continue
        path = mirror.local(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        nbytes += download(fs, f"{mirror.root}/{rel}", path, manifest.checksums[rel], f"{name}/{rel}",
                           safety.file_limit(rel, manifest), size=manifest.sizes.get(rel))
        fetched += 1
        if progress is not None:
            progress(rel, nbytes)
    complete_mirror(mirror)
    return PullReport(files=len(manifest.checksums), fetched=fetched, bytes=nbytes, path=out)
