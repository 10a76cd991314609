"""Recalibrator size for real teacher/student pairs, from configs written in code (no download, no memory).

Both models are built on the meta device from `genrecal_cache.families.flagships`; the Recalibrator is
built exactly as the trainer builds it (the student's own decoder-layer class, rotary embedding and
text config, 2 blocks by default) and its parameters are counted.

    python bench/recalibrator_size.py [--layers 2]
"""

from __future__ import annotations

import argparse

import torch

from genrecal_cache.families import adapter_for
from genrecal_cache.families.flagships import flagship_config
from genrecal_train.recalibrator import Recalibrator

PAIRS = [("Qwen2-VL-72B-Instruct", "Qwen2-VL-7B-Instruct"), ("Qwen2-VL-72B-Instruct", "Qwen2-VL-2B-Instruct"),
         ("InternVL2_5-78B", "InternVL2_5-8B"), ("Qwen2.5-VL-72B-Instruct", "Qwen2-VL-7B-Instruct"),
         ("gemma-3-27b-it", "Qwen2-VL-2B-Instruct")]


def recalibrator_params(teacher: str, student: str, layers: int = 2) -> int:
    t_cfg = flagship_config(teacher)
    s_cfg = flagship_config(student)
    adapter = adapter_for(s_cfg)
    model = adapter.meta_model(s_cfg)
    with torch.device("meta"):
        rec = Recalibrator.from_student(model, d_teacher=t_cfg.get_text_config().hidden_size, num_layers=layers,
                                        decoder_layer_cls=adapter.decoder_layer_class(model),
                                        rotary_factory=adapter.rotary_factory(model),
                                        text_config=adapter.text_config(model))
    return sum(p.numel() for p in rec.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    print(f"| teacher -> student | d_t | d_s | Recalibrator ({args.layers} blocks) |")
    print("|---|---|---|---|")
    for t, s in PAIRS:
        n = recalibrator_params(t, s, args.layers)
        d_t, d_s = (flagship_config(x).get_text_config().hidden_size for x in (t, s))
        print(f"| {t} -> {s} | {d_t} | {d_s} | {n / 1e9:.3f}B ({n:,}) |")


if __name__ == "__main__":
    main()
