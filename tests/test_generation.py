"""The library owns generation: one settings struct with its defaults, the stop rule and why a
generation stopped, the tokenizer lookup, the version; and the three front ends (./run,
Model.generate, the NumPy reference) give one text for one prompt and seed, by default and
with any sampler settings (penalties, min-p)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import arianna_c
from arianna_c import AriannaError, ErrorCode, Model
import helpers_parity as hp
from capi import create_session, last_error, load_model, load_tokenizer
from conftest import REPO, byte_id, write_synthetic_tokenizer

SEED_RANDOM = 2**64 - 1


class Loaded:
    """A model + tokenizer loaded through the C API, freed by close()."""

    def __init__(self, lib, ffi, files):
        self.lib, self.ffi = lib, ffi
        rc, self.model = load_model(lib, ffi, files.model)
        assert rc == 0, last_error(lib, ffi)
        rc, self.tok = load_tokenizer(lib, ffi, files.tokenizer, files.cfg.vocab_size)
        assert rc == 0, last_error(lib, ffi)

    def params(self, **fields):
        p = self.ffi.new("ac_session_params *", self.lib.ac_session_default_params())
        for key, value in fields.items():
            if key in ("temperature", "top_p", "top_k", "seed"):
                setattr(p.sampler, key, value)
            else:
                setattr(p, key, value)
        return p

    def session(self, **fields):
        rc, session = create_session(self.lib, self.ffi, self.model, self.tok, self.params(**fields))
        assert rc == 0, last_error(self.lib, self.ffi)
        return session

    def run(self, session, limit=1000):
        """(tokens reported by ac_session_next until it ends, the stop reason)."""
        token, out = self.ffi.new("int *"), []
        for _ in range(limit):
            assert self.lib.ac_session_next(session, token, self.ffi.NULL, self.ffi.NULL) == 0
            if token[0] < 0:
                break
            out.append(token[0])
        return out, self.lib.ac_session_stop_reason(session)

    def close(self):
        self.lib.ac_tokenizer_free(self.tok)
        self.lib.ac_model_free(self.model)


ALPHABET = [byte_id(c) for c in b"abcdefghijklmnopqrstuvwxyz"]


# ---------------------------------------------------------------------------- settings


SAMPLER_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
                  "frequency_penalty")
# The defaults, chosen with scripts/sample_quality.py on the persona (README, Command line).
DEFAULTS = dict(temperature=0.8, top_p=0.9, top_k=0, min_p=0.0, repeat_penalty=1.1, repeat_last_n=64,
                presence_penalty=0.0, frequency_penalty=0.0)


def test_session_defaults(lib, ffi):
    p = lib.ac_session_default_params()
    s = lib.ac_sampler_default_params()
    assert all(getattr(p.sampler, k) == getattr(s, k) for k in SAMPLER_FIELDS)
    assert {k: getattr(s, k) for k in SAMPLER_FIELDS} == {k: np.float32(v) if isinstance(v, float) else v
                                                           for k, v in DEFAULTS.items()}
    assert s.seed == 0 and p.sampler.seed == SEED_RANDOM == lib.AC_SEED_RANDOM
    assert (p.max_new_tokens, p.n_threads, p.ignore_eos) == (256, 0, 0)
    d = arianna_c.default_sampling()
    assert {k: getattr(d, k) for k in SAMPLER_FIELDS} == DEFAULTS  # shortest decimals of the C floats
    assert (d.max_new_tokens, d.seed, d.ignore_eos, d.stop, d.logit_bias) == (256, None, False, (), None)


@pytest.mark.parametrize("field, value, needle", [
    ("temperature", -1.0, "temperature -1 is invalid"),
    ("top_p", 0.0, "top_p 0 is invalid"),
    ("top_k", -2, "top_k -2 is invalid"),
    ("max_new_tokens", -1, "max_new_tokens -1 is invalid: it must be >= 0"),
    ("n_threads", 257, "n_threads 257 is invalid: it must be in 1..256"),
    ("n_threads", -1, "n_threads -1 is invalid"),
])
def test_bad_settings_are_refused_by_every_entry(lib, ffi, make_model, field, value, needle):
    c = Loaded(lib, ffi, make_model())
    try:
        p = c.params(**{field: value})
        assert lib.ac_session_check_params(p) == lib.AC_ERR_ARG and needle in last_error(lib, ffi)
        s, b = ffi.new("ac_session **"), ffi.new("ac_batch **")
        assert lib.ac_session_create(c.model, c.tok, p, s) == lib.AC_ERR_ARG and s[0] == ffi.NULL
        assert lib.ac_batch_create(c.model, c.tok, 2, p, b) == lib.AC_ERR_ARG and b[0] == ffi.NULL
        good = c.session()
        assert lib.ac_session_set_params(good, p) == lib.AC_ERR_ARG and needle in last_error(lib, ffi)
        lib.ac_session_free(good)
    finally:
        c.close()
    files = make_model()  # Python passes its settings to the same checks
    with pytest.raises(AriannaError, match=re.escape(needle)) as info:
        if field == "n_threads":
            Model(files.model, threads=value)
        else:
            with Model(files.model) as m:
                m.generate("x", **{field: value})
    assert info.value.code is ErrorCode.ARG


# ---------------------------------------------------------------------------- stop reasons


def test_why_a_generation_stopped(lib, ffi, scripted_model):
    files = scripted_model([1] + ALPHABET[:5] + [2], seq_len=12)  # BOS a b c d e EOS
    c = Loaded(lib, ffi, files)
    try:
        s = c.session(temperature=0.0)
        assert c.run(s) == ([], lib.AC_STOP_NONE)  # nothing fed yet
        bos = ffi.new("int[]", [1])
        assert lib.ac_session_feed_tokens(s, bos, 1) == 0
        assert c.run(s) == (ALPHABET[:5], lib.AC_STOP_END)
        assert c.run(s) == ([], lib.AC_STOP_END)  # it stays ended until the next feed

        lib.ac_session_reset(s)
        assert lib.ac_session_set_params(s, c.params(temperature=0.0, max_new_tokens=3)) == 0
        assert lib.ac_session_feed_tokens(s, bos, 1) == 0
        assert c.run(s) == (ALPHABET[:3], lib.AC_STOP_LENGTH)
        assert lib.ac_session_set_params(s, c.params(temperature=0.0, max_new_tokens=1)) == 0
        assert c.run(s) == (ALPHABET[3:4], lib.AC_STOP_LENGTH)  # new settings: the count starts again

        assert lib.ac_session_set_params(s, c.params(temperature=0.0, ignore_eos=1)) == 0
        lib.ac_session_reset(s)
        assert lib.ac_session_feed_tokens(s, bos, 1) == 0
        tokens, why = c.run(s)
        assert why == lib.AC_STOP_CONTEXT and len(tokens) == 11 and tokens[5] == 2  # EOS is a token
        assert lib.ac_session_position(s) == 11  # the last token fills position 11: never run

        stop_after = []

        @ffi.callback("int(void *, int, const char *, size_t)")
        def on_piece(user, token, piece, size):
            stop_after.append(token)
            return len(stop_after) == 2

        n = ffi.new("int *")
        assert lib.ac_generate(s, b"", 0, on_piece, ffi.NULL, n) == 0
        assert (n[0], stop_after, lib.ac_session_stop_reason(s)) == (2, ALPHABET[:2], lib.AC_STOP_CALLER)
        lib.ac_session_free(s)
    finally:
        c.close()


def test_session_stop_strings_through_ac_generate(lib, ffi, scripted_model):
    """ac_session_set_stops: the text ends before a stop string (AC_STOP_STRING, its tokens
    reported); bytes held back for one that never comes reach the callback as token -1."""
    files = scripted_model([1] + ALPHABET[:5] + [2], seq_len=12)  # BOS a b c d e EOS
    c = Loaded(lib, ffi, files)
    try:
        s = c.session(temperature=0.0)
        calls = []

        @ffi.callback("int(void *, int, const char *, size_t)")
        def on_piece(user, token, piece, size):
            calls.append((token, ffi.unpack(piece, size)))
            return 0

        def generate(*stops):
            data = [ffi.new("char[]", x) for x in stops]
            assert lib.ac_session_set_stops(s, ffi.new("const char *[]", data), ffi.new("size_t[]", [len(x) for x in stops]),
                                            len(stops)) == 0
            calls.clear()
            n = ffi.new("int *")
            assert lib.ac_generate(s, b"", 0, on_piece, ffi.NULL, n) == 0
            return [b for _, b in calls], [t for t, _ in calls], n[0], lib.ac_session_stop_reason(s)

        # "b" and "bc" are held for "bcx"; "d" completes "cd", so "b" comes out after all
        assert generate(b"cd", b"bcx") == ([b"a", b"", b"", b"b"], ALPHABET[:4], 4, lib.AC_STOP_STRING)
        assert generate(b"ex") == ([b"a", b"b", b"c", b"d", b"", b"e"], ALPHABET[:5] + [-1], 5, lib.AC_STOP_END)
        assert generate() == ([b"a", b"b", b"c", b"d", b"e"], ALPHABET[:5], 5, lib.AC_STOP_END)
        lib.ac_session_free(s)
    finally:
        c.close()


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 100])
def test_next_text_gathers_what_next_gives_and_says_when_it_ended(lib, ffi, scripted_model, chunk):
    """ac_session_next_text(chunk): the bytes of `chunk` ac_session_next steps (and the held-back
    bytes at the end), fewer than chunk tokens once the generation has ended."""
    files = scripted_model([1] + ALPHABET[:5] + [2], seq_len=12)  # BOS a b c d e EOS
    c = Loaded(lib, ffi, files)
    try:
        s = c.session(temperature=0.0)
        text, size, n = ffi.new("const char **"), ffi.new("size_t *"), ffi.new("int *")
        assert lib.ac_session_next_text(s, chunk, text, size, n) == 0 and (size[0], n[0]) == (0, 0)  # nothing fed
        stops = [ffi.new("char[]", b"ex")]  # "e" is held back for it, then comes out at the end
        assert lib.ac_session_set_stops(s, ffi.new("const char *[]", stops), ffi.new("size_t[]", [2]), 1) == 0
        assert lib.ac_session_feed(s, b"", 0, 1) == 0
        calls = []
        while True:
            assert lib.ac_session_next_text(s, chunk, text, size, n) == 0
            calls.append((ffi.unpack(text[0], size[0]), n[0]))
            if n[0] < chunk:
                break
        assert b"".join(t for t, _ in calls) == b"abcde" and sum(k for _, k in calls) == 5
        assert all(k == chunk for _, k in calls[:-1]) and lib.ac_session_stop_reason(s) == lib.AC_STOP_END
        assert lib.ac_session_next_text(s, 0, text, size, n) == lib.AC_ERR_ARG
        assert "max_tokens 0 is invalid" in last_error(lib, ffi)
        assert lib.ac_session_next_text(s, 1, ffi.NULL, size, n) == lib.AC_ERR_ARG
        lib.ac_session_free(s)
    finally:
        c.close()


CHUNK = arianna_c.runtime.TEXT_CHUNK_TOKENS


@pytest.mark.parametrize("max_new", [1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 200])
def test_generate_equals_stream_across_chunk_boundaries(make_model, max_new):
    """Model.generate gathers its text in chunks of tokens in C; stream() goes token by token:
    one text, whether the generation ends inside a chunk or right at its end."""
    files = make_model(seed=4, seq_len=256)
    with Model(files.model, files.tokenizer) as m:
        for settings in (dict(temperature=0.0, ignore_eos=True), dict(temperature=1.0, seed=9, stop=["e t"])):
            want = "".join(m.stream("the", max_new, **settings))
            assert m.generate("the", max_new, **settings) == want


def test_prompt_too_long_is_refused_by_the_feed(lib, ffi, make_model):
    files = make_model(seq_len=8)
    c = Loaded(lib, ffi, files)
    try:
        s = c.session()
        text = b"the cat sat on the mat again"
        assert lib.ac_session_feed(s, text, len(text), 1) == lib.AC_ERR_RANGE
        assert re.fullmatch(r"the prompt is \d+ tokens \(BOS included\) but the model's seq_len is 8",
                            last_error(lib, ffi))
        assert lib.ac_session_position(s) == 0
        n = ffi.new("int *")
        assert lib.ac_generate(s, text, len(text), ffi.NULL, ffi.NULL, n) == lib.AC_ERR_RANGE and n[0] == 0
        lib.ac_session_free(s)
    finally:
        c.close()


@pytest.mark.parametrize("max_new", [0, 3, 100])
def test_batch_sequences_stop_like_sessions(lib, ffi, make_model, max_new):
    files = make_model(seed=4, seq_len=40)
    c = Loaded(lib, ffi, files)
    try:
        prompts = [b"", b"the cat", b"a", b"it is the " * 3]
        p = c.params(temperature=0.9, seed=77, max_new_tokens=max_new)
        b = ffi.new("ac_batch **")
        assert lib.ac_batch_create(c.model, c.tok, len(prompts), p, b) == 0
        stride = lib.ac_batch_max_tokens(b[0])
        assert stride == min(max_new, 39)
        tokens, results = ffi.new("int[]", max(1, len(prompts) * stride)), ffi.new("ac_batch_result[]", len(prompts))
        keep = [ffi.new("char[]", t) for t in prompts]
        assert lib.ac_batch_generate(b[0], ffi.new("const char *[]", keep), ffi.new("size_t[]", list(map(len, prompts))),
                                     tokens, results) == 0
        lib.ac_batch_free(b[0])
        with Model(files.model) as m:
            for i, text in enumerate(prompts):
                s = c.session(temperature=0.9, seed=77 + i, max_new_tokens=max_new)
                assert lib.ac_session_feed(s, text, len(text), 1) == 0
                want, why = c.run(s)
                lib.ac_session_free(s)
                r = results[i]
                assert list(tokens[i * stride : i * stride + r.n_generated]) == want
                assert r.stop == why != lib.AC_STOP_NONE
                assert r.last_prompt_token == m.encode(text)[-1]
    finally:
        c.close()


def test_random_seeds_differ(lib, ffi, make_model):
    c = Loaded(lib, ffi, make_model(seed=5))
    try:
        texts = set()
        for _ in range(3):
            s = c.session(max_new_tokens=30)  # the default seed: AC_SEED_RANDOM
            assert lib.ac_session_feed(s, b"the", 3, 1) == 0
            texts.add(tuple(c.run(s)[0]))
            lib.ac_session_free(s)
        assert len(texts) > 1
    finally:
        c.close()


# ---------------------------------------------------------------------------- Python asks C


def test_streams_reuse_sessions_and_python_encodes_nothing(make_model, built):
    files = make_model(seed=6)
    with Model(files.model, threads=1) as m:
        want = [m.generate("the cat", max_new_tokens=12, seed=s) for s in range(4)]
        names = ("ac_session_create", "ac_session_set_params", "ac_state_create", "ac_encode", "ac_sampler_create")
        counter = hp.CallCounter(m._lib, names)
        m._lib = counter
        got = [m.generate("the cat", max_new_tokens=12, seed=s) for s in range(4)]
        got += m.generate_batch(["the cat"] * 2, max_new_tokens=12, seed=0)
        assert got == want + want[:2]
        assert counter.calls == {"ac_session_create": 0, "ac_session_set_params": 4, "ac_state_create": 0,
                                 "ac_encode": 0, "ac_sampler_create": 0}


def test_python_stops_where_c_stops(scripted_model, built):
    a, b, c, d = ALPHABET[:4]
    files = scripted_model([1, a, b, 2, c, d], seq_len=12)  # BOS a b EOS c d
    with Model(files.model) as m:
        assert m.generate("", temperature=0) == "ab"
        assert m.generate("", temperature=0, ignore_eos=True, max_new_tokens=5) == "abcd"  # EOS: no text
        assert m.generate("", temperature=0, max_new_tokens=1) == "a"
        assert m.generate_batch(["", ""], temperature=0, ignore_eos=True, max_new_tokens=5) == ["abcd"] * 2
        assert "".join(m.stream("", temperature=0)) == "ab"


# ---------------------------------------------------------------------------- one lookup, one version


def test_one_tokenizer_lookup_order(lib, ffi, make_model, run_binary, tmp_path):
    files = make_model(seed=2)  # tokenizer.bin next to the model
    folder = files.model.parent
    write_synthetic_tokenizer(folder / "tok4096.bin", 400)  # wrong vocabulary: refused if chosen
    buf = ffi.new("char[]", 4096)
    assert lib.ac_tokenizer_path(os.fsencode(files.model), ffi.NULL, buf, 4096) == 0
    assert ffi.string(buf).decode() == str(folder / "tokenizer.bin")
    reference = [sys.executable, "-m", "arianna_c.reference", str(files.model), "-n", "3", "-t", "0"]
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def front_ends():
        cli = subprocess.run([str(run_binary), str(files.model), "-n", "3", "-t", "0"], capture_output=True,
                             text=True, errors="replace", timeout=60, stdin=subprocess.DEVNULL)
        ref = subprocess.run(reference, capture_output=True, text=True, errors="replace", timeout=120, env=env)
        try:
            Model(files.model).close()
            python = ""
        except AriannaError as e:
            python = str(e)
        return cli, ref, python

    cli, ref, python = front_ends()
    assert cli.returncode == 0 and ref.returncode == 0 and python == "", (cli.stderr, ref.stderr, python)
    (folder / "tokenizer.bin").unlink()  # now tok4096.bin is the one found, everywhere
    cli, ref, python = front_ends()
    assert cli.returncode == 1 and "400 pieces" in cli.stderr
    assert ref.returncode == 1 and "400 pieces" in ref.stderr
    assert "400 pieces" in python
    (folder / "tok4096.bin").unlink()
    assert lib.ac_tokenizer_path(os.fsencode(files.model), ffi.NULL, buf, 4096) == lib.AC_ERR_IO
    assert last_error(lib, ffi) == f"no tokenizer file found; tried: {folder}/tokenizer.bin, {folder}/tok4096.bin"
    with pytest.raises(FileNotFoundError, match="tokenizer.bin, .*tok4096.bin"):
        Model(files.model)
    assert lib.ac_tokenizer_path(os.fsencode(files.model), b"x", buf, 4) == lib.AC_ERR_IO  # nothing named x
    (folder / "xyz.bin").write_bytes(b"")
    assert lib.ac_tokenizer_path(os.fsencode(files.model), b"xyz", buf, 8) == lib.AC_ERR_RANGE  # buffer too small


def test_help_texts_state_the_library_s_lookup_in_its_order(lib, ffi, run_binary, tmp_path):
    """The default lookup's words come from the library: the names it tries, in that order, and
    what ./run, the Python CLI, the reference and the converter say in --help."""
    words = ffi.string(lib.ac_tokenizer_lookup()).decode()
    model = tmp_path / "m.bin"
    assert lib.ac_tokenizer_path(os.fsencode(model), ffi.NULL, ffi.new("char[]", 64), 64) == lib.AC_ERR_IO
    tried = last_error(lib, ffi).split("tried: ")[1].split(", ")
    assert re.findall(r"[\w.]+\.bin", words) == [Path(p).name for p in tried] == ["tokenizer.bin", "tok4096.bin"]
    cli = subprocess.run([str(run_binary), "--help"], capture_output=True, text=True, timeout=60)
    assert f"default: {words}" in cli.stdout
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="300")
    for command in (["arianna_c.cli", "generate"], ["arianna_c.reference"], ["arianna_c.convert", "to-gguf"]):
        r = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == 0 and words in " ".join(r.stdout.split()), (command, r.stdout)


def test_one_version(lib, ffi):
    header = (REPO / "src" / "run.h").read_text()
    major, minor, patch = (int(re.search(rf"#define AC_VERSION_{k} (\d+)", header).group(1))
                           for k in ("MAJOR", "MINOR", "PATCH"))
    abi = int(re.search(r"#define AC_ABI_VERSION (\d+)", header).group(1))
    version = f"{major}.{minor}.{patch}"
    assert arianna_c.__version__ == arianna_c.library_version() == version
    assert lib.ac_version_number() == major * 10000 + minor * 100 + patch
    assert lib.ac_abi_version() == abi == ffi.integer_const("AC_ABI_VERSION")
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    provider = project["tool"]["scikit-build"]["metadata"]["version"]
    assert provider["provider"] == "scikit_build_core.metadata.regex"
    source = (REPO / provider["input"]).read_text()
    assert re.search(provider.get("regex", r'(?i)^(__version__|VERSION)(?: ?\: ?str)? *= *([\'"])v?(?P<value>.+?)\2'),
                     source, re.M).group("value") == version


def test_a_stale_library_is_named(tmp_path):
    stub = tmp_path / "libarianna.so"
    src = tmp_path / "old.c"
    src.write_text('const char *ac_version(void) { return "0.1.0"; }\n')
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(stub), str(src)], check=True, timeout=60)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import arianna_c
        try:
            arianna_c.Model()
        except ImportError as e:
            print(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, ARIANNA_C_LIB=str(stub)))
    assert r.returncode == 0, r.stderr
    assert f"{stub} is a stale libarianna.so: it is version 0.1.0 (ABI None)" in r.stdout
    assert f"this arianna_c is {arianna_c.__version__}" in r.stdout


# ---------------------------------------------------------------------------- one text


@pytest.mark.parametrize("prompt, seed", [("the", 3), ("", 11), ("a cat is", 2024)])
def test_cli_python_and_reference_agree_by_default(make_model, run_binary, prompt, seed):
    """Only a prompt and a seed: ./run, Model.generate and the NumPy reference take every
    other setting (temperature, top_p, top_k, the penalties, max_new_tokens, the tokenizer)
    from the library and print the same text."""
    files = make_model(seed=21)
    cli = subprocess.run([str(run_binary), str(files.model), "-s", str(seed), "-i", prompt], capture_output=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert cli.returncode == 0, cli.stderr
    ref = subprocess.run([sys.executable, "-m", "arianna_c.reference", str(files.model), "-s", str(seed), "-i", prompt],
                         capture_output=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert ref.returncode == 0, ref.stderr
    with Model(files.model) as m:
        python = m.generate(prompt, seed=seed)
    text = cli.stdout.decode("utf-8", "replace")
    assert len(python) > 10
    assert text == prompt + python + "\n"
    assert ref.stdout.decode("utf-8", "replace") == text


# ---------------------------------------------------------------------------- penalties: one text too


def c_draws(lib, ffi, logits, history, n, settings, bias=None):
    """n draws of one C sampler, each token recorded after history (as a generation records
    its context), cycling through the rows of logits."""
    p = ffi.new("ac_sampler_params *", lib.ac_sampler_default_params())
    for key, value in settings.items():
        setattr(p, key, value)
    out = ffi.new("ac_sampler **")
    assert lib.ac_sampler_create(p, logits.shape[1], out) == 0, last_error(lib, ffi)
    s = out[0]
    try:
        if bias:
            assert lib.ac_sampler_set_logit_bias(s, ffi.new("int[]", list(bias)), ffi.new("float[]", list(bias.values())),
                                                 len(bias)) == 0
        for t in history:
            assert lib.ac_sampler_accept(s, t) == 0
        token, draws = ffi.new("int *"), []
        for i in range(n):
            assert lib.ac_sample(s, ffi.from_buffer("float[]", logits[i % len(logits)]), token) == 0
            draws.append(token[0])
            assert lib.ac_sampler_accept(s, token[0]) == 0
        return draws
    finally:
        lib.ac_sampler_free(s)


def reference_draws(logits, history, n, settings, bias=None):
    from arianna_c.reference import Sampler

    s = Sampler(**settings, logit_bias=bias)
    for t in history:
        s.accept(t)
    draws = []
    for i in range(n):
        draws.append(s.sample(logits[i % len(logits)]))
        s.accept(draws[-1])
    return draws


SAMPLER_CASES = [
    dict(temperature=0.0, repeat_penalty=1.1, repeat_last_n=64),
    dict(temperature=0.8, top_p=0.9, repeat_penalty=1.1, repeat_last_n=64),
    dict(temperature=1.0, top_p=0.95, top_k=40, repeat_penalty=1.3, repeat_last_n=16, min_p=0.05,
         presence_penalty=0.5, frequency_penalty=0.25),
    dict(temperature=0.7, top_p=1.0, repeat_penalty=0.0, repeat_last_n=8, min_p=0.1, presence_penalty=-0.3,
         frequency_penalty=0.7),
    dict(temperature=1.2, top_p=1.0, repeat_last_n=0),
]


@pytest.mark.parametrize("settings", SAMPLER_CASES)
@pytest.mark.parametrize("bias", [None, {3: -float("inf"), 7: 2.5, 9: 0.0}])
@pytest.mark.parametrize("seed", [1, 777])
def test_reference_sampler_draws_what_c_draws(lib, ffi, settings, bias, seed):
    """The same logits, recorded tokens and settings: the NumPy sampler's 300 draws are C's."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((7, 512)) * 3).astype(np.float32)
    logits[:, :60] = np.abs(logits[:, :60])  # the recorded tokens have positive logits too
    history = [int(t) for t in rng.integers(0, 60, 40)]
    settings = dict(settings, top_p=settings.get("top_p", 1.0), seed=seed)
    want = c_draws(lib, ffi, logits, history, 300, settings, bias)
    assert reference_draws(logits, history, 300, settings, bias) == want
    assert len(set(want)) > 5 or settings["temperature"] == 0
    if bias:
        assert 3 not in want


