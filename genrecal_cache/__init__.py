"""genrecal_cache: run a teacher VLM once and store what distillation needs in a shareable cache."""

__version__ = "0.1.0"

# The hidden-state codecs (fp8, ecq) are Zarr v3 codecs: registering them here means any zarr reader
# in a process that imported genrecal_cache decodes a cache's `hidden` array (zarr also finds them
# through the `zarr.codecs` entry point of an installed genrecal, without this import).
from .format import codecs as _codecs  # noqa: E402

_codecs.register()

__all__ = ["__version__", "open_cache"]


def __getattr__(name: str):
    if name == "open_cache":
        from .parts import open_cache  # on first use: zarr's codec entry points import this package, keep it light
        return open_cache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
