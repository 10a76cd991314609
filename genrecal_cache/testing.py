"""Tiny real vision-language models, built offline in seconds, for tests and demos.

Nothing is downloaded: configurations are written here, weights are random (seeded) and each
model gets its own byte-level BPE tokenizer trained locally with `tokenizers`. Both are saved
with ``save_pretrained`` (model + processor + tokenizer + chat template), so ``from_pretrained``,
the family adapters and vLLM load them exactly as they load a hub checkpoint.

The pair is deliberately mismatched the way real teacher/student pairs are:

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

Long because each supported family gets a real tiny model and a locally trained tokenizer here,
so that tests and benchmarks need no network.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .cpu_compat import install_compat_shim  # re-exported: tests and benches load the shim from here
from .demo_data import COLOURS, SHAPES, write_demo_dataset
from .options import REQUIRED, option

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

# torch and transformers are imported inside the builders: importing this module (as test
# fixtures do) stays cheap for tests that never build a model.

# Pre-tokenizer split patterns of the real families (they decide where BPE merges may happen).
QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                      r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2-VL-*-Instruct's chat template, verbatim.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

STUDENT_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>", "<|pad|>", "<image>"]
# Llama-3 style: BOS in the template, headers per turn, string content trimmed (as Llama 3's is).
STUDENT_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<image>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

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


def build_tiny_teacher(out_dir: str | Path, seed: int = 0, hidden_size: int = 128, layers: int = 2,
                       vocab_size: int = 800, head_dim: int = 64, vision_width: int = 64, vision_depth: int = 1,
                       image_side: int | None = None) -> Path:
    """Save a random Qwen2-VL-architecture model with its processor into `out_dir`; return it.

    A 56x56 image becomes a 4x4 grid of 14-pixel patches, merged 2x2 into 4 image tokens
    (`min_pixels=784, max_pixels=3136`, so larger images are scaled down to at most 4 tokens).
    `image_side=S` instead resizes every image to about S x S pixels ((S/28)^2 image tokens), e.g.
    112 for 16 tokens.
    """
    install_compat_shim()  # Qwen2VLProcessor cannot even be built without torchvision otherwise
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    tokenizer = train_tokenizer(tokenizer_corpus(), vocab_size, QWEN2_VL_SPECIAL_TOKENS, split_regex=QWEN2_SPLIT_REGEX,
                                nfc=True, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    heads = hidden_size // head_dim
    rotary_half = head_dim // 2  # M-RoPE splits the rotary frequencies into (temporal, height, width)
    mrope_section = [rotary_half // 4, (rotary_half - rotary_half // 4) // 2]
    mrope_section.append(rotary_half - sum(mrope_section))
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=_round_up(len(tokenizer), 64), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=vision_depth, embed_dim=vision_width, hidden_size=hidden_size, num_heads=max(1, vision_width // 64),
                           mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    pixels = (784, 3136) if image_side is None else (image_side * image_side, image_side * image_side)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels[0], max_pixels=pixels[1], patch_size=14, merge_size=2,
                                               temporal_patch_size=2)
    processor = _qwen2_vl_processor(Qwen2VLProcessor, image_processor, tokenizer)
    return _save(out_dir, seed, lambda: Qwen2VLForConditionalGeneration(config), processor)


def build_tiny_student(out_dir: str | Path, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                       vocab_size: int = 500, head_dim: int = 32, image_size: int = 32, patch_size: int = 8) -> Path:
    """Save a random LLaVA model (Llama text + SigLIP vision) with its processor; return `out_dir`.

    Every image is resized to `image_size` and gives (image_size/patch_size)^2 tokens (16 by default).
    """
    from transformers import (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              SiglipImageProcessorPil, SiglipVisionConfig)

    # A different corpus (American spelling), regex and size: token splits differ from the teacher's
    # even for shared words, as they do between real model families.
    corpus = [t.replace("colour", "color") for t in tokenizer_corpus()]
    tokenizer = train_tokenizer(corpus, vocab_size, STUDENT_SPECIAL_TOKENS, split_regex=LLAMA3_SPLIT_REGEX,
                                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>",
                                add_bos=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in STUDENT_SPECIAL_TOKENS}
    heads = hidden_size // head_dim
    config = LlavaConfig(
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
            max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"], pad_token_id=ids["<|pad|>"],
        ),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=1, image_size=image_size, patch_size=patch_size),
        image_token_index=ids["<image>"], image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False,
    )
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="full", chat_template=STUDENT_CHAT_TEMPLATE,
                               image_token="<image>", num_additional_image_tokens=0)
    return _save(out_dir, seed, lambda: LlavaForConditionalGeneration(config), processor, hub_vision_names=True)


def _use_hub_vision_tower_names(path: Path) -> None:
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


@dataclass
class TinyModelsConfig:
    """The tiny pair `genrecal-cache tiny-models` builds (`tiny_pair`)."""
    out: str = option(REQUIRED, "Folder to hold teacher/ and student/.")
    seed: int = option(0, "Seed of the weights.")


def tiny_pair(root: str | Path, seed: int = TinyModelsConfig.seed) -> tuple[Path, Path]:
    """(teacher_dir, student_dir) under `root`, built once: reuses folders that are already complete."""
    root = Path(root)
    teacher, student = root / "teacher", root / "student"
    if not (teacher / "config.json").is_file():
        build_tiny_teacher(teacher, seed=seed)
    if not (student / "config.json").is_file():
        build_tiny_student(student, seed=seed + 1)
    return teacher, student


# --- tiny models of every supported family ----------------------------------------------------
#
# One builder per family (`build_tiny_family(name, out_dir)`), each with transformers' own config,
# model and processor classes, a tokenizer trained here with the family's special tokens, and a chat
# template that keeps the family's quirks (typed-only content, BOS written by the template, ...).
# Text widths are 64 with head_dim 32; vision towers are one small layer. Every family's images may
# come in any size: each processor resizes, tiles or pads them its own way.

QWEN_STYLE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                      "<|image_pad|>", "<|video_pad|>"]


def _family_tokenizer(special: Sequence[str], named: dict[str, str] | None = None, vocab_size: int = 600,
                      **kw: Any) -> PreTrainedTokenizerFast:
    return train_tokenizer(tokenizer_corpus(), vocab_size, special, split_regex=QWEN2_SPLIT_REGEX,
                           named_tokens=named, **kw)


# Gemma's SentencePiece vocabulary has runs of 1-4 newlines as single tokens, and vLLM's Gemma 3 and
# PaliGemma processors look them up by their text ("\n"): a byte-level BPE only has them as "Ċ".
GEMMA_NEWLINES = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]


def _with_gemma_newlines(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Add Gemma's newline tokens (plain added tokens: the longest run wins, as in Gemma's vocabulary)."""
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in GEMMA_NEWLINES])
    return tok


