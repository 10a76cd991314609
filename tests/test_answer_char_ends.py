"""`answer_char_ends` (the character offsets that align student and teacher answer tokens) decodes in
linear time and gives what decoding every prefix gave (the method it replaces), on byte-level BPE,
sentencepiece-style byte-fallback and WordPiece tokenizers, with multi-byte characters."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from genrecal_cache.testing import tokenizer_corpus
from genrecal_train.align import answer_char_ends

ANSWERS = ["three", "there are three", " they are red", "café au lait", "日本語 です", "it is 日本",
           "a 🙂 b", "naïve résumé", "  two  spaces", "x\ny", "ü", "🙂🙂", "red,green.blue?"]


def by_prefixes(tokenizer, ids: torch.Tensor) -> list[int]:
    """The method `answer_char_ends` replaces (quadratic: one decode per prefix), kept as the reference."""
    ids = ids.tolist()
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    lead = len(text) - len(text.lstrip())
    return [max(0, len(tokenizer.decode(ids[:k + 1], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)) - lead) for k in range(len(ids))]


def _byte_fallback() -> PreTrainedTokenizerFast:
    """Llama-2 style: '▁' for spaces, BPE with byte fallback (<0xE6> tokens), decoder strips one space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(tokenizer_corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                                    show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _wordpiece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator(tokenizer_corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                                          show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def tokenizers(tiny_pair: tuple[Path, Path]) -> dict[str, PreTrainedTokenizerFast]:
    teacher, student = tiny_pair
    return {"teacher (byte-level BPE)": AutoTokenizer.from_pretrained(teacher),
            "student (byte-level BPE)": AutoTokenizer.from_pretrained(student),
            "byte fallback (sentencepiece-style)": _byte_fallback(), "wordpiece": _wordpiece()}


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def test_same_ends_as_decoding_every_prefix(tokenizers):
    for name, tok in tokenizers.items():
        for answer in ANSWERS:
            ids = _ids(tok, answer)
            assert answer_char_ends(tok, ids) == by_prefixes(tok, ids), (name, answer, tok.convert_ids_to_tokens(ids))
    multi_byte = [_ids(tokenizers["teacher (byte-level BPE)"], a) for a in ("日本語 です", "a 🙂 b")]
    assert all(len(ids) > len(a.replace(" ", "")) for ids, a in zip(multi_byte, ("日本語です", "a🙂b")))  # split chars


def test_same_ends_on_arbitrary_byte_level_ids(tokenizers):
    """Any id sequence, including characters cut anywhere and invalid UTF-8: byte-level decoding is lossy
    per invalid sequence, which the windows reproduce exactly."""
    rng = random.Random(0)
    for name in ("teacher (byte-level BPE)", "student (byte-level BPE)"):
        tok = tokenizers[name]
        for _ in range(40):
            ids = torch.tensor([rng.randrange(len(tok)) for _ in range(rng.randrange(1, 24))])
            assert answer_char_ends(tok, ids) == by_prefixes(tok, ids), (name, ids.tolist())


def test_byte_fallback_runs_are_decoded_as_one_unit_as_before(tokenizers):
    """Byte fallback decodes a run of byte tokens as one unit (every byte a U+FFFD while the run does not
    decode), so a prefix cutting the second of two adjacent characters counts the first one per byte: the
    window reaches back to the start of the run and gives what a prefix decode gives."""
    tok = tokenizers["byte fallback (sentencepiece-style)"]
    ids = _ids(tok, "日本")
    assert tok.convert_ids_to_tokens(ids)[-6:] == ["<0xE6>", "<0x97>", "<0xA5>", "<0xE6>", "<0x9C>", "<0xAC>"]
    assert answer_char_ends(tok, ids)[-6:] == by_prefixes(tok, ids)[-6:] == [1, 2, 1, 4, 5, 2]


def test_decodes_each_token_a_bounded_number_of_times(tokenizers):
    """Linear: the tokens decoded in all calls together grow with the span, not with its square."""
    tok = tokenizers["teacher (byte-level BPE)"]

    class Counting:  # the real tokenizer, counting the ids it is asked to decode
        decoded = 0

        def decode(self, ids, **kw):
            Counting.decoded += len(ids)
            return tok.decode(ids, **kw)

        def batch_decode(self, seqs, **kw):
            Counting.decoded += sum(len(s) for s in seqs)
            return tok.batch_decode(seqs, **kw)

    ids = _ids(tok, " ".join(["there are three red squares, 日本語 🙂"] * 40))
    assert answer_char_ends(Counting(), ids) == by_prefixes(tok, ids)
    assert Counting.decoded <= 8 * len(ids), (Counting.decoded, len(ids))
