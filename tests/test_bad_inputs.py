"""Every bad input gets a clear error at every layer, never a crash or nonsense:

* C: the AC_ERR_* result code, and ac_last_error() naming the file and what is wrong;
* CLI: exit status 1 with that message on stderr (and nothing on stdout for load errors);
* Python: arianna_c.AriannaError (a ValueError, with .code) or OSError for unusable paths.

Also: prompts and sampler settings at the edges, breaking out of a stream, and the fuzz
regression inputs in tests/fuzz_regressions/ replayed through the fuzz harnesses.
"""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

from capi import (code_name, create_sampler, create_session, create_state, int8_copy, last_error, load_api, load_model,
                  load_model_bytes, load_model_file, load_tokenizer, load_tokenizer_bytes, loaded_model, mappings_of,
                  model_config, quantize, read_stdout_until, run_cli)
from conftest import REPO, TINY, byte_id, piece_id, synthetic_tokenizer, tiny_config

from arianna_c import AriannaError, Model, formats

HEADER_FIELDS = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"]
V1_PARAMS = 8  # byte offset of the seven int32 in a v1 header (after magic and version)
INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------- one input at every layer


def c_load(lib, ffi, model: Path, tokenizer: Path) -> tuple[int, str]:
    """Loads model then tokenizer (with the model's vocab_size) through the C API; returns the
    first failure's (code, message), or (AC_OK, "")."""
    rc, m = load_model(lib, ffi, model)
    if rc:
        assert m == ffi.NULL
        return rc, last_error(lib, ffi)
    try:
        rc, t = load_tokenizer(lib, ffi, tokenizer, model_config(lib, ffi, m).vocab_size)
        if rc:
            assert t == ffi.NULL
            return rc, last_error(lib, ffi)
        lib.ac_tokenizer_free(t)
        return 0, ""
    finally:
        lib.ac_model_free(m)


def cli(run_binary: Path, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    """./run with args; stdout and stderr as bytes (a random model prints any bytes)."""
    return run_cli(run_binary, *args, text=False, timeout=timeout)


def model_loads(lib, ffi, path: Path) -> bool:
    rc, model = load_model(lib, ffi, path)
    lib.ac_model_free(model)
    return rc == 0


def assert_rejected(lib, ffi, run_binary, model: Path, tokenizer: Path, code: int, needle: str,
                    py_error: type = AriannaError) -> None:
    """The same bad input fails the same way in C, in the CLI and in Python; the message starts
    with the bad file's path."""
    bad = tokenizer if model_loads(lib, ffi, model) else model
    rc, msg = c_load(lib, ffi, model, tokenizer)
    assert (rc, needle in msg) == (code, True), f"C: {ffi.string(lib.ac_strerror(rc))}: {msg}"
    assert msg.startswith(f"{bad}: "), msg

    r = cli(run_binary, model, "-z", tokenizer, "-n", "4", "-s", "1")
    stderr = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 1, stderr
    assert f"error: {msg}" in stderr
    assert r.stdout == b""

    with pytest.raises(py_error, match=re.escape(needle)) as info:
        Model(model, tokenizer)
    if py_error is AriannaError:
        assert info.value.code == code


@pytest.fixture
def good(make_model):
    """A valid v1 model (vocab 320) with its tokenizer."""
    return make_model(seed=3, version=1)


def patched_header(data: bytes, **fields: int) -> bytes:
    """A v1 file with header fields replaced (weights unchanged)."""
    out = bytearray(data)
    for field, value in fields.items():
        off = V1_PARAMS + 4 * HEADER_FIELDS.index(field)
        out[off : off + 4] = struct.pack("<i", value)
    return bytes(out)


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------- model files


def v0_bytes() -> bytes:
    cfg = tiny_config(version=0)
    return formats.model_bytes(cfg, formats.random_weights(cfg, seed=1))


# name -> (bad bytes from the valid v1 file's bytes, expected message fragment)
BAD_MODELS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda d: b"", "file is 0 bytes, shorter than a model header (28 bytes)"),
    "shorter-than-v0-header": (lambda d: d[:27], "file is 27 bytes, shorter than a model header"),
    "shorter-than-v1-header": (lambda d: d[:100], "file is 100 bytes, shorter than a v1 header (256 bytes)"),
    "truncated-weights": (lambda d: d[:-4], "header implies"),
    "truncated-v0": (lambda d: v0_bytes()[:-1], "header implies"),
    "trailing-bytes": (lambda d: d + b"\0" * 4, "header implies"),
    "trailing-bytes-v0": (lambda d: v0_bytes() + b"x", "header implies"),
    "wrong-magic": (lambda d: b"GGUF" + d[4:], "is it a model file?"),
    "unknown-version-99": (lambda d: d[:4] + struct.pack("<i", 99) + d[8:], "unknown model file version 99"),
    "unknown-version-neg": (lambda d: d[:4] + struct.pack("<i", -1) + d[8:], "unknown model file version -1"),
    "shared-classifier-2": (lambda d: d[:36] + b"\2" + d[37:], "shared_classifier is 2, expected 0 or 1"),
    "vocab-below-specials": (lambda d: patched_header(d, vocab_size=2), "vocab_size is 2, below the minimum 3"),
    "v0-vocab-int-min": (lambda d: struct.pack("<7i", 48, 96, 2, 6, 2, -(2**31), 64) + b"\0" * 64,
                         "vocab_size is -2147483648, out of range"),
    "n-heads-above-dim": (lambda d: patched_header(d, n_heads=96), "n_heads is 96, above the limit 48"),
    "n-kv-above-n-heads": (lambda d: patched_header(d, n_kv_heads=12), "n_kv_heads is 12, above the limit 6"),
    "dim-not-divisible": (lambda d: patched_header(d, n_heads=5), "dim 48 is not divisible by n_heads 5"),
    "heads-not-divisible": (lambda d: patched_header(d, n_kv_heads=4), "n_heads 6 is not divisible by n_kv_heads 4"),
    "odd-head-size": (lambda d: patched_header(d, n_heads=16, n_kv_heads=16), "head size 3 (dim / n_heads) is odd"),
    "padding-byte-37": (lambda d: d[:37] + b"\1" + d[38:],
                        "header byte 37 is 0x01; bytes 37..255 of a v1 header must be zero"),
    "padding-byte-255": (lambda d: d[:255] + b"\xff" + d[256:],
                         "header byte 255 is 0xff; bytes 37..255 of a v1 header must be zero"),
}
for _field in HEADER_FIELDS:
    BAD_MODELS[f"zero-{_field}"] = (lambda d, f=_field: patched_header(d, **{f: 0}),
                                    f"header field {_field} is 0, must be positive")
    BAD_MODELS[f"negative-{_field}"] = (lambda d, f=_field: patched_header(d, **{f: -7}),
                                        f"header field {_field} is -7, must be positive")
    # every field huge: bounds are checked before any product is formed (64-bit overflow)
    BAD_MODELS[f"huge-{_field}"] = (lambda d, f=_field: patched_header(d, **{f: INT32_MAX}),
                                    f"header field {_field} is {INT32_MAX}, above the limit")


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model_file(lib, ffi, run_binary, good, tmp_path, case):
    build, needle = BAD_MODELS[case]
    bad = write(tmp_path, f"{case}.bin", build(good.model.read_bytes()))
    assert_rejected(lib, ffi, run_binary, bad, good.tokenizer, lib.AC_ERR_FORMAT, needle)


