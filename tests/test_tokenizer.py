"""CPM tokenizer: special ids, the jieba/sentencepiece encode rule, decode, streaming, vocab lookup."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm

from cpmgen.errors import UserError
from cpmgen.tokenizer import CPMTokenizer, StreamDecoder, find_vocab

from corpus import CORPUS, train_test_vocab

HINT = "pass chinese_vocab.model (from the bpe_3w_new/ folder of the CPM-1-Generate repository)"
NO_VOCAB = (
    "no vocab file: pass --vocab PATH to chinese_vocab.model "
    "(from the bpe_3w_new/ folder of the CPM-1-Generate repository)"
)

CPM_IDS = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "\u2583": 3,
    "<sep>": 4,
    "<pad>": 5,
    "<mask>": 6,
    "<eod>": 7,
    "\u2581": 8,
    "\u2582": 10,
}

TEXTS = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n",
    "我们",
    "那天夜里下着很大的雨，街上几乎没有行人。",
    "晚风轻轻吹过我的脸\n吹散了昨天的思念\n",
    "我们  一起唱   到天亮",
    "  开头有空格，结尾也有  ",
    "Hello, world. 然后又删掉",
    "Oh yeah 我们一起唱\nOh yeah 唱到天亮",
    "手机只剩下 12% 的电量，晚上 11:45。",
    "销售额增长了 15.8%，新用户超过 3000 人！",
    "“你还要等多久？”《百年孤独》……",
    "Python 重写后台系统，bug 还有 120 多个",
    "第一章 雨夜\n\n那天夜里\r\n下着雨\t很大",
    "生僻字龘靐齉和表情😀不在词表里",
    "abc def\n\n  ghi",
    CORPUS,
]

# text made only of characters the test vocab holds, unchanged by NFKC: must round-trip
ROUND_TRIP = [
    "",
    " ",
    "我们  一起唱   到天亮",
    "  晚风轻轻吹过我的脸  ",
    "晚风轻轻吹过我的脸\n吹散了昨天的思念\n\n我们走过的那条街\n",
    "\n\n第一章 雨夜\n",
    "Hello, world. 然后又删掉",
    "Oh yeah 我们一起唱 Oh yeah 唱到天亮",
    "12% 的电量 11 45 2019年4月18日",
    "“后来呢”孩子问。《晚风》、",
]


@pytest.fixture(scope="session")
def vocab_path(tmp_path_factory) -> Path:
    return train_test_vocab(tmp_path_factory.mktemp("vocab") / "chinese_vocab.model")


@pytest.fixture(scope="session")
def tok(vocab_path) -> CPMTokenizer:
    return CPMTokenizer(vocab_path)


@pytest.fixture(scope="session")
def byte_tok(tmp_path_factory) -> CPMTokenizer:
    path = train_test_vocab(tmp_path_factory.mktemp("bytevocab") / "chinese_vocab.model", byte_fallback=True)
    return CPMTokenizer(path)


def reference_encode(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """The upstream rule, written out directly."""
    import jieba

    words = [w.replace(" ", "\u2582").replace("\n", "\u2583") for w in jieba.cut(text, cut_all=False)]
    return sp.encode(" ".join(words))


# --- special pieces --------------------------------------------------------------------


def test_special_ids(tok):
    for piece, i in CPM_IDS.items():
        assert tok.sp.piece_to_id(piece) == i
        assert tok.pieces([i]) == [piece]
    assert (tok.eod_id, tok.pad_id, tok.sep_id, tok.unk_id) == (7, 5, 4, 0)
    assert tok.vocab_size == 1000


def test_train_test_vocab_is_deterministic(tmp_path, vocab_path):
    again = train_test_vocab(tmp_path / "v.model")
    assert again == tmp_path / "v.model"
    assert again.read_bytes() == vocab_path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["v.model"]  # no temp file left behind


def test_corpus_is_fully_covered(tok):
    assert len(CORPUS.encode("utf-8")) > 2000
    assert tok.unk_id not in tok.encode(CORPUS)


# --- encode / decode -------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_matches_reference_rule(tok, vocab_path, text):
    sp = spm.SentencePieceProcessor(model_file=str(vocab_path))
    assert tok.encode(text) == reference_encode(sp, text)


def test_encode_maps_space_and_newline(tok):
    assert tok.encode("") == []
    ids = tok.encode("我们  去\n")
    pieces = tok.pieces(ids)
    assert pieces.count("\u2582") == 2 and pieces.count("\u2583") == 1
    assert " " not in "".join(pieces)


@pytest.mark.parametrize("text", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_corpus_up_to_normalisation(tok):
    # sentencepiece's nmt_nfkc turns full-width punctuation into ASCII
    assert tok.decode(tok.encode(CORPUS)) == unicodedata.normalize("NFKC", CORPUS)


def test_decode_rule(tok):
    ids = [tok.sp.piece_to_id(p) for p in ["我们", "\u2581", "\u2582", "\u2581", "一起", "\u2583", "<eod>"]]
    assert tok.decode(ids) == "我们 一起\n<eod>"
    assert tok.decode([]) == ""
    assert tok.decode(iter(ids)) == tok.decode(ids)


# --- streaming -------------------------------------------------------------------------


def stream(tok, ids, chunk=1):
    dec = StreamDecoder(tok)
    out = [dec.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    out.append(dec.flush())
    return out


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_stream_one_id_at_a_time(tok, text):
    ids = tok.encode(text)
    assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_stream_chunks_and_single_int(tok):
    ids = tok.encode(CORPUS)
    for chunk in (2, 3, 7, 50):
        assert "".join(stream(tok, ids, chunk)) == tok.decode(ids)
    dec = StreamDecoder(tok)
    assert dec.push(tok.sp.piece_to_id("我们")) == "我们"
    assert dec.push([]) == ""
    assert dec.flush() == ""


def test_stream_holds_back_partial_characters(byte_tok):
    text = "表情😀和生僻字龘靐齉不在词表里\n晚风轻轻吹"
    ids = byte_tok.encode(text)
    assert any(byte_tok.sp.is_byte(i) for i in ids)
    parts = stream(byte_tok, ids)
    assert "".join(parts) == byte_tok.decode(ids) == text
    assert not any("\ufffd" in p for p in parts)
    # a character split over byte pieces appears whole, in one push
    assert "😀" in parts


def test_stream_random_ids_with_bytes(byte_tok):
    rng = random.Random(0)
    size = byte_tok.vocab_size
    byte_ids = [i for i in range(size) if byte_tok.sp.is_byte(i)]
    lead = [i for i in byte_ids if byte_tok._byte_value(i) >= 0xC0]
    cont = [i for i in byte_ids if 0x80 <= byte_tok._byte_value(i) <= 0xBF]
    for _ in range(400):
        ids = []
        for _ in range(rng.randint(1, 25)):
            pool = rng.choice([byte_ids, lead, cont, cont, range(size)])
            ids.append(rng.choice(pool))
        want = byte_tok.decode(ids)
        assert "".join(stream(byte_tok, ids)) == want, ids
        assert "".join(stream(byte_tok, ids, 3)) == want, ids


def test_stream_keeps_little_pending(byte_tok):
    dec = StreamDecoder(byte_tok)
    ids = byte_tok.encode("😀" * 200)
    for i in ids:
        dec.push([i])
        assert len(dec._pending) <= 3


# --- loading ---------------------------------------------------------------------------


def test_not_a_sentencepiece_file(tmp_path):
    bad = tmp_path / "chinese_vocab.model"
    bad.write_bytes(b"this is not a model\x00\xff" * 10)
    with pytest.raises(UserError) as e:
        CPMTokenizer(bad)
    assert str(e.value) == f"{bad}: not a sentencepiece model; {HINT}"


def test_missing_file(tmp_path):
    with pytest.raises(UserError) as e:
        CPMTokenizer(tmp_path / "nope.model")
    assert str(e.value) == f"{tmp_path / 'nope.model'}: vocab file not found"
    with pytest.raises(UserError) as e:
        CPMTokenizer(tmp_path)
    assert str(e.value) == f"{tmp_path}: is a folder, not a vocab file; pass the path of chinese_vocab.model"


def test_wrong_special_ids(tmp_path):
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=out,
        model_type="bpe",
        vocab_size=600,
        hard_vocab_limit=False,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=["\u2583", "<sep>", "<pad>", "<mask>", "<end>", "\u2581", "<x>", "\u2582"],
        minloglevel=2,
    )
    path = tmp_path / "spiece.model"
    path.write_bytes(out.getvalue())
    with pytest.raises(UserError) as e:
        CPMTokenizer(path)
    assert str(e.value) == f"{path}: not the CPM-1 vocab: id 7 should be '<eod>' but is '<end>'; {HINT}"


def test_jieba_is_lazy_and_quiet(vocab_path):
    code = (
        "import sys\n"
        "from cpmgen.tokenizer import CPMTokenizer\n"
        f"t = CPMTokenizer({str(vocab_path)!r})\n"
        "assert 'jieba' not in sys.modules\n"
        "assert t.encode('我们一起唱') and 'jieba' in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == ""


# --- find_vocab ------------------------------------------------------------------------


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_find_vocab_order(tmp_path):
    model = tmp_path / "models" / "cpm-large"
    model.mkdir(parents=True)
    explicit = touch(tmp_path / "a" / "my.model")
    from_config = touch(tmp_path / "b" / "cfg.model")
    beside_bpe = touch(tmp_path / "models" / "bpe_3w_new" / "chinese_vocab.model")
    inside_bpe = touch(model / "bpe_3w_new" / "chinese_vocab.model")
    beside = touch(tmp_path / "models" / "chinese_vocab.model")
    spiece = touch(model / "spiece.model")
    inside = touch(model / "chinese_vocab.model")

    assert find_vocab(str(explicit), str(from_config), str(model)) == explicit
    assert find_vocab(None, str(from_config), str(model)) == from_config
    for expected in (inside, spiece, beside, inside_bpe, beside_bpe):
        assert find_vocab(None, None, str(model)) == expected
        expected.unlink()
    with pytest.raises(UserError) as e:
        find_vocab(None, None, str(model))
    assert str(e.value) == f"{NO_VOCAB}, or put it in the model folder {model}"


def test_find_vocab_explicit_folder(tmp_path):
    v = touch(tmp_path / "bpe_3w_new" / "chinese_vocab.model")
    assert find_vocab(str(tmp_path / "bpe_3w_new"), None, None) == v
    with pytest.raises(UserError) as e:
        find_vocab(str(tmp_path), None, None)
    assert str(e.value) == f"{tmp_path}: folder has no chinese_vocab.model or spiece.model (given by --vocab)"


def test_find_vocab_model_file_path(tmp_path):
    # a model path that is a file (e.g. model.safetensors) means its folder
    weights = touch(tmp_path / "hf" / "model.safetensors")
    v = touch(tmp_path / "hf" / "spiece.model")
    assert find_vocab(None, None, str(weights)) == v


def test_find_vocab_errors(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(UserError) as e:
        find_vocab(str(missing), None, str(tmp_path))
    assert str(e.value) == f"{missing}: vocab file not found (given by --vocab)"
    with pytest.raises(UserError) as e:
        find_vocab(None, str(missing), str(tmp_path))
    assert str(e.value) == f"{missing}: vocab file not found (given by tokenizer.vocab in the config)"
    with pytest.raises(UserError) as e:
        find_vocab(None, None, None)
    assert str(e.value) == NO_VOCAB
    with pytest.raises(UserError) as e:
        find_vocab(None, None, str(tmp_path / "empty"))
    assert str(e.value) == f"{NO_VOCAB}, or put it in the model folder {tmp_path / 'empty'}"
