"""How much of a shape's colour and kind reaches a VLM's language model through its image tokens.

    python bench/vision_probe.py MODEL_DIR [MODEL_DIR ...] [--n 600]

For each model folder (any family genrecal builds tiny: Qwen2-VL, LLaVA ...), on the quality suite's
one-shape images (`bench/quality_tasks.py`), from the hidden states the language model receives at the
image-token positions (`hidden_states[0]`):
- colour share: how far the image tokens move when only the shape's colour changes (red -> blue, same
  shape and place), relative to their norm; mean over the 9 places and 3 shapes;
- the image tokens' norm;
- linear-probe accuracy of colour and of shape (logistic regression on the concatenated image tokens,
  2/3 of the images to fit, 1/3 to score; chance is 20% and 33%);
- linear-probe accuracy of a handwritten digit's value (the suite's digit images: fit on 600 of the teacher's
  part of scikit-learn's digits, scored on the 300 of the suite's test part; chance is 10%).
The quality suite uses it to show why its teacher keeps a frozen vision tower (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality_tasks import SIZE, _digits, _one  # noqa: E402

from genrecal_cache.demo_data import COLOURS, SHAPES, _cell_centre, _render  # noqa: E402


def image_states(model, processor, image_token_id: int, img) -> "torch.Tensor":
    """The language model's input states at the image tokens of one question about `img`, flattened."""
    import torch

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    enc = processor(text=[processor.apply_chat_template(msgs, add_generation_prompt=True)], images=[img],
                    return_tensors="pt")
    with torch.no_grad():
        h0 = model(**enc, output_hidden_states=True).hidden_states[0][0]
    return h0[enc["input_ids"][0] == image_token_id].flatten()


def probe(path: str, n: int) -> dict[str, float]:
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    tok_id = model.config.image_token_id if hasattr(model.config, "image_token_id") else model.config.image_token_index
    shares, norms = [], []
    for shape in SHAPES:
        for cell in range(9):
            a, b = (image_states(model, processor, tok_id, _render([(shape, c, *_cell_centre(cell, SIZE))], SIZE))
                    for c in ("red", "blue"))
            shares.append(float((a - b).norm() / a.norm()))
            norms.append(float(a.norm()))
    rng = random.Random(0)
    xs, colour, kind = [], [], []
    for _ in range(n):
        s, c, _, img = _one(rng)
        xs.append(image_states(model, processor, tok_id, img).float().numpy())
        colour.append(list(COLOURS).index(c))
        kind.append(SHAPES.index(s))
    x, cut = np.stack(xs), 2 * n // 3
    acc = {name: LogisticRegression(max_iter=3000).fit(x[:cut], y[:cut]).score(x[cut:], y[cut:])
           for name, y in (("colour", colour), ("shape", kind))}
    (fit_img, fit_y), (test_img, test_y) = _digits((0, 600)), _digits((1497, 1797))  # quality.Setup.digits_parts
    fit_x, test_x = ([image_states(model, processor, tok_id, img).float().numpy() for img in imgs]
                     for imgs in (fit_img, test_img))
    acc["digit"] = LogisticRegression(max_iter=3000).fit(np.stack(fit_x), fit_y).score(np.stack(test_x), test_y)
    return {"colour_share": float(np.mean(shares)), "norm": float(np.mean(norms)), "probe_colour": acc["colour"],
            "probe_shape": acc["shape"], "probe_digit": acc["digit"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model folders (save_pretrained layout, with their processor)")
    p.add_argument("--n", type=int, default=600, help="images for the linear probes")
    args = p.parse_args(argv)
    from genrecal_cache.testing import install_compat_shim

    install_compat_shim()
    print(f"{'model':60s} {'colour share':>12s} {'norm':>8s} {'probe colour':>12s} {'probe shape':>11s} {'probe digit':>11s}")
    for path in args.models:
        r = probe(path, args.n)
        print(f"{path[-60:]:60s} {100 * r['colour_share']:11.1f}% {r['norm']:8.2f} {100 * r['probe_colour']:11.1f}% "
              f"{100 * r['probe_shape']:10.1f}% {100 * r['probe_digit']:10.1f}%", flush=True)


if __name__ == "__main__":
    main()
