"""The Python package: Model, its errors and lifetime, generate/stream, library lookup."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import arianna_c
from arianna_c import AriannaError, Model, ModelConfig
from arianna_c import _lib
from conftest import REPO, piece_id, write_synthetic_tokenizer


def test_config_and_repr(make_model, built):
    files = make_model(version=0, shared_classifier=False)
    with Model(files.model) as m:  # tokenizer.bin next to the model
        assert isinstance(m.config, ModelConfig)
        assert m.config == files.cfg
        assert m.config.head_size == 8 and m.config.kv_dim == 16
        assert "open" in repr(m)
    assert "closed" in repr(m)


def test_close_is_idempotent_and_blocks_use(make_model, built):
    files = make_model()
    m = Model(files.model, files.tokenizer)
    m.close()
    m.close()
    assert m.closed
    with pytest.raises(AriannaError, match="closed"):
        m.encode("hi")
    with pytest.raises(AriannaError, match="closed"):
        m.generate("hi")


def test_generate_is_deterministic_per_seed(make_model, built):
    files = make_model(seed=8)
    with Model(files.model, files.tokenizer) as m:
        a = m.generate("the", max_new_tokens=30, seed=5)
        b = m.generate("the", max_new_tokens=30, seed=5)
        c = m.generate("the", max_new_tokens=30, seed=6)
        assert isinstance(a, str) and a == b and a != c
        assert "".join(m.stream("the", max_new_tokens=30, seed=5)) == a
        assert m.generate("the", max_new_tokens=0) == ""
        greedy = m.generate("the", max_new_tokens=20, temperature=0.0)
        assert greedy == m.generate("the", max_new_tokens=20, temperature=0.0, seed=123)
        assert greedy == m.generate("the", max_new_tokens=20, top_k=1, seed=4)


def test_generate_matches_the_c_generate_loop(lib, ffi, make_model):
    """Python's loop over the step API and C's ac_generate produce the same tokens."""
    files = make_model(seed=9)
    with Model(files.model, files.tokenizer) as m:
        text = m.generate("it", max_new_tokens=25, temperature=1.0, top_p=0.9, seed=21)
        params = ffi.new("ac_sampler_params *", {"temperature": 1.0, "top_p": 0.9, "top_k": 0, "seed": 21})
        out = ffi.new("ac_session **")
        assert lib.ac_session_create(m._h.model, m._h.tokenizer, params, out) == 0
        chunks = []

        @ffi.callback("int(void *, int, const char *, size_t)")
        def on_piece(user, token, piece, size):
            chunks.append(ffi.buffer(piece, size)[:])
            return 0

        assert lib.ac_generate(out[0], b"it", 2, 25, on_piece, ffi.NULL, ffi.NULL) == 0
        lib.ac_session_free(out[0])
    assert b"".join(chunks).decode("utf-8", "replace") == text


def test_stream_yields_whole_characters(scripted_model, built):
    script = [1, 3 + 0xC3, 3 + 0xA9, 3 + 0xF0, 3 + 0x9F, 3 + 0x99, 3 + 0x82, 3 + ord("x"), 2]  # é🙂x
    files = scripted_model(script)
    with Model(files.model, files.tokenizer) as m:
        pieces = list(m.stream("", max_new_tokens=50, temperature=0.0))
        assert pieces == ["é", "🙂", "x"]
        assert m.generate("", temperature=0.0) == "é🙂x"
        # a byte-split character cut by max_new_tokens still comes out (as U+FFFD)
        assert m.generate("", max_new_tokens=3, temperature=0.0) == "é\ufffd"


def test_breaking_out_of_stream_leaves_model_usable(make_model, built):
    files = make_model(seed=10)
    with Model(files.model, files.tokenizer) as m:
        want = m.generate("a", max_new_tokens=10, seed=1)
        gen = m.stream("a", max_new_tokens=40, seed=2)
        for i, _ in enumerate(gen):
            if i == 2:
                break
        gen.close()
        assert m.generate("a", max_new_tokens=10, seed=1) == want


def test_close_during_stream_waits_for_it(make_model, built):
    files = make_model(seed=10)
    m = Model(files.model, files.tokenizer)
    gen = m.stream("a", max_new_tokens=30, temperature=0.0)
    first = next(gen, None)
    m.close()  # the running stream keeps the C objects alive until it ends
    rest = list(gen)
    assert m.closed
    assert first is None or isinstance(first, str)
    assert all(isinstance(p, str) for p in rest)
    with pytest.raises(AriannaError):
        m.generate("a")


def test_logits(make_model, built):
    files = make_model(seed=11)
    with Model(files.model, files.tokenizer) as m:
        out = m.logits([1, 20, 30])
        assert out.shape == (3, 320) and out.dtype == np.float32
        np.testing.assert_array_equal(m.logits([1, 20])[1], out[1])
        assert m.logits([]).shape == (0, 320)
        with pytest.raises(AriannaError, match="outside the vocabulary"):
            m.logits([1, 320])
        with pytest.raises(AriannaError, match="outside the vocabulary"):
            m.logits([-1])
        with pytest.raises(AriannaError, match="not an integer"):
            m.logits(["a"])
        with pytest.raises(AriannaError, match="seq_len"):
            m.logits([1] * 65)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"temperature": -1.0}, "temperature -1 is invalid"),
        ({"temperature": float("nan")}, "temperature nan is invalid"),
        ({"top_p": 0.0}, "top_p 0 is invalid"),
        ({"top_p": 2.0}, "top_p 2 is invalid"),
        ({"top_k": -3}, "top_k -3 is invalid"),
        ({"seed": -1}, "seed -1 is invalid"),
        ({"seed": 2**64}, "seed"),
        ({"max_new_tokens": -1}, "max_new_tokens -1 is invalid"),
    ],
)
def test_bad_generation_arguments(make_model, built, kwargs, needle):
    files = make_model()
    with Model(files.model, files.tokenizer) as m:
        with pytest.raises(AriannaError, match=needle.replace("(", r"\(")) as info:
            m.generate("x", **kwargs)
        assert isinstance(info.value, ValueError)


def test_prompt_too_long(make_model, built):
    files = make_model(seq_len=8)
    with Model(files.model, files.tokenizer) as m:
        with pytest.raises(AriannaError, match="seq_len is 8") as info:
            m.generate("x y z w v u t s r q")
        assert info.value.name == "AC_ERR_RANGE"
        assert m.generate("", max_new_tokens=100, seed=3) is not None  # empty prompt: BOS alone


def test_missing_files(make_model, tmp_path, built):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        Model(tmp_path / "nope.bin")
    files = make_model(tokenizer_name=None)
    with pytest.raises(FileNotFoundError) as info:
        Model(files.model)
    folder = files.model.parent
    assert str(folder / "tok4096.bin") in str(info.value) and str(folder / "tokenizer.bin") in str(info.value)
    with pytest.raises(FileNotFoundError, match="mytok.bin"):
        Model(files.model, "mytok")


def test_tokenizer_resolution_like_cli(make_model, built):
    files = make_model(tokenizer_name="tok4096.bin")
    with Model(files.model) as m:
        assert m.encode("a") == [1, piece_id(b" a")]
    with Model(files.model, "tok4096") as m:
        assert m.config.vocab_size == 320
    shutil.copy(files.model.parent / "tok4096.bin", files.model.parent / "other.bin")
    with Model(files.model, "other") as m:
        assert m.config.vocab_size == 320


def test_file_errors_become_ariannaerror(make_model, tmp_path, built):
    files = make_model()
    short = tmp_path / "short.bin"
    short.write_bytes(files.model.read_bytes()[:-8])
    with pytest.raises(AriannaError, match="short.bin: file is .* bytes, header implies") as info:
        Model(short, files.tokenizer)
    assert info.value.name == "AC_ERR_FORMAT" and info.value.code == 2
    wrong = write_synthetic_tokenizer(tmp_path / "wrong.bin", 400)
    with pytest.raises(AriannaError, match="tokenizer has 400 pieces but the model's vocab_size is 320"):
        Model(files.model, wrong)
    with pytest.raises(AriannaError, match="tokenizer"):
        Model(files.model.read_bytes(), b"\0\0")
    with pytest.raises(FileNotFoundError, match="name a tokenizer"):
        Model(files.model.read_bytes())


def test_encode_decode_roundtrip(make_model, built):
    files = make_model()
    with Model(files.model, files.tokenizer) as m:
        for text in ["", "the cat sat", "Upper Case 123 ünïcödé 🙂\n\tend", "<s>literal</s>"]:
            assert m.decode(m.encode(text)) == text
            assert m.decode(m.encode(text, bos=False, eos=True)) == text
        with pytest.raises(AriannaError):
            m.decode([5000])
        assert m.encode("\ud800") == m.encode("\ud800")  # lone surrogates do not crash


def test_module_level_helpers_use_the_bundled_persona(monkeypatch, make_model, built):
    files = make_model(tokenizer_name="tok4096.bin")
    monkeypatch.setattr(arianna_c, "_default_model_path", lambda: files.model)
    monkeypatch.setattr(arianna_c, "_default", None)
    text = arianna_c.generate("the", max_new_tokens=10, seed=1)
    assert text == "".join(arianna_c.stream("the", max_new_tokens=10, seed=1))
    assert arianna_c.default_model() is arianna_c.default_model()
    arianna_c.default_model().close()
    monkeypatch.setattr(arianna_c, "_default", None)


def test_default_model_path_when_absent(tmp_path, monkeypatch):
    # a package directory with no persona beside it or inside it
    monkeypatch.setattr(arianna_c, "_PACKAGE_DIR", tmp_path / "pkg" / "arianna_c")
    with pytest.raises(FileNotFoundError, match="arianna_v1_base.bin"):
        Model()


def test_library_lookup(monkeypatch, tmp_path, built):
    paths = _lib.library_candidates()
    assert paths[-1] == REPO / "libarianna.so"
    assert REPO / "arianna_c" / "libarianna.so" in paths
    monkeypatch.setenv("ARIANNA_C_LIB", str(tmp_path / "x.so"))
    assert _lib.library_candidates()[0] == tmp_path / "x.so"


def test_library_lookup_follows_the_package_path(monkeypatch, tmp_path):
    """An editable install lists its install tree in the package's __path__: searched in order."""
    monkeypatch.delenv("ARIANNA_C_LIB", raising=False)
    monkeypatch.setattr(arianna_c, "__path__", [str(tmp_path), *arianna_c.__path__])
    paths = _lib.library_candidates()
    assert paths[:2] == [tmp_path / "libarianna.so", REPO / "arianna_c" / "libarianna.so"]


def test_missing_library_is_a_clear_importerror(monkeypatch, tmp_path):
    monkeypatch.setattr(_lib, "_lib", None)
    monkeypatch.setattr(_lib, "library_candidates", lambda: [tmp_path / "libarianna.so"])
    with pytest.raises(ImportError, match=str(tmp_path / "libarianna.so")):
        _lib.load()


@pytest.mark.persona
def test_bundled_persona_speaks(built):
    persona = REPO / "persona" / "arianna_v1_base.bin"
    if not persona.exists() or not (REPO / "persona" / "tok4096.bin").exists():
        pytest.skip("the persona has not landed yet")
    with Model(persona) as m:
        assert m.config.vocab_size == 4096
        text = m.generate("Resonance is", max_new_tokens=30, temperature=0.0)
        assert len(text.strip()) > 0