# (./run flags, the same settings as keywords)
PENALTY_SETTINGS = [
    (["-t", "0", "--repeat-penalty", "1.3"], dict(temperature=0.0, repeat_penalty=1.3)),
    (["-t", "0", "--repeat-penalty", "1.0", "--presence-penalty", "0.8", "--repeat-last-n", "8"],
     dict(temperature=0.0, repeat_penalty=1.0, presence_penalty=0.8, repeat_last_n=8)),
    (["-t", "0.9", "-p", "0.95", "--repeat-penalty", "1.15", "--frequency-penalty", "0.3"],
     dict(temperature=0.9, top_p=0.95, repeat_penalty=1.15, frequency_penalty=0.3)),
    (["-t", "1.1", "-p", "1", "-k", "50", "--min-p", "0.05", "--repeat-penalty", "1.5", "--repeat-last-n", "16"],
     dict(temperature=1.1, top_p=1.0, top_k=50, min_p=0.05, repeat_penalty=1.5, repeat_last_n=16)),
    (["-t", "1", "-p", "0.9", "--repeat-penalty", "1"], dict(temperature=1.0, top_p=0.9, repeat_penalty=1.0)),
]


@pytest.mark.parametrize("flags, settings", PENALTY_SETTINGS, ids=["greedy", "greedy-presence", "sampled",
                                                                    "top-k-min-p", "no-penalty"])
