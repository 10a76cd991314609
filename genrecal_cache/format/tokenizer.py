"""The teacher's tokenizer, stored in the cache (`teacher_tokenizer/`) so a cache is self-contained.

Trainers need it to align the student's answer tokens with the teacher's by text
(`main_pass_answer="student_aligned"`), and a cache is trained from without the teacher. Only the
tokenizer's own files are stored (what `save_pretrained` writes: tokenizer.json, tokenizer_config.json,
the chat template, and vocab/merges or a sentencepiece model where the tokenizer has them), never code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from .manifest import CacheFormatError, sha256_text

__all__ = ["load_tokenizer", "tokenizer_files", "tokenizer_sha256"]


def tokenizer_sha256(tokenizer: Any) -> str:
    """The manifest's `tokenizer_sha256`: the hash of the tokenizer's serialized form (tokenizer.json)."""
    return sha256_text(tokenizer.backend_tokenizer.to_str())


def tokenizer_files(tokenizer: Any, chat_template: str | None) -> dict[str, bytes]:
    """The files of `tokenizer` (name inside the folder -> bytes), as `save_pretrained` writes them.

    `chat_template` is the template that rendered the cache (the processor's when it has its own, the one
    `chat_template_sha256` hashes); it is stored as chat_template.jinja, which the tokenizer loads back."""
    with tempfile.TemporaryDirectory(prefix="genrecal-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        if chat_template:
            Path(tmp, "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        root = Path(tmp)
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load_tokenizer(files: dict[str, bytes], expected_sha256: str, where: str) -> Any:
    """A tokenizer from its stored files, refused unless it is the one the manifest's hash describes."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="genrecal-tokenizer-") as tmp:
        for name, data in files.items():
            path = os.path.join(tmp, *name.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        try:  # files only: no code is ever run from a cache
            tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - any failure means the stored files are not a usable tokenizer
            raise CacheFormatError(f"{where}: the stored teacher tokenizer does not load ({type(e).__name__}: {e}); "
                                   f"the files are corrupt, re-download or re-extract the cache") from e
    if tokenizer_sha256(tok) != expected_sha256:
        raise CacheFormatError(f"{where}: the stored teacher tokenizer is not the one the manifest's tokenizer_sha256 "
                               f"describes (the one the cache was made with); re-download or re-extract the cache")
    return tok
