"""Mistral 3 (Mistral-Small-3.1 vision): a Pixtral vision tower (native resolution: images of different
sizes are padded to one tensor and cropped back by `image_sizes`), a patch-merger projector and a
Mistral text decoder."""

from .base import FamilyAdapter


class Mistral3Adapter(FamilyAdapter):
    model_type = "mistral3"
    model_class_name = "Mistral3ForConditionalGeneration"
    vision_prefixes = ("model.vision_tower.",)
