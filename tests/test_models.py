"""Tiny real models, family adapters (encode / heads / hidden states) and the CPU compatibility shim."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, LlamaConfig

from genrecal_cache.backends.hf import HFBackend
from genrecal_cache.data import Sample, decode_image, read_samples
from genrecal_cache.families import EncodeError, Encoded, LlavaAdapter, Qwen2VLAdapter, adapter_for
from genrecal_cache.testing import build_tiny_teacher

FAMILIES = ["teacher", "student"]


@pytest.fixture(params=FAMILIES)
def loaded(request: pytest.FixtureRequest):
    return request.getfixturevalue(request.param)


def _image(colour: str = "red", size: int = 56) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def _sample(sid: str, *turns: str, n_images: int = 1) -> Sample:
    """Alternating user/assistant turns; the first user turn gets `n_images` markers."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    messages[0]["content"] = "<image>\n" * n_images + messages[0]["content"]
    return Sample(sid, messages, [b""] * n_images, [])


def _answer_runs(processor, enc: Encoded) -> list[str]:
    """Decoded text of each contiguous run of answer tokens."""
    runs, mask, ids = [], enc.answer_mask.tolist(), enc.input_ids
    i = 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            runs.append(processor.tokenizer.decode(ids[i:j]))
            i = j
        else:
            i += 1
    return runs


# --- the tiny models themselves ----------------------------------------------------------------

def test_tiny_models_load_by_path_like_hub_models(teacher_dir: Path, student_dir: Path) -> None:
    t_cfg, s_cfg = AutoConfig.from_pretrained(teacher_dir), AutoConfig.from_pretrained(student_dir)
    assert (t_cfg.model_type, s_cfg.model_type) == ("qwen2_vl", "llava")
    assert isinstance(adapter_for(t_cfg), Qwen2VLAdapter) and isinstance(adapter_for(student_dir), LlavaAdapter)
    t_proc, s_proc = AutoProcessor.from_pretrained(teacher_dir), AutoProcessor.from_pretrained(student_dir)
    assert type(t_proc).__name__ == "Qwen2VLProcessor" and type(s_proc).__name__ == "LlavaProcessor"
    assert t_proc.chat_template and s_proc.chat_template and t_proc.chat_template != s_proc.chat_template
    assert t_cfg.text_config.hidden_size // t_cfg.text_config.num_attention_heads == 64  # vLLM CPU needs >= 32
    assert not t_cfg.tie_word_embeddings  # a separate lm_head matrix, as in the real teacher


def test_unsupported_family_is_named() -> None:
    with pytest.raises(ValueError, match=r"unsupported model type 'llama'; supported: gemma3, .*llava, .*qwen2_vl"):
        adapter_for(LlamaConfig())


def test_tokenizers_and_image_token_counts_differ(teacher, student) -> None:
    t_tok, s_tok = teacher.processor.tokenizer, student.processor.tokenizer
    assert len(t_tok) != len(s_tok) and 600 <= len(t_tok) <= 1000 and len(s_tok) <= 600
    text = "What colour is the triangle? 123 left"
    t_split, s_split = t_tok.tokenize(text), s_tok.tokenize(text)
    assert t_split != s_split and len(t_tok(text).input_ids) != len(s_tok(text, add_special_tokens=False).input_ids)
    # a token both vocabularies share still has different ids: nothing lines up position by position
    assert t_tok.convert_tokens_to_ids("Ġtriangle") != s_tok.convert_tokens_to_ids("Ġtriangle")

    sample = _sample("img", "What colour?", "red")
    counts = {}
    for name, m in (("teacher", teacher), ("student", student)):
        enc = m.adapter.encode(m.processor, sample, [_image()])
        image_token_id = m.model.config.image_token_id
        counts[name] = int((enc.input_ids == image_token_id).sum())
        assert enc.prompt.count(m.processor.image_token) == 1  # the prompt keeps one placeholder per image
    assert counts == {"teacher": 4, "student": 16}


def test_model_configs_match_the_head(teacher) -> None:
    head = teacher.adapter.head_config(teacher.model)
    # like real Qwen checkpoints, the embedding matrix is padded beyond the tokenizer
    assert head.vocab_size % 64 == 0 and head.vocab_size >= len(teacher.processor.tokenizer)
    assert head.hidden_size == teacher.adapter.text_config(teacher.model).hidden_size == 128


