"""How far a cache's teacher targets are from the labels: per answer token, the probability the teacher puts on
the label (from the cached top-k at the row that predicts it; 0 when the label is not in the top-k) and how
often its top-1 is the label. Targets that equal the labels carry nothing a student's CE on the labels lacks.

    python bench/teacher_targets.py /work/q22/cache /work/q22-t/cache     # issue 22: teacher saw the set / did not
"""

from __future__ import annotations

import argparse

import numpy as np

from genrecal_cache import open_cache


def label_probabilities(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(p(label), top-1 == label) per answer token of every sample of the cache at `path`."""
    p, top1 = [], []
    with open_cache(path) as cache:
        for s in cache.iter_samples():
            tok, mask = np.asarray(s.token_ids), np.asarray(s.answer_mask)
            answer = np.flatnonzero(mask)
            ids, lps = np.asarray(s.topk_ids)[answer - 1], np.asarray(s.topk_logprobs)[answer - 1]
            hit = ids == tok[answer, None]
            p.append(np.where(hit.any(1), np.exp((lps * hit).sum(1)), 0.0))
            top1.append(ids[:, 0] == tok[answer])
    return np.concatenate(p), np.concatenate(top1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("caches", nargs="+", help="cache folders (or URLs)")
    args = ap.parse_args()
    print("| cache | answer tokens | mean p(label) | p(label) > 0.99 | top-1 = label |")
    print("|---|---|---|---|---|")
    for path in args.caches:
        p, top1 = label_probabilities(path)
        print(f"| {path} | {len(p)} | {p.mean():.3f} | {100 * (p > 0.99).mean():.0f}% | {100 * top1.mean():.1f}% |")


if __name__ == "__main__":
    main()
