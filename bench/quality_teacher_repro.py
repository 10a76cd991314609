"""Train a quality suite's teacher again, beside the one in its --out, and compare: is the teacher reproducible?

    python bench/quality_teacher_repro.py SUITE_OUT [--work DIR]

Same recipe as `bench/quality.py` (its `Setup`, with the knobs SUITE_OUT records in inputs.json): the initial
teacher of SUITE_OUT, a throwaway cache of its data, SFT, then the held-out evaluation. Prints both accuracies and the largest weight difference (0.0: bit-identical).
About 4 min of one core on this project's VM (the suite's teacher: 1200 steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality as q  # noqa: E402


def max_weight_diff(a: Path, b: Path) -> float:
    """Largest absolute difference over the weights of two model folders with the same tensors."""
    from safetensors.torch import load_file

    def load(folder: Path) -> dict:
        out: dict = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    wa, wb = load(a), load(b)
    if wa.keys() != wb.keys():
        raise SystemExit(f"{a} and {b} hold different tensors")
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("suite_out", type=Path, help="a finished bench/quality.py --out (its teacher/ and data/)")
    p.add_argument("--work", type=Path, help="where to train the second teacher (default: a temporary folder)")
    args = p.parse_args()
    q.env()
    import torch

    torch.set_num_threads(1)  # as bench/quality.py trains its teacher (--threads 1)
    src = args.suite_out
    inputs = src / "inputs.json"  # the knobs that --out was made with (bench/quality.py: check_inputs)
    known = json.loads(inputs.read_text()) if inputs.is_file() else {}
    s = q.Setup(**{k: v for k, v in known.items() if k in q.Setup.__dataclass_fields__})
    first = src / "teacher" / "sft" / "final"
    if not (first / "config.json").is_file():
        raise SystemExit(f"{src} has no trained teacher ({first}): give a finished bench/quality.py --out")
    work = args.work or Path(tempfile.mkdtemp(prefix="teacher-repro-"))
    data = src / "data" / ("teacher.jsonl" if s.teacher_sees_train else "teacher_own.jsonl")
    raw = q.extract_cache(src / "teacher" / "init", data, work / "raw_cache")
    second, secs = q.run_train(work / "sft", cache=str(raw), student=str(src / "teacher" / "init"),
                               **q.teacher_train_kw(s))
    test = src / "data" / "test" / "data.jsonl"
    acc = [q.run_eval(m, test, out, s.max_new_tokens)["accuracy"]
           for m, out in ((first, src / "teacher" / "eval.json"), (second, work / "eval.json"))]
    print(f"teacher in {src}: {100 * acc[0]:.1f}%; trained again in {work} ({secs:.0f} s): {100 * acc[1]:.1f}%; "
          f"largest weight difference {max_weight_diff(first, second):.3g}")


if __name__ == "__main__":
    main()
