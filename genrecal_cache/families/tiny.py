"""Tiny random models of every supported family, built offline in seconds: the kit each family's `build_tiny`
(in its own module) uses.

Nothing is downloaded: configurations are written in the family modules, weights are random (seeded) and each
model gets its own byte-level BPE tokenizer trained here with `tokenizers`. Models are saved with
``save_pretrained`` (model + processor + tokenizer + chat template), so ``from_pretrained``, the family adapters
and vLLM load them exactly as they load a hub checkpoint. Text widths are 64 with head_dim 32 (vLLM's CPU
attention needs at least 32); vision towers are one small layer. Every family's images may come in any size:
each processor resizes, tiles or pads them its own way. torch and transformers are imported inside the
builders: importing a family stays cheap.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..demo_data import COLOURS, SHAPES

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

__all__ = ["GEMMA_NEWLINES", "LLAMA3_SPLIT_REGEX", "QWEN2_SPLIT_REGEX", "family_tokenizer", "mrope_section",
           "round_up", "save_tiny", "text_config", "tokenizer_corpus", "train_tokenizer", "use_hub_vision_tower_names",
           "with_gemma_newlines"]

# Pre-tokenizer split patterns of the real families (they decide where BPE merges may happen).
QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                      r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

_PROSE = """\
A picture shows one or more shapes on a light background. Each shape has a colour and a position.
Circles are round, squares have four equal sides and triangles have three corners. Look at the image
carefully before you answer the question, and give a short answer: one word or one number.
The model reads the question, looks at every part of the picture and then writes the answer.
Digits are written by hand; small images of them are hard to read, so the answer may be wrong.
You are a helpful assistant. The user asks and the assistant answers. Left and right are seen from
the viewer. The first image comes before the second image. Count every shape, even small ones.
A large teacher network is run once over the training data, and its final hidden states are stored
in a cache on disk. Later, a much smaller student learns from those stored features on modest
hardware. Because the two networks split text into different pieces, their vocabularies, token
boundaries and sequence lengths never line up, so a recalibrator maps the student's features into
the teacher's space, where the teacher's own language head can read them out again.
Training proceeds in three stages: alignment, distillation and fine-tuning. During alignment only
the recalibrator learns; during distillation the student's language body learns as well; finally
the recalibrator is dropped and the student is tuned alone on plain supervised answers.
Weather, music, gardens, rivers, mountains, kitchens, libraries, bicycles, windows and oceans
appear in everyday photographs; so do people walking, children playing, dogs running, birds flying,
cars parked along streets, trains crossing bridges, boats drifting near harbours and clouds moving
slowly over quiet villages. Scientists measure temperature, pressure, distance, velocity, weight and
brightness; engineers design engines, circuits, buildings, software, networks and satellites.
Questions about charts ask for maxima, minima, averages, trends, percentages or comparisons between
groups; questions about documents ask for dates, names, totals, addresses, signatures or titles.
"""


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizers are trained on: every demo question and answer plus some prose."""
    texts = [_PROSE, "system user assistant", "Which digit is this?", " ".join(str(i) for i in range(100))]
    colours, numbers = list(COLOURS), [str(k) for k in range(1, 5)]
    for shape in SHAPES:
        texts.append(f"What colour is the {shape}? Which image shows a {shape}, the first or the second?")
        texts += [f"Is the {c} {shape} on the left or the right? {c} {shape} left right" for c in colours]
    texts += ["What shape is this? Which shape is shown? And what colour is it?",
              "How many shapes are there? Count the shapes. Which colour is the shape?",
              " ".join(colours + list(SHAPES) + numbers + ["left", "right", "first", "second"])]
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str], *,
                    split_regex: str = QWEN2_SPLIT_REGEX, nfc: bool = False, bos_token: str | None = None,
                    eos_token: str | None = None, pad_token: str | None = None,
                    add_bos: bool = False, model_max_length: int = 4096,
                    named_tokens: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and wrap it as a transformers fast tokenizer.

    `special_tokens` get the first ids, in order; `split_regex` is the family's pre-tokenizer
    pattern; `add_bos` adds a post-processor that prepends `bos_token` (Llama-3 behaviour).
    `named_tokens` ({"boi_token": "<start_of_image>", ...}) become tokenizer attributes (and `*_id`s),
    as processors of some families expect. Deterministic for the same inputs. The result may be smaller than `vocab_size` when the
    corpus runs out of pairs to merge.
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    if add_bos:
        if bos_token is None:
            raise ValueError("add_bos=True needs a bos_token")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, tok.token_to_id(bos_token))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token,
                                   pad_token=pad_token, model_max_length=model_max_length,
                                   extra_special_tokens=named_tokens or [t for t in special_tokens
                                                                         if t not in (bos_token, eos_token, pad_token)])


def family_tokenizer(special: Sequence[str], named: dict[str, str] | None = None, vocab_size: int = 600,
                      **kw: Any) -> PreTrainedTokenizerFast:
    return train_tokenizer(tokenizer_corpus(), vocab_size, special, split_regex=QWEN2_SPLIT_REGEX,
                           named_tokens=named, **kw)


# Gemma's SentencePiece vocabulary has runs of 1-4 newlines as single tokens, and vLLM's Gemma 3 and
# PaliGemma processors look them up by their text ("\n"): a byte-level BPE only has them as "Ċ".
GEMMA_NEWLINES = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]


def with_gemma_newlines(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Add Gemma's newline tokens (plain added tokens: the longest run wins, as in Gemma's vocabulary)."""
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in GEMMA_NEWLINES])
    return tok


def text_config(tok: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2, head_dim: int = 32, **kw: Any) -> dict:
    heads = hidden // head_dim
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=head_dim,
                max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw)


def mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2]
    return section + [half - sum(section)]


def save_tiny(out_dir: str | Path, seed: int, make_model: Callable[[], torch.nn.Module], processor: Any,
          hub_vision_names: bool = False) -> Path:
    """Build the model under `seed` and save model + processor; the folder appears complete or not at all.
    `hub_vision_names`: rename the vision tower's tensors as hub checkpoints (and vLLM) have them."""
    import torch

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with torch.random.fork_rng(devices=[]):  # seed locally: callers' RNG streams stay untouched
            torch.manual_seed(seed)
            model = make_model()
        model.eval().save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if hub_vision_names:
            use_hub_vision_tower_names(tmp / "model.safetensors")
        if out_dir.exists():  # rebuilding over an old folder
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def use_hub_vision_tower_names(path: Path) -> None:
    """Rename `vision_tower.*` weights to the hub layout `vision_tower.vision_model.*`, in place.

    transformers 5 saves a model that was built from a config (never loaded) without the
    `vision_model.` level of its SigLIP/CLIP tower (LLaVA, LLaVA-OneVision, Gemma 3, PaliGemma),
    and vLLM cannot load that. Hub checkpoints
    have the level; transformers strips it on load and restores it on save, so after this rename
    the tiny student round-trips through both exactly like a hub model.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    renamed = {("vision_tower.vision_model." + k[len("vision_tower."):]
                if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
               for k, v in tensors.items()}
    save_file(renamed, path, metadata=metadata)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
