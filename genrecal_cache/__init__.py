"""genrecal_cache: run a teacher VLM once and store what distillation needs in a shareable cache."""

__version__ = "0.1.0"
