"""GenRecal at its best against SFT at its best across runs of the quality suite: a variant's --out against the suite's.

    python bench/quality_margins.py SUITE_OUT VARIANT_OUT [VARIANT_OUT ...]

SUITE_OUT is the suite's run (SFT on the labelled set, every arm); each VARIANT_OUT a run with other settings
(`--set n_unlabelled=N`, `--set 'genrecal_overrides={...}'`). Per regime and student, with the best arm per task kind
as `bench/quality.py` picks it (`summarize`: SFT over tower x warm-up, GenRecal over the tower): SFT on the suite's
labels, the variant's own SFT where it ran SFT arms (with n_unlabelled: SFT on the teacher's answers too, i.e.
sequence-level KD), the variant's GenRecal, and GenRecal's margin over each. Means over seeds, held-out exact match %.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import summarize  # noqa: E402


def best(out: Path) -> dict:
    """{(regime, student): summary} of a finished --out (its results.json, summarized as the suite does)."""
    results = json.loads((out / "results.json").read_text())
    return {(regime, student): s for regime, by in summarize(results)[1].items() for student, s in by.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", type=Path, help="the suite's --out (SFT arms on the labelled set)")
    p.add_argument("variants", type=Path, nargs="+", help="--out folders of variants of the suite")
    args = p.parse_args(argv)
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
