"""Two runs of the quality suite side by side, run by run: did a change to the code move its results?

    python bench/quality_compare.py /work/q22 /work/q24      # the --out before a change, the --out after it

For every arm run both `--out` folders finished (`runs/<regime>-<student>-<arm>-seed<N>`): how many of its held-out
answers are identical, its accuracy per task kind in each, and the largest difference of its final weights. Then,
per regime, student, arm and kind, the mean over seeds before and after. An exact change that only reorders float
sums should leave the answers as they were.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import per_kind  # noqa: E402


def weight_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between the final weights of two runs (inf when their tensors differ in name)."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    if wa.keys() != wb.keys():
        return float("inf")
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path, help="the suite's --out made with the code before the change")
    p.add_argument("after", type=Path, help="the suite's --out made with the code after it")
    args = p.parse_args(argv)
    runs = sorted(d.name for d in (args.after / "runs").iterdir()
                  if (d / "eval.json").is_file() and (args.before / "runs" / d.name / "eval.json").is_file())
    if not runs:
        raise SystemExit(f"no run finished in both {args.before}/runs and {args.after}/runs")
    print("| run | identical answers | before (per kind) | after (per kind) | max weight difference |")
    print("|---|---|---|---|---|")
    cells: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    same_runs = 0
    for name in runs:
        ev = [json.loads((root / "runs" / name / "eval.json").read_text()) for root in (args.before, args.after)]
        same = sum(x == y for x, y in zip(ev[0]["predictions"], ev[1]["predictions"]))
        same_runs += same == len(ev[0]["predictions"]) == len(ev[1]["predictions"])
        kinds = [{k: round(100 * v, 1) for k, v in per_kind(e).items()} for e in ev]
        diff = weight_diff(args.before / "runs" / name, args.after / "runs" / name)
        print(f"| {name} | {same}/{len(ev[0]['predictions'])} | {kinds[0]} | {kinds[1]} | {diff:.1e} |")
        for k in kinds[0]:
            before, after = cells.setdefault((name.rsplit("-seed", 1)[0], k), ([], []))
            before.append(kinds[0][k])
            after.append(kinds[1][k])
    print(f"\n{same_runs} of {len(runs)} runs answered every held-out question as before\n")
    print("| regime-student-arm | kind | seeds | before | after | after - before |")
    print("|---|---|---|---|---|---|")
    moved = []
    for (arm, k), (before, after) in cells.items():
        b, a = statistics.mean(before), statistics.mean(after)
        moved.append(a - b)
        print(f"| {arm} | {k} | {len(before)} | {b:.1f} | {a:.1f} | {a - b:+.1f} |")
    print(f"\n{len(moved)} cells (regime x student x arm x kind, mean over seeds): after - before from "
          f"{min(moved):+.1f} to {max(moved):+.1f} points, mean {statistics.mean(moved):+.1f}")


if __name__ == "__main__":
    main()
