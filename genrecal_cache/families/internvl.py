"""InternVL (transformers' native `InternVLForConditionalGeneration`, the `-hf` checkpoints): an
InternViT vision tower, a pixel-shuffle MLP projector and a Qwen2/Llama text decoder.

The original remote-code InternVL checkpoints (`InternVLChatModel`, `model_type` "internvl_chat")
are another layout and are refused; convert them to the `-hf` format first."""

from .base import FamilyAdapter


class InternVLAdapter(FamilyAdapter):
    model_type = "internvl"
    model_class_name = "InternVLForConditionalGeneration"
    vision_prefixes = ("model.vision_tower.",)  # the projector trains with the language model
    vllm_needs_torchvision = True  # vLLM's InternVL (interns1.py) imports transformers' video processor