def _weight_names(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_checkpoints_use_hub_weight_names(teacher_dir: Path, student, tmp_path: Path) -> None:
    """vLLM loads checkpoints by these names (it failed on transformers 5's unsaved-model layout)."""
    assert {n.split(".")[0] for n in _weight_names(teacher_dir)} == {"model", "visual", "lm_head"}
    names = _weight_names(student.path)
    assert {n.split(".")[0] for n in names} == {"language_model", "vision_tower", "multi_modal_projector"}
    assert all(n.startswith("vision_tower.vision_model.") for n in names if n.startswith("vision_tower."))
    student.model.save_pretrained(tmp_path / "again")  # a trained student keeps the layout
    assert _weight_names(tmp_path / "again") == names


def test_builds_are_deterministic(tmp_path: Path, teacher_dir: Path) -> None:
    again = build_tiny_teacher(tmp_path / "t")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (teacher_dir / name).read_bytes(), name


# --- encode ------------------------------------------------------------------------------------

def test_encode_masks_exactly_the_answers_on_demo_data(loaded, demo_jsonl: Path) -> None:
    samples = list(read_samples(demo_jsonl))
    assert any(sum(m["role"] == "assistant" for m in s.messages) > 1 for s in samples)  # multi-turn present
    assert any(len(s.images) > 1 for s in samples)  # multi-image present
    for s in samples:
        enc = loaded.adapter.encode(loaded.processor, s, [decode_image(b) for b in s.images])
        answers = [m["content"] for m in s.messages if m["role"] == "assistant"]
        assert _answer_runs(loaded.processor, enc) == answers, s.id
        assert enc.input_ids.dtype == torch.int64 and enc.answer_mask.dtype == torch.bool
        assert enc.input_ids.shape == enc.answer_mask.shape and enc.input_ids.ndim == 1
        assert enc.prompt.count(loaded.processor.image_token) == len(s.images)


def test_encode_multi_turn_with_images_in_later_turns_and_text_only(loaded) -> None:
    s = Sample("mt", [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "<image>\nWhat shape is this?"}, {"role": "assistant", "content": "circle"},
        {"role": "user", "content": "And this one? <image>"}, {"role": "assistant", "content": "a blue square"},
        {"role": "user", "content": "Count them."}, {"role": "assistant", "content": "2"},
    ], [b"", b""], [])
    enc = loaded.adapter.encode(loaded.processor, s, [_image(), _image("blue", 84)])
    assert _answer_runs(loaded.processor, enc) == ["circle", "a blue square", "2"]
    text_only = _sample("txt", "Say yes.", "yes", "Again?", "yes", n_images=0)
    enc = loaded.adapter.encode(loaded.processor, text_only, [])
    assert _answer_runs(loaded.processor, enc) == ["yes", "yes"]
    assert "pixel_values" not in enc.model_inputs


