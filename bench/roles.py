"""Role-aware storage bench: bytes, plan agreement, read speed and basis cost per context policy, side by side.

    PYTHONPATH=genrecal_cache/compat HF_HUB_OFFLINE=1 python bench/roles.py --suite bench/out/quality

`--suite` is a `bench/quality.py` output folder run with the context arms
(`--arms genrecal,genrecal_lowrank,genrecal_text,genrecal_none`): its trained teacher and distillation data are
reused. For each hidden codec (fp32 as the suite trains on; bf16 and ecq as labs store) and each context policy
(full with top-k at every row = what format version 2 stores; lowrank / text / none with top-k at answer rows),
it extracts the teacher's cache over the distillation set and prints:
- bytes per sample of the feature files, and their ratio to full storage;
- `genrecal-cache plan`'s estimate of the feature bytes given the cache's own counts and role mix, and its error;
- read throughput (tokens/s of `iter_samples("shuffled")`, decoded float32 hidden, low-rank rows reconstructed);
- the low-rank basis fit's share of extraction time (timed inside the writer);
then, from the suite's results, accuracy per policy and task kind (mean of seeds) and the regularization pass's
losses (stage 2 reg_ar / reg_kl, mean of the last 50 steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from _machine import machine  # noqa: E402

from genrecal_cache import open_cache  # noqa: E402
from genrecal_cache.extract import ExtractConfig, extract  # noqa: E402
from genrecal_cache.format.roles import ContextBasis  # noqa: E402
from genrecal_cache.plan import estimate_like, sample_rows  # noqa: E402

POLICIES = ("full", "lowrank", "text", "none")
ARMS = {"full": "genrecal", "lowrank": "genrecal_lowrank", "text": "genrecal_text", "none": "genrecal_none"}


class TimedFit:
    """Times ContextBasis.fit (the only extra work low-rank storage adds to extraction besides a small matmul)."""
    seconds = 0.0

    def __enter__(self):
        self._fit = ContextBasis.fit.__func__

        def fit(cls, states, rank):
            t0 = time.perf_counter()
            try:
                return self._fit(cls, states, rank)
            finally:
                TimedFit.seconds += time.perf_counter() - t0
        ContextBasis.fit = classmethod(fit)
        return self

    def __exit__(self, *exc):
        ContextBasis.fit = classmethod(self._fit)


def feature_bytes(m) -> int:
    return sum(n for rel, n in m.sizes.items() if rel.startswith("features.zarr/") and "/c/" in rel)


def read_once(path: Path) -> float:
    c = open_cache(path)
    t0, n = time.perf_counter(), 0
    for s in c.iter_samples("shuffled", seed=0):
        n += len(s.token_ids)
    rate = n / (time.perf_counter() - t0)
    c.close()
    return rate


def read_speeds(paths: list[Path], rounds: int = 5) -> list[float]:
    """Best tokens/s of each cache over `rounds`, the caches read in turn within each round (a busy machine's
    drift falls on all of them alike)."""
    best = [0.0] * len(paths)
    for r in range(rounds):
        order = range(len(paths)) if r % 2 == 0 else reversed(range(len(paths)))
        for i in order:
            best[i] = max(best[i], read_once(paths[i]))
    return best


def plan_error(path: Path, image_ids: list[int], sample: dict | None = None) -> tuple[int, float]:
    c = open_cache(path)
    est = estimate_like(c, image_ids, sample)
    return est.features_bytes, est.features_bytes / feature_bytes(c.manifest) - 1


def basis_fit(sizes: tuple[int, ...] = (4096, 8192), rows: int = 4096, rank: int = 64) -> None:
    """The basis fit at real teachers' sizes on synthetic LLM-like context rows: seconds (best of 2, after a
    warm-up) and the share of the rows' variance it keeps against the exact principal subspace (float64 eigh)."""
    import torch

    from genrecal_cache.fidelity import synthetic_post_norm_states

    print(f"\nbasis fit: {rows:,} synthetic LLM-like rows, rank {rank}")
    for d in sizes:
        x = synthetic_post_norm_states(rows, d, seed=0)
        ContextBasis.fit(x, rank)
        secs = []
        for _ in range(2):
            t0 = time.perf_counter()
            b = ContextBasis.fit(x, rank)
            secs.append(time.perf_counter() - t0)
        xc = torch.from_numpy(x).double()
        xc -= xc.mean(0)
        kept = float((xc @ torch.from_numpy(b.basis).double().T).square().sum())
        best = float(torch.linalg.eigvalsh(xc.T @ xc).flip(0)[:rank].sum())
        print(f"d={d}: {min(secs):.2f} s; keeps {100 * kept / best:.2f}% of the variance the exact subspace keeps")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default=str(ROOT / "bench" / "out" / "quality"))
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "roles"))
    p.add_argument("--codecs", default="fp32,bf16,ecq")
    p.add_argument("--fit-only", action="store_true", help="only time the basis fit at d=4096 and 8192 (seconds)")
    args = p.parse_args()
    if args.fit_only:
        print(f"# bench/roles.py --fit-only on {machine()}")
        return basis_fit()
    suite, out = Path(args.suite), Path(args.out)
    teacher, data = suite / "teacher" / "sft" / "final", suite / "data" / "train" / "data.jsonl"
    print(f"# bench/roles.py on {machine()}; teacher {teacher}, data {data}")
    pilot = out / "pilot"  # 200 samples of the teacher's own extra data: other samples than the cache's
    if not (pilot / "manifest.json").exists():
        extract(ExtractConfig(teacher=str(teacher), data=str(suite / "data" / "teacher_extra" / "data.jsonl"),
                              out=str(pilot), backend="transformers", progress=False, hidden_codec="fp32",
                              context="full", topk_rows="all", limit=200))
    rows = []
    for codec in args.codecs.split(","):
        image_ids: list[int] = []
        for policy in ("text",) + tuple(p for p in POLICIES if p != "text"):  # text first: it names the image ids
            path = out / f"{codec}-{policy}"
            TimedFit.seconds = 0.0
            t0 = time.perf_counter()
            if not (path / "manifest.json").exists():
                with TimedFit():
                    extract(ExtractConfig(teacher=str(teacher), data=str(data), out=str(path), backend="transformers",
                                          progress=False, hidden_codec=codec, context=policy,
                                          topk_rows="all" if policy == "full" else "answer"))
            secs = time.perf_counter() - t0
            m = open_cache(path).manifest
            if policy == "text":
                image_ids = m.roles.image_token_ids
            est, err = plan_error(path, image_ids)
            _, pilot_err = plan_error(path, image_ids, sample_rows(open_cache(pilot), image_ids))
            rows.append(dict(codec=codec, policy=policy, version=m.format_version, samples=m.counts["ok"],
                             bytes=feature_bytes(m), plan=est, plan_err=err, pilot_err=pilot_err, path=path,
                             extract_s=secs,
                             fit_s=TimedFit.seconds))
    for r, rate in zip(rows, read_speeds([r["path"] for r in rows])):
        r["read_tok_s"] = rate
    print("\n| codec | policy | format | feature bytes/sample | x of full | plan error | plan error, --sample pilot "
          "| read tokens/s | x of full | basis fit share of extract |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        full = next(x for x in rows if x["codec"] == r["codec"] and x["policy"] == "full")
        fit = f"{100 * r['fit_s'] / r['extract_s']:.2f}% ({r['fit_s']:.3f} of {r['extract_s']:.1f} s)" \
            if r["policy"] == "lowrank" and r["fit_s"] else "-"
        print(f"| {r['codec']} | {r['policy']} | v{r['version']} | {r['bytes'] / r['samples']:,.0f} | "
              f"{r['bytes'] / full['bytes']:.3f} | {100 * r['plan_err']:+.1f}% | {100 * r['pilot_err']:+.1f}% | "
              f"{r['read_tok_s']:,.0f} | "
              f"{r['read_tok_s'] / full['read_tok_s']:.2f} | {fit} |")
    basis_fit()
    results = suite / "results.json"
    if not results.exists():
        results = suite / "results.partial.json"
    if results.exists():
        res = json.loads(results.read_text())
        print("\nAccuracy (exact match %, mean of seeds), the regularization pass's losses (stage 2, last 50 steps) "
              "and the share of stage 1-2 time the step waited for data")
        print("| student | policy | seeds | word | phrase | clauses | all | reg_ar | reg_kl | data wait |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for student in res["setup"]["students"]:
            for policy, arm in ARMS.items():
                runs = [r for r in res["runs"] if r["student"] == student and r["arm"] == arm]
                if not runs:
                    continue
                kinds = {k: 100 * statistics.fmean(r["kinds"][k] for r in runs) for k in runs[0]["kinds"]}
                reg = {"reg_ar": [], "reg_kl": [], "wait": []}
                for r in runs:
                    lines = [json.loads(x) for x in Path(r["metrics"]).read_text().splitlines()]
                    s2 = [x for x in lines if x.get("stage") == 2 and "reg_ar" in x][-50:]
                    for k in ("reg_ar", "reg_kl"):
                        reg[k].append(statistics.fmean(x[k] for x in s2))
                    reg["wait"].append(statistics.fmean(x["data_wait_frac"] for x in lines if x.get("stage") in (1, 2)))
                print(f"| {student} | {policy} | {len(runs)} | " + " | ".join(f"{kinds[k]:.1f}" for k in
                      ("word", "phrase", "clauses")) + f" | {100 * statistics.fmean(r['accuracy'] for r in runs):.1f}"
                      f" | {statistics.fmean(reg['reg_ar']):.3f} | {statistics.fmean(reg['reg_kl']):.4f} | "
                      f"{100 * statistics.fmean(reg['wait']):.1f}% |")


if __name__ == "__main__":
    main()