def _text(tok: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2, head_dim: int = 32, **kw: Any) -> dict:
    heads = hidden // head_dim
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=head_dim,
                max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw)


def _mrope(head_dim: int) -> list[int]:
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2]
    return section + [half - sum(section)]


def _qwen_style(name: str, out_dir: Path, seed: int) -> Path:
    """Qwen2.5-VL / Qwen3-VL: the Qwen2-VL processor layout and template, their own model classes."""
    import transformers

    tok = _family_tokenizer(QWEN_STYLE_SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_STYLE_SPECIAL}
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": _mrope(32)}
    if name == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(
            text_config=_text(tok, rms_norm_eps=1e-6, rope_parameters=rope),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=64,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                               fullatt_block_indexes=[0]),
            tie_word_embeddings=False, **tokens)
        model_cls, proc_cls, patch, template = (transformers.Qwen2_5_VLForConditionalGeneration,
                                                transformers.Qwen2_5_VLProcessor, 14, QWEN2_VL_CHAT_TEMPLATE)
    else:  # qwen3_vl: interleaved M-RoPE, DeepStack, 16-pixel patches, no default system prompt
        config = transformers.Qwen3VLConfig(
            text_config=_text(tok, rms_norm_eps=1e-6, rope_parameters={**rope, "mrope_interleaved": True}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=64,
                               patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                               deepstack_visual_indexes=[0]),
            tie_word_embeddings=False, **tokens)
        model_cls, proc_cls, patch = (transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLProcessor, 16)
        template = QWEN2_VL_CHAT_TEMPLATE.replace(
            "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
            "<|im_end|>\n{% endif %}", "")
    side = 2 * patch * 2  # 2x2 merged tokens at most: (side/patch/2)^2 = 4 image tokens
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=(patch * 2) ** 2, max_pixels=side * side,
                                                            patch_size=patch, merge_size=2, temporal_patch_size=2)
    processor = proc_cls(image_processor=image_processor, tokenizer=tok, chat_template=template)
    return _save(out_dir, seed, lambda: model_cls(config), processor)


INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<IMG_CONTEXT>\n{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _internvl(out_dir: Path, seed: int) -> Path:
    """InternVL (-hf layout): InternViT + pixel shuffle + Qwen2; images tiled into 1-4 crops by aspect ratio."""
    import transformers

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = _family_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *named.values()], named,
                            eos_token="<|im_end|>", pad_token="<|endoftext|>")
    config = transformers.InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64,
                           image_size=[28, 28], patch_size=[7, 7]),
        text_config=dict(model_type="qwen2", **_text(tok, rms_norm_eps=1e-6)),
        image_token_id=tok.context_image_token_id, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False)
    image_processor = transformers.GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True,
                                                            min_patches=1, max_patches=4)
    processor = transformers.InternVLProcessor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                               chat_template=INTERNVL_CHAT_TEMPLATE)
    return _save(out_dir, seed, lambda: transformers.InternVLForConditionalGeneration(config), processor)


GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _gemma3(out_dir: Path, seed: int) -> Path:
    """Gemma 3: SigLIP + 2x2 average pooling to 4 image tokens, Gemma 3 text (x*(1+w) norms, sliding and
    full layers, tied head, soft-capped logits: real Gemma 3 checkpoints have no cap; it is set here so
    the tests exercise it)."""
    import transformers

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _with_gemma_newlines(_family_tokenizer(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>",
                                                  *named.values()], named, bos_token="<bos>", eos_token="<eos>",
                                                 pad_token="<pad>"))
    config = transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(**_text(
            tok, rms_norm_eps=1e-6, query_pre_attn_scalar=32, sliding_window=16, final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention"]) | {"tie_word_embeddings": True}),
        vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=1, image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id, tie_word_embeddings=True)
    image_processor = transformers.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                             chat_template=GEMMA3_CHAT_TEMPLATE)
    return _save(out_dir, seed, lambda: transformers.Gemma3ForConditionalGeneration(config), processor,
                 hub_vision_names=True)


# SmolVLM's own template: it reads only typed content parts (a plain-string answer renders as nothing)
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _smolvlm(out_dir: Path, seed: int) -> Path:
    """SmolVLM: SigLIP-style vision + pixel shuffle (4 tokens per 32-pixel tile), Llama text at
    `model.text_model`; images larger than a tile are split into tiles plus a global view."""
    import transformers

    named = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
             "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>"}
    tok = _family_tokenizer(["<|endoftext|>", "<|im_start|>", *named.values()], named, bos_token="<|im_start|>",
                            eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    config = transformers.SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", **_text(tok, rms_norm_eps=1e-5)),
        scale_factor=2, image_token_id=tok.image_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    image_processor = transformers.SmolVLMImageProcessorPil(do_image_splitting=True, size={"longest_edge": 64},
                                                           max_image_size={"longest_edge": 32})
    processor = transformers.SmolVLMProcessor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                              chat_template=SMOLVLM_CHAT_TEMPLATE)
    return _save(out_dir, seed, lambda: transformers.SmolVLMForConditionalGeneration(config), processor)


# LLaVA-OneVision's layout: images first, then the text parts; typed content only
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _llava_onevision(out_dir: Path, seed: int) -> Path:
    """LLaVA-OneVision: SigLIP (16 tokens per 32-pixel view), anyres crops on a 32/64-pixel grid, Qwen2 text."""
    import transformers

    tok = _family_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                            {"image_token": "<image>", "video_token": "<video>"},
                            eos_token="<|im_end|>", pad_token="<|endoftext|>")
    grid = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=1, image_size=32, patch_size=8),
        text_config=dict(model_type="qwen2", **_text(tok, rms_norm_eps=1e-6)),
        image_token_index=tok.image_token_id, video_token_index=tok.video_token_id, image_grid_pinpoints=grid,
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False)
    image_processor = transformers.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                                  image_grid_pinpoints=grid)
    processor = transformers.LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tok,
                                                     num_image_tokens=16, vision_feature_select_strategy="full",
                                                     chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE)
    return _save(out_dir, seed, lambda: transformers.LlavaOnevisionForConditionalGeneration(config), processor,
                 hub_vision_names=True)


MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'text' %}{{ block['text'] }}{% elif block['type'] == 'image' %}[IMG]{% endif %}"
    "{% endfor %}{% endif %}[/INST]{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def _mistral3(out_dir: Path, seed: int) -> Path:
    """Mistral 3: Pixtral vision at native resolution (8-pixel patches, longest edge 64, rows ended by
    [IMG_BREAK]), 2x2 patch merger, Mistral text; BOS written by the template. (transformers' Mistral 3
    fails on a batch whose images make a single merged token in all: keep images >= 2 merged patches.)"""
    import transformers

    special = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tok = _family_tokenizer(special, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = transformers.Mistral3Config(
        vision_config=transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=1, head_dim=32, image_size=64,
                                                       patch_size=8),
        text_config=transformers.MistralConfig(**_text(tok, rms_norm_eps=1e-5)),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1,
        tie_word_embeddings=False)
    image_processor = transformers.PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=8)
    processor = transformers.PixtralProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                              spatial_merge_size=2, chat_template=MISTRAL3_CHAT_TEMPLATE)
    return _save(out_dir, seed, lambda: transformers.Mistral3ForConditionalGeneration(config), processor)


def _paligemma(out_dir: Path, seed: int) -> Path:
    """PaliGemma: SigLIP (16 tokens per 32-pixel image) + linear projector + Gemma text (x*(1+w) norms, tied
    head); no chat template (the processor builds image tokens + BOS + question + newline + answer)."""
    import transformers

    tok = _with_gemma_newlines(_family_tokenizer(["<pad>", "<eos>", "<bos>", "<image>"], {"image_token": "<image>"},
                                                 bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"))
    image_processor = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)  # adds <loc>/<seg>
    text = transformers.GemmaConfig(**_text(tok, rms_norm_eps=1e-6) | {"tie_word_embeddings": True})
    text.vocab_size = len(processor.tokenizer)
    config = transformers.PaliGemmaConfig(
        vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=1, image_size=32, patch_size=8,
                                                      projection_dim=64),
        text_config=text, image_token_index=tok.image_token_id, projection_dim=64, hidden_size=64,
        tie_word_embeddings=True)
    return _save(out_dir, seed, lambda: transformers.PaliGemmaForConditionalGeneration(config), processor,
                 hub_vision_names=True)


def _qwen2_vl_small(out_dir: Path, seed: int) -> Path:
    return build_tiny_teacher(out_dir, seed=seed, hidden_size=64, head_dim=32, vision_width=32)


def _llava_small(out_dir: Path, seed: int) -> Path:
    return build_tiny_student(out_dir, seed=seed)


FAMILY_BUILDERS: dict[str, Callable[[Path, int], Path]] = {
    "qwen2_vl": _qwen2_vl_small,
    "llava": _llava_small,
    "qwen2_5_vl": lambda out, seed: _qwen_style("qwen2_5_vl", out, seed),
    "qwen3_vl": lambda out, seed: _qwen_style("qwen3_vl", out, seed),
    "internvl": _internvl,
    "gemma3": _gemma3,
    "smolvlm": _smolvlm,
    "llava_onevision": _llava_onevision,
    "mistral3": _mistral3,
    "paligemma": _paligemma,
}


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


def _qwen2_vl_processor(processor_cls: type, image_processor: Any, tokenizer: PreTrainedTokenizerFast) -> Any:
    """A Qwen2VLProcessor; its video processor is added only where torchvision can build one."""
    try:
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(min_pixels=784, max_pixels=3136, patch_size=14, merge_size=2,
                                                temporal_patch_size=2)
    except ImportError:  # no torchvision: the compat shim has removed the video processor
        return processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return processor_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                         chat_template=QWEN2_VL_CHAT_TEMPLATE)


def _save(out_dir: str | Path, seed: int, make_model: Callable[[], torch.nn.Module], processor: Any,
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
            _use_hub_vision_tower_names(tmp / "model.safetensors")
        if out_dir.exists():  # rebuilding over an old folder
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


__all__ = ["FAMILY_BUILDERS", "TinyModelsConfig", "build_tiny_family", "build_tiny_student", "build_tiny_teacher", "install_compat_shim",
           "tiny_pair", "tokenizer_corpus", "train_tokenizer", "write_mixed_size_dataset"]