def test_encode_model_inputs(teacher, student) -> None:
    s = _sample("x", "What colour?", "red", n_images=2)
    t = teacher.adapter.encode(teacher.processor, s, [_image(), _image()]).model_inputs
    assert set(t) == {"pixel_values", "image_grid_thw", "mm_token_type_ids"}  # M-RoPE needs the token types
    assert t["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    st = student.adapter.encode(student.processor, s, [_image(), _image()]).model_inputs
    assert set(st) == {"pixel_values"} and tuple(st["pixel_values"].shape) == (2, 3, 32, 32)


def test_student_template_trims_answers(student) -> None:
    enc = student.adapter.encode(student.processor, _sample("sp", "Colour?", "  red \n"), [_image()])
    assert _answer_runs(student.processor, enc) == ["red"]
    assert enc.input_ids[0] == student.processor.tokenizer.bos_token_id and enc.input_ids[1] != enc.input_ids[0]
    # the prompt already starts with BOS: whoever tokenizes it (vLLM) must not add another
    assert not student.adapter.add_special_tokens(student.processor, enc.prompt)


def test_encode_errors(loaded) -> None:
    a, proc = loaded.adapter, loaded.processor
    good = _sample("long", "What colour?", "red")
    n = len(a.encode(proc, good, [_image()]).input_ids)
    with pytest.raises(EncodeError, match=rf"sample 'long' .*{n} tokens exceed max_len={n - 1}"):
        a.encode(proc, good, [_image()], max_len=n - 1)
    assert len(a.encode(proc, good, [_image()], max_len=n).input_ids) == n
    with pytest.raises(EncodeError, match="sample 'empty'.*answer of turn 1 is empty"):
        a.encode(proc, _sample("empty", "What?", " "), [_image()])
    with pytest.raises(EncodeError, match=r"1 '<image>' marker\(s\) but 2 image\(s\)"):
        a.encode(proc, good, [_image(), _image()])
    with pytest.raises(EncodeError, match="marked bad: broken"):
        a.encode(proc, Sample("bad", [], [], [], error="broken"), [])


def test_processor_rejections_become_encode_errors(teacher) -> None:
    with pytest.raises(EncodeError, match="sample 'thin'.*processor rejected the sample.*aspect ratio"):
        teacher.adapter.encode(teacher.processor, _sample("thin", "What?", "x"), [Image.new("RGB", (600, 2))])


def test_encode_refuses_answers_glued_to_the_template(teacher) -> None:
    # "<|im_start|>assistant:" + " red": the space before the answer belongs to the template,
    # but byte-level BPE makes " red" one token, which straddles the answer boundary.
    proc = AutoProcessor.from_pretrained(teacher.path)
    proc.chat_template = proc.chat_template.replace("<|im_start|>{{ message['role'] }}\n",
                                                    "<|im_start|>{{ message['role'] }}: ")
    proc.chat_template = proc.chat_template.replace("<|im_start|>assistant\n", "<|im_start|>assistant: ")
    with pytest.raises(EncodeError, match="straddles the boundary of the answer 'red'"):
        teacher.adapter.encode(proc, _sample("glued", "What colour?", "red"), [_image()])


# --- hidden states and heads -------------------------------------------------------------------

def test_final_hidden_states_are_post_norm_and_feed_lm_head(loaded, demo_jsonl: Path) -> None:
    a = loaded.adapter
    backend = HFBackend(a, str(loaded.path), torch.float32, "cpu", pad_id=0)  # what extraction runs
    model = backend.model
    s = next(s for s in read_samples(demo_jsonl) if len(s.images) == 2)
    enc = a.encode(loaded.processor, s, [decode_image(b) for b in s.images])
    h = backend.hidden_states([enc])[0].clone()  # an inference-mode tensor; lm_head below records autograd
    assert h.shape == (len(enc.input_ids), a.text_config(model).hidden_size) and not h.requires_grad
    with torch.no_grad():
        out = model(input_ids=enc.input_ids[None], **enc.model_inputs, output_hidden_states=True)
    torch.testing.assert_close(a.lm_head(model)(h), out.logits[0])
    torch.testing.assert_close(h, out.hidden_states[-1][0])  # transformers' last entry is post-norm too
    # and the exported head reproduces the model exactly, from post-norm and from pre-norm states
    head = a.export_head(model)
    torch.testing.assert_close(head.logits(h), out.logits[0])
    pre_norm = {}
    hook = a.final_norm(model).register_forward_hook(lambda mod, args, res: pre_norm.setdefault("x", args[0]))
    try:
        backend.hidden_states([enc])
    finally:
        hook.remove()
    torch.testing.assert_close(head.logits(pre_norm["x"][0], post_norm=False), out.logits[0])


def test_where_things_live(loaded) -> None:
    a, model = loaded.adapter, loaded.model
    text = a.text_model(model)
    layer_cls = a.decoder_layer_class(model)
    assert all(type(layer) is layer_cls for layer in text.layers)
    assert a.final_norm(model) is text.norm and a.lm_head(model) is model.lm_head
    prefixes = a.vision_parameter_prefixes(model)
    names = [n for n, _ in model.named_parameters()]
    vision = [n for n in names if n.startswith(tuple(prefixes))]
    text_names = {f"{prefix}{n}" for prefix in ("model.language_model.",) for n, _ in text.named_parameters()}
    assert vision and set(vision).isdisjoint(text_names)
    # what is neither vision encoder nor text decoder: the head, and LLaVA's projector (it trains with the LM)
    projector = {n for n in names if n.startswith("model.multi_modal_projector.")}
    assert set(names) == set(vision) | text_names | {"lm_head.weight"} | projector
    assert not any(n.startswith("model.multi_modal_projector.") for n in vision)


# --- CPU compatibility shim --------------------------------------------------------------------

def test_compat_shim_in_a_fresh_process(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """Subprocesses get the shim from PYTHONPATH (set by conftest) and load both processors."""
    teacher_dir, student_dir = tiny_pair
    code = textwrap.dedent(f"""
        import json, sys
        cheap = "torch" not in sys.modules and "transformers" not in sys.modules
        shim = sys.modules["sitecustomize"]
        from transformers import AutoProcessor
        t = AutoProcessor.from_pretrained({str(teacher_dir)!r})
        s = AutoProcessor.from_pretrained({str(student_dir)!r})
        report = dict(cheap=cheap, shim=shim.__file__, missing=shim.torchvision_missing(),
                      teacher=type(t.image_processor).__name__, student=type(s.image_processor).__name__)
        if report["missing"]:
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor, smart_resize
            report["alias"] = Qwen2VLImageProcessor.__name__
            report["video_kwargs"] = list(t.video_processor.valid_kwargs.__annotations__)
            try:
                t.video_processor([])
            except NotImplementedError as e:
                report["video_error"] = str(e)
            t.save_pretrained({str(tmp_path / "saved")!r})
        print(json.dumps(report))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cheap"], "importing the shim must not import torch or transformers"
    assert Path(report["shim"]).parent.name == "compat"
    if not report["missing"]:
        pytest.skip("torchvision works here: the shim is inert")
    assert report["teacher"] == "Qwen2VLImageProcessorPil" and report["student"] == "SiglipImageProcessorPil"
    assert report["alias"] == "Qwen2VLImageProcessorPil" and report["video_kwargs"] == []
    assert "video inputs are not supported without torchvision" in report["video_error"]
    saved = json.loads((tmp_path / "saved" / "processor_config.json").read_text())
    assert "video_processor" not in saved and "image_processor" in saved
