"""Where the student's distillation signal lands: gradient norm of the main pass's L_ar + L_kl (stage 2,
w_student = 0) on the student's last question state (which predicts the first answer token) and on its
answer states (which predict the later ones), per task kind and main-pass mode; L_s's for comparison.

    PYTHONPATH=genrecal_cache/compat python bench/quality_signal.py --out bench/out/quality   # after bench/quality.py

Uses the suite's teacher cache and each student's seed-0 init (a fresh Recalibrator, seed 0): it shows
where each formulation *can* send the teacher's signal, not how much a trained run gets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def forward_with_student_states(model, batch, stage: int):
    """(the model's losses for `stage`, the student's final hidden states): a backward fills their .grad."""
    seen = {}
    hook = model.student.model.register_forward_hook(lambda m, i, o: seen.update(h=o.last_hidden_state))
    try:
        losses = model(batch, stage)
    finally:
        hook.remove()
    seen["h"].retain_grad()
    return losses, seen["h"]


def grad_norms(model, batch, stage_losses: tuple[str, ...]) -> tuple[float, float]:
    """(mean grad norm on the states before each answer, mean over the answer states but the last) of the
    sum of `stage_losses`, w.r.t. the student's final hidden states."""
    losses, h = forward_with_student_states(model, batch, 2)
    sum(losses[k] for k in stage_losses).backward()
    g = h.grad.norm(dim=-1)
    first, later = [], []
    for i, e in enumerate(batch.examples):
        for a, b in e.student_spans:
            first.append(float(g[i, a - 1]))
            later += [float(x) for x in g[i, a:b - 1]]
    model.zero_grad(set_to_none=True)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return mean(first), mean(later)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "quality"), help="a bench/quality.py --out folder")
    p.add_argument("--per-kind", type=int, default=16, help="samples per task kind")
    args = p.parse_args(argv)
    import torch

    from genrecal_cache.families import adapter_for
    from genrecal_cache import open_cache
    from genrecal_cache.testing import install_compat_shim
    from genrecal_train.config import TrainConfig
    from genrecal_train.batches import collate, make_example
    from genrecal_train.model import GenRecal

    install_compat_shim()
    torch.set_num_threads(1)
    out = Path(args.out)
    cache = open_cache(out / "cache")
    kinds: dict[str, list[int]] = {}
    for i in range(len(cache)):
        kind = str(cache[i].extra.get("qtype", "all")).split("/")[0]
        if len(kinds.setdefault(kind, [])) < args.per_kind:
            kinds[kind].append(i)
    rows, result = [], {}
    t_tok = cache.teacher_tokenizer()
    for sdir in sorted((out / "students").glob("*-seed0")):
        adapter = adapter_for(sdir)
        processor = adapter.load_processor(sdir)
        for mode in ("teacher", "student_aligned"):
            cfg = TrainConfig(cache=str(out / "cache"), student=str(sdir), out="unused", main_pass_answer=mode)
            torch.manual_seed(0)
            model = GenRecal(adapter.load_model(sdir), adapter, cache.head(), cfg).train()
            model.set_stage(2)
            for kind, idx in kinds.items():
                batch = collate([make_example(cache[i], adapter, processor, 2048, t_tok) for i in idx],
                                processor.tokenizer.pad_token_id, 0)
                kd = grad_norms(model, batch, ("l_ar", "l_kl"))
                sft = grad_norms(model, batch, ("l_s",))
                result[f"{sdir.name}/{mode}/{kind}"] = {"kd": kd, "l_s": sft}
                rows.append(f"| {sdir.name.split('-')[0]} | {mode} | {kind} | {kd[0]:.2e} | {kd[1]:.2e} | "
                            f"{sft[0]:.2e} | {sft[1]:.2e} |")
    table = "\n".join(["| student | main pass | kind | L_ar+L_kl: before answer | L_ar+L_kl: answer states | "
                       "L_s: before answer | L_s: answer states |", "|---|---|---|---|---|---|---|", *rows])
    print(table)
    (out / "signal.json").write_text(json.dumps({"table_md": table, "norms": result}, indent=1))
    return result


if __name__ == "__main__":
    main()
