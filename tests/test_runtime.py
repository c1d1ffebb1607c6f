"""The C runtime through its C API (via cffi): loading and validation, the forward pass
against a small NumPy forward written here, the sampler, sessions and generate."""

from __future__ import annotations

import struct
import threading

import numpy as np
import pytest

from capi import (code_name, create_sampler, create_session, create_state, last_error, load_model, load_model_bytes,
                  load_tokenizer, load_tokenizer_bytes, loaded_model, model_config)
from conftest import LAYOUTS, write_synthetic_tokenizer
from arianna_c import formats

# ---------------------------------------------------------------------------- a NumPy forward


def numpy_forward(cfg, w, tokens):
    """Plain float64 NumPy forward of the whole sequence (causal attention), for checking."""
    D, hs = cfg.dim, cfg.dim // cfg.n_heads
    kv_mul = cfg.n_heads // cfg.n_kv_heads
    w = {k: v.astype(np.float64) for k, v in w.items()}
    T = len(tokens)

    def rmsnorm(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * g

    freq = 1.0 / np.power(np.float32(10000.0), np.arange(0, hs, 2, dtype=np.float32) / np.float32(hs))
    ang = np.arange(T)[:, None] * freq.astype(np.float64)[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v):  # v: (T, heads, hs), interleaved pairs
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = a * cos[:, None, :] - b * sin[:, None, :]
        out[..., 1::2] = a * sin[:, None, :] + b * cos[:, None, :]
        return out

    x = w["token_embedding"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(cfg.n_layers):
        xb = rmsnorm(x, w["rms_att"][l])
        q = rope((xb @ w["wq"][l].T).reshape(T, cfg.n_heads, hs))
        k = rope((xb @ w["wk"][l].T).reshape(T, cfg.n_kv_heads, hs))
        v = (xb @ w["wv"][l].T).reshape(T, cfg.n_kv_heads, hs)
        k, v = np.repeat(k, kv_mul, axis=1), np.repeat(v, kv_mul, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hs) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        att = np.einsum("hts,shd->thd", scores, v).reshape(T, D)
        x = x + att @ w["wo"][l].T
        xb = rmsnorm(x, w["rms_ffn"][l])
        h1, h3 = xb @ w["w1"][l].T, xb @ w["w3"][l].T
        x = x + (h1 / (1 + np.exp(-h1)) * h3) @ w["w2"][l].T
    x = rmsnorm(x, w["rms_final"])
    wcls = w["token_embedding"] if cfg.shared_classifier else w["wcls"]
    return x @ wcls.T


# ---------------------------------------------------------------------------- loading


def test_load_config_every_layout(lib, ffi, layout_model):
    with loaded_model(lib, ffi, layout_model.model) as model:
        c = model_config(lib, ffi, model)
        cfg = layout_model.cfg
        got = (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len,
               bool(c.shared_classifier), c.version)
        assert got == (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                       cfg.vocab_size, cfg.seq_len, cfg.shared_classifier, cfg.version)


def test_load_from_memory_matches_file(lib, ffi, layout_model):
    from arianna_c import Model

    data = layout_model.model.read_bytes()
    tokens = [1, 40, 41, 300, 7]
    with Model(layout_model.model) as a, Model(data, layout_model.tokenizer.read_bytes()) as b:
        assert a.config == b.config
        np.testing.assert_array_equal(a.logits(tokens), b.logits(tokens))


def test_free_null_is_harmless(lib, ffi):
    lib.ac_model_free(ffi.NULL)
    lib.ac_tokenizer_free(ffi.NULL)
    lib.ac_state_free(ffi.NULL)
    lib.ac_sampler_free(ffi.NULL)
    lib.ac_session_free(ffi.NULL)


def test_truncated_file_names_sizes(lib, ffi, make_model, tmp_path):
    files = make_model(**LAYOUTS["v1-tied-gqa"])
    data = files.model.read_bytes()
    bad = tmp_path / "short.bin"
    bad.write_bytes(data[:-4])
    rc, model = load_model(lib, ffi, bad)
    assert rc == lib.AC_ERR_FORMAT and model == ffi.NULL
    msg = last_error(lib, ffi)
    expected = formats.expected_file_size(files.cfg)
    assert f"short.bin: file is {len(data) - 4} bytes, header implies {expected}" in msg
    assert "dim=48" in msg and "vocab_size=320" in msg


def test_trailing_bytes_rejected(lib, ffi, make_model):
    files = make_model(version=0)
    rc, _, _ = load_model_bytes(lib, ffi, files.model.read_bytes() + b"\0" * 4)
    assert rc == lib.AC_ERR_FORMAT
    assert "header implies" in last_error(lib, ffi)


def test_bad_version_and_short_headers(lib, ffi, make_model):
    data = bytearray(make_model(version=1).model.read_bytes())
    data[4:8] = struct.pack("<i", 99)
    rc, _, _ = load_model_bytes(lib, ffi, bytes(data))
    assert rc == lib.AC_ERR_FORMAT and "unknown model file version 99" in last_error(lib, ffi)
    for size in (0, 3, 27):
        rc, _, _ = load_model_bytes(lib, ffi, bytes(data[:size]))
        assert rc == lib.AC_ERR_FORMAT and "shorter than a model header" in last_error(lib, ffi)
    rc, _, _ = load_model_bytes(lib, ffi, bytes(data[:100]))  # "ak42" but not a whole v1 header
    assert rc == lib.AC_ERR_FORMAT and "v1 header" in last_error(lib, ffi)


def test_bad_magic_reads_as_v0_and_fails_validation(lib, ffi):
    rc, _, _ = load_model_bytes(lib, ffi, b"GGUF" + b"\xff" * 60)
    assert rc == lib.AC_ERR_FORMAT
    assert "header field dim" in last_error(lib, ffi)


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("dim", 0, "header field dim is 0, must be positive"),
        ("n_layers", -3, "header field n_layers is -3, must be positive"),
        ("dim", 1 << 20, "above the limit 65536"),
        ("seq_len", (1 << 20) + 1, "header field seq_len"),
        ("n_heads", 5, "dim 48 is not divisible by n_heads 5"),
        ("n_kv_heads", 4, "n_heads 6 is not divisible by n_kv_heads 4"),
        ("n_heads", 8, "header implies 219328"),  # valid, but wk/wv shrink: size mismatch
        ("n_heads", 16, "head size 3 (dim / n_heads) is odd"),
    ],
)
def test_header_validation(lib, ffi, make_model, field, value, needle):
    files = make_model(version=1)
    data = bytearray(files.model.read_bytes())
    order = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"]
    off = 8 + 4 * order.index(field)
    data[off : off + 4] = struct.pack("<i", value)
    rc, _, _ = load_model_bytes(lib, ffi, bytes(data), b"hdr.bin")
    assert rc == lib.AC_ERR_FORMAT
    msg = last_error(lib, ffi)
    assert msg.startswith("hdr.bin: ")
    assert needle in msg


