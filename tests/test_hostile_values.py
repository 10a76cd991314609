"""Values a reader must not train on (issue 14): NaN/inf in the teacher head or in hidden states, and
bytes of a hidden-state shard that changed after extraction. The head is checked in full when it is
loaded, hidden states chunk by chunk as they are read (local fast path and zarr/HTTP path alike), and
`verify` checks both. Caches carry a crc32c per inner chunk, so a flipped byte is noticed by the read
itself, without a second pass; caches written before that still read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

from _http import serve
from genrecal_cache.format.codecs import describe_chain
from genrecal_cache.format.head import TeacherHead
from genrecal_cache.format.manifest import CacheFormatError, sha256_bytes
from genrecal_cache import open_cache
from genrecal_cache.verify import verify
from test_cache_format import D, V, make_samples, write_cache, synthetic_head


@pytest.fixture(scope="module")
def head() -> TeacherHead:
    return synthetic_head()


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def made(request, tmp_path_factory, head) -> Path:
    path = tmp_path_factory.mktemp(f"values-{request.param}") / "cache"
    write_cache(path, head, make_samples(head, n=12), hidden_dtype=request.param, shard_tokens=64, chunk_tokens=16)
    return path


@pytest.fixture()
def cache(made, tmp_path) -> Path:
    root = tmp_path / "cache"
    shutil.copytree(made, root)
    return root


def _rehash(root: Path, prefix: str = "") -> None:
    """Recompute every checksum under `prefix`, as the maker of a hostile cache would."""
    m = json.loads((root / "manifest.json").read_text())
    for p in sorted((root / prefix).rglob("*") if prefix else root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != "manifest.json":
            m["checksums"][rel] = sha256_bytes(p.read_bytes())
            m["extra"]["sizes"][rel] = p.stat().st_size
    (root / "manifest.json").write_text(json.dumps(m))


def _read_all(root: Path | str, precision: str = "float32") -> list:
    with open_cache(root) as c:
        return [s.hidden.copy() for s in c.iter_samples(precision=precision)]


# ---- NaN / inf -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tensor,value", [("lm_head.weight", float("nan")), ("norm.weight", float("inf"))])
def test_non_finite_head_is_refused_when_loaded_and_by_verify(cache, tensor, value):
    path = cache / "teacher_head.safetensors"
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    t[tensor].view(-1)[7] = value
    save_file(t, str(path), metadata=meta)
    _rehash(cache)
    with open_cache(cache) as c, pytest.raises(CacheFormatError, match=rf"teacher_head.safetensors.*{tensor} holds NaN or inf"):
        c.head()
    faults = verify(cache)
    assert len(faults) == 1 and f"{tensor} holds NaN or inf" in faults[0], faults


def _poison_hidden(root: Path, token: int, value: float) -> None:
    """Write `value` into hidden[token] through zarr (chunks re-encoded, their crc32c valid) and rehash."""
    a = zarr.open_array(root / "features.zarr", path="hidden", mode="r+")
    row = a[token]
    if a.dtype == np.uint16:  # bf16 bits
        row[3] = np.array([value], np.float32).view(np.uint32)[0] >> 16
    else:
        row[3] = value
    a[token] = row
    _rehash(root, "features.zarr")


@pytest.mark.parametrize("precision", ["float32", "stored"])  # stored: bf16 bits are checked as bits
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_non_finite_hidden_state_stops_the_read_naming_the_token(cache, value, precision):
    _poison_hidden(cache, 100, value)
    with pytest.raises(CacheFormatError, match=r"token 100 holds NaN or inf"):
        _read_all(cache, precision)
    faults = verify(cache)
    assert len(faults) == 1 and "token 100 holds NaN or inf" in faults[0], faults


def test_non_finite_hidden_state_is_refused_over_http(cache):
    _poison_hidden(cache, 70, float("nan"))
    with serve(cache) as (url, _):
        with pytest.raises(CacheFormatError, match=r"hidden: token 70 holds NaN or inf"):
            _read_all(url)
        assert any("NaN or inf" in f for f in verify(url))


# ---- flipped bytes ---------------------------------------------------------------------------------------

def _chunk_payload_positions(shard: Path, chunks: int) -> list[int]:
    """Byte positions inside the inner chunks of a shard (not its index)."""
    data = shard.read_bytes()
    index = np.frombuffer(data[-(16 * chunks + 4):-4], "<u8").reshape(chunks, 2)
    return [int(off) + j for off, n in index for j in range(0, int(n), max(1, int(n) // 3))]


def test_every_flipped_byte_in_a_hidden_shard_is_noticed_while_reading(cache):
    """Blosc has no checksum: many flips decode to other numbers. With a crc32c per inner chunk every one
    is caught by the read that trains on it."""
    shard = cache / "features.zarr" / "hidden" / "c" / "1" / "0"
    original = shard.read_bytes()
    positions = _chunk_payload_positions(shard, 64 // 16)
    assert len(positions) >= 12
    silent = []
    for pos in positions:
        data = bytearray(original)
        data[pos] ^= 0x10
        shard.write_bytes(bytes(data))
        try:
            _read_all(cache)
            silent.append(pos)
        except CacheFormatError as e:
            assert "features.zarr" in str(e) and "verify" in str(e) or "crc32c" in str(e), str(e)
    shard.write_bytes(original)
    assert not silent, f"flips at {silent} were read without an error"


def test_flipped_byte_is_noticed_over_http(cache):
    shard = cache / "features.zarr" / "hidden" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[_chunk_payload_positions(shard, 4)[1]] ^= 0x01
    shard.write_bytes(bytes(data))
    with serve(cache) as (url, _), pytest.raises(CacheFormatError, match="tokens"):
        _read_all(url)


def test_new_caches_record_the_crc32c_in_the_chain(cache):
    m = json.loads((cache / "manifest.json").read_text())
    for name, spec in m["arrays"].items():
        assert spec["codec"].startswith("sharding_indexed[") and ", crc32c], index [bytes, crc32c]" in spec["codec"]


def _strip_chunk_crc(root: Path) -> None:
    """Rewrite every array the way genrecal wrote them before the inner crc32c (same data, same chain
    minus crc32c), with a manifest to match: an old cache."""
    m = json.loads((root / "manifest.json").read_text())
    group = zarr.open_group(root / "features.zarr", mode="r+")
    for name in list(m["arrays"]):
        a = group[name]
        data = a[...]
        sh = a.metadata.codecs[0]
        serializer, blosc, crc = sh.codecs
        assert type(crc).__name__ == "Crc32cCodec"
        shutil.rmtree(root / "features.zarr" / name)
        b = group.create_array(name, shape=a.shape, dtype=a.dtype, chunks=a.chunks, shards=a.shards,
                               serializer=serializer, compressors=(blosc,), fill_value=0,
                               dimension_names=a.metadata.dimension_names, attributes=dict(a.attrs),
                               config={"write_empty_chunks": True})
        b[...] = data
        m["arrays"][name]["codec"] = describe_chain(b)
        assert "crc32c]" not in m["arrays"][name]["codec"].split("], index")[0]
    m["checksums"] = {k: v for k, v in m["checksums"].items() if not k.startswith("features.zarr/")}
    (root / "manifest.json").write_text(json.dumps(m))
    _rehash(root, "features.zarr")


def test_caches_without_the_chunk_crc32c_still_read(cache, tmp_path):
    expected = _read_all(cache)
    old = tmp_path / "old"
    shutil.copytree(cache, old)
    _strip_chunk_crc(old)
    assert verify(old) == []
    got = _read_all(old)
    assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))
    with serve(old) as (url, _):
        assert all(np.array_equal(a, b) for a, b in zip(_read_all(url), expected))
