"""The CPM-1 tokenizer: jieba word cut + sentencepiece, with the upstream space/newline rule.

encode(text): cut with jieba (`cut_all=False`), map " " -> U+2582 and "\\n" -> U+2583 in
every word, join the words with single spaces, sentencepiece-encode.
decode(ids): sentencepiece-decode, delete every " ", map U+2582 -> " " and U+2583 -> "\\n".
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from cpmgen.errors import UserError

SPACE = "\u2582"  # ▂ stands for " "
NEWLINE = "\u2583"  # ▃ stands for "\n"
WORD_SEP = "\u2581"  # ▁ sentencepiece's whitespace (the joins between jieba words)

ENCODE_TABLE = str.maketrans({" ": SPACE, "\n": NEWLINE})
DECODE_TABLE = str.maketrans({SPACE: " ", NEWLINE: "\n"})

# The special pieces of chinese_vocab.model and the ids CPM-1 was trained with.
SPECIAL_PIECES: dict[int, str] = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: NEWLINE,
    4: "<sep>",
    5: "<pad>",
    6: "<mask>",
    7: "<eod>",
    8: WORD_SEP,
    10: SPACE,
}

VOCAB_NAMES = ("chinese_vocab.model", "spiece.model")
VOCAB_FOLDER = "bpe_3w_new"

_jieba = None


def _get_jieba():
    """Import jieba on first use (its import and dictionary load are slow), silenced."""
    global _jieba
    if _jieba is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import jieba
        jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict ..." chatter
        _jieba = jieba
    return _jieba


def prepare(text: str) -> str:
    """The string CPM hands to sentencepiece: jieba words with ' '/'\\n' mapped, space-joined."""
    jieba = _get_jieba()
    return " ".join(word.translate(ENCODE_TABLE) for word in jieba.cut(text, cut_all=False))


def _load_processor(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        if path.is_dir():
            raise UserError(f"{path}: is a folder, not a vocab file; pass the path of chinese_vocab.model")
        raise UserError(f"{path}: vocab file not found")
    data = path.read_bytes()
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except Exception:
        raise UserError(
            f"{path}: not a sentencepiece model; pass chinese_vocab.model "
            f"(from the {VOCAB_FOLDER}/ folder of the CPM-1-Generate repository)"
        ) from None
    return sp


def _check_special(sp: spm.SentencePieceProcessor, path: Path) -> None:
    size = sp.get_piece_size()
    for i, want in SPECIAL_PIECES.items():
        got = sp.id_to_piece(i) if i < size else None
        if got != want:
            shown = "missing" if got is None else repr(got)
            raise UserError(
                f"{path}: not the CPM-1 vocab: id {i} should be {want!r} but is {shown}; "
                f"pass chinese_vocab.model (from the {VOCAB_FOLDER}/ folder of the CPM-1-Generate repository)"
            )


class CPMTokenizer:
    """jieba + sentencepiece tokenizer of CPM-1 (`chinese_vocab.model`)."""

    def __init__(self, model_file: str | os.PathLike):
        self.path = Path(model_file)
        self.sp = _load_processor(self.path)
        _check_special(self.sp, self.path)
        self._size = self.sp.get_piece_size()

    # ids -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def eod_id(self) -> int:
        return self.sp.piece_to_id("<eod>")

    @property
    def pad_id(self) -> int:
        return self.sp.piece_to_id("<pad>")

    @property
    def sep_id(self) -> int:
        return self.sp.piece_to_id("<sep>")

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    # text <-> ids ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return self.sp.encode(prepare(text), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._decode(ids)

    def _decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if not ids:
            return ""
        return self.sp.decode(ids).replace(" ", "").translate(DECODE_TABLE)

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def _byte_value(self, i: int) -> int | None:
        """The byte of a byte-fallback piece (`<0xE4>`), else None."""
        if 0 <= i < self._size and self.sp.is_byte(i):
            return int(self.sp.id_to_piece(i)[3:5], 16)
        return None


def _utf8_len(lead: int) -> int:
    """Length of the UTF-8 sequence a lead byte starts; 0 if it cannot start one."""
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


class StreamDecoder:
    """Incremental decode for live output.

    `push(ids)` returns the text that the appended ids make printable; `flush()` returns
    what is still held back. Everything pushed and flushed concatenates to
    `tokenizer.decode(all_ids)` exactly. Text is held back only while the pending ids end
    in an unfinished UTF-8 sequence of byte pieces (whose decode ends in U+FFFD), so no
    half character is ever shown; each push decodes only the new ids plus at most 3
    held-back ones.
    """

    def __init__(self, tokenizer: CPMTokenizer):
        self.tokenizer = tokenizer
        self._pending: list[int] = []

    def push(self, ids: Iterable[int] | int) -> str:
        try:
            ids = list(ids)
        except TypeError:  # a single id
            ids = [ids]
        self._pending.extend(int(i) for i in ids)
        k = self._open_tail(self._pending)
        if k is None:
            head, self._pending = self._pending, []
        else:  # hold back an unfinished UTF-8 sequence of byte pieces (it decodes to U+FFFD now)
            head, self._pending = self._pending[:k], self._pending[k:]
        return self.tokenizer._decode(head)

    def flush(self) -> str:
        text = self.tokenizer._decode(self._pending)
        self._pending = []
        return text

    def _open_tail(self, ids: Sequence[int]) -> int | None:
        """Index where a trailing, still-completable UTF-8 sequence of byte pieces starts.

        Splitting before a lead byte (or before any non-byte piece) never changes the
        decode: the bytes before it decode the same whatever follows."""
        tok = self.tokenizer
        conts = 0
        for back in range(1, 5):
            if back > len(ids):
                return None
            b = tok._byte_value(ids[-back])
            if b is None:
                return None
            if 0x80 <= b <= 0xBF:
                conts += 1
                if conts >= 3:
                    return None
                continue
            return len(ids) - back if _utf8_len(b) > conts + 1 else None
        return None


def find_vocab(vocab: str | None, config_vocab: str | None, model_dir: str | None) -> Path:
    """Locate chinese_vocab.model: --vocab, then the config's tokenizer.vocab, then the
    model folder, the folder beside it, and bpe_3w_new/ inside or beside it."""
    for given, where in ((vocab, "given by --vocab"), (config_vocab, "given by tokenizer.vocab in the config")):
        if given:
            path = Path(given).expanduser()
            if path.is_file():
                return path
            if path.is_dir():
                for name in VOCAB_NAMES:
                    if (path / name).is_file():
                        return path / name
                raise UserError(f"{path}: folder has no chinese_vocab.model or spiece.model ({where})")
            raise UserError(f"{path}: vocab file not found ({where})")
    if model_dir:
        folder = Path(model_dir).expanduser()
        if folder.is_file():
            folder = folder.parent
        parent = folder.absolute().parent
        candidates = [folder / name for name in VOCAB_NAMES]
        candidates.append(parent / VOCAB_NAMES[0])
        candidates.append(folder / VOCAB_FOLDER / VOCAB_NAMES[0])
        candidates.append(parent / VOCAB_FOLDER / VOCAB_NAMES[0])
        for c in candidates:
            if c.is_file():
                return c
    msg = (
        "no vocab file: pass --vocab PATH to chinese_vocab.model "
        f"(from the {VOCAB_FOLDER}/ folder of the CPM-1-Generate repository)"
    )
    if model_dir:
        msg += f", or put it in the model folder {model_dir}"
    raise UserError(msg)
