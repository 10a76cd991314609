"""CPU-only compatibility shim for machines without torchvision (development and tests).

Why it exists: the CPU wheel of vLLM drags in torchvision/torchaudio builds that break a CPU torch,
so the CPU set-up removes them (scripts/setup.sh). Without torchvision, transformers cannot build
or load a Qwen2-VL processor (its video processor is torchvision-only), and vLLM fails importing
``transformers.models.qwen2_vl.image_processing_qwen2_vl``, which imports torchvision at module
level. transformers ships a PIL implementation next to most torchvision image processors, so,
for every ``transformers.models.*`` module, this shim:

* serves each torchvision image-processor module that has a PIL twin
  (``image_processing_qwen2_vl`` -> ``image_processing_pil_qwen2_vl``; SigLIP's, CLIP's,
  Pixtral's -- which vLLM's LLaVA imports -- and so on) as an alias of that twin, with the
  torchvision class names bound to the PIL classes (``Qwen2VLImageProcessor`` ->
  ``Qwen2VLImageProcessorPil``; module functions such as ``smart_resize`` come along);
* drops the ``video_processor`` argument from Qwen2-VL's processor (and from every processor
  whose __init__ has the same shape: Qwen2.5-VL, Qwen3-VL, ...), leaving a stand-in that has the
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
from typing import Any, TypedDict

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


def _model_module(fullname: str, prefix: str) -> tuple[str, str] | None:
    """('qwen2_vl', 'qwen2_vl') for 'transformers.models.qwen2_vl.<prefix>qwen2_vl', else None."""
    parts = fullname.split(".")
    if len(parts) != 4 or parts[0] != "transformers" or parts[1] != "models" or not parts[3].startswith(prefix):
        return None
    return parts[2], parts[3][len(prefix):]


def _pil_twin(fullname: str) -> str | None:
    """The PIL module transformers ships next to a torchvision image-processor module, by name."""
    found = _model_module(fullname, "image_processing_")
    if found is None or found[1].startswith("pil_"):
        return None
    return f"transformers.models.{found[0]}.image_processing_pil_{found[1]}"


# The __init__ shape of Qwen2-VL's processor and of most of its successors (Qwen2.5-VL, Qwen3-VL...).
_QWEN_STYLE_INIT = ("self", "image_processor", "tokenizer", "video_processor", "chat_template", "kwargs")


def _drop_video_processors(module: Any) -> None:
    """Give each Qwen-style processor class of `module` an __init__ without `video_processor`.

    transformers derives a processor's sub-processors from its __init__ signature (and its
    accepted keyword arguments from the code object's names), so the video processor is then
    neither loaded, checked against its torchvision-only class, nor saved. Processors with other
    __init__ shapes are left alone.
    """
    import inspect

    for cls in list(vars(module).values()):
        if (isinstance(cls, type) and cls.__module__ == module.__name__ and "__init__" in cls.__dict__
                and tuple(inspect.signature(cls.__init__).parameters) == _QWEN_STYLE_INIT):
            cls.__init__ = _init_without_video(cls.__init__)


def _init_without_video(original: Any) -> Any:
    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                 **kwargs: Any) -> None:
        kwargs.pop("video_processor", None)
        original(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        self.video_processor = VideoProcessorUnavailable()

    __init__.__doc__ = original.__doc__
    return __init__


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
    """Builds a torchvision image-processor module from its PIL twin: `XImageProcessor` = `XImageProcessorPil`."""

    def __init__(self, twin: str):
        self.twin = twin

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        source = importlib.import_module(self.twin)
        namespace = {k: v for k, v in vars(source).items() if not k.startswith("__")}
        for name, value in list(namespace.items()):
            if name.endswith("Pil") and isinstance(value, type):
                namespace.setdefault(name[: -len("Pil")], value)
        module.__dict__.update(namespace)


class _PatchingLoader:
    """Runs the real loader, then drops the video processors of the fresh module."""

    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _drop_video_processors(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ...: as the real loader
        return getattr(self.loader, name)


class _Finder:
    """sys.meta_path hook for `transformers.models.*.{image_processing_,processing_}*`, only without torchvision."""

    _genrecal_compat = True

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        twin = _pil_twin(fullname)
        is_processor = twin is None and _model_module(fullname, "processing_") is not None
        if (twin is None and not is_processor) or not torchvision_missing():
            return None
        if twin is not None:
            if importlib.machinery.PathFinder.find_spec(twin, path) is None:
                return None  # no PIL twin: leave the module alone
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader(twin), origin=f"alias of {twin} (genrecal compat)")
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> None:
    """Install the import hook (idempotent); patch processor modules that are already imported."""
    if not any(getattr(f, "_genrecal_compat", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    imported = [m for name, m in list(sys.modules.items()) if _model_module(name, "processing_") and m is not None]
    if imported and torchvision_missing():
        for module in imported:
            _drop_video_processors(module)


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
