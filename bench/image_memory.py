"""Peak memory of `extract` on very large images: queued samples must hold encoded bytes, not pixels.

    python bench/image_memory.py                  # 1 vs 12 images of 8192 x 8192 (about 2 min on 2 cores)
    python bench/image_memory.py --side 4096 --many 24

Each run is a fresh process (`extract` with the transformers backend on the tiny test teacher, whose
processor resizes every image to its own small size) over N samples, each with its own 8192 x 8192
PNG (a gradient: a small file that decodes to 201 MB of RGB). Its peak RSS (ru_maxrss) is printed for
N = 1 and N = --many. If queued samples kept decoded images, the --many run would need about
(many - 1) x 201 MB more than the single-image run (4.4 GB for 12, issue 14); holding encoded bytes,
the two peaks differ by little more than the extra PNG files' size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_data(root: Path, n: int, side: int) -> Path:
    """`n` samples, each with its own `side` x `side` PNG (distinct files: no decoding is shared)."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    with open(root / "data.jsonl", "w") as f:
        for i in range(n):
            rgb = np.stack([np.broadcast_to(ramp[None, :], (side, side)),
                            np.broadcast_to(ramp[:, None], (side, side)),
                            np.full((side, side), 17 * i % 256, np.float32)], axis=-1).astype(np.uint8)
            Image.fromarray(rgb).save(root / "images" / f"{i}.png", compress_level=1)
            f.write(json.dumps({"id": f"big-{i}", "image": f"images/{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the corner?"},
                {"from": "gpt", "value": "dark"}]}) + "\n")
    return root / "data.jsonl"


def child(teacher: str, data: str, out: str) -> None:
    """Extract, then print this process's peak RSS in MiB (Linux ru_maxrss is in KiB)."""
    from genrecal_cache.extract import ExtractConfig, extract

    manifest = extract(ExtractConfig(teacher=teacher, data=data, out=out, backend="transformers", progress=False))
    assert manifest.counts["ok"] == manifest.counts["samples"], manifest.counts
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "samples": manifest.counts["samples"]}))


def measure(teacher: Path, data: Path, out: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "genrecal_cache" / "compat"),
                                           os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, __file__, "--child", str(teacher), str(data), str(out)],
                         env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"extraction failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=8192, help="image width and height in pixels")
    p.add_argument("--many", type=int, default=12, help="images in the second run")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)

    from genrecal_cache.testing import build_tiny_teacher

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = build_tiny_teacher(root / "teacher")
        decoded_mib = args.side * args.side * 3 / 2**20
        rows = []
        for n in (1, args.many):
            data = write_data(root / f"data{n}", n, args.side)
            png_mib = sum(f.stat().st_size for f in (root / f"data{n}" / "images").iterdir()) / 2**20
            r = measure(teacher, data, root / f"cache{n}")
            rows.append((n, png_mib, r["peak_mib"]))
            print(f"{n:3d} image(s) of {args.side}x{args.side}: PNG files {png_mib:7.1f} MiB, "
                  f"peak RSS {r['peak_mib']:7.0f} MiB", flush=True)
        (n1, _, p1), (nm, _, pm) = rows
        print(f"\nextra peak for {nm - n1} more images: {pm - p1:.0f} MiB "
              f"({(pm - p1) / (nm - n1):.1f} MiB per image; one decoded image is {decoded_mib:.0f} MiB)")


if __name__ == "__main__":
    main()
