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
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .demo_data import COLOURS, SHAPES

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


COMPAT_DIR = Path(__file__).parent / "compat"


def install_compat_shim() -> bool:
    """Load the CPU compatibility shim (`compat/sitecustomize.py`) into this process if needed.

    Subprocesses get it from PYTHONPATH (see tests/conftest.py); this covers the current process
    when it was started without. Idempotent; returns True when torchvision is missing (shim active).
    """
    name = "genrecal_compat_sitecustomize"
    module = sys.modules.get("sitecustomize")
    if module is None or not hasattr(module, "torchvision_missing"):  # ours was not loaded at startup
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, COMPAT_DIR / "sitecustomize.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    module.install()
    return module.torchvision_missing()


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
                    add_bos: bool = False, model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and wrap it as a transformers fast tokenizer.

    `special_tokens` get the first ids, in order; `split_regex` is the family's pre-tokenizer
    pattern; `add_bos` adds a post-processor that prepends `bos_token` (Llama-3 behaviour).
    Deterministic for the same inputs. The result may be smaller than `vocab_size` when the
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
                                   extra_special_tokens=[t for t in special_tokens
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
    out_dir = _save(out_dir, seed, lambda: LlavaForConditionalGeneration(config), processor)
    _use_hub_vision_tower_names(out_dir / "model.safetensors")
    return out_dir


def _use_hub_vision_tower_names(path: Path) -> None:
    """Rename `vision_tower.*` weights to the hub layout `vision_tower.vision_model.*`, in place.

    transformers 5 saves a LLaVA model that was built from a config (never loaded) without the
    `vision_model.` level of its SigLIP/CLIP tower, and vLLM cannot load that. Hub checkpoints
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


def tiny_pair(root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """(teacher_dir, student_dir) under `root`, built once: reuses folders that are already complete."""
    root = Path(root)
    teacher, student = root / "teacher", root / "student"
    if not (teacher / "config.json").is_file():
        build_tiny_teacher(teacher, seed=seed)
    if not (student / "config.json").is_file():
        build_tiny_student(student, seed=seed + 1)
    return teacher, student


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


def _save(out_dir: str | Path, seed: int, make_model: Callable[[], torch.nn.Module], processor: Any) -> Path:
    """Build the model under `seed` and save model + processor; the folder appears complete or not at all."""
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
        if out_dir.exists():  # rebuilding over an old folder
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


__all__ = ["build_tiny_student", "build_tiny_teacher", "install_compat_shim", "tiny_pair", "tokenizer_corpus",
           "train_tokenizer"]
