"""Fuzzed inputs and caches (issue 7): nothing crashes without a clear message, nothing corrupts a
committed sample.

- inputs (`read_samples`): malformed JSONL lines, wrong field types, zero-byte / truncated / huge
  (decompression-bomb) / non-RGB images, path traversal and symlink escapes -> every line becomes a
  Sample, the bad ones with an error naming the line; never an exception;
- extraction over such a file with the tiny teacher: bad lines become error rows, the good samples
  have the same features as a clean run, `verify` passes;
- caches: random byte flips / truncations of every kind of file, manifests with missing, extra,
  mistyped, huge or path-traversing fields, structurally wrong parquet rows -> opening and reading
  either works or raises CacheFormatError (never another exception type), and `verify` never
  raises and reports every change to a checksummed file;
- training from a corrupted cache stops with a CacheFormatError naming the file.

Seeded (numpy PCG64), so a failure names a reproducible case. The number of cases is printed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import traceback
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from genrecal_cache.data import decode_image, read_samples
from genrecal_cache.format.manifest import CacheFormatError, sha256_bytes
from genrecal_cache import open_cache
from genrecal_cache.verify import verify
from test_cache_format import D, V, make_samples, write_cache, synthetic_head

SEED = 20240607
COUNTS: dict[str, int] = {}


def _count(kind: str, n: int = 1) -> None:
    COUNTS[kind] = COUNTS.get(kind, 0) + n


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print(f"\nfuzz cases tried: {sum(COUNTS.values())} ({', '.join(f'{k} {v}' for k, v in COUNTS.items())})")


# ---- images ---------------------------------------------------------------------------------------

def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt)
    return b.getvalue()


def _bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (CRC fixed): a decompression bomb."""
    data = bytearray(_png(Image.new("L", (8, 8))))
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def image_cases() -> dict[str, tuple[bytes, bool]]:
    """name -> (encoded bytes, decodes?)."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    p = rgb.convert("P")
    p.info["transparency"] = 0
    good = _png(rgb)
    return {
        "rgb": (good, True), "L": (_png(rgb.convert("L")), True), "P+transparency": (_png(p), True),
        "RGBA": (_png(rgb.convert("RGBA")), True), "LA": (_png(rgb.convert("LA")), True),
        "1-bit": (_png(rgb.convert("1")), True), "CMYK-jpeg": (_png(rgb.convert("CMYK"), "JPEG"), True),
        "I;16": (_png(Image.fromarray(np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80)), True),
        "I-32bit-tiff": (_png(rgb.convert("I"), "TIFF"), True), "webp": (_png(rgb, "WEBP"), True), "gif": (_png(rgb, "GIF"), True),
        "zero-byte": (b"", False), "truncated": (good[: len(good) // 2], False), "header-only": (good[:33], False),
        "garbage": (bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)), False),
        "bomb-100k": (_bomb(100_000, 100_000), False), "bomb-wide": (_bomb(2**31 - 1, 1), False),
        "zero-size": (_bomb(0, 10), False), "text": (b"<svg></svg>", False),
    }


def test_decode_image_on_every_kind_of_image():
    for name, (data, ok) in image_cases().items():
        _count("images")
        try:
            img = decode_image(data)
        except ValueError as e:  # ImageError
            assert not ok, f"{name}: {e}"
            continue
        assert ok, f"{name} decoded but should not"
        assert img.mode == "RGB" and img.size[0] > 0, name


# ---- JSONL inputs ---------------------------------------------------------------------------------

def _good_record(i: int, image: str | None = "img/rgb.png") -> dict:
    rec = {"id": f"s{i}", "conversations": [{"from": "human", "value": "<image>\nWhat colour?" if image else "Hi?"},
                                             {"from": "gpt", "value": f"red {i}"}]}
    if image:
        rec["image"] = image
    return rec


def _bad_lines() -> list[bytes]:
    """Lines that must each become an error Sample."""
    conv = _good_record(0)["conversations"]
    fixed: list = [
        b"{", b"not json", b'{"id": "x", "conversations": [', b"\xff\xfe\x00garbage", b"[" * 100_000,
        b"123", b'"a string"', b"[]", b"null",
        {"id": [1]}, {"id": {"a": 1}, "conversations": conv}, {"id": 1.5, "conversations": conv},
        {"id": True, "conversations": conv}, {"conversations": "hello"}, {"conversations": []},
        {"conversations": [1, 2]}, {"conversations": [{"from": 5, "value": "x"}]},
        {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}]}, {"conversations": [{"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
        {"conversations": [{"from": "alien", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"image": 5, "conversations": conv}, {"image": [1, 2], "conversations": conv},
        {"image": {"path": "img/rgb.png"}, "conversations": conv},
        {"image": ["img/rgb.png", "img/rgb.png"], "conversations": conv},  # 2 images, 1 marker
        {"conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]},  # no image
        {"image": "img/rgb.png", "conversations": [{"from": "human", "value": "q"},
                                                   {"from": "gpt", "value": "<image> a"}]},
    ]
    for ref in ("../outside.png", "/etc/passwd", "img/../../outside.png", "img/../../../../../../etc/hostname",
                "img/escape-link.png", "img/dir-link/outside.png", "missing.png", "img", "img/nul\x00.png",
                "http://example.invalid/x.png", "~/x.png", "C:\\x.png", "%2e%2e/outside.png", "img/fifo", ""):
        fixed.append({"image": ref, "conversations": conv})
    for name, (_, ok) in image_cases().items():
        if not ok:
            fixed.append({"image": f"img/{name}.png", "conversations": conv})
    return [x if isinstance(x, bytes) else json.dumps(x).encode() for x in fixed]


def _mutated_lines(rng: np.random.Generator, n: int) -> list[bytes]:
    """Random mutations of a good line (flipped/cut bytes, mistyped fields): may or may not stay valid."""
    good = json.dumps(_good_record(0)).encode()
    lines: list[bytes] = []
    while len(lines) < n:
        kind = rng.integers(4)
        if kind == 0:
            b = bytearray(good)
            for j in rng.integers(0, len(b), int(rng.integers(1, 4))):
                b[j] = int(rng.integers(0, 256))
            line = bytes(b)
        elif kind == 1:
            line = good[: int(rng.integers(1, len(good) - 1))]
        elif kind == 2:
            rec = _good_record(0)
            key = ["id", "image", "conversations"][int(rng.integers(3))]
            rec[key] = [None, 3.5, [], {}, [[]], -1, "\x00", True][int(rng.integers(8))]
            line = json.dumps(rec).encode()
        else:
            rec = _good_record(0)
            turn = rec["conversations"][int(rng.integers(2))]
            turn[["from", "value"][int(rng.integers(2))]] = [None, 1, [], {"x": 1}][int(rng.integers(4))]
            line = json.dumps(rec).encode()
        if b"\n" not in line and b"\r" not in line and line.strip():
            lines.append(line)
    return lines


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzzdata")
    data = root / "data"
    (data / "img").mkdir(parents=True)
    for name, (b, _) in image_cases().items():
        (data / "img" / f"{name}.png").write_bytes(b)
    outside = root / "outside.png"
    outside.write_bytes(image_cases()["rgb"][0])
    (data / "img" / "escape-link.png").symlink_to(outside)          # symlink out of the data root
    (data / "img" / "dir-link").symlink_to(root, target_is_directory=True)
    (data / "img" / "inside-link.png").symlink_to(data / "img" / "rgb.png")  # inside: allowed
    os.mkfifo(data / "img" / "fifo")
    return data


def test_malformed_jsonl_lines_become_error_samples(data_root):
    rng = np.random.default_rng(SEED)
    bad, anything = _bad_lines(), _mutated_lines(rng, 200)
    good_refs = ["img/rgb.png", "img/L.png", "img/P+transparency.png", "img/RGBA.png", "img/LA.png", "img/1-bit.png",
                 "img/CMYK-jpeg.png", "img/I;16.png", "img/I-32bit-tiff.png", "img/webp.png", "img/gif.png",
                 "img/inside-link.png", None]
    good = [json.dumps(_good_record(100 + i, ref)).encode() for i, ref in enumerate(good_refs)]
    pool = [(line, "bad") for line in bad] + [(line, "any") for line in anything] + [(line, "good") for line in good]
    pool = [pool[j] for j in rng.permutation(len(pool))]
    path = data_root / "fuzz.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in pool) + b"\n")
    samples = list(read_samples(path))  # must not raise
    assert len(samples) == len(pool)
    for n, (s, (line, expect)) in enumerate(zip(samples, pool), start=1):
        if expect == "good":
            assert s.error is None, (line[:200], s.error)
            assert len(s.images) == (0 if b'"image"' not in line else 1)
        elif expect == "bad":
            assert s.error and f"line-{n}" in s.error, (line[:200], s.error)
        else:
            assert s.error is None or f"line-{n}" in s.error
    escapes = [s.error for s in samples if s.error and "outside the image root" in s.error]
    assert len(escapes) >= 5  # ../, absolute, deep ../, symlinked file, symlinked folder
    _count("jsonl lines", len(pool))


def test_malformed_parquet_inputs(tmp_path):
    good_conv = json.dumps(_good_record(0, None)["conversations"])
    img = image_cases()["rgb"][0]
    tables = {
        "conversations int": pa.table({"conversations": [1, 2]}),
        "images not list": pa.table({"conversations": [good_conv], "images": [b"x"]}),
        "images ints": pa.table({"conversations": [good_conv], "images": [[1, 2]]}),
        "hf struct no bytes": pa.table({"conversations": [good_conv],
                                        "images": [[{"bytes": None, "path": "a.png"}]]}),
        "bad json": pa.table({"conversations": ["[{"], "images": [[img]]}),
        "bad image": pa.table({"conversations": [good_conv.replace("Hi?", "<image>Hi?")], "images": [[img[:40]]]}),
        "id list": pa.table({"id": [[1]], "conversations": [good_conv]}),
    }
    for name, table in tables.items():
        p = tmp_path / f"{name}.parquet"
        pq.write_table(table, p)
        samples = list(read_samples(p))
        assert samples and all(s.error for s in samples), (name, samples)
        _count("parquet inputs")
    for name, data in {"garbage": b"PAR1garbagePAR1", "empty": b"", "truncated": b"PAR1\x00\x00"}.items():
        p = tmp_path / f"{name}.parquet"
        p.write_bytes(data)
        with pytest.raises(ValueError, match="not a readable Parquet file"):
            read_samples(p)
        _count("parquet inputs")


def test_extraction_over_fuzzed_inputs_keeps_good_samples_intact(tmp_path, teacher_dir, data_root):
    from genrecal_cache.demo_data import write_demo_dataset
    from genrecal_cache.extract import ExtractConfig, extract

    demo = write_demo_dataset(tmp_path / "demo", n=5, seed=3)
    good = [line for line in demo.read_text().splitlines() if line.strip()]
    bad = [line.decode("utf-8", "replace") for line in _bad_lines()[:40]]
    bad = [b for b in bad if "\n" not in b and b.strip()]
    mixed = demo.parent / "mixed.jsonl"
    lines = good[:2] + bad[:20] + good[2:] + bad[20:]
    mixed.write_text("\n".join(lines) + "\n")
    common = dict(teacher=str(teacher_dir), backend="transformers", hidden_codec="float32", progress=False)
    extract(ExtractConfig(data=str(demo), out=str(tmp_path / "clean"), **common))
    m = extract(ExtractConfig(data=str(mixed), out=str(tmp_path / "mixed"), **common))
    _count("extraction lines", len(lines))
    assert verify(tmp_path / "mixed") == []
    clean, mix = open_cache(tmp_path / "clean"), open_cache(tmp_path / "mixed")
    assert m.counts["samples"] == len(lines) and m.counts["error"] >= len(bad) - 2  # a few "bad" lines are fine
    assert all(s.error for s in mix.iter_samples(status="error"))
    by_id = {s.id: s for s in mix.iter_samples()}
    for s in clean.iter_samples():
        t = by_id[s.id]
        np.testing.assert_array_equal(t.token_ids, s.token_ids)
        np.testing.assert_array_equal(t.answer_mask, s.answer_mask)
        np.testing.assert_allclose(t.hidden, s.hidden, rtol=1e-4, atol=1e-4)


# ---- caches ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    head = synthetic_head()
    path = tmp_path_factory.mktemp("fuzzcache") / "cache"
    write_cache(path, head, make_samples(head, n=12), shard_tokens=64, chunk_tokens=32)
    return path


def _load_all(path: Path) -> str:
    """Open, read every sample and the head; 'ok' or 'refused'. Other exception types propagate."""
    try:
        with open_cache(path) as cache:
            for s in cache.iter_samples(status="all"):
                assert s.hidden.shape[0] == s.token_ids.shape[0]
            cache.head()
        return "ok"
    except CacheFormatError as e:
        assert str(e).strip(), "empty message"
        return "refused"


class Fuzzer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.failures: list[str] = []
        self.outcomes: dict[str, int] = {}

    def case(self, label: str, rel: str, data: bytes, checksummed: bool = True) -> None:
        """Replace `rel` with `data`, load and verify, restore. Records unexpected exceptions."""
        path = self.root / rel
        original = path.read_bytes() if path.exists() else None
        path.write_bytes(data)
        try:
            outcome = _load_all(self.root)
            faults = verify(self.root)
            if checksummed and data != original and not faults:
                self.failures.append(f"{label}: verify reported nothing for a changed {rel}")
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        except Exception:  # noqa: BLE001 - what the test is looking for
            self.failures.append(f"{label}:\n{traceback.format_exc(limit=6)}")
        finally:
            if original is None:
                path.unlink()
            else:
                path.write_bytes(original)
        _count("cache mutations")


def _flip(rng, data: bytes, max_flips: int = 3) -> bytes:
    b = bytearray(data)
    for j in rng.integers(0, len(b), int(rng.integers(1, max_flips + 1))):
        b[j] ^= int(rng.integers(1, 256))
    return bytes(b)


def test_corrupted_caches_are_refused_with_a_clear_error(small_cache, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(small_cache, root)
    f = Fuzzer(root)
    rng = np.random.default_rng(SEED + 2)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")
    shards = [r for r in files if "/c/" in r]
    metas = [r for r in files if r.endswith("zarr.json")]
    for i in range(40):  # shard bytes
        rel = shards[int(rng.integers(len(shards)))]
        data = (root / rel).read_bytes()
        how = int(rng.integers(3))
        new = _flip(rng, data) if how == 0 else data[: int(rng.integers(0, len(data)))] if how == 1 else data + b"\0" * 7
        f.case(f"shard {rel} #{i}", rel, new)
    for i in range(25):  # zarr metadata
        rel = metas[int(rng.integers(len(metas)))]
        data = (root / rel).read_bytes()
        f.case(f"zarr.json {rel} #{i}", rel, _flip(rng, data) if i % 2 else data[: int(rng.integers(0, len(data)))])
    for i, meta in enumerate([r for r in metas if r.count("/") == 2]):  # hostile chunk shapes (checksum kept: only the structure check sees it)
        m = json.loads((root / meta).read_text())
        m["chunk_grid"]["configuration"]["chunk_shape"][0] = 2**40
        f.case(f"zarr.json huge chunks {meta}", meta, json.dumps(m).encode())
    parquet = (root / "samples.parquet").read_bytes()
    for i in range(40):
        how = int(rng.integers(3))
        new = _flip(rng, parquet) if how == 0 else parquet[: int(rng.integers(0, len(parquet)))] if how == 1 else \
            bytes(rng.integers(0, 256, len(parquet), dtype=np.uint8))
        f.case(f"parquet #{i}", "samples.parquet", new)
    head = (root / "teacher_head.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", head[:8])
    header = json.loads(head[8:8 + n])
    for i in range(15):
        f.case(f"head #{i}", "teacher_head.safetensors",
               _flip(rng, head[: 8 + n]) + head[8 + n:] if i % 3 == 0 else
               head[: int(rng.integers(0, len(head)))] if i % 3 == 1 else _flip(rng, head))
    for cfg in ('{"hidden_size": "32"}', "[1]", '{"hidden_size": 32, "vocab_size": 300, "evil": 1}', "{",
                '{"hidden_size": 32, "vocab_size": 300, "norm_type": "exec"}', '{"hidden_size": -1, "vocab_size": 1}'):
        hdr = dict(header, __metadata__={"genrecal_head_config": cfg})
        text = json.dumps(hdr).encode()
        text += b" " * (-len(text) % 8)
        f.case(f"head config {cfg}", "teacher_head.safetensors",
               struct.pack("<Q", len(text)) + text + head[8 + n:])
    f.case("stray file", "features.zarr/hidden/c/99", b"x", checksummed=True)
    print(f"cache byte mutations: {f.outcomes}")
    assert not f.failures, "\n\n".join(f.failures[:10])
    assert verify(root) == [] and _load_all(root) == "ok"  # every original byte restored, still sound


def _rewrite_manifest(root: Path, m: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(m))


def test_fuzzed_manifests_are_refused_naming_the_field(small_cache, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(small_cache, root)
    text = (root / "manifest.json").read_bytes()
    good = json.loads(text)
    rng = np.random.default_rng(SEED + 3)
    f = Fuzzer(root)
    for i in range(60):
        f.case(f"manifest flips #{i}", "manifest.json", _flip(rng, text, 4), checksummed=False)
    for i in range(15):
        f.case(f"manifest cut #{i}", "manifest.json", text[: int(rng.integers(0, len(text)))], checksummed=False)
    weird = [None, "x", -1, 2**70, 1.5, True, [], {}, [1, -2], "1" * 5000]
    mutations: list[tuple[str, dict]] = []
    for key in good:
        m = json.loads(text)
        del m[key]
        mutations.append((f"missing {key}", m))
        for v in rng.choice(np.array(weird, dtype=object), 3, replace=False):
            m = json.loads(text)
            m[key] = v
            mutations.append((f"{key}={v!r:.20}", m))
    for section in ("counts", "teacher"):
        for key in good[section]:
            for v in (None, -5, 2**64, "7", [1]):
                m = json.loads(text)
                m[section][key] = v
                mutations.append((f"{section}.{key}={v!r}", m))
    for key, v in [("dtype", "object"), ("stored_dtype", "|O"), ("shard_tokens", 0), ("chunk_tokens", 0),
                   ("shard_tokens", 2**60), ("shape_tail", [2**40]), ("shape_tail", [1, 1, 1, 1, 1]), ("codec", 5)]:
        m = json.loads(text)
        m["arrays"]["hidden"][key] = v
        mutations.append((f"arrays.hidden.{key}={v!r}", m))
    for key, v in [("extra_field", 1), ("format_version", 99)]:
        m = json.loads(text)
        m[key] = v
        mutations.append((f"{key}={v}", m))
    m = json.loads(text)
    m["arrays"]["evil"] = m["arrays"]["hidden"]
    mutations.append(("extra array", m))
    traversal = ["../evil", "/etc/passwd", "https://evil.example/x", "a/../../b", "C:\\x", "./x", "a//b", "",
                 "x\x00y", "manifest.json", "features.zarr/../../../etc/shadow", "file:///etc/passwd", "..",
                 "features.zarr/hidden/c/0/0/..", "\\\\server\\share"]
    digest = sha256_bytes(b"")
    for p in traversal:
        m = json.loads(text)
        m["checksums"][p] = digest
        mutations.append((f"checksums path {p!r}", m))
    for label, m in mutations:
        f.case(label, "manifest.json", json.dumps(m).encode(), checksummed=False)
        if label.startswith("checksums path"):  # refused outright, by the reader and by verify
            (root / "manifest.json").write_text(json.dumps(m))
            with pytest.raises(CacheFormatError, match="not a file of the cache"):
                open_cache(root)
            assert "not a file of the cache" in verify(root)[0]
            (root / "manifest.json").write_bytes(text)
            _count("cache mutations")
    print(f"manifest mutations: {f.outcomes}")
    assert not f.failures, "\n\n".join(f.failures[:10])


def test_structurally_wrong_index_rows_are_refused(small_cache, tmp_path):
    """Index rows that parse but lie (checksums recomputed, so only the structure checks can see it)."""
    root = tmp_path / "c"
    shutil.copytree(small_cache, root)
    table = pq.read_table(root / "samples.parquet")
    text = (root / "manifest.json").read_text()
    ok_rows = [i for i, s in enumerate(table.column("status").to_pylist()) if s == "ok"]

    def setcol(t: pa.Table, name: str, values, type_=None) -> pa.Table:
        return t.set_column(t.schema.get_field_index(name), name, pa.array(values, type=type_))

    col = lambda name: table.column(name).to_pylist()  # noqa: E731
    first = ok_rows[1]
    cases = {
        "offset shifted": setcol(table, "token_offset", [o + (3 if i == first else 0) for i, o in enumerate(col("token_offset"))]),
        "negative length": setcol(table, "num_tokens", [-n if i == first else n for i, n in enumerate(col("num_tokens"))]),
        "length past T": setcol(table, "num_tokens", [n + 10**9 if i == first else n for i, n in enumerate(col("num_tokens"))]),
        "huge offset": setcol(table, "token_offset", [2**62 if i == first else o for i, o in enumerate(col("token_offset"))]),
        "status maybe": setcol(table, "status", ["maybe" if i == first else s for i, s in enumerate(col("status"))]),
        "null status": setcol(table, "status", [None if i == first else s for i, s in enumerate(col("status"))]),
        "messages not json": setcol(table, "messages", ["[{" if i == first else s for i, s in enumerate(col("messages"))]),
        "messages wrong shape": setcol(table, "messages", ['{"role": 1}' if i == first else s for i, s in enumerate(col("messages"))]),
        "messages deep": setcol(table, "messages", ["[" * 100000 if i == first else s for i, s in enumerate(col("messages"))]),
        "extra list": setcol(table, "extra", ["[1]" if i == first else s for i, s in enumerate(col("extra"))]),
        "duplicate id": setcol(table, "id", [col("id")[0] if i == first else s for i, s in enumerate(col("id"))]),
        "offset as string": setcol(table, "token_offset", [str(o) for o in col("token_offset")]),
        "images as strings": setcol(table, "images", [["x"] for _ in col("id")], pa.list_(pa.string())),
        "no messages column": table.drop_columns(["messages"]),
        "error row with tokens": setcol(table, "num_tokens", [5 if s == "error" else n for s, n in zip(col("status"), col("num_tokens"))]),
    }
    f = Fuzzer(root)
    for label, t in cases.items():
        buf = io.BytesIO()
        pq.write_table(t, buf)
        m = json.loads(text)
        m["checksums"]["samples.parquet"] = sha256_bytes(buf.getvalue())
        m["extra"]["sizes"]["samples.parquet"] = len(buf.getvalue())
        (root / "manifest.json").write_text(json.dumps(m))
        before = len(f.failures)
        f.case(label, "samples.parquet", buf.getvalue(), checksummed=True)
        (root / "manifest.json").write_text(text)
        if len(f.failures) == before and f.outcomes.get("ok"):
            f.failures.append(f"{label}: the reader accepted it")
            f.outcomes.pop("ok")
    assert not f.failures, "\n\n".join(f.failures[:10])
    assert f.outcomes == {"refused": len(cases)}


def test_training_on_a_corrupted_cache_stops_with_a_clear_error(tmp_path, train_cache, student_dir):
    from genrecal_train.config import TrainConfig
    from genrecal_train.trainer import train

    root = tmp_path / "c"
    shutil.copytree(train_cache, root)
    shard = root / "features.zarr" / "hidden" / "c" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated mid-file, as after a broken copy
    cfg = TrainConfig(cache=str(root), student=str(student_dir), out=str(tmp_path / "run"), stages=[1], max_steps=2,
                      batch_size=2, device="cpu", prefetch=1, checkpoint_every=1000)
    with pytest.raises(CacheFormatError, match=r"features.zarr.*unreadable.*verify"):
        train(cfg)
    _count("training runs")