def test_bad_model_from_memory_names_the_buffer(good):
    for case in ("empty", "truncated-weights", "odd-head-size"):
        build, needle = BAD_MODELS[case]
        with pytest.raises(AriannaError, match="<memory>: ") as info:
            Model(build(good.model.read_bytes()), good.tokenizer.read_bytes())
        assert needle in str(info.value) and info.value.name == "AC_ERR_FORMAT"


def test_products_overflowing_32_bits_report_the_exact_64_bit_size(lib, ffi, run_binary, good, tmp_path):
    """dim * hidden_dim * n_layers * 3 * 4 bytes is ~2^48: each field is within its bound, the
    products are formed in 64 bits and the size check names the exact expected size."""
    big = dict(dim=65536, hidden_dim=1 << 20, n_layers=1024, n_heads=256, n_kv_heads=256,
               vocab_size=1 << 24, seq_len=1 << 20)
    bad = write(tmp_path, "big.bin", patched_header(good.model.read_bytes(), **big))
    expected = formats.expected_file_size(formats.ModelConfig(**big, version=1))
    assert expected > 2**48
    assert_rejected(lib, ffi, run_binary, bad, good.tokenizer, lib.AC_ERR_FORMAT,
                    f"header implies {expected} (dim=65536 hidden_dim=1048576")


def test_tokenizer_passed_as_model(lib, ffi, run_binary, good):
    assert_rejected(lib, ffi, run_binary, good.tokenizer, good.tokenizer, lib.AC_ERR_FORMAT,
                    "read as a legacy llama2.c v0 header: is it a model file?")


def test_missing_model_in_missing_folder(lib, ffi, run_binary, good, tmp_path):
    missing = tmp_path / "no-such-dir" / "model.bin"
    rc, msg = c_load(lib, ffi, missing, good.tokenizer)
    assert rc == lib.AC_ERR_IO and msg == f"{missing}: cannot open model file: No such file or directory"
    r = cli(run_binary, missing, "-z", good.tokenizer)
    assert r.returncode == 1 and f"error: {msg}" in r.stderr.decode()
    with pytest.raises(FileNotFoundError, match="model file not found"):
        Model(missing, good.tokenizer)


def test_directory_as_model(lib, ffi, run_binary, good, tmp_path):
    rc, msg = c_load(lib, ffi, tmp_path, good.tokenizer)
    assert rc == lib.AC_ERR_IO and msg == f"{tmp_path}: cannot use it as the model file: it is a directory, not a regular file"
    r = cli(run_binary, tmp_path, "-z", good.tokenizer)
    assert r.returncode == 1 and f"error: {msg}" in r.stderr.decode()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        Model(tmp_path, good.tokenizer)


