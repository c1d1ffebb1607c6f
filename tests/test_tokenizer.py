"""The C tokenizer against real SentencePiece: a tiny BPE model is trained here with the
project's settings (byte fallback, identity normalization, dummy prefix, digits split) and
the C encode must give SentencePiece's ids exactly; decode must invert encode."""

from __future__ import annotations

import numpy as np
import pytest

from arianna_c import formats

TEXTS = [
    "Resonance is the quiet agreement of two things that vibrate together.",
    "Once upon a time, a small model learned to speak.",
    "I wandered lonely as a cloud\nThat floats on high o'er vales and hills,\n\nWhen all at once",
    "  leading spaces",
    "trailing spaces   ",
    "runs    of     spaces and\ttabs\t\tand\t mixed \t whitespace",
    " ",
    "\n",
    "\t",
    "a",
    "In 1984 there were 12 lamps; 3.14159 * 2 = 6.28318, 1000000 ways.",
    "Punctuation!? (yes) [no] {maybe} <angle> \"quotes\" 'single' -- dashes -- ... ;:,",
    "Café, naïve, résumé, façade, jalapeño, Ångström, über, crème brûlée.",
    "東京の夜は静かです。我喜欢读书。한국어 문장입니다.",
    "Unseen script: Ελληνικά, русский, עברית, العربية, हिन्दी",
    "Emoji 🙂 🚀 🌊 ✨ and unseen ones 🦜🧬🫠 👩‍👩‍👧",
    "literal specials: <s> </s> <unk> <0x41> <0x0A>",
    "control\x01chars\x7f are bytes",
    "mixed: tHe RiVeR ReMeMbErS 42 times\r\nwindows line end",
    "x" * 300,
    "the " * 100,
]


@pytest.fixture(scope="module")
def model_with_sp(sp_tok, tmp_path_factory):
    """A random model whose vocab matches the trained SentencePiece tokenizer."""
    from arianna_c import Model

    cfg = formats.ModelConfig(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                              vocab_size=sp_tok.vocab_size, seq_len=32, shared_classifier=True, version=1)
    folder = tmp_path_factory.mktemp("spmodel")
    formats.write_model(folder / "model.bin", cfg, formats.random_weights(cfg, 0))
    with Model(folder / "model.bin", sp_tok.bin_file) as m:
        yield m


def test_converted_tokenizer_holds_sentencepiece_pieces_and_scores(sp_tok):
    """The exported .bin: every piece by id as SentencePiece has it ("\u2581" written as a space,
    byte pieces as their "<0xNN>" text), its score as a float32, the specials named."""
    pieces, scores = formats.read_tokenizer(sp_tok.bin_file)
    sp = sp_tok.sp
    assert len(pieces) == len(scores) == sp_tok.vocab_size == sp.get_piece_size()
    assert pieces[:3] == [b"<unk>", b"<s>", b"</s>"]
    assert pieces[3] == b"<0x00>" and pieces[258] == b"<0xFF>"
    for i in range(3, sp_tok.vocab_size):
        assert pieces[i] == sp.id_to_piece(i).replace("\u2581", " ").encode(), i
        assert scores[i] == np.float32(sp.get_score(i)), i
    assert sum(p.startswith(b" ") for p in pieces) > 20  # word-initial pieces, with their space


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_equals_sentencepiece(model_with_sp, sp_tok, text, built):
    assert model_with_sp.encode(text, bos=False) == sp_tok.sp.encode(text)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_decode_inverts_encode(model_with_sp, text, built):
    # decode drops raw control characters other than \n \t \r by design; all else round-trips
    expected = "".join(c for c in text if not (ord(c) < 0x20 and c not in "\n\t\r" or c == "\x7f"))
    ids = model_with_sp.encode(text)
    assert ids[0] == 1
    assert model_with_sp.decode(ids) == expected
    assert model_with_sp.decode(model_with_sp.encode(text, bos=False)) == expected


def test_random_strings_match_sentencepiece(model_with_sp, sp_tok):
    """Random mixes of the training alphabet, spaces and unseen characters."""
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ETAOIN.,;'\"!?0123456789 \t\n éçüñ東京夜静🙂🚀Ωжش")
    for _ in range(200):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 40))))
        assert model_with_sp.encode(text, bos=False) == sp_tok.sp.encode(text), repr(text)