@pytest.mark.parametrize("prompt, seed", [("the cat", 5), ("", 99)])
def test_cli_python_and_reference_agree_with_penalties(make_model, run_binary, flags, settings, prompt, seed):
    """Penalties on (or explicitly off): ./run, Model.generate and the NumPy reference give one
    text; and the penalties change it (so the agreement is not that of ignored settings)."""
    files = make_model(seed=21)
    argv = ["-s", str(seed), "-i", prompt, "-n", "48", "-e", "1"] + flags
    cli = subprocess.run([str(run_binary), str(files.model)] + argv, capture_output=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert cli.returncode == 0, cli.stderr
    ref = subprocess.run([sys.executable, "-m", "arianna_c.reference", str(files.model)] + argv,
                         capture_output=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert ref.returncode == 0, ref.stderr
    with Model(files.model) as m:
        python = m.generate(prompt, max_new_tokens=48, ignore_eos=True, seed=seed, **settings)
        neutral = dict(repeat_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
        unpenalized = m.generate(prompt, max_new_tokens=48, ignore_eos=True, seed=seed, **{**settings, **neutral})
    text = cli.stdout.decode("utf-8", "replace")
    assert len(python) > 10
    assert text == prompt + python + "\n"
    assert ref.stdout.decode("utf-8", "replace") == text
    penalized = any(settings.get(k, off) != off for k, off in neutral.items())
    assert (python != unpenalized) == penalized


PERSONA = REPO / "persona" / "arianna_v1_base.bin"


@pytest.mark.parametrize("prompt, flags", [("Resonance is", ["-s", "42"]), ("Once upon a time", ["-t", "0"])],
                         ids=["sampled", "greedy"])
def test_persona_front_ends_agree_with_the_default_penalty(run_binary, prompt, flags):
    """The shipped persona with the library's defaults (the repeat penalty on), sampled and
    greedy: ./run, Model.generate and the NumPy reference print one text."""
    argv = [str(PERSONA), "-z", "tok4096", "-i", prompt, "-n", "40", "-e", "1"] + flags
    cli = subprocess.run([str(run_binary)] + argv, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert cli.returncode == 0, cli.stderr
    ref = subprocess.run([sys.executable, "-m", "arianna_c.reference"] + argv, capture_output=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert ref.returncode == 0, ref.stderr
    settings = dict(temperature=0.0) if flags[0] == "-t" else dict(seed=int(flags[1]))
    with Model(PERSONA) as m:
        python = m.generate(prompt, max_new_tokens=40, ignore_eos=True, **settings)
        greedy_plain = m.generate(prompt, max_new_tokens=40, ignore_eos=True, temperature=0.0, repeat_penalty=1.0)
    text = cli.stdout.decode("utf-8", "replace")
    assert text == prompt + python + "\n"
    assert ref.stdout.decode("utf-8", "replace") == text
    if "temperature" in settings:  # the default penalty takes greedy decoding off its loop
        assert python != greedy_plain


def test_new_settings_keep_the_penalties_view_of_the_context(lib, ffi, make_model):
    """ac_session_set_params after a feed samples as a session created with those settings: the
    penalties still see the fed tokens (here a presence penalty strong enough to decide)."""
    c = Loaded(lib, ffi, make_model(seed=3, seq_len=64))
    text = b"abcabc hello"
    try:
        def settings(p):
            p.sampler.temperature, p.sampler.presence_penalty, p.sampler.repeat_last_n = 0.0, -1000.0, 64
            return p

        given_at_create = c.session()
        assert lib.ac_session_set_params(given_at_create, settings(c.params(max_new_tokens=8))) == 0
        assert lib.ac_session_feed(given_at_create, text, len(text), 1) == 0
        set_after_feed = c.session(temperature=0.0, max_new_tokens=8)
        assert lib.ac_session_feed(set_after_feed, text, len(text), 1) == 0
        assert lib.ac_session_set_params(set_after_feed, settings(c.params(max_new_tokens=8))) == 0
        want, got = c.run(given_at_create), c.run(set_after_feed)
        assert want == got and len(want[0]) == 8
        plain = c.session(temperature=0.0, max_new_tokens=8)
        assert lib.ac_session_feed(plain, text, len(text), 1) == 0
        assert c.run(plain)[0] != want[0]  # the penalty decides these tokens
        for s in (given_at_create, set_after_feed, plain):
            lib.ac_session_free(s)
    finally:
        c.close()