def call_with_timeout(fn: Callable[[], object], seconds: float = 20) -> object:
    """fn() in a daemon thread: a call that blocks forever fails the test instead of hanging it."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(_capture(fn)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"the call blocked for more than {seconds} s"
    return result[0]


def _capture(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except BaseException as e:  # returned, so the test thread can inspect it
        return e


def test_fifo_as_model_or_tokenizer_does_not_block(lib, ffi, run_binary, good, tmp_path):
    """Opening a FIFO for reading waits for a writer; the loaders must refuse it at once."""
    fifo = tmp_path / "fifo.bin"
    os.mkfifo(fifo)
    rc, msg = call_with_timeout(lambda: c_load(lib, ffi, fifo, good.tokenizer))
    assert rc == lib.AC_ERR_IO and "it is a special file, not a regular file" in msg
    rc, msg = call_with_timeout(lambda: c_load(lib, ffi, good.model, fifo))
    assert rc == lib.AC_ERR_IO and msg.startswith(f"{fifo}: cannot use it as the tokenizer file")
    r = cli(run_binary, fifo, "-z", good.tokenizer, timeout=20)
    assert r.returncode == 1 and b"special file" in r.stderr
    error = call_with_timeout(lambda: Model(fifo, good.tokenizer))
    assert isinstance(error, OSError) and "special file" in str(error)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of their permissions")
def test_unreadable_model(lib, ffi, run_binary, good):
    good.model.chmod(0)
    rc, msg = c_load(lib, ffi, good.model, good.tokenizer)
    assert rc == lib.AC_ERR_IO and "Permission denied" in msg
    assert cli(run_binary, good.model, "-z", good.tokenizer).returncode == 1
    with pytest.raises(OSError, match="Permission denied"):
        Model(good.model, good.tokenizer)


def test_nul_in_path_is_an_argument_error(good):
    with pytest.raises(AriannaError, match="contains a NUL byte"):
        Model(str(good.model) + "\0x", good.tokenizer)


# ---------------------------------------------------------------------------- tokenizer files

V = TINY["vocab_size"]


def tokenizer_file(pieces: list[bytes], scores: list[float], max_len: Optional[int] = None) -> bytes:
    data = bytearray(formats.tokenizer_bytes(pieces, scores))
    if max_len is not None:
        data[0:4] = struct.pack("<i", max_len)
    return bytes(data)


def last_piece_offset(data: bytes, pieces: list[bytes]) -> int:
    return len(data) - len(pieces[-1]) - 8


def damaged_tokenizer(damage: str) -> bytes:
    pieces, scores = synthetic_tokenizer(V)
    data = bytearray(tokenizer_file(pieces, scores))
    last = last_piece_offset(bytes(data), pieces)
    if damage == "length-past-end":
        data[last + 4 : last + 8] = struct.pack("<i", len(pieces[-1]) + 1)
    elif damage == "negative-length":
        data[last + 4 : last + 8] = struct.pack("<i", -5)
    elif damage == "nan-score":
        data[last : last + 4] = struct.pack("<f", math.nan)
    elif damage == "truncated-piece-header":
        data = data[: last + 3]
    return bytes(data)


# name -> (file bytes, code name, message fragment)
BAD_TOKENIZERS = {
    "fewer-pieces": (lambda: tokenizer_file(*[x[:-1] for x in synthetic_tokenizer(V)]), "AC_ERR_MISMATCH",
                     f"tokenizer has {V - 1} pieces but the model's vocab_size is {V}"),
    "more-pieces": (lambda: tokenizer_file(*synthetic_tokenizer(V + 1)), "AC_ERR_MISMATCH",
                    f"tokenizer has {V + 1} pieces but the model's vocab_size is {V}"),
    "length-past-end": (lambda: damaged_tokenizer("length-past-end"), "AC_ERR_FORMAT",
                        f"piece {V - 1} (length "),
    "negative-length": (lambda: damaged_tokenizer("negative-length"), "AC_ERR_FORMAT",
                        f"piece {V - 1} has length -5, expected 0..6 (max_token_length)"),
    "max-len-below-a-piece": (lambda: tokenizer_file(*synthetic_tokenizer(V), max_len=5), "AC_ERR_FORMAT",
                              "piece 3 has length 6, expected 0..5 (max_token_length)"),
    "negative-max-len": (lambda: tokenizer_file(*synthetic_tokenizer(V), max_len=-1), "AC_ERR_FORMAT",
                         "max_token_length is -1, expected 0..65536"),
    "nan-score": (lambda: damaged_tokenizer("nan-score"), "AC_ERR_FORMAT", f"piece {V - 1} has a NaN score"),
    "truncated-piece-header": (lambda: damaged_tokenizer("truncated-piece-header"), "AC_ERR_FORMAT",
                               f"piece {V - 1} header runs past the end of the file"),
    "empty": (lambda: b"", "AC_ERR_FORMAT", "0 bytes is too short for a tokenizer header"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENIZERS))
def test_bad_tokenizer_file(lib, ffi, run_binary, good, tmp_path, case):
    build, code_name, needle = BAD_TOKENIZERS[case]
    tok = write(tmp_path, f"{case}.tok", build())
    assert_rejected(lib, ffi, run_binary, good.model, tok, getattr(lib, code_name), needle)


def test_huge_tokenizer_file_is_refused_before_reading(lib, ffi, run_binary, good, tmp_path):
    # a sparse 1 GiB file with a valid first field: refused from its size, never read in
    tok = write(tmp_path, "huge.tok", tokenizer_file(*synthetic_tokenizer(V)))
    os.truncate(tok, 1 << 30)
    assert_rejected(lib, ffi, run_binary, good.model, tok, lib.AC_ERR_FORMAT,
                    f"file is {1 << 30} bytes, more than a tokenizer of {V} pieces of at most 6 bytes")


def test_model_passed_as_tokenizer(lib, ffi, run_binary, good):
    # a v1 model's first int32 is the magic: far above the longest piece allowed
    assert_rejected(lib, ffi, run_binary, good.model, good.model, lib.AC_ERR_FORMAT,
                    "max_token_length is 1634415666, expected 0..65536")


def test_vocabulary_without_special_tokens(lib, ffi):
    data = tokenizer_file([b"<unk>", b"<s>"], [0.0, 0.0])
    rc, tok = load_tokenizer_bytes(lib, ffi, data, 2, b"two.tok")
    assert rc == lib.AC_ERR_ARG and tok == ffi.NULL
    assert last_error(lib, ffi) == "two.tok: vocab_size 2 is outside 3..16777216"


# ---------------------------------------------------------------------------- prompts, settings


def test_empty_prompt_starts_from_bos(run_binary, good):
    with Model(good.model, good.tokenizer) as m:
        text = m.generate("", max_new_tokens=10, seed=4)
        assert text == m.generate(b"", max_new_tokens=10, seed=4)
    r = cli(run_binary, good.model, "-z", good.tokenizer, "-n", "10", "-s", "4", "-i", "")  # default settings
    assert r.returncode == 0
    assert r.stdout.decode("utf-8", "replace") == text + "\n"


def test_prompt_longer_than_seq_len_is_an_error_everywhere(lib, ffi, run_binary, make_model):
    files = make_model(seed=2, seq_len=16)
    prompt = "the " * 20  # far more than 16 tokens
    with Model(files.model, files.tokenizer) as m:
        n = len(m.encode(prompt))
        with pytest.raises(AriannaError, match=f"the prompt is {n} tokens .BOS included. but the model's seq_len is 16") as info:
            m.stream(prompt)  # raised by the call itself, before the first piece
        assert info.value.name == "AC_ERR_RANGE"
        # exactly seq_len tokens fit (nothing can be generated after them)
        fits = m.decode(m.encode(prompt)[1:16])
        assert len(m.encode(fits)) == 16
        assert m.generate(fits, max_new_tokens=5, seed=1) == ""
    r = cli(run_binary, files.model, "-i", prompt, "-n", "4")
    assert r.returncode == 1
    assert f"error: the prompt is {n} tokens (BOS included) but the model's seq_len is 16".encode() in r.stderr


def count_generated(lib, ffi, files, prompt: bytes, steps: int) -> int:
    """ac_generate's token count (greedy), with the session's position checked."""
    n = ffi.new("int *")
    params = lib.ac_session_default_params()
    params.sampler.temperature, params.max_new_tokens = 0.0, steps
    with loaded_model(lib, ffi, files.model) as model:
        rc, tok = load_tokenizer(lib, ffi, files.tokenizer, files.cfg.vocab_size)
        assert rc == 0, last_error(lib, ffi)
        session = ffi.NULL
        try:
            rc, session = create_session(lib, ffi, model, tok, ffi.new("ac_session_params *", params))
            assert rc == 0, last_error(lib, ffi)
            assert lib.ac_generate(session, prompt, len(prompt), ffi.NULL, ffi.NULL, n) == 0
            assert lib.ac_session_position(session) <= files.cfg.seq_len
            return n[0]
        finally:
            lib.ac_session_free(session)
            lib.ac_tokenizer_free(tok)


def test_steps_beyond_seq_len_are_clamped(lib, ffi, run_binary, scripted_model):
    """Prompt + generated tokens never exceed seq_len, whatever max_new_tokens says."""
    # greedily BOS -> a -> b -> ... -> z: longer than the context, so it never ends the text
    files = scripted_model([1] + [byte_id(c) for c in b"abcdefghijklmnopqrstuvwxyz"], seq_len=12)
    assert count_generated(lib, ffi, files, b"", 10_000) == 11  # seq_len 12 minus BOS
    with Model(files.model, files.tokenizer) as m:
        assert m.generate("", max_new_tokens=10_000, temperature=0) == "abcdefghijk"
    r = cli(run_binary, files.model, "-n", "10000", "-t", "0")
    assert (r.returncode, r.stdout) == (0, b"abcdefghijk\n")


BAD_SETTINGS = [
    (dict(temperature=-0.5), ["-t", "-0.5"], "temperature -0.5 is invalid: it must be >= 0"),
    (dict(temperature=math.nan), ["-t", "nan"], "temperature nan is invalid"),
    (dict(top_p=0.0), ["-p", "0"], "top_p 0 is invalid: it must be in (0, 1]"),
    (dict(top_p=1.5), ["-p", "1.5"], "top_p 1.5 is invalid"),
    (dict(top_p=-0.1), ["-p", "-0.1"], "top_p -0.1 is invalid"),
    (dict(top_p=math.nan), ["-p", "nan"], "top_p nan is invalid"),
    (dict(top_k=-1), ["-k", "-1"], "top_k -1 is invalid: it must be >= 0"),
]


@pytest.mark.parametrize("kwargs, flags, needle", BAD_SETTINGS, ids=[n for _, _, n in BAD_SETTINGS])
def test_bad_sampler_settings(lib, ffi, run_binary, good, kwargs, flags, needle):
    params = lib.ac_sampler_default_params()
    for key, value in kwargs.items():
        setattr(params, key, value)
    rc, sampler = create_sampler(lib, ffi, params, V)
    assert rc == lib.AC_ERR_ARG
    assert needle in last_error(lib, ffi) and sampler == ffi.NULL
    r = cli(run_binary, good.model, "-z", good.tokenizer, *flags, "-n", "4")
    # the CLI refuses the option itself, naming it with the value as typed (tests/test_cli.py)
    assert r.returncode == 1 and f"error: {flags[0]} {flags[1]}: ".encode() in r.stderr and r.stdout == b""
    with Model(good.model, good.tokenizer) as m:
        want = m.generate("hi", max_new_tokens=3, seed=1)
        with pytest.raises(AriannaError, match=re.escape(needle)) as info:
            m.stream("hi", **kwargs)  # checked by the call, before the first piece
        assert info.value.name == "AC_ERR_ARG"
        assert m.generate("hi", max_new_tokens=3, seed=1) == want  # still usable, unchanged


def test_extreme_temperatures_and_non_finite_logits_sample_greedily(lib, ffi, good):
    """Logits / temperature overflowing (a tiny temperature), or NaN / inf logits from a corrupt
    model, make softmax NaN: the sampler then picks the argmax, never an arbitrary token."""
    with Model(good.model, good.tokenizer) as m:
        greedy = m.generate("the", max_new_tokens=12, temperature=0)
        for temperature in (1e-45, 1e-40):
            for top_p, top_k in ((1.0, 0), (0.9, 0), (1.0, 5)):
                assert m.generate("the", max_new_tokens=12, temperature=temperature, top_p=top_p,
                                  top_k=top_k, seed=1) == greedy
    cases = [([0.5, math.nan, 3.0, -math.inf, 2.0], 2), ([0.0, math.inf, 1.0, 5.0, -1.0], 1),
             ([math.nan] * 5, 0), ([math.nan, 1.0, math.nan, 4.0, 2.0], 3)]
    for logits, want in cases:
        for top_p, top_k in ((1.0, 0), (0.5, 0), (1.0, 2)):
            params = {"temperature": 1.0, "top_p": top_p, "top_k": top_k, "seed": 3}
            assert sample_once(lib, ffi, params, logits) == want, (logits, top_p, top_k)


def sample_once(lib, ffi, params: dict, logits: list[float]) -> int:
    """The token a new sampler with params picks from logits."""
    rc, sampler = create_sampler(lib, ffi, params, len(logits))
    assert rc == 0, last_error(lib, ffi)
    token = ffi.new("int *")
    try:
        assert lib.ac_sample(sampler, ffi.new("float[]", logits), token) == 0, last_error(lib, ffi)
    finally:
        lib.ac_sampler_free(sampler)
    return token[0]


def first_largest(logits: list[float]) -> int:
    """The greedy token: the first index of the largest value that is not NaN (0 if none is)."""
    numbers = [v for v in logits if not math.isnan(v)]
    return logits.index(max(numbers)) if numbers else 0


def test_greedy_sampling_takes_the_first_largest_logit_and_never_a_nan(lib, ffi):
    inf, nan = math.inf, math.nan
    below = [-5.0] * 21  # 21 logits: two whole blocks of 8 and a tail of 5
    cases = {"largest in the tail": {19: 2.0}, "a tie: the first": {3: 1.0, 17: 1.0},
             "NaN first": {0: nan, 9: 0.5}, "only -inf and NaN": {i: (nan if i % 3 else -inf) for i in range(21)},
             "-0 before +0": {i: -9.0 for i in range(21)} | {4: -0.0, 12: 0.0},
             "+0 before -0": {i: -9.0 for i in range(21)} | {4: 0.0, 12: -0.0},
             "every value NaN": {i: nan for i in range(21)}, "two +inf": {13: inf, 20: inf, 2: nan}}
    vectors = [(name, [changes.get(i, v) for i, v in enumerate(below)]) for name, changes in cases.items()]
    rng = np.random.default_rng(11)
    for n in range(1, 41):  # every length around the blocks, values drawn from a few so ties occur
        vectors.append((f"random {n}", [float(v) for v in rng.choice([nan, -inf, inf, -1.0, 0.0, 2.0, 3.0], n,
                                                                      p=[.1, .1, .02, .2, .2, .2, .18])]))
    for name, logits in vectors:
        assert sample_once(lib, ffi, {"temperature": 0.0, "top_p": 1.0}, logits) == first_largest(logits), (name, logits)


def test_nul_bytes_in_a_prompt_are_byte_tokens(good):
    with Model(good.model, good.tokenizer) as m:
        ids = m.encode("a\x00b")
        assert ids == [1, piece_id(b" a"), byte_id(0), piece_id(b"b")]
        assert m.decode(ids) == "ab"  # control bytes decode to nothing
        assert m.encode(b"a\x00b") == ids
        text = m.generate("a\x00b", max_new_tokens=8, seed=2)
        assert m.generate(b"a\x00b", max_new_tokens=8, seed=2) == text  # the same prompt as bytes


def test_invalid_utf8_prompts(run_binary, good):
    bad = b"\xff\xfe \xc3( \xed\xa0\x80"  # stray bytes, a broken pair, an encoded surrogate
    with Model(good.model, good.tokenizer) as m:
        ids = m.encode(bad)
        assert byte_id(0xFF) in ids and byte_id(0xC3) in ids and byte_id(0xED) in ids
        assert m.encode("\ud800") == m.encode(b"\xed\xa0\x80")  # a lone surrogate, as its bytes
        text = m.generate(bad, max_new_tokens=8, seed=3, temperature=0)
        assert isinstance(text, str)
        with pytest.raises(TypeError, match="str or bytes"):
            m.encode(42)  # type: ignore[arg-type]
    r = cli(run_binary, good.model, "-z", good.tokenizer, "-i", os.fsdecode(bad), "-n", "8", "-t", "0")
    assert r.returncode == 0
    assert r.stdout.startswith(bad)  # the CLI echoes the prompt's bytes unchanged
    assert r.stdout[len(bad):].decode("utf-8", "replace") == text + "\n"


def test_breaking_out_of_a_stream_leaves_the_model_usable(good):
    kwargs = dict(max_new_tokens=40, temperature=0.9, seed=12)
    with Model(good.model, good.tokenizer) as fresh:
        want = fresh.generate("the thing", **kwargs)
    assert len(want) > 5
    with Model(good.model, good.tokenizer) as m:
        got = []
        for piece in m.stream("the thing", **kwargs):
            got.append(piece)
            if len(got) == 3:
                break
        assert want.startswith("".join(got))
        abandoned = m.stream("the thing", **kwargs)
        next(abandoned)  # left suspended, never closed: must not disturb other calls
        assert m.generate("the thing", **kwargs) == want
        assert "".join(m.stream("the thing", **kwargs)) == want
        abandoned.close()
        assert m.generate("the thing", **kwargs) == want


# ---------------------------------------------------------------------------- int8 (v2) files

GROUP_SIZE_OFFSET = 37  # int32 after the shared_classifier byte of a v2 header


def with_group_size(data: bytes, group_size: int) -> bytes:
    return data[:GROUP_SIZE_OFFSET] + struct.pack("<i", group_size) + data[GROUP_SIZE_OFFSET + 4 :]


# name -> (bad bytes from a valid v2 file's bytes, expected message fragment)
BAD_INT8_MODELS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated": (lambda d: d[:-4], "header implies"),
    "trailing-bytes": (lambda d: d + b"\0" * 4, "header implies"),
    "header-only": (lambda d: d[:256], "file is 256 bytes, header implies"),
    "read-as-float32": (lambda d: d[:4] + struct.pack("<i", 1) + d[8:], "header implies"),
    "group-size-0": (lambda d: with_group_size(d, 0), "header field group_size is 0, must be a positive multiple of 4"),
    "group-size-negative": (lambda d: with_group_size(d, -32), "header field group_size is -32"),
    "group-size-not-multiple-of-4": (lambda d: with_group_size(d, 6), "header field group_size is 6"),
    "group-size-huge": (lambda d: with_group_size(d, 1 << 30), "group_size 1073741824 does not divide dim 48"),
    "group-size-not-dividing-dim": (lambda d: with_group_size(d, 32), "group_size 32 does not divide dim 48"),
    "group-size-not-dividing-hidden": (lambda d: patched_header(with_group_size(d, 4), hidden_dim=98),
                                       "group_size 4 does not divide hidden_dim 98"),
    "padding-byte-41": (lambda d: d[:41] + b"\7" + d[42:],
                        "header byte 41 is 0x07; bytes 41..255 of a v2 header must be zero"),
}


@pytest.fixture
def good_int8(lib, ffi, good, tmp_path) -> Path:
    """good's model quantized to int8 and saved as a v2 file (group size 16)."""
    return int8_copy(lib, ffi, good.model, tmp_path / "int8.bin")