def test_empty_string_and_bos_eos(model_with_sp, sp_tok):
    assert sp_tok.sp.encode("") == []
    assert model_with_sp.encode("", bos=False) == []
    assert model_with_sp.encode("") == [1]
    assert model_with_sp.encode("", bos=True, eos=True) == [1, 2]
    ids = model_with_sp.encode("hello", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == sp_tok.sp.encode("hello")
    assert model_with_sp.decode(ids) == "hello"


def test_literal_special_text_is_not_special(model_with_sp):
    ids = model_with_sp.encode("<s></s><0x41>", bos=False)
    assert 1 not in ids and 2 not in ids and (0x41 + 3) not in ids
    assert model_with_sp.decode(ids) == "<s></s><0x41>"


def test_unseen_characters_use_byte_fallback(model_with_sp, sp_tok):
    text = "🦜"
    ids = model_with_sp.encode(text, bos=False)
    assert ids == sp_tok.sp.encode(" ")[:1] + [b + 3 for b in text.encode()]  # "▁" + 4 bytes
    assert model_with_sp.decode(ids) == text


def test_decode_piece_rules(lib, ffi, model_with_sp):
    """Byte pieces give raw bytes, the dummy-prefix space goes after BOS only, specials and
    lone control bytes give nothing."""
    tok = model_with_sp._h.tokenizer
    piece, size = ffi.new("const char **"), ffi.new("size_t *")

    def dec(prev, token):
        assert lib.ac_decode_piece(tok, prev, token, piece, size) == 0
        return ffi.buffer(piece[0], size[0])[:]

    word = model_with_sp.encode(" the", bos=False)[0]
    raw = ffi.new("const char **")
    n = ffi.new("size_t *")
    assert lib.ac_tokenizer_piece(tok, word, raw, n, ffi.NULL) == 0
    text = ffi.buffer(raw[0], n[0])[:]
    assert text.startswith(b" ")
    assert dec(1, word) == text[1:]
    assert dec(50, word) == text
    assert dec(5, 0) == dec(5, 1) == dec(5, 2) == b""
    assert dec(5, 0x0A + 3) == b"\n" and dec(5, 0x09 + 3) == b"\t" and dec(5, 0x0D + 3) == b"\r"
    assert dec(5, 0x01 + 3) == b"" and dec(5, 0x7F + 3) == b"" and dec(5, 0x1B + 3) == b""
    assert dec(5, 0xC3 + 3) == b"\xc3"
    assert lib.ac_decode_piece(tok, 5, model_with_sp.config.vocab_size, piece, size) == lib.AC_ERR_RANGE


def test_split_multibyte_character_decodes_whole(model_with_sp):
    ids = [1] + [b + 3 for b in "é🙂".encode()]
    assert model_with_sp.decode(ids) == "é🙂"
    assert model_with_sp.decode(ids[:-1]) == "é\ufffd"  # a cut character becomes U+FFFD


def test_encode_capacity_contract(lib, ffi, model_with_sp):
    tok = model_with_sp._h.tokenizer
    text = "hello world, hello".encode()
    n = ffi.new("int *")
    out = ffi.new("int[]", 2)
    assert lib.ac_encode(tok, text, len(text), 1, 1, out, 2, n) == lib.AC_ERR_RANGE
    needed = n[0]
    assert needed == len(model_with_sp.encode("hello world, hello", bos=True, eos=True))
    out = ffi.new("int[]", needed)
    assert lib.ac_encode(tok, text, len(text), 1, 1, out, needed, n) == 0 and n[0] == needed
    assert lib.ac_encode(tok, ffi.NULL, 3, 0, 0, out, needed, n) == lib.AC_ERR_ARG


def test_invalid_utf8_becomes_byte_tokens(lib, ffi, model_with_sp):
    tok = model_with_sp._h.tokenizer
    data = b"a\xff\xc3(b\xed\xa0\x80"  # stray byte, bad continuation, a surrogate
    n = ffi.new("int *")
    out = ffi.new("int[]", len(data) + 3)
    assert lib.ac_encode(tok, data, len(data), 0, 0, out, len(data) + 3, n) == 0
    ids = list(out[0 : n[0]])
    for b in (0xFF, 0xC3, 0xED, 0xA0, 0x80):
        assert b + 3 in ids


def test_synthetic_tokenizer_merges_by_score(make_model):
    """The hand-made vocabulary: " the" (a high-score merge) wins over its parts."""
    from arianna_c import Model
    from conftest import piece_id

    files = make_model()
    with Model(files.model, files.tokenizer) as m:
        assert m.encode("the", bos=False) == [piece_id(b" the")]
        assert m.decode(m.encode("the cat in the hat")) == "the cat in the hat"


def test_byte_fallback_takes_the_first_byte_piece_and_never_a_special(lib, ffi, tmp_path):
    """A "<0x61>" piece in a special slot (id 2, EOS) is not byte a's token: the first later
    one is, in C and in the reference alike (an EOS inside a prompt would end it)."""
    from arianna_c.reference import Tokenizer
    from capi import load_tokenizer

    pieces = [b"<unk>", b"<s>", b"<0x61>", b" ", b"<0x62>", b"<0x62>", b"<0x61>"]
    path = tmp_path / "tok.bin"
    formats.write_tokenizer(path, pieces, [0.0] * len(pieces))
    rc, tok = load_tokenizer(lib, ffi, path, len(pieces))
    assert rc == 0
    n, out = ffi.new("int *"), ffi.new("int[]", 8)
    assert lib.ac_encode(tok, b"ab", 2, 1, 0, out, 8, n) == 0
    assert list(out[0:n[0]]) == [1, 3, 6, 4] == Tokenizer(path, sp_model=False).encode("ab")
    lib.ac_tokenizer_free(tok)