def test_missing_file_and_unaligned_buffer(lib, ffi, make_model, tmp_path):
    rc, _ = load_model(lib, ffi, tmp_path / "nope.bin")
    assert rc == lib.AC_ERR_IO and "nope.bin: cannot open model file" in last_error(lib, ffi)
    rc, _ = load_model(lib, ffi, tmp_path)
    assert rc == lib.AC_ERR_IO and "not a regular file" in last_error(lib, ffi)
    raw = bytearray(b"\0" + make_model().model.read_bytes())
    buf = ffi.from_buffer("char[]", raw)
    out = ffi.new("ac_model **")
    assert lib.ac_model_load_memory(buf + 1, len(raw) - 1, ffi.NULL, out) == lib.AC_ERR_ARG
    assert "4-byte aligned" in last_error(lib, ffi)


def test_tokenizer_vocab_mismatch_message(lib, ffi, make_model, tmp_path):
    files = make_model()
    big = write_synthetic_tokenizer(tmp_path / "tok.bin", 400)
    rc, tok = load_tokenizer(lib, ffi, big, files.cfg.vocab_size)  # 320
    assert rc == lib.AC_ERR_MISMATCH and tok == ffi.NULL
    assert "tok.bin: tokenizer has 400 pieces but the model's vocab_size is 320" in last_error(lib, ffi)


