"""Why the quality suite's teacher keeps its random vision tower: colour questions alone, tower trained or frozen.

    PYTHONPATH=genrecal_cache/compat HF_HUB_OFFLINE=1 .venv/bin/python bench/colour_only.py [--out OUT]

Trains the suite's teacher model (its `Setup` sizes, fresh from its init) by SFT on one-word colour
questions only (1000 to train, 100 held out) with its vision tower trained (300 and 1000 steps) or frozen at
its random init (300 steps), and the suite's LLaVA student with its tower trained (300 steps), 16 samples
per step, LR 1e-3 -> 1e-4. Prints each run's held-out accuracy (chance 20%) and what
`bench/vision_probe.py` measures on its image tokens. Finished runs under --out are reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402
from quality_tasks import write_tasks  # noqa: E402
from vision_probe import probe  # noqa: E402

# (name, model, vision tower trained, steps)
RUNS = (("teacher, tower trained", "teacher", True, 300), ("teacher, tower frozen", "teacher", False, 300),
        ("teacher, tower trained", "teacher", True, 1000), ("LLaVA student, tower trained", "llava", True, 300))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "colour_only"))
    p.add_argument("--probe-images", type=int, default=300, help="images for vision_probe's linear probes")
    args = p.parse_args(argv)
    quality.env()
    import torch

    from genrecal_cache.testing import build_tiny_student, build_tiny_teacher

    torch.set_num_threads(1)
    out, s = Path(args.out), quality.Setup()
    colour = {"word": ("colour",)}
    train = write_tasks(out / "train", ["word"], 1000, 0, s.digits_parts[1], facts=colour)
    test = write_tasks(out / "test", ["word"], 100, 1, s.digits_parts[2], facts=colour)
    inits = {"teacher": out / "teacher_init", "llava": out / "llava_init"}
    if not (inits["teacher"] / "config.json").is_file():
        build_tiny_teacher(inits["teacher"], seed=1234, hidden_size=s.teacher_hidden, layers=s.teacher_layers,
                           vision_width=s.teacher_vision_width, vision_depth=s.teacher_vision_depth)
    if not (inits["llava"] / "config.json").is_file():
        build_tiny_student(inits["llava"], seed=0, hidden_size=s.student_hidden, layers=s.student_layers,
                           image_size=s.student_image_size, patch_size=s.student_patch)
    cache = quality.extract_cache(inits["teacher"], train, out / "cache")  # the trainer reads data as a cache
    rows = [("teacher init (no training)", None, probe(str(inits["teacher"]), args.probe_images))]
    for name, model, tower, steps in RUNS:
        run = out / f"{model}-{'trained' if tower else 'frozen'}-{steps}"
        final, _ = quality.run_train(run, cache=str(cache), student=str(inits[model]), stages=[3], stage_steps=[steps],
                                     batch_size=16, lr=1e-3, lr_end=1e-4, train_vision=tower, seed=0)
        acc = quality.run_eval(final, test, run / "eval.json", 8)["accuracy"]
        rows.append((f"{name}, {steps} steps", acc, probe(str(final), args.probe_images)))
    print(f"\n{'run':42s} {'colour acc':>10s} {'colour share':>12s} {'norm':>8s} {'probe colour':>12s} {'probe shape':>11s}")
    for name, acc, r in rows:
        a = "-" if acc is None else f"{100 * acc:.1f}%"
        print(f"{name:42s} {a:>10s} {100 * r['colour_share']:11.1f}% {r['norm']:8.2f} {100 * r['probe_colour']:11.1f}% "
              f"{100 * r['probe_shape']:10.1f}%")


if __name__ == "__main__":
    main()
