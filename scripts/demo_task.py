"""The demo's task, teacher and student (step 1 of scripts/demo.sh).

    python scripts/demo_task.py OUT [--quick] [--seed N]

bench/quality.py's recipe (its first, single-task version) at a smaller budget, with its training,
caching and reuse functions: synthetic visual questions about shapes (`genrecal-cache demo-data`:
colour, shape, count, side, a two-turn question, a two-image comparison) and scikit-learn digits, in
three splits; a tiny Qwen2-VL-architecture teacher trained from scratch on the distillation set *and*
more data of its own (a real teacher has seen far more than a lab's distillation set, including data
like it: that is the knowledge to distil); a fresh LLaVA student (another family, tokenizer and
image-token count). Everything is reused when already in OUT (the teacher is trained once).
Progress goes to stderr; stdout gets the paths as shell assignments, for demo.sh.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
_tqdm_setting = os.environ.get("TQDM_DISABLE")
import quality  # noqa: E402  (bench/quality.py: bench/ is not a package)

if _tqdm_setting is None:  # the bench turns progress bars off; the demo's teacher training shows one
    os.environ.pop("TQDM_DISABLE", None)


@dataclass
class DemoTask:
    """Data, teacher and student of the demo (an OUT made with other values is refused, not reused)."""
    n_shapes_train: int = 300  # the distillation set: the teacher's cache covers it, both students train on it
    n_digits_train: int = 200
    n_shapes_teacher_extra: int = 600  # the teacher's own extra data
    n_digits_teacher_extra: int = 400
    n_shapes_test: int = 150  # held out from everyone
    n_digits_test: int = 100
    data_seed: int = 2
    teacher_data_seed: int = 0
    test_seed: int = 1000
    # digit images come from disjoint parts of scikit-learn's 1797: teacher extra, distillation set, test
    digits_parts: tuple[tuple[int, int], ...] = ((0, 1000), (1000, 1497), (1497, 1797))
    teacher_hidden: int = 192
    teacher_layers: int = 3
    teacher_vision_width: int = 128
    teacher_steps: int = 600
    teacher_batch: int = 16
    teacher_lr: float = 1e-3
    teacher_lr_end: float = 1e-4
    # The teacher's vision tower stays at its random init: trained from scratch it washes colour out of the
    # image tokens and the teacher learns no colour (docs/benchmarks.md, quality suite, bench/vision_probe.py).
    teacher_train_vision: bool = False
    student_hidden: int = 64
    student_layers: int = 2


# A smoke run of every step (tests): the numbers mean nothing.
QUICK = DemoTask(n_shapes_train=12, n_digits_train=6, n_shapes_teacher_extra=6, n_digits_teacher_extra=6,
                 n_shapes_test=12, n_digits_test=6, teacher_hidden=64, teacher_layers=1, teacher_vision_width=32,
                 teacher_steps=4, teacher_batch=4)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--quick", action="store_true", help="tiny data and teacher: a smoke run")
    p.add_argument("--seed", type=int, default=0, help="the student's initialisation")
    args = p.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # progress to stderr: stdout is for demo.sh to read
        paths = prepare(args.out, QUICK if args.quick else DemoTask(), args.seed)
    print("\n".join(f"{k}={shlex.quote(str(v))}" for k, v in paths.items()))


def prepare(out: Path, s: DemoTask, seed: int) -> dict[str, Path]:
    """Data splits, the trained teacher and a fresh student under `out` (each reused when there)."""
    from genrecal_cache.testing import build_tiny_student, build_tiny_teacher

    quality.env()  # the CPU compat shim, for this process and the ones it starts
    out.mkdir(parents=True, exist_ok=True)
    quality.check_inputs(out, s)  # an OUT made with other settings (e.g. --quick) is refused
    parts = s.digits_parts
    train = make_split(out / "data" / "train", s.n_shapes_train, s.n_digits_train, s.data_seed, parts[1])
    extra = make_split(out / "data" / "teacher_extra", s.n_shapes_teacher_extra, s.n_digits_teacher_extra,
                       s.teacher_data_seed, parts[0])
    test = make_split(out / "data" / "test", s.n_shapes_test, s.n_digits_test, s.test_seed, parts[2])
    teacher_data = quality.combine(out / "data" / "teacher.jsonl", [train, extra])

    tdir, t_init = out / "teacher", out / "teacher_init"
    if not (t_init / "config.json").is_file():
        build_tiny_teacher(t_init, seed=1234, hidden_size=s.teacher_hidden, layers=s.teacher_layers,
                           vision_width=s.teacher_vision_width)
    t_kw = dict(stages=[3], stage_steps=[s.teacher_steps], batch_size=s.teacher_batch, lr=s.teacher_lr,
                lr_end=s.teacher_lr_end, train_vision=s.teacher_train_vision, seed=0)
    data_cache = out / "teacher_data_cache"  # the teacher's data in cache form (the trainer reads caches)
    if not quality._finished(tdir, t_kw):
        quality.log(f"teacher: a tiny Qwen2-VL trained from scratch, {s.teacher_steps} steps x {s.teacher_batch} "
                    f"on {s.n_shapes_train + s.n_digits_train + s.n_shapes_teacher_extra + s.n_digits_teacher_extra} questions "
                    "(once; later runs reuse it) ...")
        quality.extract_cache(t_init, teacher_data, data_cache)
    t_final, secs = quality.run_train(tdir, cache=str(data_cache), student=str(t_init), **t_kw)
    quality.log(f"teacher: {t_final} ({secs:.0f} s of training)")
    shutil.rmtree(data_cache, ignore_errors=True)

    student = out / "students" / f"seed{seed}"
    if not (student / "config.json").is_file():
        build_tiny_student(student, seed=seed, hidden_size=s.student_hidden, layers=s.student_layers)
    return {"TEACHER": t_final, "STUDENT": student, "TRAIN": train, "TEST": test}


def make_split(folder: Path, n_shapes: int, n_digits: int, seed: int, digits_part: tuple[int, int]) -> Path:
    """Shape and digit questions in one folder: one JSONL (a qtype per record), images side by side."""
    from genrecal_cache.demo_data import write_demo_dataset, write_digits_dataset

    path = folder / "data.jsonl"
    if path.is_file():
        return path
    lines = write_demo_dataset(folder, n_shapes, seed=seed).read_text().splitlines()
    # image names differ (demo-* vs digit-*), so both fit in one images/ folder
    lines += write_digits_dataset(folder, n_digits, seed=seed, part=tuple(digits_part)).read_text().splitlines()
    (folder / "train.jsonl").unlink()
    tmp = folder / "data.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


if __name__ == "__main__":
    main()
