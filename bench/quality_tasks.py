"""The quality suite's tasks: one set of visual facts, asked for in three answer formats.

Facts (each needs the image): a shape's colour, its shape, the number of shapes (1-4), the side a
shape is on, and a handwritten digit (scikit-learn's bundled 8x8 digits, upscaled). Task kinds:

* ``word``     one-word answers: "red", "circle", "three", "left", "7".
* ``phrase``   short sentences whose informative word comes last: "it is red", "there are three",
               "it is on the left", "the digit is 7". The first answer tokens tell nothing.
* ``clauses``  a description of a few clauses with several facts in the middle and at the end:
               "the shape is a circle, its colour is red, and it is in the left column." /
               "this is a handwritten digit, and it is a 7."

The question says which format is wanted, so one model can learn all three; every record carries
``qtype = "<kind>/<fact>"`` so accuracy is reported per kind (and per fact). Deterministic per seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from genrecal_cache.demo_data import COLOURS, SHAPES, _cell_centre, _render

KINDS = ("word", "phrase", "clauses")
NUMBERS = ("one", "two", "three", "four")
SIZE = 56  # image side in pixels (the teacher sees 4 image tokens, the LLaVA student 16)


def _digits(part: tuple[int, int]) -> tuple[list[Image.Image], list[int]]:
    """Images lo..hi-1 of one fixed shuffle of scikit-learn's 1797 digits (disjoint parts never share one)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pool = list(range(len(d.images)))
    random.Random(1797).shuffle(pool)
    lo, hi = part
    if not 0 <= lo < hi <= len(pool):
        raise ValueError(f"digits part {part}: need 0 <= lo < hi <= {len(pool)}")
    images = []
    for k in pool[lo:hi]:
        pixels = (255 - d.images[k] * (255 / 16)).clip(0, 255).astype("uint8")
        images.append(Image.fromarray(pixels).resize((SIZE, SIZE), Image.NEAREST).convert("RGB"))
    return images, [int(d.target[k]) for k in pool[lo:hi]]


def _one(rng: random.Random, cols: tuple[int, ...] = (0, 1, 2)) -> tuple[str, str, int, Image.Image]:
    """One shape in a random row of one of `cols`: (shape, colour, column, image)."""
    shape, colour, col = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(cols)
    cell = 3 * rng.randrange(3) + col
    return shape, colour, col, _render([(shape, colour, *_cell_centre(cell, SIZE))], SIZE)


FACTS = {"word": ("colour", "shape", "count", "side", "digit"),
         "phrase": ("colour", "shape", "count", "side", "digit"),
         "clauses": ("describe", "digit")}


def _question(kind: str, fact: str, rng: random.Random, digit: tuple[Image.Image, int]) -> tuple[Image.Image, str, str]:
    """(image, question, answer) for one fact in one answer format."""
    if fact == "describe":  # clauses: shape, colour and column at once
        shape, colour, col, img = _one(rng)
        side = ("left", "middle", "right")[col]
        return img, "Describe the shape.", f"the shape is a {shape}, its colour is {colour}, and it is in the {side} column."
    if fact == "digit":
        img, value = digit
        if kind == "clauses":
            return img, "Describe this image.", f"this is a handwritten digit, and it is a {value}."
        q, word, phrase = "Which digit is this?", str(value), f"the digit is {value}"
    elif fact == "count":
        k = rng.randint(1, 4)
        items = [(rng.choice(SHAPES), rng.choice(list(COLOURS)), *_cell_centre(c, SIZE)) for c in rng.sample(range(9), k)]
        img, q, word = _render(items, SIZE), "How many shapes are there?", NUMBERS[k - 1]
        phrase = f"there {'is' if k == 1 else 'are'} {word}"
    elif fact == "colour":
        shape, colour, _, img = _one(rng)
        q, word, phrase = f"What colour is the {shape}?", colour, f"it is {colour}"
    elif fact == "shape":
        shape, _, _, img = _one(rng)
        q, word, phrase = "What shape is this?", shape, f"it is a {shape}"
    else:  # side
        side = rng.choice(["left", "right"])
        shape, colour, _, img = _one(rng, (0,) if side == "left" else (2,))
        q, word, phrase = f"Is the {colour} {shape} on the left or the right?", side, f"it is on the {side}"
    if kind == "word":
        return img, q + " Answer with one word.", word
    return img, q + " Answer with a short sentence.", phrase


