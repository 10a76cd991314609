"""CPU-only compatibility shim for machines without torchvision (development and tests).

Why it exists: the CPU wheel of vLLM drags in torchvision/torchaudio builds that break a CPU torch,
so the CPU set-up removes them (scripts/setup.sh). Without torchvision, transformers cannot build
or load a Qwen2-VL processor (its video processor is torchvision-only), and vLLM fails importing
``transformers.models.qwen2_vl.image_processing_qwen2_vl``, which imports torchvision at module
level. transformers ships a PIL implementation of the same image processors, so this shim:

* serves the torchvision image-processor modules of the families we use (Qwen2-VL, SigLIP,
  LLaVA) as aliases of their PIL modules, with the torchvision class names bound to the PIL
  classes (``Qwen2VLImageProcessor`` -> ``Qwen2VLImageProcessorPil``; ``smart_resize`` and the
  rest of the module come along);
* drops the video processor from ``Qwen2VLProcessor``, leaving a stand-in that has the
  ``valid_kwargs`` vLLM reads and raises a clear error if a video is actually processed.

Video inputs are therefore not supported under the shim. GPU machines have a working torchvision
and need none of this: the shim activates only when ``import torchvision`` fails, and only once
one of the patched transformers modules is imported.

It is named ``sitecustomize`` and its folder is put on ``PYTHONPATH`` so that every Python process
gets it, vLLM's engine subprocesses included. Importing it is cheap: it only installs an import
hook (no torch, no transformers); it also runs any ``sitecustomize`` it shadows.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any, Callable, TypedDict

# torchvision-backed module -> (its PIL counterpart, {torchvision class name: PIL class name})
_PIL_ALIASES: dict[str, tuple[str, dict[str, str]]] = {
    "transformers.models.qwen2_vl.image_processing_qwen2_vl": (
        "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
        {"Qwen2VLImageProcessor": "Qwen2VLImageProcessorPil"},
    ),
    "transformers.models.siglip.image_processing_siglip": (
        "transformers.models.siglip.image_processing_pil_siglip",
        {"SiglipImageProcessor": "SiglipImageProcessorPil"},
    ),
    "transformers.models.llava.image_processing_llava": (
        "transformers.models.llava.image_processing_pil_llava",
        {"LlavaImageProcessor": "LlavaImageProcessorPil"},
    ),
}

_VIDEO_UNSUPPORTED = ("video inputs are not supported without torchvision (genrecal CPU compatibility "
                      "shim, genrecal_cache/compat/sitecustomize.py); install a torchvision that matches "
                      "your torch to process videos")


class _NoVideoKwargs(TypedDict, total=False):
    """No video processing kwargs are supported under the shim."""


class VideoProcessorUnavailable:
    """Stands in for a torchvision-only video processor: images keep working, videos fail clearly."""

    valid_kwargs = _NoVideoKwargs  # vLLM reads `processor.video_processor.valid_kwargs.__annotations__`

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_VIDEO_UNSUPPORTED)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # keep copy/pickle protocols working
            raise AttributeError(name)
        raise AttributeError(f"video_processor.{name}: {_VIDEO_UNSUPPORTED}")

    def __repr__(self) -> str:
        return "VideoProcessorUnavailable()"


def _drop_video_processor(module: Any, class_name: str) -> None:
    """Re-signature the processor's __init__ without `video_processor`.

    transformers derives a processor's sub-processors from its __init__ signature, so the video
    processor is then neither loaded, checked against its (torchvision-only) class, nor saved.
    """
    cls = getattr(module, class_name)
    if getattr(cls, "_genrecal_no_video", False):
        return
    original = cls.__init__

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                 **kwargs: Any) -> None:
        kwargs.pop("video_processor", None)
        original(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        self.video_processor = VideoProcessorUnavailable()

    __init__.__doc__ = original.__doc__
    cls.__init__ = __init__
    cls._genrecal_no_video = True
    # the stand-in is runtime state, not configuration: keep it out of processor_config.json
    original_to_dict = cls.to_dict

    def to_dict(self: Any) -> dict[str, Any]:
        stand_in = self.__dict__.pop("video_processor", None)
        try:
            return original_to_dict(self)
        finally:
            if stand_in is not None:
                self.video_processor = stand_in

    cls.to_dict = to_dict


_PATCHES: dict[str, Callable[[Any], None]] = {
    "transformers.models.qwen2_vl.processing_qwen2_vl": lambda m: _drop_video_processor(m, "Qwen2VLProcessor"),
}

_torchvision_missing: bool | None = None


def torchvision_missing() -> bool:
    """True when `import torchvision` fails (decided once, at first need: torch is loading by then)."""
    global _torchvision_missing
    if _torchvision_missing is None:
        try:
            import torchvision  # noqa: F401
            _torchvision_missing = False
        except Exception:  # missing, or a build that does not match torch: both unusable
            _torchvision_missing = True
    return _torchvision_missing


class _AliasLoader:
    def __init__(self, target: str, renames: dict[str, str]):
        self.target, self.renames = target, renames

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        source = importlib.import_module(self.target)
        module.__dict__.update({k: v for k, v in vars(source).items() if not k.startswith("__")})
        for alias, name in self.renames.items():
            setattr(module, alias, getattr(source, name))
        module.__all__ = [*getattr(source, "__all__", []), *self.renames]


class _PatchingLoader:
    """Runs the real loader, then a patch on the fresh module."""

    def __init__(self, loader: Any, patch: Callable[[Any], None]):
        self.loader, self.patch = loader, patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        self.patch(module)


class _Finder:
    """sys.meta_path hook: only answers for the few module names above, and only without torchvision."""

    _genrecal_compat = True

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _PIL_ALIASES and fullname not in _PATCHES:
            return None
        if not torchvision_missing():
            return None
        if fullname in _PIL_ALIASES:
            pil_module, renames = _PIL_ALIASES[fullname]
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader(pil_module, renames),
                                                  origin=f"alias of {pil_module} (genrecal compat)")
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, _PATCHES[fullname])
        return spec


def install() -> None:
    """Install the import hook (idempotent); patch target modules that are already imported."""
    if not any(getattr(f, "_genrecal_compat", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name, patch in _PATCHES.items():
        if name in sys.modules and torchvision_missing():
            patch(sys.modules[name])


def _run_shadowed_sitecustomize() -> None:
    """Python imports only the first `sitecustomize` on sys.path; run the one we hide, if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), "sitecustomize.py")
        if os.path.abspath(os.path.dirname(candidate)) == here or not os.path.isfile(candidate):
            continue
        spec = importlib.util.spec_from_file_location("_genrecal_shadowed_sitecustomize", candidate)
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        return


install()
if __name__ == "sitecustomize":
    _run_shadowed_sitecustomize()
