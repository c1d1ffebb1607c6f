"""The Python package: Model, its errors and lifetime, strict argument types, the shared
generation settings, generate/stream/generate_batch, file and library lookup."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import arianna_c
from arianna_c import AriannaError, ErrorCode, Model, ModelConfig, SamplingParams
from arianna_c import _lib, paths, runtime
import helpers_parity as hp
from capi import create_session, last_error
from conftest import REPO, piece_id, write_synthetic_tokenizer


def counting(model: Model, *names: str) -> hp.CallCounter:
    counter = hp.CallCounter(model._lib, names)
    model._lib = counter
    return counter


# ---------------------------------------------------------------------------- the package


def test_public_names(lib, ffi):
    for name in arianna_c.__all__:
        assert hasattr(arianna_c, name), name
    assert arianna_c.Model is runtime.Model
    assert arianna_c.library_version() == arianna_c.__version__ == ffi.string(lib.ac_version()).decode()
    assert arianna_c.kernel_name() == ffi.string(lib.ac_kernel_name()).decode()


def test_kernel_name_follows_ac_kernel(built):
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import arianna_c; print(arianna_c.kernel_name())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, AC_KERNEL="scalar"))
    assert (r.returncode, r.stdout.strip()) == (0, "scalar"), r.stderr


def test_error_codes_are_the_libraries(lib, ffi):
    for code in ErrorCode:
        assert code == getattr(lib, code.c_name)
        assert ffi.string(lib.ac_strerror(code)).decode() == code.c_name
    assert ErrorCode.FORMAT.c_name == "AC_ERR_FORMAT" and ErrorCode(2) is ErrorCode.FORMAT
    err = AriannaError("bad", ErrorCode.RANGE)
    assert isinstance(err, ValueError) and err.code is ErrorCode.RANGE and err.name == "AC_ERR_RANGE"
    newer = AriannaError("from a newer library", 99, "AC_ERR_NEW")
    assert newer.code == 99 and newer.name == "AC_ERR_NEW"


# ---------------------------------------------------------------------------- lifetime


def test_config_and_repr(make_model, built):
    files = make_model(version=0, shared_classifier=False)
    with Model(files.model) as m:  # tokenizer.bin next to the model
        assert isinstance(m.config, ModelConfig)
        assert m.config == files.cfg
        assert m.config.head_size == 8 and m.config.kv_dim == 16 and m.config.group_size == 0
        assert "open" in repr(m)
    assert "closed" in repr(m)


def test_every_method_raises_after_close(make_model, tmp_path, built):
    files = make_model()
    m = Model(files.model, files.tokenizer)
    with m:
        assert m.logits([]).shape == (0, 320)
    m.close()
    m.close()  # idempotent
    assert m.closed
    calls = {
        "encode": lambda: m.encode("hi"), "decode": lambda: m.decode([]), "logits": lambda: m.logits([]),
        "generate": lambda: m.generate("hi"), "stream": lambda: m.stream("hi"),
        "generate_batch": lambda: m.generate_batch([]), "save": lambda: m.save(tmp_path / "x.bin"),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="the model is closed"):
            call()
    assert not (tmp_path / "x.bin").exists()


def test_close_during_stream_waits_for_it(make_model, built):
    files = make_model(seed=10)
    m = Model(files.model, files.tokenizer)
    want = m.generate("a", max_new_tokens=30, temperature=0.0)
    gen = m.stream("a", max_new_tokens=30, temperature=0.0)
    first = next(gen)
    m.close()  # the running stream keeps the C objects alive until it ends
    assert first + "".join(gen) == want
    assert m.closed
    with pytest.raises(ValueError, match="closed"):
        m.generate("a")


def test_breaking_out_of_stream_leaves_model_usable(make_model, built):
    files = make_model(seed=10)
    with Model(files.model, files.tokenizer) as m:
        want = m.generate("a", max_new_tokens=10, seed=1)
        gen = m.stream("a", max_new_tokens=40, seed=2)
        for i, _ in enumerate(gen):
            if i == 2:
                break
        gen.close()
        gen.close()
        assert list(gen) == []
        never_started = m.stream("a", max_new_tokens=40, seed=3)
        del never_started  # dropped before its first piece: its session is freed
        assert m._h._users == 0
        assert m.generate("a", max_new_tokens=10, seed=1) == want


# ---------------------------------------------------------------------------- generation


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
        params = ffi.new("ac_session_params *", lib.ac_session_default_params())
        params.sampler.temperature, params.sampler.top_p, params.sampler.seed = 1.0, 0.9, 21
        params.max_new_tokens = 25
        rc, session = create_session(lib, ffi, m._h.model, m._h.tokenizer, params)
        assert rc == 0, last_error(lib, ffi)
        chunks = []

        @ffi.callback("int(void *, int, const char *, size_t)")
        def on_piece(user, token, piece, size):
            chunks.append(ffi.buffer(piece, size)[:])
            return 0

        assert lib.ac_generate(session, b"it", 2, on_piece, ffi.NULL, ffi.NULL) == 0
        lib.ac_session_free(session)
    assert b"".join(chunks).decode("utf-8", "replace") == text


def test_settings_object_and_keywords(make_model, built):
    files = make_model(seed=12)
    with Model(files.model, files.tokenizer) as m:
        p = SamplingParams(max_new_tokens=12, temperature=0.7, top_k=5, seed=9)
        want = m.generate("the", max_new_tokens=12, temperature=0.7, top_k=5, seed=9)
        assert m.generate("the", params=p) == want
        assert "".join(m.stream("the", params=p)) == want
        assert arianna_c.generate is runtime.generate
        assert m.generate("the", 12, temperature=0.7, top_k=5, seed=9) == want  # max_new_tokens positional
        assert m.generate("the", max_tokens=12, temperature=0.7, top_k=5, seed=9) == want  # OpenAI's name
        assert m.generate("the", params=p, seed=10) == m.generate("the", params=SamplingParams(
            max_new_tokens=12, temperature=0.7, top_k=5, seed=10))  # keywords win over params
        assert m.generate_batch(["the"], params=p) == [want]
    with pytest.raises(Exception):
        p.seed = 3  # frozen


def test_defaults_are_the_librarys(lib, make_model):
    c = lib.ac_session_default_params()
    defaults = arianna_c.default_sampling()
    assert np.float32(defaults.temperature) == np.float32(c.sampler.temperature)
    assert np.float32(defaults.top_p) == np.float32(c.sampler.top_p) and defaults.top_k == c.sampler.top_k
    assert defaults.max_new_tokens == c.max_new_tokens
    assert defaults.seed is None and defaults.ignore_eos is False
    files = make_model(seed=13)
    with Model(files.model, files.tokenizer) as m:
        explicit = m.generate("the", max_new_tokens=defaults.max_new_tokens, temperature=defaults.temperature,
                              top_p=defaults.top_p, top_k=defaults.top_k, seed=3)
        assert m.generate("the", seed=3) == explicit


def test_stream_yields_whole_characters(scripted_model, built):
    script = [1, 3 + 0xC3, 3 + 0xA9, 3 + 0xF0, 3 + 0x9F, 3 + 0x99, 3 + 0x82, 3 + ord("x"), 2]  # é🙂x
    files = scripted_model(script)
    with Model(files.model, files.tokenizer) as m:
        pieces = list(m.stream("", max_new_tokens=50, temperature=0.0))
        assert pieces == ["é", "🙂", "x"]
        assert m.generate("", temperature=0.0) == "é🙂x"
        # a byte-split character cut by max_new_tokens still comes out (as U+FFFD)
        assert m.generate("", max_new_tokens=3, temperature=0.0) == "é\ufffd"


def test_huge_max_new_tokens_is_clamped_everywhere(scripted_model, built):
    files = scripted_model([1] + [3 + c for c in b"abcdefghijklmnopqrstuvwxyz"], seq_len=12)
    with Model(files.model, files.tokenizer) as m:
        for n in (2**31, 2**63, 10**30):
            assert m.generate("", max_new_tokens=n, temperature=0) == "abcdefghijk"
            assert m.generate_batch(["", ""], max_new_tokens=n, temperature=0) == ["abcdefghijk"] * 2
        assert m.generate("", top_k=2**40, seed=1) == m.generate("", top_k=0, seed=1)  # more than the vocabulary


def test_prompt_too_long(make_model, built):
    files = make_model(seq_len=8)
    prompt = "x y z w v u t s r q"
    with Model(files.model, files.tokenizer) as m:
        n = len(m.encode(prompt))
        assert n > 8
        with pytest.raises(AriannaError) as info:
            m.generate(prompt)
        assert str(info.value) == f"the prompt is {n} tokens (BOS included) but the model's seq_len is 8"
        assert info.value.name == "AC_ERR_RANGE" and info.value.code is ErrorCode.RANGE
        # an empty prompt is BOS alone, and the generation fills the rest of the context
        empty = m.generate("", max_new_tokens=100, seed=3, ignore_eos=True, logprobs=0)
        assert (empty.prompt_tokens, empty.completion_tokens, empty.finish_reason) == (1, 8 - 1, "length")
        assert empty.text == m.generate("", max_new_tokens=100, seed=3, ignore_eos=True)


def test_logits_reuse_one_state(make_model, built):
    files = make_model(seed=11)
    with Model(files.model, files.tokenizer, threads=2) as m:
        counter = counting(m, "ac_state_create", "ac_state_set_threads")
        first = m.logits([1, 20, 30])
        for _ in range(3):
            np.testing.assert_array_equal(m.logits([1, 20, 30]), first)
        np.testing.assert_array_equal(m.logits(np.array([1, 20], dtype=np.int64))[1], first[1])
        assert counter.calls == {"ac_state_create": 1, "ac_state_set_threads": 1}


def test_logits(make_model, built):
    files = make_model(seed=11)
    with Model(files.model, files.tokenizer) as m:
        out = m.logits([1, 20, 30])
        assert out.shape == (3, 320) and out.dtype == np.float32
        np.testing.assert_array_equal(m.logits([1, 20])[1], out[1])
        assert m.logits([]).shape == (0, 320)
        with pytest.raises(AriannaError, match="outside the vocabulary") as info:
            m.logits([1, 320])
        assert info.value.code is ErrorCode.RANGE
        with pytest.raises(AriannaError, match="outside the vocabulary"):
            m.logits([-1])
        with pytest.raises(AriannaError, match="outside the vocabulary"):
            m.logits([2**40])
        with pytest.raises(AriannaError, match="seq_len"):
            m.logits([1] * 65)


# ---------------------------------------------------------------------------- strict types


BAD_TYPES = [
    (dict(temperature="0.5"), "temperature must be a float, not str"),
    (dict(top_p="1"), "top_p must be a float, not str"),
    (dict(temperature=True), "temperature must be a float, not bool"),
    (dict(max_new_tokens=True), "max_new_tokens must be an int, not bool"),
    (dict(max_new_tokens=5.0), "max_new_tokens must be an int, not float"),
    (dict(top_k=True), "top_k must be an int, not bool"),
    (dict(top_k=2.5), "top_k must be an int, not float"),
    (dict(seed=True), "seed must be an int, not bool"),
    (dict(seed="7"), "seed must be an int, not str"),
    (dict(ignore_eos=1), "ignore_eos must be True or False, not int"),
    (dict(temprature=0.5), "unknown setting 'temprature'"),
    (dict(max_new_tokens=4, max_tokens=4), "max_new_tokens is given twice"),
    (dict(params={"seed": 1}), "params must be a SamplingParams, not dict"),
]


@pytest.mark.parametrize("kwargs, needle", BAD_TYPES, ids=[n for _, n in BAD_TYPES])
def test_wrong_setting_types_are_type_errors(make_model, built, kwargs, needle):
    files = make_model()
    with Model(files.model, files.tokenizer) as m:
        for call in (m.generate, m.stream):
            with pytest.raises(TypeError, match=needle):
                call("x", **kwargs)
        with pytest.raises(TypeError, match=needle):
            m.generate_batch(["x"], **kwargs)
    with pytest.raises(TypeError, match=needle):
        arianna_c.stream("x", **kwargs)  # checked before the bundled persona is loaded


def test_module_stream_refuses_logprobs_as_model_stream_does(make_model, built):
    files = make_model()
    with Model(files.model, files.tokenizer) as m:
        with pytest.raises(TypeError) as info:
            m.stream("x", logprobs=1)
    needle = re.escape(str(info.value))
    assert "returns text only" in str(info.value)
    with pytest.raises(TypeError, match=needle):
        arianna_c.stream("x", logprobs=1)  # before the bundled persona is loaded


def test_wrong_argument_types_are_type_errors(make_model, built):
    files = make_model()
    with pytest.raises(TypeError, match="threads must be an int, not bool"):
        Model(files.model, files.tokenizer, threads=True)
    with pytest.raises(TypeError, match="threads must be an int, not float"):
        Model(files.model, files.tokenizer, threads=2.0)
    with pytest.raises(TypeError, match="model must be a path or bytes, not int"):
        Model(3)
    with Model(files.model, files.tokenizer) as m:
        for bad, needle in (([1.7], r"tokens\[0\] must be an int, not float"),
                            ([1, True], r"tokens\[1\] must be an int, not bool"),
                            (["a"], r"tokens\[0\] must be an int, not str"),
                            ("abc", "tokens must be a sequence of ints, not str")):
            with pytest.raises(TypeError, match=needle):
                m.logits(bad)
            with pytest.raises(TypeError, match=needle):
                m.decode(bad)
        for bad, needle in ((None, "tokens must be a sequence of ints, not NoneType"),
                            (5, "tokens must be a sequence of ints, not int"),
                            ([1, None], r"tokens\[1\] must be an int, not NoneType")):
            with pytest.raises(TypeError, match=needle):
                m.logits(bad)
            with pytest.raises(TypeError, match=needle):
                m.decode(bad)
        for prompts in ("abc", b"abc"):
            with pytest.raises(TypeError, match="prompts must be a sequence of str or bytes"):
                m.generate_batch(prompts)
        with pytest.raises(TypeError, match=r"prompts\[1\] must be str or bytes, not int"):
            m.generate_batch(["a", 7])
        with pytest.raises(TypeError, match="prompt must be str or bytes, not int"):
            m.generate(7)
        assert m.logits(np.array([1, 2], dtype=np.int16)).shape == (2, 320)  # NumPy ints are ints


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"temperature": -1.0}, "temperature -1 is invalid"),
        ({"temperature": float("nan")}, "temperature nan is invalid"),
        ({"top_p": 0.0}, "top_p 0 is invalid"),
        ({"top_p": 2.0}, "top_p 2 is invalid"),
        ({"top_k": -3}, "top_k -3 is invalid"),
        ({"top_k": -2**40}, "top_k -1099511627776 is invalid: it is outside the range of a C int"),
        ({"seed": -1}, "seed -1 is invalid"),
        ({"seed": 2**64}, "seed"),
        ({"max_new_tokens": -1}, "max_new_tokens -1 is invalid"),
        # the value as given, not as a C int or float holds it
        ({"repeat_last_n": 2**70}, "repeat_last_n 1180591620717411303424 is invalid: it must be in 0.."),
        ({"top_p": 1e39}, "top_p 1e+39 is invalid: it must be in (0, 1]"),
        ({"top_p": 1e-46}, "top_p 1e-46 is invalid: it must be in (0, 1]"),
        ({"min_p": 1.1}, "min_p 1.1 is invalid: it must be in [0, 1]"),
    ],
)
def test_bad_generation_arguments(make_model, built, kwargs, needle):
    files = make_model()
    with Model(files.model, files.tokenizer) as m:
        with pytest.raises(AriannaError, match=re.escape(needle)) as info:
            m.generate("x", **kwargs)
        assert isinstance(info.value, ValueError) and info.value.code is ErrorCode.ARG
        for call in (lambda: m.generate_batch(["x"], **kwargs), lambda: m.stream("x", **kwargs),
                     lambda: m.generate("x", logprobs=1, **kwargs)):
            with pytest.raises(AriannaError, match=re.escape(needle)):
                call()


# ---------------------------------------------------------------------------- files


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


def test_empty_path(make_model, built):
    files = make_model()
    with pytest.raises(ValueError, match="the model path is empty"):
        Model("")
    with pytest.raises(ValueError, match="the tokenizer path is empty"):
        Model(files.model, "")


def test_directory_as_tokenizer(make_model, tmp_path, built):
    files = make_model()
    with pytest.raises(IsADirectoryError, match="is a directory") as info:
        Model(files.model, tmp_path)
    assert info.value.errno == errno.EISDIR
    bare = make_model(tokenizer_name=None)
    (bare.model.parent / "tokenizer.bin").mkdir()  # the first default name, as a directory
    with pytest.raises(IsADirectoryError, match="tokenizer.bin"):
        Model(bare.model)


def test_symlink_loop(make_model, tmp_path, built):
    files = make_model()
    loop = tmp_path / "loop.bin"
    loop.symlink_to(loop)
    for args in ((loop, files.tokenizer), (files.model, loop)):
        with pytest.raises(OSError) as info:
            Model(*args)
        assert info.value.errno == errno.ELOOP and str(loop) in str(info.value)
        assert not isinstance(info.value, FileNotFoundError)


def test_allocation_failure_is_memory_error(make_model, built):
    """A state too big for the address-space limit: the library's AC_ERR_NOMEM and message
    become a MemoryError, not an OSError."""
    files = make_model(seq_len=2**20)  # the KV cache alone is 2^20 * 2 layers * 2 * 16 floats
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(REPO)!r})
        import arianna_c
        m = arianna_c.Model({str(files.model)!r}, {str(files.tokenizer)!r}, threads=1)
        resource.setrlimit(resource.RLIMIT_AS, (256 << 20, resource.RLIM_INFINITY))
        try:
            m.logits([1])
        except MemoryError as e:
            print("MemoryError:", e)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cfg = files.cfg
    kv_floats = 2 * cfg.n_layers * cfg.seq_len * cfg.n_kv_heads * (cfg.dim // cfg.n_heads)
    assert r.stdout == f"MemoryError: out of memory for the state (KV cache of {kv_floats} floats)\n"


def test_model_docstring_gives_the_librarys_tokenizer_order(built):
    names = re.findall(r"[\w.]+\.bin", paths.tokenizer_lookup_text())
    assert names == ["tokenizer.bin", "tok4096.bin"]
    assert f"default: ``{names[0]}``, then ``{names[1]}`` next to the model" in " ".join(Model.__doc__.split())


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
    assert info.value.name == "AC_ERR_FORMAT" and info.value.code is ErrorCode.FORMAT
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
        with pytest.raises(AriannaError, match="outside the vocabulary"):
            m.decode([5000])
        assert m.encode("\ud800") == m.encode(b"\xed\xa0\x80")  # a lone surrogate, as its bytes


def test_module_level_helpers_use_the_bundled_persona(monkeypatch, make_model, built):
    files = make_model(tokenizer_name="tok4096.bin")
    monkeypatch.setattr(paths, "default_model_path", lambda: str(files.model))
    monkeypatch.setattr(runtime, "_default", None)
    text = arianna_c.generate("the", max_new_tokens=10, seed=1)
    assert text == "".join(arianna_c.stream("the", max_new_tokens=10, seed=1))
    assert arianna_c.default_model() is arianna_c.default_model()
    arianna_c.default_model().close()
    monkeypatch.setattr(runtime, "_default", None)


def test_default_model_path_when_absent(tmp_path, monkeypatch, built):
    # a package directory with no persona beside it or inside it
    monkeypatch.setattr(paths, "PACKAGE_DIR", tmp_path / "pkg" / "arianna_c")
    with pytest.raises(FileNotFoundError, match="arianna_v1_base.bin"):
        Model()


# ---------------------------------------------------------------------------- the library


def test_library_lookup(monkeypatch, tmp_path, built):
    paths_tried = _lib.library_candidates()
    assert paths_tried[-1] == REPO / "libarianna.so"
    assert REPO / "arianna_c" / "libarianna.so" in paths_tried
    monkeypatch.setenv("ARIANNA_C_LIB", str(tmp_path / "x.so"))
    assert _lib.library_candidates()[0] == tmp_path / "x.so"


def test_library_lookup_follows_the_package_path(monkeypatch, tmp_path):
    """An editable install lists its install tree in the package's __path__: searched in order."""
    monkeypatch.delenv("ARIANNA_C_LIB", raising=False)
    monkeypatch.setattr(arianna_c, "__path__", [str(tmp_path), *arianna_c.__path__])
    paths_tried = _lib.library_candidates()
    assert paths_tried[:2] == [tmp_path / "libarianna.so", REPO / "arianna_c" / "libarianna.so"]