@pytest.mark.parametrize("case", list(BAD_INT8_MODELS))
def test_bad_int8_model_file(lib, ffi, run_binary, good, good_int8, tmp_path, case):
    data = good_int8.read_bytes()
    assert struct.unpack_from("<i", data, 4)[0] == 2
    with Model(good_int8, good.tokenizer) as m:  # the unbroken file loads and runs
        assert m.config.version == 2 and np.isfinite(m.logits([1, 40, 50])).all()
    build, needle = BAD_INT8_MODELS[case]
    bad = write(tmp_path, f"int8-{case}.bin", build(data))
    assert_rejected(lib, ffi, run_binary, bad, good.tokenizer, lib.AC_ERR_FORMAT, needle)


def test_batch_generation_rejects_bad_prompts_and_settings(good):
    with Model(good.model, good.tokenizer) as m:
        with pytest.raises(AriannaError, match="top_p 2 is invalid"):
            m.generate_batch(["a", "b"], max_new_tokens=4, top_p=2.0)
        with pytest.raises(AriannaError, match="seq_len is 64"):
            m.generate_batch(["a", "the " * 80], max_new_tokens=4)
        with pytest.raises(TypeError, match="str or bytes"):
            m.generate_batch(["a", 7], max_new_tokens=4)  # type: ignore[list-item]
        texts = m.generate_batch([b"\xff\x00", ""], max_new_tokens=6, seed=3)
        assert texts == [m.generate(b"\xff\x00", max_new_tokens=6, seed=3),
                         m.generate("", max_new_tokens=6, seed=4)]


