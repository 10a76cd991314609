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
* lets transformers' lazy modules hand out processors that are marked torchvision-only by a
  decorator but run on PIL images (Pixtral's, used by Mistral 3), instead of a placeholder;
* drops the ``video_processor`` argument from every processor that takes one (Qwen2-VL,
  Qwen2.5-VL, Qwen3-VL, InternVL, SmolVLM, LLaVA-OneVision, ...), leaving a stand-in that has the
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
    """Stands in for a torchvision-only video processor: images keep working, videos fail clearly.

    vLLM's Qwen3-VL sizes its largest video item at engine start even when videos are disabled
    (`limit_mm_per_prompt={"video": 0}`), reading the video processor's patch geometry, and then
    discards the number (video is not an active modality: vllm/multimodal/encoder_budget.py). For
    that read alone, the patch geometry (`GEOMETRY`) is the image processor's; nothing else is.
    """

    valid_kwargs = _NoVideoKwargs  # vLLM reads `processor.video_processor.valid_kwargs.__annotations__`
    # SmolVLM's apply_chat_template reads these defaults for video loading even when there is no video
    num_frames = None
    fps = None
    GEOMETRY = ("size", "patch_size", "merge_size", "temporal_patch_size")

    def __init__(self, image_processor: Any = None):
        self._image_processor = image_processor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_VIDEO_UNSUPPORTED)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # keep copy/pickle protocols (and our own field) working
            raise AttributeError(name)
        image = self.__dict__.get("_image_processor")
        if name in self.GEOMETRY and getattr(image, name, None) is not None:
            return getattr(image, name)
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


def _drop_video_processors(module: Any) -> None:
    """Give each processor class of `module` that takes a `video_processor` an __init__ without it.

    transformers derives a processor's sub-processors from its __init__ signature (and its
    accepted keyword arguments from the code object's names), so the video processor is then
    neither loaded, checked against its torchvision-only class, nor saved. Works for every
    __init__ shape (Qwen2-VL's, InternVL's, SmolVLM's, LLaVA-OneVision's, ...).
    """
    import inspect

    for cls in list(vars(module).values()):
        if (isinstance(cls, type) and cls.__module__ == module.__name__ and "__init__" in cls.__dict__
                and "video_processor" in inspect.signature(cls.__init__).parameters
                and not getattr(cls.__init__, "_genrecal_without_video", False)):
            cls.__init__ = _init_without_video(cls.__init__)


def _init_without_video(original: Any) -> Any:
    """`original` with its `video_processor` parameter removed: a real function with the same other
    parameters (names, defaults, order), so both `inspect.signature` and `__code__.co_varnames` agree."""
    import inspect

    params = [p for p in inspect.signature(original).parameters.values() if p.name != "video_processor"]
    defaults = {}
    text, call = [], []
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            text.append(f"**{p.name}")
            call.append(f"**{p.name}")
            continue
        if p.kind is p.VAR_POSITIONAL:
            raise TypeError(f"{original.__qualname__}: *args processors are not supported by the compat shim")
        if p.name == "self":
            text.append("self")
            continue
        defaults[f"_d_{p.name}"] = None if p.default is p.empty else p.default  # all optional: as for loading
        text.append(f"{p.name}=_d_{p.name}")
        call.append(f"{p.name}={p.name}")
    kw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
    pop = f"    {kw}.pop('video_processor', None)\n" if kw else ""
    source = (f"def __init__({', '.join(text)}):\n{pop}"
              f"    _original(self, video_processor=None, {', '.join(call)})\n"
              f"    self.video_processor = _Unavailable(getattr(self, 'image_processor', None))\n")
    namespace = {"_original": original, "_Unavailable": VideoProcessorUnavailable, **defaults}
    exec(compile(source, f"<genrecal compat: {original.__qualname__}>", "exec"), namespace)  # noqa: S102
    init = namespace["__init__"]
    init.__doc__, init.__qualname__ = original.__doc__, original.__qualname__
    init._genrecal_without_video = True
    return init


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


def _unblock_processors(lazy: Any) -> None:
    """Let a transformers lazy module hand out processors marked torchvision-only by a decorator alone.

    Pixtral's processor is declared `@requires(backends=("torchvision", "torch"))` but runs on PIL
    images; without torchvision the lazy module would return a placeholder that raises on use.
    Image and video processors stay as they are (their PIL twins are served by `_AliasLoader`)."""
    missing = vars(lazy).get("_object_missing_backend")  # never getattr: a lazy module imports on a miss
    if not isinstance(missing, dict):
        return
    for name, backends in list(missing.items()):
        plain_processor = name.endswith("Processor") and not name.endswith(("ImageProcessor", "VideoProcessor"))
        if list(backends) == ["torchvision"] and (plain_processor or name.startswith("processing_")):
            del missing[name]


def _patch_lazy_module_class(import_utils: Any) -> None:
    """Every `_LazyModule` built from now on unblocks its processors (see `_unblock_processors`)."""
    cls = import_utils._LazyModule
    if getattr(cls.__init__, "_genrecal_compat", False):
        return
    original = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _unblock_processors(self)

    __init__._genrecal_compat = True
    cls.__init__ = __init__


class _PatchingLoader:
    """Runs the real loader, then patches the fresh module (`patch(module)`)."""

    def __init__(self, loader: Any, patch: Any = None):
        self.loader = loader
        self.patch = patch or _drop_video_processors

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        self.patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ...: as the real loader
        return getattr(self.loader, name)


class _Finder:
    """sys.meta_path hook for `transformers.models.*.{image_processing_,processing_}*`, only without torchvision."""

    _genrecal_compat = True

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "transformers.utils.import_utils" and torchvision_missing():
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, _patch_lazy_module_class)
            return spec
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
    import_utils = sys.modules.get("transformers.utils.import_utils")
    if import_utils is not None and torchvision_missing():
        _patch_lazy_module_class(import_utils)
        for name, module in list(sys.modules.items()):
            if name == "transformers" or name.startswith("transformers.models."):
                _unblock_processors(module)


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