@pytest.mark.parametrize("damage", ["trailing", "truncated", "negative", "too_long", "nan", "empty"])
def test_tokenizer_file_validation(lib, ffi, damage):
    pieces = [b"<unk>", b"<s>", b"</s>", b"a", b"bc"]
    scores = [0.0, 0.0, 0.0, -1.0, -2.0]
    data = bytearray(formats.tokenizer_bytes(pieces, scores))
    needle = {"trailing": "runs past the end", "truncated": "runs past the end",
              "negative": "has length -1", "too_long": "has length 9", "nan": "NaN score",
              "empty": "too short for a tokenizer header"}[damage]
    last = len(data) - 2 - 8  # offset of the last piece's header
    if damage == "trailing":
        data += b"\1\2\3"
    elif damage == "truncated":
        data = data[:-1]
    elif damage == "negative":
        data[last + 4 : last + 8] = struct.pack("<i", -1)
    elif damage == "too_long":
        data[last + 4 : last + 8] = struct.pack("<i", 9)
    elif damage == "nan":
        data[last : last + 4] = struct.pack("<f", float("nan"))
    elif damage == "empty":
        data = bytearray()
    rc, tok = load_tokenizer_bytes(lib, ffi, bytes(data), 5, b"t.bin")
    assert rc == lib.AC_ERR_FORMAT and tok == ffi.NULL
    msg = last_error(lib, ffi)
    assert msg.startswith("t.bin: ") and needle in msg


def test_tokenizer_extra_piece_is_a_mismatch(lib, ffi):
    data = formats.tokenizer_bytes([b"<unk>", b"<s>", b"</s>", b"a", b"b", b"c"], [0.0] * 6)
    rc, tok = load_tokenizer_bytes(lib, ffi, data, 5, b"t.bin")
    assert rc == lib.AC_ERR_MISMATCH and tok == ffi.NULL
    assert "tokenizer has 6 pieces but the model's vocab_size is 5" in last_error(lib, ffi)


def test_strerror_names_every_code(lib, ffi):
    names = ["AC_OK", "AC_ERR_IO", "AC_ERR_FORMAT", "AC_ERR_MISMATCH", "AC_ERR_ARG", "AC_ERR_NOMEM",
             "AC_ERR_RANGE", "AC_ERR_NUMERIC"]
    for name in names:
        assert code_name(lib, ffi, getattr(lib, name)) == name
    assert [getattr(lib, name) for name in names] == list(range(len(names)))  # run.h's numbers
    assert code_name(lib, ffi, 99) == code_name(lib, ffi, -1) == "AC_ERR_UNKNOWN"


# ---------------------------------------------------------------------------- forward


def test_logits_match_numpy_forward(layout_model):
    from arianna_c import Model

    rng = np.random.default_rng(3)
    tokens = [1] + rng.integers(3, layout_model.cfg.vocab_size, layout_model.cfg.seq_len - 1).tolist()
    with Model(layout_model.model, layout_model.tokenizer) as m:
        got = m.logits(tokens)
    want = numpy_forward(layout_model.cfg, layout_model.weights, tokens)
    assert got.shape == want.shape and got.dtype == np.float32
    # float32 C vs float64 NumPy over the whole context: observed ~1e-6 of the logit scale
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_forward_steps_equal_logits_rows(lib, ffi, layout_model):
    rc, model = load_model(lib, ffi, layout_model.model)
    assert rc == 0, last_error(lib, ffi)
    rc, state = create_state(lib, ffi, model)
    assert rc == 0, last_error(lib, ffi)
    tokens = [1, 10, 200, 300, 5]
    all_rows = np.empty((len(tokens), layout_model.cfg.vocab_size), np.float32)
    assert lib.ac_logits(state, ffi.new("int[]", tokens), len(tokens), ffi.from_buffer("float[]", all_rows)) == 0
    out = ffi.new("const float **")
    for pos, tok in enumerate(tokens):
        assert lib.ac_forward(state, tok, pos, out) == 0
        row = np.frombuffer(ffi.buffer(out[0], 4 * layout_model.cfg.vocab_size), np.float32)
        np.testing.assert_array_equal(row, all_rows[pos])
    assert lib.ac_forward(state, 320, 0, out) == lib.AC_ERR_RANGE
    assert "token 320 is outside the vocabulary [0, 320)" in last_error(lib, ffi)
    assert lib.ac_forward(state, 5, 64, out) == lib.AC_ERR_RANGE
    assert "position 64 is outside the context [0, 64)" in last_error(lib, ffi)
    assert lib.ac_logits(state, ffi.new("int[]", 65), 65, ffi.new("float[]", 65 * 320)) == lib.AC_ERR_RANGE
    assert last_error(lib, ffi) == "65 tokens exceed the model's seq_len 64"
    lib.ac_state_free(state)
    lib.ac_model_free(model)


