"""GenRecal at its best against SFT at its best across runs of the quality suite: a variant's --out against the suite's.

    python bench/quality_margins.py SUITE_OUT VARIANT_OUT [VARIANT_OUT ...]

SUITE_OUT is the suite's run (SFT on the labelled set, every arm); each VARIANT_OUT a run with other settings
(`--set n_unlabelled=N`, `--set 'genrecal_overrides={...}'`). Per regime and student, with the best arm per task kind
as `bench/quality.py` picks it (`summarize`: SFT over tower x warm-up, GenRecal over the tower): SFT on the suite's
labels, the variant's own SFT where it ran SFT arms (with n_unlabelled: SFT on the teacher's answers too, i.e.
sequence-level KD), the variant's GenRecal, and GenRecal's margin over each. Means over seeds, held-out exact match %.

    python bench/quality_margins.py --per-type OUT [OUT ...]

instead prints each --out's held-out exact match per question type (word/digit, ...) for every regime, student and
arm, mean over seeds: where the gap to the teacher is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import summarize  # noqa: E402


def best(out: Path) -> dict:
    """{(regime, student): summary} of a finished --out (its results.json, summarized as the suite does)."""
    results = json.loads((out / "results.json").read_text())
    return {(regime, student): s for regime, by in summarize(results)[1].items() for student, s in by.items()}


def per_type(outs: list[Path]) -> None:
    """Held-out exact match % per question type, mean over seeds, per --out, regime, student and arm."""
    cells: dict[tuple[str, str, str, str], dict[str, list[float]]] = {}
    for out in outs:
        for run in json.loads((out / "results.json").read_text())["runs"]:
            cell = cells.setdefault((out.name, run["regime"], run["student"], run["arm"]), {})
            for qtype, v in run["per_type"].items():
                cell.setdefault(qtype, []).append(100 * v["correct"] / v["n"])
    types = sorted({t for c in cells.values() for t in c})
    print("| out | regime | student | arm | " + " | ".join(types) + " |")
    print("|---|---|---|---|" + "---|" * len(types))
    for key, c in cells.items():
        print("| " + " | ".join(key) + " | " + " | ".join(f"{statistics.mean(c[t]):.0f}" if t in c else "-"
                                                          for t in types) + " |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-type", nargs="+", type=Path, metavar="OUT", help="per question type instead (see above)")
    p.add_argument("suite", type=Path, nargs="?", help="the suite's --out (SFT arms on the labelled set)")
    p.add_argument("variants", type=Path, nargs="*", help="--out folders of variants of the suite")
    args = p.parse_args(argv)
    if args.per_type:
        return per_type(args.per_type)
    if args.suite is None or not args.variants:
        p.error("give SUITE_OUT and at least one VARIANT_OUT (or --per-type OUT ...)")
    base = best(args.suite)
    fmt = lambda d, sign="": " / ".join(f"{100 * d[k]:{sign}.1f}" for k in d)  # noqa: E731
    print("| variant | regime | student | SFT on the labels, at its best | the variant's SFT, at its best | GenRecal, "
          "at its best | GenRecal - SFT on the labels | GenRecal - the variant's SFT |")
    print("|---|---|---|---|---|---|---|---|")
    for out in [args.suite, *args.variants]:
        for key, s in best(out).items():
            if "genrecal_best" not in s or "sft_best" not in base.get(key, {}):
                continue
            labels, own, gen = base[key]["sft_best"], s.get("sft_best"), s["genrecal_best"]
            print(f"| {out.name} | {key[0]} | {key[1]} | {fmt(labels)} | {fmt(own) if own else '-'} | {fmt(gen)} | "
                  f"{fmt({k: gen[k] - labels[k] for k in gen}, '+')} | "
                  f"{fmt({k: gen[k] - own[k] for k in gen}, '+') if own else '-'} |")


if __name__ == "__main__":
    main()
