"""The command-line tools (genrecal-cache, genrecal-train, genrecal-eval).

Every tool works as installed: on a CPU machine without torchvision the compatibility shim is applied here,
before any tool imports transformers, in this process and (through PYTHONPATH) in the processes it starts
(genrecal_cache/cpu_compat.py); elsewhere it is inert."""

from genrecal_cache.cpu_compat import apply_compat_shim

apply_compat_shim()