def test_missing_library_is_a_clear_importerror(monkeypatch, tmp_path):
    monkeypatch.setattr(_lib, "_lib", None)
    monkeypatch.setattr(_lib, "library_candidates", lambda: [tmp_path / "libarianna.so"])
    with pytest.raises(ImportError, match=str(tmp_path / "libarianna.so")):
        _lib.load()


@pytest.mark.persona
def test_bundled_persona_speaks(built):
    """Model() finds the shipped persona and its tokenizer, and speaks as the golden logits
    (tests/golden/) say it must: each golden prompt encodes to its golden tokens, the logits
    match, greedy generation starts with the token the golden logits rank first and goes on
    with the token its own logits rank first at every step."""
    meta, golden = hp.persona_golden()
    near_best = 2 * hp.TOL  # a token this close to the best logit is a fair greedy choice
    with Model() as m:
        assert dataclasses.asdict(m.config) == meta["config"]
        for prompt, tokens, rows in zip(meta["prompts"], meta["tokens"], golden):
            assert m.encode(prompt) == tokens
            diff = hp.max_abs_diff(m.logits(tokens)[-len(rows):], rows)
            assert diff <= hp.TOL, (prompt, diff)
            reply = m.generate(prompt, max_new_tokens=30, temperature=0.0, repeat_penalty=1.0, ignore_eos=True,
                               logprobs=0)
            assert len(reply.tokens) == 30 and reply.text == m.decode(tokens + reply.tokens)[len(prompt):]
            assert rows[-1][reply.tokens[0]] >= rows[-1].max() - near_best, (prompt, reply.text)
            steps = m.logits(tokens + reply.tokens[:-1])[len(tokens) - 1:]
            chosen = steps[np.arange(len(reply.tokens)), reply.tokens]
            assert (chosen >= steps.max(axis=1) - near_best).all(), (prompt, reply.text)
