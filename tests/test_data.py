"""Data readers (JSONL / JSON / Parquet), image decoding limits, and the demo data generators."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from genrecal_cache.data import IMAGE_MARKER, ImageError, Sample, decode_image, read_samples
from genrecal_cache.demo_data import QTYPES, write_demo_dataset, write_digits_dataset


def _png(colour: str = "red", size: tuple[int, int] = (8, 8), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 128).save(buf, format="PNG")
    return buf.getvalue()


def _record(sid: str | None, question: str = "<image>\nWhat colour?", answer: str = "red",
            image: object = "img.png") -> dict:
    rec = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if sid is not None:
        rec["id"] = sid
    if image is not None:
        rec["image"] = image
    return rec


def _write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# --- decode_image ------------------------------------------------------------------------------

def test_decode_image_gives_loaded_rgb() -> None:
    for mode in ("RGB", "RGBA", "L", "P"):
        img = decode_image(_png(mode=mode, size=(5, 3)))
        assert img.mode == "RGB" and img.size == (5, 3)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"definitely not an image", "not a recognised image"),
    (_png(size=(64, 64))[:60], "truncated"),
])
def test_decode_image_rejects_bad_data(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_decode_image_truncated_pixel_data_is_detected() -> None:
    # A JPEG cut in the middle still has a valid header: only load() notices.
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_decode_image_size_limit_is_checked_before_decoding() -> None:
    with pytest.raises(ImageError, match=r"100x100 = 10000 pixels, above the limit of 5000"):
        decode_image(_png(size=(100, 100)), max_pixels=5000)
    assert issubclass(ImageError, ValueError)


# --- JSONL / JSON / Parquet --------------------------------------------------------------------

def test_demo_jsonl_reads_back_completely(demo_jsonl: Path) -> None:
    records = [json.loads(line) for line in demo_jsonl.read_text().splitlines()]
    samples = list(read_samples(demo_jsonl))
    assert [s.id for s in samples] == [r["id"] for r in records]
    assert all(s.error is None for s in samples)
    for s, r in zip(samples, records):
        refs = r["image"] if isinstance(r["image"], list) else [r["image"]]
        assert s.image_refs == refs
        assert s.images == [(demo_jsonl.parent / ref).read_bytes() for ref in refs]
        assert sum(m["content"].count(IMAGE_MARKER) for m in s.messages) == len(s.images)
        assert [m["content"] for m in s.messages] == [t["value"] for t in r["conversations"]]
        assert [m["role"] for m in s.messages] == [{"human": "user", "gpt": "assistant"}[t["from"]]
                                                   for t in r["conversations"]]
    assert list(read_samples(demo_jsonl, limit=5)) == samples[:5]


def test_roles_are_normalised_and_markers_prepended(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "b.png").write_bytes(_png("blue"))
    rec = {"id": 7, "image": ["a.png", "b.png"], "conversations": [
        {"from": "system", "value": "Be brief."},
        {"role": "user", "content": "Compare them."}, {"role": "assistant", "content": "same"},
        {"from": "Human", "value": "Sure?"}, {"from": "GPT", "value": "yes"}]}
    (s,) = read_samples(_write_jsonl(tmp_path / "d.jsonl", [rec]))
    assert s.error is None and s.id == "7"
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert s.messages[1]["content"] == "<image>\n<image>\nCompare them."
    assert s.images == [_png(), _png("blue")]


def test_image_root_and_json_array(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "sub" / "x.png").write_bytes(_png())
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / "train.json"
    path.write_text(json.dumps([_record("a", image="sub/x.png"), _record(None, image="sub/x.png")]))
    samples = list(read_samples(path, image_root=tmp_path / "imgs"))
    assert [(s.id, s.error) for s in samples] == [("a", None), ("item-1", None)]
    # without image_root, paths resolve against the file's folder, where the image is not
    assert "image file not found" in next(read_samples(path)).error


def test_parquet_round_trip_both_conversation_encodings(demo_jsonl: Path, tmp_path: Path) -> None:
    samples = list(read_samples(demo_jsonl))
    as_json = pa.table({
        "id": [s.id for s in samples],
        "conversations": [json.dumps([{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                                      for m in s.messages]) for s in samples],
        "images": [s.images for s in samples],
    })
    as_structs = as_json.set_column(1, "conversations", pa.array(
        [[{"from": m["role"], "value": m["content"]} for m in s.messages] for s in samples]))
    # Hugging Face datasets' Image feature stores {bytes, path} structs
    as_hf = as_structs.set_column(2, "images", pa.array(
        [[{"bytes": b, "path": ref} for b, ref in zip(s.images, s.image_refs)] for s in samples]))
    for name, table in (("json", as_json), ("structs", as_structs), ("hf", as_hf)):
        pq.write_table(table, tmp_path / f"{name}.parquet")
        back = list(read_samples(tmp_path / f"{name}.parquet"))
        assert [(b.id, b.messages, b.images, b.error) for b in back] == [(s.id, s.messages, s.images, None)
                                                                         for s in samples], name
        assert all(b.image_refs == (s.image_refs if name == "hf" else []) for b, s in zip(back, samples))
    assert len(list(read_samples(tmp_path / "json.parquet", limit=3))) == 3


def test_bad_jsonl_inputs_become_error_samples(tmp_path: Path) -> None:
    png = _png(size=(32, 32))
    (tmp_path / "img.png").write_bytes(png)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    noisy = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(noisy, format="PNG")
    (tmp_path / "truncated.png").write_bytes(noisy.getvalue()[: len(noisy.getvalue()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path.parent / "outside.png").write_bytes(png)
    (tmp_path / "link.png").symlink_to(tmp_path.parent / "outside.png")
    lines: list[object] = [
        _record("good-1"),
        "{not json",
        _record("missing-img", image="nope.png"),
        _record("corrupt-img", image="corrupt.png"),
        _record("truncated-img", image="truncated.png"),
        _record("zero-byte-img", image="empty.png"),
        _record("escape", image="../outside.png"),
        _record("symlink-escape", image="link.png"),
        _record("empty-answer", answer="  "),
        _record("two-markers", question="<image> and <image>?"),
        _record("conv-type", image=None) | {"conversations": "hello"},
        _record("value-type", question=None, image=None) | {"conversations": [{"from": "human", "value": 3},
                                                                               {"from": "gpt", "value": "x"}]},
        _record("image-type", image=5),
        _record("bad-role") | {"conversations": [{"from": "robot", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        _record("no-answer") | {"conversations": [{"from": "human", "value": "<image>hi"}]},
        _record("marker-in-answer", answer="<image>"),
        _record("id-type") | {"id": {"a": 1}},
        [1, 2, 3],
        _record(None, image="nope.png"),
        _record("nul-path", image="a\u0000b.png"),
        _record("good-2", question="Text only?", image=None),
        "",  # blank lines are skipped, not errors
        _record("good-3"),
    ]
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    samples = list(read_samples(path))
    by_id = {s.id: s for s in samples}
    assert [s.id for s in samples if s.error is None] == ["good-1", "good-2", "good-3"]
    expected = {
        "line-2": "malformed JSON",
        "missing-img": "image file not found",
        "corrupt-img": "corrupt or truncated image",
        "truncated-img": "corrupt or truncated",
        "zero-byte-img": "empty (0 bytes)",
        "escape": "points outside the image root",
        "symlink-escape": "points outside the image root",
        "empty-answer": "empty assistant answer",
        "two-markers": "2 '<image>' marker(s) in the conversation but 1 image(s)",
        "conv-type": "'conversations' must be a non-empty list",
        "value-type": "text must be a string",
        "image-type": "'image' must be a path or a list of paths",
        "bad-role": "speaker 'robot'",
        "no-answer": "no assistant turn",
        "marker-in-answer": "outside a user turn",
        "line-17": "'id' must be a string or an integer",
        "line-18": "expected a JSON object",
        "line-19": "image file not found",
        "nul-path": "invalid image path",
    }
    assert len(samples) == len(expected) + 3
    for sid, message in expected.items():
        error = by_id[sid].error
        assert error is not None and message in error, (sid, error)
        assert f"sample {sid!r}" in error and str(path) in error  # names the sample and the file
        assert by_id[sid].messages == [] and by_id[sid].images == []
    assert "line-3" in by_id["missing-img"].error  # and where in the file it is


def test_bad_parquet_rows_become_error_samples(tmp_path: Path) -> None:
    conv = json.dumps([{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}])
    table = pa.table({
        "id": ["ok", None, "bad-json", "corrupt", "count"],
        "conversations": [conv, conv, "{oops", conv, conv],
        "images": [[_png()], [_png()], [_png()], [b"\x00" * 10], [_png(), _png()]],
    })
    pq.write_table(table, tmp_path / "d.parquet")
    samples = list(read_samples(tmp_path / "d.parquet"))
    assert [(s.id, s.error is None) for s in samples] == [("ok", True), ("row-1", True), ("bad-json", False),
                                                          ("corrupt", False), ("count", False)]
    assert "'conversations' is not valid JSON" in samples[2].error
    assert "images[0]" in samples[3].error and "not a recognised image format" in samples[3].error
    assert "1 '<image>' marker(s) in the conversation but 2 image(s)" in samples[4].error


def test_file_level_problems_raise_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        read_samples(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("id\n")
    with pytest.raises(ValueError, match="unknown dataset format '.csv'"):
        read_samples(tmp_path / "data.csv")
    (tmp_path / "broken.json").write_text('[{"id": 1}')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_samples(tmp_path / "broken.json")
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="no 'conversations' column"):
        read_samples(tmp_path / "x.parquet")


def test_sample_fields_match_the_documented_type() -> None:
    s = Sample("x", [{"role": "user", "content": "hi"}], [], [])
    assert s.error is None and s.extra == {}
    assert list(Sample.__dataclass_fields__) == ["id", "messages", "images", "image_refs", "error", "extra",
                                                "where"]


def test_extra_jsonl_fields_are_kept(tmp_path: Path) -> None:
    rec = {"id": "a", "qtype": "colour", "source": {"set": 3},
           "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    [s] = list(read_samples(path))
    assert s.error is None and s.extra == {"qtype": "colour", "source": {"set": 3}}


# --- demo data ---------------------------------------------------------------------------------

def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_demo_dataset_is_deterministic_and_covers_every_question_type(tmp_path: Path) -> None:
    a = write_demo_dataset(tmp_path / "a", n=18, seed=3)
    b = write_demo_dataset(tmp_path / "b", n=18, seed=3)
    c = write_demo_dataset(tmp_path / "c", n=18, seed=4)
    assert _digest(a.parent) == _digest(b.parent) != _digest(c.parent)
    records = [json.loads(line) for line in a.read_text().splitlines()]
    assert {r["qtype"] for r in records} == set(QTYPES)
    for r in records:
        answers = [t["value"] for t in r["conversations"] if t["from"] == "gpt"]
        assert all(len(ans.split()) == 1 for ans in answers)
        assert len(answers) == (2 if r["qtype"] == "multi" else 1)
        refs = r["image"] if isinstance(r["image"], list) else [r["image"]]
        assert len(refs) == (2 if r["qtype"] == "compare" else 1)
        for ref in refs:
            with Image.open(a.parent / ref) as img:
                assert img.size == (56, 56) and img.mode == "RGB"
    side = next(r for r in records if r["qtype"] == "side")
    with Image.open(a.parent / side["image"]) as img:  # the shape really is on the answered side
        pixels = img.load()
        xs = [x for x in range(56) for y in range(56) if pixels[x, y] != (245, 245, 245)]
    answer = side["conversations"][1]["value"]
    assert (max(xs) < 28) if answer == "left" else (min(xs) >= 28)


def test_digits_dataset(tmp_path: Path) -> None:
    path = write_digits_dataset(tmp_path / "d", n=10, seed=1)
    again = write_digits_dataset(tmp_path / "e", n=10, seed=1)
    assert _digest(path.parent) == _digest(again.parent)
    samples = list(read_samples(path))
    assert len(samples) == 10 and all(s.error is None for s in samples)
    for s in samples:
        assert s.messages[0]["content"] == "<image>\nWhich digit is this?"
        assert s.messages[1]["content"] in [str(d) for d in range(10)]
        img = decode_image(s.images[0])
        assert img.size == (56, 56) and img.mode == "RGB"


def test_digits_parts_never_share_an_image(tmp_path: Path) -> None:
    """Train and test splits drawn from disjoint parts share no digit image, whatever their seeds."""
    def image_bytes(part, seed, n):
        path = write_digits_dataset(tmp_path / f"{part}-{seed}", n=n, seed=seed, part=part)
        return {decode_image(s.images[0]).tobytes() for s in read_samples(path)}

    train = image_bytes((0, 1000), 0, 1500)  # more questions than images: every image of the part is used
    test = image_bytes((1000, 1797), 1000, 800)
    assert len(train) > 900 and len(test) > 700
    assert not train & test
    with pytest.raises(ValueError, match="digits part"):
        write_digits_dataset(tmp_path / "bad", n=1, part=(10, 5))
