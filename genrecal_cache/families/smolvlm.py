"""SmolVLM and Idefics3: a SigLIP-style vision model, a pixel-shuffle connector and a Llama text model
at `model.text_model` (not `model.language_model`).

Their chat templates read only typed content parts: a plain-string answer renders as nothing, so
answers are given as one text part."""

from .base import HEAD_TENSOR_NAMES, FamilyAdapter


class SmolVLMAdapter(FamilyAdapter):
    model_type = "smolvlm"
    model_class_name = "SmolVLMForConditionalGeneration"
    text_model_path = "model.text_model"
    vision_prefixes = ("model.vision_model.",)  # the connector trains with the language model
    typed_answers = True
    head_tensor_names = {**HEAD_TENSOR_NAMES, "norm.weight": ("model.text_model.norm.weight",),
                         "embed_tokens.weight": ("model.text_model.embed_tokens.weight",)}


class Idefics3Adapter(SmolVLMAdapter):
    model_type = "idefics3"
    model_class_name = "Idefics3ForConditionalGeneration"