def test_separate_threads_give_identical_results(make_model):
    """One model shared by threads, each with its own state (calls release the GIL)."""
    from arianna_c import Model

    files = make_model(**LAYOUTS["v0-untied-gqa"])
    tokens = [1] + list(range(3, 60))
    with Model(files.model, files.tokenizer) as m:
        want = m.logits(tokens)
        texts = {}
        results, errors = [], []

        def work(i):
            try:
                results.append(m.logits(tokens))
                texts[i] = m.generate("the", max_new_tokens=20, temperature=0.9, seed=11)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    for r in results:
        np.testing.assert_array_equal(r, want)
    assert len(set(texts.values())) == 1


# ---------------------------------------------------------------------------- sampler


def make_sampler(lib, ffi, vocab, temperature=1.0, top_p=1.0, top_k=0, seed=1):
    return create_sampler(lib, ffi, {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}, vocab)


def draw(lib, ffi, sampler, logits, n):
    tok = ffi.new("int *")
    buf = ffi.from_buffer("float[]", logits)
    result = []
    for _ in range(n):
        assert lib.ac_sample(sampler, buf, tok) == 0
        result.append(tok[0])
    return result


@pytest.fixture
def logits():
    return np.random.default_rng(5).standard_normal(100).astype(np.float32) * 2


def test_sampler_defaults(lib):
    """The defaults run.h documents."""
    p = lib.ac_sampler_default_params()
    f32 = np.float32
    assert (f32(p.temperature), f32(p.top_p), p.top_k, p.seed) == (f32(0.8), f32(0.9), 0, 0)
    assert (f32(p.min_p), f32(p.repeat_penalty), p.repeat_last_n) == (0, f32(1.1), 64)
    assert (p.presence_penalty, p.frequency_penalty) == (0, 0)


def test_sampler_is_deterministic(lib, ffi, logits):
    runs = []
    for seed in (42, 42, 43):
        rc, s = make_sampler(lib, ffi, 100, temperature=1.0, top_p=0.95, seed=seed)
        assert rc == 0
        runs.append(draw(lib, ffi, s, logits, 50))
        lib.ac_sampler_free(s)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_greedy_topk1_and_tiny_topp_agree(lib, ffi, logits):
    best = int(np.argmax(logits))
    for kwargs in ({"temperature": 0.0}, {"top_k": 1}, {"top_p": 1e-6}, {"top_k": 3, "top_p": 1e-6}):
        rc, s = make_sampler(lib, ffi, 100, seed=9, **kwargs)
        assert rc == 0
        assert set(draw(lib, ffi, s, logits, 20)) == {best}, kwargs
        lib.ac_sampler_free(s)


def test_top_k_keeps_only_the_k_largest(lib, ffi, logits):
    rc, s = make_sampler(lib, ffi, 100, temperature=5.0, top_k=3, seed=4)
    assert rc == 0, last_error(lib, ffi)
    got = set(draw(lib, ffi, s, logits, 300))
    assert got == set(np.argsort(-logits)[:3].tolist())
    lib.ac_sampler_free(s)