def write_tasks(folder: Path, kinds: list[str], n_per_kind: int, seed: int, digits_part: tuple[int, int],
                facts: dict[str, tuple[str, ...]] = FACTS) -> Path:
    """`n_per_kind` questions of each kind (its `facts` in turn) into `folder`/data.jsonl + images/; returns the JSONL."""
    path = folder / "data.jsonl"
    if path.is_file():
        return path
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        raise ValueError(f"unknown task kind(s) {bad}; choose from {KINDS}")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    digit_images, digit_values = _digits(digits_part)
    order: list[int] = []
    lines = []
    for kind in kinds:
        for i in range(n_per_kind):
            fact = facts[kind][i % len(facts[kind])]
            digit = None
            if fact == "digit":
                if not order:  # shuffled passes over the part: each image used evenly
                    order = list(range(len(digit_images)))
                    rng.shuffle(order)
                k = order.pop()
                digit = digit_images[k], digit_values[k]
            lines.append(_record(folder, f"{kind}-{i:05d}", f"{kind}/{fact}", *_question(kind, fact, rng, digit)))
    return _write_jsonl(path, lines)


def _record(folder: Path, sid: str, qtype: str, img: Image.Image, question: str, answer: str) -> str:
    """One JSONL line (the image saved under `folder`/images/)."""
    img.save(folder / "images" / f"{sid}.png")
    return json.dumps({"id": sid, "image": f"images/{sid}.png", "qtype": qtype,
                       "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                         {"from": "gpt", "value": answer}]})


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


# --- the users' regime: a generic visual mix that is not the distillation tasks --------------------

ROWS = ("top", "middle", "bottom")
GENERIC_FACTS = ("caption", "row", "present", "parity")


def _generic(fact: str, rng: random.Random, digit: tuple[Image.Image, int]) -> tuple[Image.Image, str, str]:
    """(image, question, answer) for one generic fact: other attributes (row, presence of a colour, a digit's
    parity) and captions, so that a student learns to see without being taught the distillation questions."""
    if fact == "caption":
        shape, colour, col = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.randrange(3)
        row = rng.randrange(3)
        img = _render([(shape, colour, *_cell_centre(3 * row + col, SIZE))], SIZE)
        return img, "Caption the image.", f"a {colour} {shape} at the {ROWS[row]}"
    if fact == "row":
        shape, colour, col = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.randrange(3)
        row = rng.randrange(3)
        img = _render([(shape, colour, *_cell_centre(3 * row + col, SIZE))], SIZE)
        return img, "Is the shape at the top, in the middle or at the bottom?", ROWS[row]
    if fact == "present":
        k = rng.randint(1, 3)
        colours = [rng.choice(list(COLOURS)) for _ in range(k)]
        items = [(rng.choice(SHAPES), c, *_cell_centre(cell, SIZE)) for c, cell in zip(colours, rng.sample(range(9), k))]
        asked = rng.choice(colours) if rng.random() < 0.5 else rng.choice(list(COLOURS))
        return _render(items, SIZE), f"Is there a {asked} shape?", "yes" if asked in colours else "no"
    img, value = digit  # parity
    return img, "Is the digit odd or even?", "odd" if value % 2 else "even"


def write_generic_mix(folder: Path, n: int, seed: int, digits_part: tuple[int, int]) -> Path:
    """`n` questions of the generic mix (GENERIC_FACTS in turn) into `folder`/data.jsonl + images/; qtype
    "generic/<fact>"; returns the JSONL."""
    path = folder / "data.jsonl"
    if path.is_file():
        return path
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    digit_images, digit_values = _digits(digits_part)
    lines = []
    for i in range(n):
        fact = GENERIC_FACTS[i % len(GENERIC_FACTS)]
        k = rng.randrange(len(digit_images))
        lines.append(_record(folder, f"generic-{i:05d}", f"generic/{fact}",
                             *_generic(fact, rng, (digit_images[k], digit_values[k]))))
    return _write_jsonl(path, lines)
