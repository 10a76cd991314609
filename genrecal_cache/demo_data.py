"""Synthetic visual-question data for demos and tests (``genrecal-cache demo-data``).

Two generators, both writing ``<out_dir>/images/*.png`` and a LLaVA-style ``<out_dir>/train.jsonl``
that `genrecal_cache.data.read_samples` reads:

* `write_demo_dataset`: rendered shapes (circle/square/triangle) in colours, with questions whose
  answers need the image -- colour, shape, count, left/right side, a two-turn conversation and a
  two-image comparison. Answers are one word or one number. Each record carries its question type
  in an extra ``"qtype"`` field so results can be broken down per type.
* `write_digits_dataset`: the 8x8 handwritten digits that scikit-learn ships (no download),
  upscaled to 56x56 RGB: "Which digit is this?" -> "7".

Pure PIL (plus scikit-learn for the digits); deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from .config import DemoDataConfig

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
QTYPES = ("colour", "shape", "count", "side", "multi", "compare")
BACKGROUND = (245, 245, 245)

# (shape, colour, centre x, centre y) in pixels
_Item = tuple[str, str, float, float]
_Record = tuple[list[Image.Image], list[dict[str, str]]]  # images, conversation


def write_demo_dataset(out_dir: str | Path, n: int, seed: int = DemoDataConfig.seed, image_size: int = 56) -> Path:
    """Write `n` shape questions (all question types in turn) and return the JSONL path."""
    if image_size < 24:
        raise ValueError(f"image_size={image_size} is too small to draw distinguishable shapes; use >= 24")
    rng = random.Random(seed)
    makers: dict[str, Callable[[random.Random, int], _Record]] = {
        "colour": _colour_q, "shape": _shape_q, "count": _count_q,
        "side": _side_q, "multi": _multi_q, "compare": _compare_q,
    }
    records = []
    for i in range(n):
        qtype = QTYPES[i % len(QTYPES)]  # cycling keeps every type present even for tiny n
        images, conversation = makers[qtype](rng, image_size)
        records.append((f"demo-{i:06d}", qtype, images, conversation))
    return _write(Path(out_dir), records)


def write_digits_dataset(out_dir: str | Path, n: int, seed: int = 0, part: tuple[int, int] | None = None) -> Path:
    """Write `n` "Which digit is this?" questions on scikit-learn's bundled digits; return the JSONL path.

    `part=(lo, hi)` draws only from images lo..hi-1 of one fixed shuffle of the 1797 (the same for
    every seed), so splits made with disjoint parts never share a digit image (train vs test)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no network access

    digits = load_digits()
    pool = list(range(len(digits.images)))
    if part is not None:
        lo, hi = part
        if not 0 <= lo < hi <= len(pool):
            raise ValueError(f"digits part {part}: need 0 <= lo < hi <= {len(pool)}")
        random.Random(1797).shuffle(pool)
        pool = pool[lo:hi]
    rng = random.Random(seed)
    order: list[int] = []
    records = []
    for i in range(n):
        if not order:  # walk through shuffled passes, so n > len(pool) repeats each digit image evenly
            order = list(pool)
            rng.shuffle(order)
        k = order.pop()
        # 0..16 ink intensity -> dark digit on white, 8x8 -> 56x56 with crisp pixels
        pixels = (255 - digits.images[k] * (255 / 16)).clip(0, 255).astype("uint8")
        img = Image.fromarray(pixels).resize((56, 56), Image.NEAREST).convert("RGB")
        conversation = [{"from": "human", "value": "<image>\nWhich digit is this?"},
                        {"from": "gpt", "value": str(int(digits.target[k]))}]
        records.append((f"digit-{i:06d}", "digit", [img], conversation))
    return _write(Path(out_dir), records)


def _write(out_dir: Path, records: list[tuple[str, str, list[Image.Image], list[dict[str, str]]]]) -> Path:
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / "train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for sid, qtype, images, conversation in records:
            refs = []
            for j, img in enumerate(images):
                ref = f"images/{sid}.png" if len(images) == 1 else f"images/{sid}-{j}.png"
                img.save(out_dir / ref, format="PNG")
                refs.append(ref)
            rec = {"id": sid, "image": refs[0] if len(refs) == 1 else refs, "conversations": conversation,
                   "qtype": qtype}
            f.write(json.dumps(rec) + "\n")
    return path


# --- rendering ---------------------------------------------------------------------------------

def _render(items: list[_Item], size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    r = size * 0.13  # half-size of a shape: fits a 3x3 grid of cells without overlap
    for shape, colour, cx, cy in items:
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _cell_centre(cell: int, size: int) -> tuple[float, float]:
    """Centre of one cell of a 3x3 grid (cells 0..8, row-major)."""
    step = size / 3
    return (cell % 3 + 0.5) * step, (cell // 3 + 0.5) * step


def _one_shape(rng: random.Random, size: int, cells: tuple[int, ...] = tuple(range(9))) -> tuple[str, str, Image.Image]:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    return shape, colour, _render([(shape, colour, *_cell_centre(rng.choice(cells), size))], size)


def _qa(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _colour_q(rng: random.Random, size: int) -> _Record:
    shape, colour, img = _one_shape(rng, size)
    question = rng.choice([f"What colour is the {shape}?", "Which colour is the shape?"])
    return [img], _qa(f"<image>\n{question}", colour)


def _shape_q(rng: random.Random, size: int) -> _Record:
    shape, _, img = _one_shape(rng, size)
    question = rng.choice(["What shape is this?", "Which shape is shown?"])
    return [img], _qa(f"<image>\n{question}", shape)


def _count_q(rng: random.Random, size: int) -> _Record:
    k = rng.randint(1, 4)
    items = [(rng.choice(SHAPES), rng.choice(list(COLOURS)), *_cell_centre(c, size))
             for c in rng.sample(range(9), k)]
    question = rng.choice(["How many shapes are there?", "Count the shapes."])
    return [_render(items, size)], _qa(f"<image>\n{question}", str(k))


def _side_q(rng: random.Random, size: int) -> _Record:
    side = rng.choice(["left", "right"])
    shape, colour, img = _one_shape(rng, size, cells=(0, 3, 6) if side == "left" else (2, 5, 8))
    return [img], _qa(f"<image>\nIs the {colour} {shape} on the left or the right?", side)


def _multi_q(rng: random.Random, size: int) -> _Record:
    shape, colour, img = _one_shape(rng, size)
    return [img], _qa("<image>\nWhat shape is this?", shape) + _qa("And what colour is it?", colour)


def _compare_q(rng: random.Random, size: int) -> _Record:
    first, second = rng.sample(SHAPES, 2)
    target = rng.choice(["first", "second"])
    images = [_render([(s, rng.choice(list(COLOURS)), *_cell_centre(rng.randrange(9), size))], size)
              for s in (first, second)]
    asked = first if target == "first" else second
    return images, _qa(f"<image>\n<image>\nWhich image shows a {asked}, the first or the second?", target)


__all__ = ["COLOURS", "QTYPES", "SHAPES", "write_demo_dataset", "write_digits_dataset"]
