"""Tiny real vision-language models for tests and demos: the tiny teacher/student pair and one model of
every supported family, built offline in seconds.

Each family builds its own tiny model (`build_tiny` in its module under genrecal_cache/families/, with the
kit in families/tiny.py); this module gathers them (`FAMILY_BUILDERS`, `build_tiny_family`) and builds the
pair the demo and the tests distil with. The pair is deliberately mismatched the way real teacher/student
pairs are:

=================  ==================================  ==================================
                   teacher (`build_tiny_teacher`)      student (`build_tiny_student`)
=================  ==================================  ==================================
architecture       Qwen2-VL (M-RoPE, ViT + merger)     LLaVA: Llama text + SigLIP vision
tokenizer          ~800 tokens, Qwen2 split regex      ~500 tokens, Llama-3 split regex,
                                                       American-spelling corpus
chat template      Qwen2-VL's own (im_start/im_end)    Llama-3 style headers, adds BOS
image tokens       4 for a 56x56 image (dynamic)       16 per image (fixed 32x32 input)
head               untied lm_head; config vocab        untied lm_head, vocab = tokenizer
                   padded to a multiple of 64, as
                   real Qwen checkpoints are
=================  ==================================  ==================================

Text head_dim is 64 (teacher) / 32 (student): vLLM's CPU attention needs at least 32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import TinyModelsConfig
from .cpu_compat import install_compat_shim  # re-exported: tests and benches load the shim from here
from .demo_data import write_demo_dataset
from .families import (
    gemma3, internvl, llava, llava_onevision, mistral3, paligemma, qwen2_5_vl, qwen2_vl, qwen3_vl, smolvlm,
)
from .families.llava import build_tiny_student
from .families.qwen2_vl import build_tiny_teacher
from .families.tiny import tokenizer_corpus, train_tokenizer

__all__ = ["FAMILY_BUILDERS", "build_tiny_family", "build_tiny_student", "build_tiny_teacher",
           "install_compat_shim", "tiny_pair", "tokenizer_corpus", "train_tokenizer", "write_mixed_size_dataset"]

# model_type -> its module's `build_tiny(out_dir, seed)` (Idefics3 shares SmolVLM's code and has none)
FAMILY_BUILDERS: dict[str, Callable[[Path, int], Path]] = {
    m.__name__.rpartition(".")[2]: m.build_tiny for m in (
        qwen2_vl, llava, qwen2_5_vl, qwen3_vl, internvl, gemma3, smolvlm, llava_onevision, mistral3, paligemma)}


def tiny_pair(root: str | Path, seed: int = TinyModelsConfig.seed) -> tuple[Path, Path]:
    """(teacher_dir, student_dir) under `root`, built once: reuses folders that are already complete."""
    root = Path(root)
    teacher, student = root / "teacher", root / "student"
    if not (teacher / "config.json").is_file():
        build_tiny_teacher(teacher, seed=seed)
    if not (student / "config.json").is_file():
        build_tiny_student(student, seed=seed + 1)
    return teacher, student


def build_tiny_family(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random model of `family` (a `model_type` of genrecal_cache.families) into `out_dir`."""
    if family not in FAMILY_BUILDERS:
        raise ValueError(f"no tiny builder for family {family!r}; have {sorted(FAMILY_BUILDERS)}")
    install_compat_shim()
    return FAMILY_BUILDERS[family](Path(out_dir), seed)


def write_mixed_size_dataset(out_dir: str | Path, n: int = 8, seed: int = 0) -> Path:
    """The demo questions with images of different sizes and aspect ratios (landscape, portrait, square,
    32 to 96 pixels), so a batch holds images of different sizes; returns the JSONL path."""
    import json
    import random

    out_dir = Path(out_dir)
    path = write_demo_dataset(out_dir, n=n, seed=seed, image_size=56)
    rng = random.Random(seed)
    sizes = [(56, 56), (96, 40), (40, 80), (72, 72), (32, 64), (88, 64), (32, 32)]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    from PIL import Image

    for rec in records:
        refs = rec.get("image") or []
        for ref in [refs] if isinstance(refs, str) else refs:
            img = Image.open(out_dir / ref)
            img.resize(rng.choice(sizes)).save(out_dir / ref)
    return path