def test_top_p_keeps_the_nucleus(lib, ffi):
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    rc, s = make_sampler(lib, ffi, 4, top_p=0.7, seed=8)  # 0.5 + 0.3 > 0.7: {0, 1}
    assert rc == 0, last_error(lib, ffi)
    got = draw(lib, ffi, s, logits, 400)
    assert set(got) == {0, 1}
    assert 0.5 < got.count(0) / len(got) < 0.75  # 0.5/0.8 = 0.625
    lib.ac_sampler_free(s)


def test_top_p_counts_the_mass_of_the_tokens_it_skips(lib, ffi):
    # top-p alone skips tokens below (1 - p) / (V - 1) = 0.167 (here 0.149 and 0.001), but the
    # nucleus is a share of the whole distribution: 0.45 < 0.5 < 0.45 + 0.40, so {0, 1}
    logits = np.log(np.array([0.45, 0.40, 0.149, 0.001], np.float32))
    for top_k in (0, 3):
        rc, s = make_sampler(lib, ffi, 4, top_p=0.5, top_k=top_k, seed=8)
        assert rc == 0, last_error(lib, ffi)
        got = draw(lib, ffi, s, logits, 400)
        assert set(got) == {0, 1}, top_k
        lib.ac_sampler_free(s)


def test_logprobs_refuse_logits_that_are_all_minus_infinity(lib, ffi):
    logits = ffi.new("float[]", [float("-inf")] * 3)
    lp, ids, lps = ffi.new("float *"), ffi.new("int[]", 3), ffi.new("float[]", 3)
    assert lib.ac_logprobs(logits, 3, 0, 3, lp, ids, lps) == lib.AC_ERR_RANGE
    assert "every logit is -inf" in last_error(lib, ffi)
    logits[1] = 0.0  # one finite logit: a distribution again
    assert lib.ac_logprobs(logits, 3, 1, 3, lp, ids, lps) == 0
    assert lp[0] == 0.0 and ids[0] == 1 and lps[1] == float("-inf")


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"temperature": -0.5}, "temperature -0.5 is invalid"),
        ({"temperature": float("nan")}, "temperature nan is invalid"),
        ({"top_p": 0.0}, "top_p 0 is invalid"),
        ({"top_p": 1.5}, "top_p 1.5 is invalid"),
        ({"top_k": -1}, "top_k -1 is invalid"),
    ],
)
def test_sampler_validation(lib, ffi, kwargs, needle):
    rc, s = make_sampler(lib, ffi, 100, **kwargs)
    assert rc == lib.AC_ERR_ARG and s == ffi.NULL
    assert needle in last_error(lib, ffi)


# ---------------------------------------------------------------------------- generation


class Loaded:
    def __init__(self, lib, ffi, files, **sampling):
        self.lib, self.ffi = lib, ffi
        rc, self.model = load_model(lib, ffi, files.model)
        assert rc == 0, last_error(lib, ffi)
        rc, self.tok = load_tokenizer(lib, ffi, files.tokenizer, files.cfg.vocab_size)
        assert rc == 0, last_error(lib, ffi)
        self.params = ffi.new("ac_session_params *", lib.ac_session_default_params())
        plain = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 1, "repeat_penalty": 1.0}  # no penalty
        for key, value in dict(plain, **sampling).items():
            setattr(self.params.sampler, key, value)
        rc, self.session = create_session(lib, ffi, self.model, self.tok, self.params)
        assert rc == 0, last_error(lib, ffi)

    def generate(self, prompt: bytes, max_new: int, stop_after=None):
        tokens, pieces = [], []

        @self.ffi.callback("int(void *, int, const char *, size_t)")
        def on_piece(user, token, piece, size):
            tokens.append(token)
            pieces.append(self.ffi.buffer(piece, size)[:])
            return 1 if stop_after is not None and len(tokens) >= stop_after else 0

        n = self.ffi.new("int *")
        self.params.max_new_tokens = max_new
        assert self.lib.ac_session_set_params(self.session, self.params) == 0
        rc = self.lib.ac_generate(self.session, prompt, len(prompt), on_piece, self.ffi.NULL, n)
        return rc, tokens, pieces, n[0]

    def close(self):
        self.lib.ac_session_free(self.session)
        self.lib.ac_tokenizer_free(self.tok)
        self.lib.ac_model_free(self.model)