# ---------------------------------------------------------------------------- fuzz regressions

REGRESSIONS = REPO / "tests" / "fuzz_regressions"
HARNESSES = ["fuzz_model_load", "fuzz_tokenizer_load", "fuzz_encode", "fuzz_generate"]


@pytest.fixture(scope="session")
def replay_binaries(built) -> Path:
    """The fuzz harnesses built as plain programs (`make fuzz-replay`, no clang needed)."""
    r = subprocess.run(["make", "-s", "fuzz-replay"], cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"make fuzz-replay failed:\n{r.stdout}\n{r.stderr}")
    return REPO / "build-fuzz"


@pytest.mark.parametrize("harness", HARNESSES)
def test_fuzz_regressions_replay_cleanly(replay_binaries, harness):
    files = sorted(p for p in (REGRESSIONS / harness).glob("*") if p.is_file())
    assert files, f"no regression inputs in {REGRESSIONS / harness}"
    r = subprocess.run([str(replay_binaries / f"replay_{harness}"), *map(str, files)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == len(files)


def test_fuzz_regression_models_through_python(good):
    """The model crashers also load (or fail cleanly) through the Python API."""
    for path in sorted((REGRESSIONS / "fuzz_model_load").glob("*")):
        try:
            with Model(path.read_bytes(), good.tokenizer.read_bytes()) as m:
                m.logits([0])
        except AriannaError as e:
            assert str(e).startswith("<memory>: ") and e.name in ("AC_ERR_FORMAT", "AC_ERR_MISMATCH")


# ---------------------------------------------------------------------------- a model file that changes while loaded


def overwrite_in_place(path: Path, data: bytes) -> None:
    with open(path, "r+b") as f:  # the same inode: a mapping of it would see the new bytes
        f.write(data)


def other_weights_same_size(files) -> bytes:
    return formats.model_bytes(files.cfg, formats.random_weights(files.cfg, seed=99))


# name -> what happens to the loaded model's file
FILE_CHANGES: dict[str, Callable[[Path, bytes], None]] = {
    "truncated-to-0": lambda path, other: os.truncate(path, 0),
    "truncated-to-half": lambda path, other: os.truncate(path, path.stat().st_size // 2),
    "overwritten-in-place": overwrite_in_place,
}


@pytest.mark.parametrize("change", list(FILE_CHANGES))
def test_python_model_survives_its_file_changing(good, change):
    """The file is read into private memory at load: truncating it (SIGBUS with a mapping) or
    rewriting it in place (new weights showing up with a mapping) leaves the model as loaded."""
    other = other_weights_same_size(good)
    kwargs = dict(max_new_tokens=16, seed=5)
    with Model(good.model, good.tokenizer) as m:
        text, logits = m.generate("the", **kwargs), m.logits([1, 40, 50])
        FILE_CHANGES[change](good.model, other)
        assert m.generate("the", **kwargs) == text
        assert (m.logits([1, 40, 50]) == logits).all()
    if change == "overwritten-in-place":  # the new file is a different model: the check can fail
        with Model(good.model, good.tokenizer) as fresh:
            assert not (fresh.logits([1, 40, 50]) == logits).all()
    else:
        with pytest.raises(AriannaError, match="header"):
            Model(good.model, good.tokenizer)


def chat_after(run_binary: Path, files, change: Optional[Callable[[], None]]) -> tuple[int, bytes]:
    """./run in chat mode: once it asks for the first turn (the model is loaded), change() runs,
    then a turn is answered greedily and stdin ends.  Returns the exit status and stdout."""
    proc = subprocess.Popen([str(run_binary), str(files.model), "-z", str(files.tokenizer), "-m", "chat",
                             "-y", "", "-t", "0", "-n", "12"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = read_stdout_until(proc, b"User: ")
        if change:
            change()
        rest, err = proc.communicate(b"the thing\n", timeout=30)  # then the end of input ends the chat
        assert proc.returncode == 0, err
        return proc.returncode, out + rest
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("change", list(FILE_CHANGES))
def test_cli_survives_its_model_file_changing(run_binary, good, change):
    _, want = chat_after(run_binary, good, None)
    assert b"Assistant: " in want
    other = other_weights_same_size(good)
    rc, got = chat_after(run_binary, good, lambda: FILE_CHANGES[change](good.model, other))
    assert rc == 0 and got == want


# ---------------------------------------------------------------------------- load params: read or map

@pytest.fixture(scope="module")
def file_api(lib):
    """ac_model_load_file and its params, which the package's binding does not declare."""
    return load_api(lib)


def api_logits(file_api, model, tokens: list[int], vocab: int = V) -> list[float]:
    """Logits of tokens from a model loaded through file_api."""
    api_ffi, api = file_api
    out = api_ffi.new("float[]", len(tokens) * vocab)
    rc, state = create_state(api, api_ffi, model)
    assert rc == 0, last_error(api, api_ffi)
    try:
        rc = api.ac_logits(state, api_ffi.new("int[]", tokens), len(tokens), out)
        assert rc == 0, last_error(api, api_ffi)
        return list(out)
    finally:
        api.ac_state_free(state)


def test_mapping_the_file_gives_the_same_model_and_shows_rewrites(file_api, good):
    """use_mmap=1 maps the file instead of reading it: the same logits, and (as run.h warns)
    bytes rewritten in place show up in the mapped model, never in a read one (the default,
    also what NULL params give)."""
    api_ffi, api = file_api
    assert api.ac_model_default_load_params().use_mmap == 0
    tokens = [1, 40, 50]
    models = {}
    try:
        for mode, use_mmap in (("read", 0), ("mapped", 1)):
            rc, models[mode] = load_model_file(file_api, good.model, use_mmap)
            assert rc == 0, last_error(api, api_ffi)
            assert (mappings_of(good.model) > 0) == (mode == "mapped")
        out = api_ffi.new("ac_model **")
        assert api.ac_model_load_file(os.fsencode(good.model), api_ffi.NULL, out) == 0
        models["default"] = out[0]
        want = api_logits(file_api, models["read"], tokens)
        assert api_logits(file_api, models["mapped"], tokens) == want
        assert api_logits(file_api, models["default"], tokens) == want
        overwrite_in_place(good.model, other_weights_same_size(good))
        assert api_logits(file_api, models["read"], tokens) == want
        assert api_logits(file_api, models["default"], tokens) == want
        assert api_logits(file_api, models["mapped"], tokens) != want
    finally:
        for model in models.values():
            api.ac_model_free(model)
    assert mappings_of(good.model) == 0  # freeing the model unmaps its file


def test_a_huge_file_is_refused_from_its_header_before_it_is_read(file_api, good, tmp_path):
    """A 16 GiB sparse file with a model header: its size contradicts the header, which is read
    first, so it is refused in both modes without reading (or allocating) 16 GiB."""
    api_ffi, api = file_api
    big = write(tmp_path, "big.bin", good.model.read_bytes()[:256])
    os.truncate(big, 16 << 30)
    for use_mmap in (0, 1):
        params = api_ffi.new("ac_model_load_params *", {"use_mmap": use_mmap})
        model = api_ffi.new("ac_model **")
        started = time.monotonic()
        assert api.ac_model_load_file(os.fsencode(big), params, model) == 2  # AC_ERR_FORMAT
        assert time.monotonic() - started < 5 and model[0] == api_ffi.NULL
        assert f"file is {16 << 30} bytes, header implies" in last_error(api, api_ffi)


# ---------------------------------------------------------------------------- weights that are not numbers

PER_LAYER = {"rms_att", "rms_ffn", "wq", "wk", "wv", "wo", "w1", "w2", "w3"}
ALL_TENSORS = ["token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
               "rms_final", "wcls"]


def poison(weights: dict, tensor: str, value: float) -> str:
    """Puts value into tensor (layer 1 of a per-layer one) at row 1, column 5 (index 5 of a
    norm); returns the fragment of the message naming it."""
    layer = weights[tensor][1] if tensor in PER_LAYER else weights[tensor]
    name = f"layers.1.{tensor}" if tensor in PER_LAYER else tensor
    shown = "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if layer.ndim == 1:
        layer[5] = value
        return f": {name}[5] is {shown}, not a finite number"
    cols = layer.shape[1]
    layer[1, 5] = value
    return f": {name}[{cols + 5}] (row 1, column 5) is {shown}, not a finite number"


NON_FINITE_CASES = [(t, math.nan, 1) for t in ALL_TENSORS] + [
    ("token_embedding", math.inf, 1), ("w2", -math.inf, 1), ("rms_final", math.inf, 1),
    ("rms_ffn", math.nan, 0), ("wcls", -math.inf, 0), ("token_embedding", math.nan, 0),
]


@pytest.mark.parametrize("tensor, value, version", NON_FINITE_CASES,
                         ids=[f"{t}-{v}-v{ver}" for t, v, ver in NON_FINITE_CASES])
def test_non_finite_weights_are_refused(lib, ffi, run_binary, make_model, tensor, value, version):
    base = make_model(seed=3, version=version, shared_classifier=False)
    weights = {k: np.array(v) for k, v in base.weights.items()}
    needle = poison(weights, tensor, value)
    bad = make_model(weights=weights, version=version, shared_classifier=False)
    assert_rejected(lib, ffi, run_binary, bad.model, bad.tokenizer, lib.AC_ERR_FORMAT, needle)


@pytest.fixture
def int8_weights(good_int8):
    """good_int8's config and its weights as stored (int8 matrices as Q8Tensor, copies)."""
    cfg, weights = formats.read_model(good_int8, dequantize=False)
    copies = {}
    for name, value in weights.items():
        is_q8 = isinstance(value, formats.Q8Tensor)
        copies[name] = formats.Q8Tensor(value.values.copy(), value.scales.copy()) if is_q8 else value.copy()
    return cfg, copies


def first_nonzero_in_group(values, group: int, group_size: int) -> int:
    flat = values.reshape(-1)
    return next(j for j in range(group * group_size, (group + 1) * group_size) if flat[j])


BAD_SCALES = {"nan": math.nan, "inf": math.inf, "negative": -0.5, "zero-over-values": 0.0}


@pytest.mark.parametrize("case", list(BAD_SCALES))
def test_bad_int8_scales_are_refused(lib, ffi, run_binary, good, int8_weights, tmp_path, case):
    cfg, weights = int8_weights
    tensor, label = ("token_embedding", "token_embedding") if case == "inf" else ("w1", "layers.1.w1")
    q8 = weights[tensor]
    scales = q8.scales[1] if tensor in PER_LAYER else q8.scales
    values = q8.values[1] if tensor in PER_LAYER else q8.values
    scales.reshape(-1)[3] = BAD_SCALES[case]
    if case == "zero-over-values":
        j = first_nonzero_in_group(values, 3, cfg.group_size)
        needle = (f": {label} scale[3] is 0 but {label}[{j}] is {values.reshape(-1)[j]}; a zero scale is "
                  "only written for an all-zero group")
    else:
        needle = f": {label} scale[3] is {BAD_SCALES[case]:g}; int8 scales must be finite and >= 0"
    bad = write(tmp_path, f"scale-{case}.bin", formats.model_bytes(cfg, weights))
    assert_rejected(lib, ffi, run_binary, bad, good.tokenizer, lib.AC_ERR_FORMAT, needle)


def test_a_zero_scale_over_an_all_zero_group_loads(lib, ffi, good, int8_weights, tmp_path):
    """A zero scale over an all-zero group is what the quantizer writes for zeros: the file loads
    and runs as the library's own quantization of the float weights with that group zeroed."""
    cfg, weights = int8_weights
    gs = cfg.group_size
    weights["wq"].scales[0].reshape(-1)[2] = 0.0
    weights["wq"].values[0].reshape(-1)[2 * gs : 3 * gs] = 0
    path = write(tmp_path, "zero-group.bin", formats.model_bytes(cfg, weights))
    floats = {k: np.array(v) for k, v in good.weights.items()}
    floats["wq"][0].reshape(-1)[2 * gs : 3 * gs] = 0.0
    zeroed = write(tmp_path, "zeroed-float.bin", formats.model_bytes(good.cfg, floats))
    quantized = int8_copy(lib, ffi, zeroed, tmp_path / "zeroed-int8.bin")
    tokens = [1, 40, 50, 7]
    with Model(path, good.tokenizer) as m, Model(quantized, good.tokenizer) as want:
        np.testing.assert_array_equal(m.logits(tokens), want.logits(tokens))


DEGENERATE = ["token_embedding", "rms_final", "wcls"]


@pytest.mark.parametrize("tensor", DEGENERATE)
def test_all_zero_tensors_that_make_every_logit_equal_are_refused(lib, ffi, run_binary, make_model, tensor):
    base = make_model(seed=3, shared_classifier=False)
    weights = {k: np.array(v) for k, v in base.weights.items()}
    weights[tensor][...] = 0.0
    bad = make_model(weights=weights, shared_classifier=False)
    assert_rejected(lib, ffi, run_binary, bad.model, bad.tokenizer, lib.AC_ERR_FORMAT,
                    f": {tensor} is all zeros: every token would get the same logits")


def test_all_zero_int8_embedding_is_refused(lib, ffi, run_binary, good, int8_weights, tmp_path):
    cfg, weights = int8_weights
    emb = weights["token_embedding"]
    emb.values[...] = 0
    emb.scales[...] = 0.0
    bad = write(tmp_path, "zero-embedding.bin", formats.model_bytes(cfg, weights))
    assert_rejected(lib, ffi, run_binary, bad, good.tokenizer, lib.AC_ERR_FORMAT,
                    ": token_embedding is all zeros")


def test_an_embedding_too_small_for_int8_scales_is_refused_by_quantization(lib, ffi, make_model):
    """Denormal weights are finite and load as float32, but each group's int8 scale (its
    largest |value| / 127) underflows to 0: quantized, the embedding would be all zeros."""
    base = make_model(seed=3)
    weights = {k: np.array(v) for k, v in base.weights.items()}
    weights["token_embedding"][...] = np.float32(1e-44)
    files = make_model(weights=weights)
    with loaded_model(lib, ffi, files.model) as model:
        rc, q = quantize(lib, ffi, model, group_size=16)
        assert (code_name(lib, ffi, rc), q) == ("AC_ERR_NUMERIC", ffi.NULL)
        assert last_error(lib, ffi) == ("int8 quantization: token_embedding is all zeros: every token would get "
                                        "the same logits (once quantized: its float32 values are too small for "
                                        "int8 scales)")


def test_all_zero_layer_tensors_load(make_model):
    """A layer whose matrices or norms are all zero adds nothing to the residual stream: a
    working (pruned) model, not a degenerate one.  With every layer zeroed the logits are the
    classifier applied to the normalized token embedding."""
    base = make_model(seed=3)
    weights = {k: np.array(v) for k, v in base.weights.items()}
    for name in ("rms_att", "wq", "wk", "wv", "wo", "w2"):
        weights[name][...] = 0.0
    files = make_model(weights=weights)
    tokens = [1, 40, 50, 7]
    x = weights["token_embedding"][tokens].astype(np.float64)
    x = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + 1e-5) * weights["rms_final"]
    want = x @ weights["token_embedding"].T.astype(np.float64)  # tied classifier
    with Model(files.model, files.tokenizer) as m:
        np.testing.assert_allclose(m.logits(tokens), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_quantize_refuses_a_borrowed_buffer_that_became_non_finite(lib, ffi, good):
    """ac_model_load_memory borrows the buffer; if the caller breaks its promise and writes a NaN
    into it, quantizing refuses instead of turning the NaN into 0."""
    data = bytearray(good.model.read_bytes())
    rc, model, _buf = load_model_bytes(lib, ffi, data, b"borrowed.bin")
    assert rc == 0, last_error(lib, ffi)
    try:
        rms_att_7 = 256 + 4 * 7  # v1: rms_att comes first, right after the header
        data[rms_att_7 : rms_att_7 + 4] = struct.pack("<f", math.nan)
        rc, quantized = quantize(lib, ffi, model, 16)
        assert (rc, quantized) == (lib.AC_ERR_FORMAT, ffi.NULL)
        assert last_error(lib, ffi) == (
            "int8 quantization of the source model: layers.0.rms_att[7] is nan, not a finite number")
    finally:
        lib.ac_model_free(model)


# ---------------------------------------------------------------------------- logits that are not numbers


@pytest.fixture
def overflowing(make_model):
    """A model whose weights are finite but overflow float32: rms_final of 3e38 (a norm, float32
    in int8 files too) scales the normalized residual stream past FLT_MAX, so the logits are
    infinite or NaN."""
    weights = formats.random_weights(tiny_config(), seed=3)
    weights["rms_final"][...] = 3e38
    return make_model(weights=weights)


NUMERIC_MESSAGE = r"the logits after the token at position \d+ are not numbers \(logit \d+ is (-?inf|nan)\): " \
                  "the model's values overflow float32"


def test_non_finite_logits_are_an_error_in_c(lib, ffi, overflowing):
    rc, _ = c_load(lib, ffi, overflowing.model, overflowing.tokenizer)
    assert rc == 0  # finite weights load
    logits = ffi.new("float[]", 2 * V)
    with loaded_model(lib, ffi, overflowing.model) as model:
        rc, state = create_state(lib, ffi, model)
        assert rc == 0, last_error(lib, ffi)
        try:
            rc = lib.ac_logits(state, ffi.new("int[]", [1, 40]), 2, logits)
            assert rc == lib.AC_ERR_NUMERIC
            message = last_error(lib, ffi)
            assert re.fullmatch(NUMERIC_MESSAGE, message) and "position 0 " in message
        finally:
            lib.ac_state_free(state)


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_non_finite_logits_stop_generation_everywhere(lib, ffi, run_binary, overflowing, tmp_path, int8):
    path = int8_copy(lib, ffi, overflowing.model, tmp_path / "int8.bin") if int8 else overflowing.model
    with Model(path, overflowing.tokenizer) as m:
        for call in (lambda: m.generate("the", max_new_tokens=4, seed=1),
                     lambda: m.generate("the", max_new_tokens=4, temperature=0),
                     lambda: m.logits([1, 40]),
                     lambda: m.generate_batch(["a", "the"], max_new_tokens=4, seed=1)):
            with pytest.raises(AriannaError, match=NUMERIC_MESSAGE) as info:
                call()
            assert info.value.name == "AC_ERR_NUMERIC"
    r = cli(run_binary, path, "-z", overflowing.tokenizer, "-n", "4", "-s", "1", "-i", "the")
    assert r.returncode == 1 and re.search(NUMERIC_MESSAGE, r.stderr.decode())
