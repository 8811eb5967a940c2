"""Train a CPM-shaped sentencepiece vocab: the special pieces at the CPM-1 ids.

Ids 0..10 are `<unk> <s> </s> ▃ <sep> <pad> <mask> <eod> ▁ <unused9> ▂`, as in
chinese_vocab.model (see cpmgen.tokenizer.SPECIAL_PIECES), and the training lines are
prepared exactly as CPMTokenizer.encode prepares text (jieba words, " "/"\\n" mapped,
space-joined), so the pieces are learned on what encode() hands to sentencepiece.
Used by the test fixtures (tests/corpus.py) and by tools/train_tiny.py.

Two shapes of `▁` (id 8, the joint between jieba words):

- isolated (the test fixtures): `▁` is a user-defined piece, so sentencepiece always cuts
  it out on its own and every word costs one extra token;
- merged (`merge_word_sep=True`, as in the real chinese_vocab.model, where `▁现在` is 129
  and `▁` alone is 8): `▁` is an ordinary character piece that BPE merges into the word
  after it. sentencepiece can only pin ids with user-defined pieces, so a placeholder is
  trained at id 8 and then swapped with the learned `▁` piece in the serialized model.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Iterable


def prepared_lines(texts: Iterable[str]) -> list[str]:
    """Each non-blank text as CPMTokenizer.encode hands it to sentencepiece.

    A text may keep its trailing "\\n" so that the vocab learns U+2583 in context."""
    from cpmgen.tokenizer import prepare

    return [prepare(text) for text in texts if text.strip()]


def train_cpm_vocab(texts: Iterable[str], path: str | os.PathLike, vocab_size: int,
                    byte_fallback: bool = False, character_coverage: float = 1.0,
                    num_threads: int = 1, max_sentence_length: int | None = None,
                    merge_word_sep: bool = False) -> Path:
    """Train a BPE sentencepiece model on `texts` (jieba-prepared here) and write it to `path`
    atomically. Deterministic for the same texts and options (single-threaded by default).

    `max_sentence_length` (bytes of a prepared line; sentencepiece skips longer ones,
    default 4192) is passed only when given, so the written model is byte-identical to
    one trained without the option. `merge_word_sep`: see the module docstring."""
    import sentencepiece as spm

    from cpmgen.tokenizer import NEWLINE, SPACE, SPECIAL_PIECES, WORD_SEP

    path = Path(path)
    lines = prepared_lines(texts)
    out = io.BytesIO()
    extra = {} if max_sentence_length is None else {"max_sentence_length": max_sentence_length}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=[NEWLINE, "<sep>", "<pad>", "<mask>", "<eod>",
                              _PLACEHOLDER8 if merge_word_sep else WORD_SEP, "<unused9>", SPACE],
        num_threads=num_threads,
        minloglevel=2,  # no trainer log on stderr
        **extra,
    )
    data = out.getvalue()
    if merge_word_sep:
        data = _swap_pieces(data, _PLACEHOLDER8, WORD_SEP)

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(data)
    for i, piece in SPECIAL_PIECES.items():
        if sp.id_to_piece(i) != piece:  # pragma: no cover - guards a sentencepiece change
            raise RuntimeError(f"CPM vocab: id {i} is {sp.id_to_piece(i)!r}, expected {piece!r}")

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


_PLACEHOLDER8 = "<unused8>"


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _swap_pieces(data: bytes, a: str, b: str) -> bytes:
    """Swap the ids of pieces `a` and `b` in a serialized sentencepiece ModelProto.

    The model is a protobuf message whose field 1 (`pieces`, repeated, length-delimited)
    lists the pieces in id order; each entry keeps its text, score and type, only its
    position (its id) changes. Every other field is copied as it is."""
    entries: list[tuple[int, bytes]] = []  # (field number, raw bytes of tag + value)
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            pos += length
        elif wire == 5:
            pos += 4
        else:  # pragma: no cover - sentencepiece writes no groups
            raise RuntimeError(f"unexpected protobuf wire type {wire} in a sentencepiece model")
        entries.append((field, data[start:pos]))

    def piece_text(raw: bytes) -> str:
        _, p = _read_varint(raw, 0)  # tag of field 1
        _, p = _read_varint(raw, p)  # length of the SentencePiece message
        key, p = _read_varint(raw, p)  # its field 1: the piece string
        if key != (1 << 3 | 2):  # pragma: no cover
            raise RuntimeError("sentencepiece model: a piece without its text first")
        length, p = _read_varint(raw, p)
        return raw[p:p + length].decode("utf-8")

    where = {piece_text(raw): i for i, (field, raw) in enumerate(entries) if field == 1}
    i, j = where[a], where[b]
    entries[i], entries[j] = entries[j], entries[i]
    return b"".join(raw for _, raw in entries)