def test_greedy_generate_follows_argmax_of_logits(lib, ffi, make_model):
    from arianna_c import Model

    files = make_model(seed=3, **LAYOUTS["v1-tied-gqa"])
    g = Loaded(lib, ffi, files)
    rc, tokens, pieces, n = g.generate(b"the cat", 20)
    g.close()
    assert rc == 0 and n == len(tokens) and 0 < n <= 20
    with Model(files.model, files.tokenizer) as m:
        seq = m.encode("the cat")
        rows = m.logits(seq + tokens)
        greedy = rows[len(seq) - 1 :].argmax(axis=1)
        assert tokens == greedy[: len(tokens)].tolist()
        if n < 20:  # ended early: the model chose EOS or BOS next
            assert greedy[len(tokens)] in (1, 2)
        assert b"".join(pieces).decode("utf-8", "replace") == m.decode(seq[1:] + tokens)[len("the cat"):]


def test_callback_can_stop_early_and_seeds_repeat(lib, ffi, make_model):
    files = make_model(seed=5)
    runs = []
    for seed in (77, 77):
        g = Loaded(lib, ffi, files, temperature=1.0, seed=seed)
        rc, tokens, _, n = g.generate(b"", 30, stop_after=3)
        assert rc == 0 and n == 3 and len(tokens) == 3
        rc, more, _, _ = g.generate(b"the", 10)  # the same session again: generate resets it
        assert rc == 0
        runs.append((tokens, more))
        g.close()
    assert runs[0] == runs[1]


def test_generation_never_exceeds_seq_len(lib, ffi, make_model):
    files = make_model(seed=2, seq_len=16)
    g = Loaded(lib, ffi, files, temperature=1.0, seed=5)
    for seed_prompt in (b"", b"the", b"is it"):
        rc, tokens, _, n = g.generate(seed_prompt, 1000)
        assert rc == 0
        pos = lib.ac_session_position(g.session)
        assert pos <= 16 and n <= 16
    long_prompt = b"x y z " * 10
    rc, _, _, n = g.generate(long_prompt, 5)
    assert rc == lib.AC_ERR_RANGE and n == 0
    assert "but the model's seq_len is 16" in last_error(lib, ffi)
    g.close()


def test_session_step_api(lib, ffi, scripted_model):
    script = [1, 3 + 0xC3, 3 + 0xA9, 300, 301, 2]
    files = scripted_model(script)
    g = Loaded(lib, ffi, files)
    tok, piece, size = ffi.new("int *"), ffi.new("const char **"), ffi.new("size_t *")
    assert lib.ac_session_next(g.session, tok, piece, size) == 0 and tok[0] == -1  # nothing fed
    assert lib.ac_session_feed(g.session, b"", 0, 1) == 0
    assert lib.ac_session_position(g.session) == 1
    seen = []
    while True:
        assert lib.ac_session_next(g.session, tok, piece, size) == 0
        seen.append(tok[0])
        if tok[0] == -1:  # the library ended the text: EOS is not reported
            break
    assert seen == script[1:-1] + [-1] and lib.ac_session_stop_reason(g.session) == lib.AC_STOP_END
    assert lib.ac_session_feed_tokens(g.session, ffi.new("int[]", [999]), 1) == lib.AC_ERR_RANGE
    g.close()


def test_session_rejects_mismatched_tokenizer(lib, ffi, make_model, tmp_path):
    files = make_model()
    other = write_synthetic_tokenizer(tmp_path / "t.bin", 300)
    rc, tok = load_tokenizer(lib, ffi, other, 300)
    assert rc == 0, last_error(lib, ffi)
    with loaded_model(lib, ffi, files.model) as model:
        rc, session = create_session(lib, ffi, model, tok, ffi.NULL)
        assert rc == lib.AC_ERR_MISMATCH and session == ffi.NULL
    lib.ac_tokenizer_free(tok)

