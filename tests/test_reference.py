"""The NumPy reference on its own (no C library needed): forward paths, formats, sampler,
decode/encode, generation semantics, CLI."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers_parity as hp  # noqa: E402

from arianna_c import formats  # noqa: E402
from arianna_c.formats import FormatError, ModelConfig  # noqa: E402
from arianna_c.reference import (BOS, EOS, Reference, Sampler, Tokenizer, load_weights,  # noqa: E402
                                 main, rope_tables, save_npz)

CFG = ModelConfig(48, 112, 2, 6, 2, 300, 40, shared_classifier=False, version=1)


@pytest.fixture(scope="module")
def weights():
    return hp.parity_weights(CFG, seed=1)


@pytest.fixture(scope="module")
def ref(weights):
    return Reference((CFG, weights))


def test_full_sequence_equals_kv_cache(ref, weights):
    tokens = hp.parity_tokens(CFG, seed=2)
    full, step = ref.logits(tokens), ref.logits_cached(tokens)
    assert full.dtype == step.dtype == np.float32 and full.shape == (40, 300)
    assert hp.max_abs_diff(full, step) < 2e-5
    r64 = Reference((CFG, weights), dtype=np.float64)
    full64 = r64.logits(tokens)
    assert full64.dtype == np.float64
    assert hp.max_abs_diff(full64, r64.logits_cached(tokens)) < 1e-10
    assert hp.max_abs_diff(full, full64) < 1e-4
    # a prefix of the sequence gives the first rows; the full path leaves the cache alone
    np.testing.assert_allclose(ref.logits(tokens[:7]), full[:7], atol=2e-5)


def test_causality(ref):
    """Changing a later token never changes earlier logits."""
    a = [1, 5, 6, 7, 8, 9]
    b = [1, 5, 6, 7, 200, 201]
    la, lb = ref.logits(a), ref.logits(b)
    np.testing.assert_array_equal(la[:4], lb[:4])
    assert not np.allclose(la[4:], lb[4:])


def test_matches_a_naive_per_head_implementation(weights):
    """An independent, loop-per-head float64 forward pass (written from the math, not the code)."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    c = CFG
    hs, kv_mul = c.head_size, c.n_heads // c.n_kv_heads
    tokens = [1, 17, 250, 3, 99, 99, 42]

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x) + 1e-5) * g

    def rope(v, pos):
        out = v.copy()
        for i in range(0, hs, 2):
            theta = pos / 10000.0 ** (i / hs)
            for h in range(len(v) // hs):
                a, b = v[h * hs + i], v[h * hs + i + 1]
                out[h * hs + i] = a * np.cos(theta) - b * np.sin(theta)
                out[h * hs + i + 1] = a * np.sin(theta) + b * np.cos(theta)
        return out

    keys = [[] for _ in range(c.n_layers)]
    vals = [[] for _ in range(c.n_layers)]
    out_logits = []
    for pos, tok in enumerate(tokens):
        x = w["token_embedding"][tok].copy()
        for l in range(c.n_layers):
            xb = rms(x, w["rms_att"][l])
            q = rope(w["wq"][l] @ xb, pos)
            keys[l].append(rope(w["wk"][l] @ xb, pos))
            vals[l].append(w["wv"][l] @ xb)
            att_out = np.zeros(c.dim)
            for h in range(c.n_heads):
                g = h // kv_mul
                qh = q[h * hs:(h + 1) * hs]
                scores = np.array([qh @ k[g * hs:(g + 1) * hs] for k in keys[l]]) / np.sqrt(hs)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                att_out[h * hs:(h + 1) * hs] = sum(pi * v[g * hs:(g + 1) * hs] for pi, v in zip(p, vals[l]))
            x = x + w["wo"][l] @ att_out
            xb = rms(x, w["rms_ffn"][l])
            a = w["w1"][l] @ xb
            x = x + w["w2"][l] @ (a / (1 + np.exp(-a)) * (w["w3"][l] @ xb))
        out_logits.append(w["wcls"] @ rms(x, w["rms_final"]))
    naive = np.array(out_logits)
    r64, r32 = Reference((CFG, weights), dtype=np.float64), Reference((CFG, weights))
    for forward in (r64.logits, r64.logits_cached):
        assert hp.max_abs_diff(forward(tokens), naive) < 1e-9
    for forward in (r32.logits, r32.logits_cached):
        assert hp.max_abs_diff(forward(tokens), naive) < 1e-4


def test_step_returns_fresh_logits(ref):
    """step works in scratch buffers, but the logits it returns are never reused or aliased."""
    first = ref.step(1, 0)
    kept = first.copy()
    second = ref.step(5, 1)
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)


def test_rope_tables_float32_match_c_rounding():
    cos, sin = rope_tables(48, 256)
    assert cos.dtype == np.float32 and cos.shape == (256, 24)
    # the C computation: freq = 1.0f / powf(10000.0f, (float)(2i) / (float)48)
    exponent = np.arange(0, 48, 2, dtype=np.float32) / np.float32(48)
    freq = np.float32(1) / (10000.0 ** exponent.astype(np.float64)).astype(np.float32)
    angle = np.float32(255) * freq
    np.testing.assert_allclose(cos[255], np.cos(angle.astype(np.float64)), atol=1e-6)
    cos64, _ = rope_tables(48, 256, np.float64)
    assert np.abs(cos64 - cos).max() < 1e-4


@pytest.mark.parametrize("version,shared", [(0, True), (0, False), (1, True), (1, False)])
def test_reads_v0_v1_and_npz_identically(tmp_path, version, shared):
    cfg = ModelConfig(32, 64, 1, 4, 2, 100, 16, shared_classifier=shared, version=version)
    w = formats.random_weights(cfg, 3)
    formats.write_model(tmp_path / "m.bin", cfg, w)
    save_npz(tmp_path / "m.npz", cfg, w)
    cfg_npz, w_npz = load_weights(tmp_path / "m.npz")
    assert cfg_npz == cfg
    tokens = [1, 4, 50, 99]
    base = Reference((cfg, w)).logits(tokens)
    np.testing.assert_array_equal(Reference(tmp_path / "m.bin").logits(tokens), base)
    np.testing.assert_array_equal(Reference(tmp_path / "m.npz").logits(tokens), base)


INT8_CFG = ModelConfig(64, 128, 2, 4, 2, 100, 16, shared_classifier=False, version=2, group_size=32)
INT8_MATRICES = ["token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls"]


def test_int8_layout_round_trip(tmp_path):
    cfg, path = INT8_CFG, tmp_path / "q8.bin"
    w = formats.random_weights(cfg, 5)
    formats.write_model(path, cfg, w)
    data = path.read_bytes()
    assert len(data) == formats.expected_file_size(cfg)
    assert data[:8] == formats.MAGIC_V1.to_bytes(4, "little") + (2).to_bytes(4, "little")
    assert data[37:41] == (32).to_bytes(4, "little") and data[41:256] == bytes(215)
    read_cfg, stored = formats.read_model(path, dequantize=False)
    assert read_cfg == cfg
    for name in formats.NORMS:
        np.testing.assert_array_equal(stored[name], w[name])
    for name in INT8_MATRICES:
        want = formats.quantize_q8(w[name], 32)
        assert stored[name].values.dtype == np.int8 and stored[name].group_size == 32
        np.testing.assert_array_equal(stored[name].values, want.values)
        np.testing.assert_array_equal(stored[name].scales, want.scales)
    _, floats = formats.read_model(path)
    for name in INT8_MATRICES:
        np.testing.assert_array_equal(floats[name], stored[name].dequantize())
        # within half a step of the original, per group
        groups = (floats[name] - w[name]).reshape(*stored[name].scales.shape, 32)
        assert (np.abs(groups) <= stored[name].scales[..., None] / 2 * (1 + 1e-6)).all()
    assert formats.model_bytes(cfg, stored) == data  # stored tensors are written as they are
    assert Reference(path).config == cfg


def test_quantize_q8_rounds_halves_to_even_and_keeps_zero_groups():
    w = np.array([[-127.0, 0.5, 1.5, 2.5, 0.0, 0.0, 0.0, 0.0, 1e-42, -2e-42, 0.0, 3e-42]], dtype=np.float32)
    q8 = formats.quantize_q8(w, 4)
    np.testing.assert_array_equal(q8.scales, np.array([[1.0, 0.0, np.float32(3e-42) / np.float32(127)]],
                                                      dtype=np.float32))
    assert q8.values[0, :8].tolist() == [-127, 0, 2, 2, 0, 0, 0, 0]
    with pytest.raises(FormatError, match="group_size 5 does not divide rows of 12 values"):
        formats.quantize_q8(w, 5)


@pytest.mark.parametrize("group_size, needle", [(0, "group_size is 0, must be a positive multiple of 4"),
                                                (6, "group_size is 6"),
                                                (48, "group_size 48 does not divide dim 64")])
def test_int8_header_errors(tmp_path, group_size, needle):
    good = formats.model_bytes(INT8_CFG, formats.random_weights(INT8_CFG, 1))
    bad = good[:37] + group_size.to_bytes(4, "little") + good[41:]
    with pytest.raises(FormatError, match=needle):
        formats.read_model(bad)
    with pytest.raises(FormatError, match=needle):
        formats.model_bytes(dataclasses.replace(INT8_CFG, group_size=group_size), {})
    with pytest.raises(FormatError, match="header implies"):
        formats.read_model(good[:-4])


def test_bad_npz_and_tokens(tmp_path, ref):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(FormatError, match="__config__"):
        load_weights(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ref.logits([1, 300])
    with pytest.raises(ValueError, match="position"):
        ref.step(1, CFG.seq_len)
    with pytest.raises(ValueError, match="seq_len"):
        ref.logits([1] * (CFG.seq_len + 1))


# ---------------------------------------------------------------------------- sampler


def test_sampler_greedy_and_seeding():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32)
    assert Sampler(temperature=0).sample(logits) == int(np.argmax(logits))
    assert Sampler(temperature=1.0, top_k=1, top_p=1.0, seed=5).sample(logits) == int(np.argmax(logits))
    a = [Sampler(0.9, 0.9, 0, seed=11).sample(logits) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same first draw
    s1, s2 = Sampler(1.0, 1.0, 0, seed=11), Sampler(1.0, 1.0, 0, seed=12)
    d1 = [s1.sample(logits) for _ in range(50)]
    d2 = [s2.sample(logits) for _ in range(50)]
    assert d1 != d2
    # top-k: only the k best ever come out
    s = Sampler(2.0, 1.0, 5, seed=1)
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert {s.sample(logits) for _ in range(200)} <= top5
    # top-p: a dominant token with p above top_p is the only candidate
    peaked = logits.copy()
    peaked[7] = 50
    assert {Sampler(1.0, 0.5, 0, seed=3).sample(peaked) for _ in range(20)} == {7}


def test_sampler_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    s = Sampler(1.0, 1.0, 0, seed=123)
    counts = np.bincount([s.sample(logits) for _ in range(3000)], minlength=3) / 3000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.04)


def test_sampler_rejects_bad_params():
    for kwargs, needle in ((dict(temperature=-1), "temperature -1 is invalid"),
                           (dict(temperature=float("nan")), "temperature nan is invalid"),
                           (dict(top_p=0.0), "top_p 0 is invalid"), (dict(top_p=1.5), "top_p 1.5 is invalid"),
                           (dict(top_k=-1), "top_k -1 is invalid"), (dict(min_p=1.5), "min_p 1.5 is invalid"),
                           (dict(min_p=float("nan")), "min_p nan is invalid"),
                           (dict(repeat_penalty=-0.5), "repeat_penalty -0.5 is invalid"),
                           (dict(repeat_penalty=float("inf")), "repeat_penalty inf is invalid"),
                           (dict(repeat_last_n=-1), "repeat_last_n -1 is invalid"),
                           (dict(repeat_last_n=2**20 + 1), "repeat_last_n 1048577 is invalid"),
                           (dict(presence_penalty=float("inf")), "presence_penalty inf is invalid"),
                           (dict(frequency_penalty=1e39), "frequency_penalty inf is invalid"),
                           (dict(logit_bias={3: float("nan")}), "logit bias nan of token 3 is invalid"),
                           (dict(logit_bias={-1: 1.0}), "logit bias token -1 is outside the vocabulary")):
        with pytest.raises(ValueError, match=needle):
            Sampler(**kwargs)
    with pytest.raises(ValueError, match=r"logit bias token 9 is outside the vocabulary \[0, 5\)"):
        Sampler(logit_bias={9: 1.0}).sample(np.zeros(5, np.float32))


def test_penalties_arithmetic_and_window():
    """llama.cpp's penalties on the tokens among the last repeat_last_n recorded: a positive
    logit divided by repeat_penalty, a non-positive one multiplied, then count * frequency +
    presence subtracted; tokens that left the window are not touched."""
    logits = np.array([4.0, -1.0, 3.0, 0.0, 2.0], np.float32)
    s = Sampler(0.0, repeat_penalty=2.0, repeat_last_n=4, presence_penalty=0.5, frequency_penalty=0.25)
    for token in (2, 0, 0, 1, 3):  # 2 has left the 4-token window
        s.accept(token)
    assert list(s.adjusted_logits(logits)) == [4 / 2 - (2 * 0.25 + 0.5), -1 * 2 - (0.25 + 0.5), 3.0,
                                               0 * 2 - (0.25 + 0.5), 2.0]
    assert s.sample(logits) == 2  # greedy over the penalized logits: 0 fell from 4.0 to 1.0
    s.reset_history()
    assert np.array_equal(s.adjusted_logits(logits), logits) and s.sample(logits) == 0
    # repeat_penalty 0 is off, as 1 is; repeat_last_n 0 records nothing
    for off in (Sampler(0.0, repeat_penalty=0.0, repeat_last_n=4), Sampler(0.0, repeat_penalty=3.0)):
        off.accept(0)
        assert np.array_equal(off.adjusted_logits(logits), logits)


def test_logit_bias_and_min_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    banned = Sampler(1.0, logit_bias={0: -float("inf")}, seed=4)
    draws = [banned.sample(logits) for _ in range(300)]
    assert 0 not in draws and set(draws) == {1, 2, 3}
    assert Sampler(0.0, logit_bias={3: 10.0}).sample(logits) == 3
    # min-p 0.4: only tokens at least 0.4 times as likely as the best (0.5): ids 0 and 1
    s = Sampler(1.0, min_p=0.4, seed=9)
    assert {s.sample(logits) for _ in range(300)} == {0, 1}
    # applied to the logits before temperature: a high temperature keeps the same two
    s = Sampler(5.0, min_p=0.4, seed=9)
    assert {s.sample(logits) for _ in range(300)} == {0, 1}


# ---------------------------------------------------------------------------- tokenizer


def small_tokenizer(tmp_path) -> Path:
    """<unk> <s> </s>, 256 byte pieces, ASCII letters, space, and a few merges (no é)."""
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)]
    singles = [bytes([c]) for c in b" abcdefghijklmnopqrstuvwxyzCR.,"]
    merges = [b" c", b"af", b" caf", b" R", b" Re", b"so", b"son", b" Reson", b"an", b"ce", b"ance",
              b" Resonance", b"es", b"on"]
    pieces += singles + merges
    scores = [0.0] * 259 + [-1000.0 - i for i in range(len(singles))] + [-float(i) for i in range(len(merges))]
    path = tmp_path / "tok.bin"
    formats.write_tokenizer(path, pieces, scores)
    return path


def test_decode_joins_byte_pieces(tmp_path):
    tok = Tokenizer(small_tokenizer(tmp_path), sp_model=False)
    ids = tok.encode("café 🙂")
    assert ids[0] == BOS
    byte_ids = [t for t in ids if tok.byte_value[t] >= 0]
    assert len(byte_ids) == 2 + 4  # é is two byte pieces, 🙂 four
    assert tok.decode(ids) == "café 🙂"
    assert tok.decode(ids[1:]) == "café 🙂"  # default prev=BOS drops the dummy space
    assert tok.decode(ids[1:], prev=-1) == " café 🙂"
    # streaming: nothing for an incomplete character, the whole character once complete
    stream = tok.stream()
    out = [stream.feed(t) for t in ids]
    assert "".join(out) + stream.flush() == "café 🙂"
    assert all("\ufffd" not in piece for piece in out)
    e_first = ids.index(byte_ids[0])
    assert out[e_first] == "" and out[e_first + 1] == "é"
    # an unfinished character at the end becomes U+FFFD on flush, not an exception
    stream = tok.stream()
    stream.feed(byte_ids[2])
    assert stream.flush() == "\ufffd"


def test_decode_special_tokens_and_control_bytes(tmp_path):
    tok = Tokenizer(small_tokenizer(tmp_path), sp_model=False)
    nl = 3 + 0x0A
    bell = 3 + 0x07
    assert tok.decode([BOS, EOS, 0]) == ""
    assert tok.decode([nl, bell, 3 + ord("\t")]) == "\n\t"


def test_pure_python_bpe_merges_by_score(tmp_path):
    tok = Tokenizer(small_tokenizer(tmp_path), sp_model=False)
    ids = tok.encode("Resonance", bos=False)
    assert [tok.pieces[i] for i in ids] == [b" Resonance"]
    assert tok.encode("", bos=True, eos=True) == [BOS, EOS]


def test_pure_python_bpe_matches_sentencepiece(tmp_path):
    spm = hp.need_sentencepiece()
    from arianna_c.export import tokenizer_from_sentencepiece

    tok_bin = tokenizer_from_sentencepiece(hp.PERSONA_TOKENIZER_MODEL, tmp_path / "tok4096.bin")
    sp = spm.SentencePieceProcessor(model_file=str(hp.PERSONA_TOKENIZER_MODEL))
    pure = Tokenizer(tok_bin, sp_model=False)
    with_sp = Tokenizer(tok_bin, sp_model=hp.PERSONA_TOKENIZER_MODEL)
    for text in hp.TOKENIZER_TEXTS:
        expected = sp.encode(text)
        assert pure.encode(text, bos=False) == expected, text
        assert with_sp.encode(text, bos=False) == expected
        assert pure.decode(expected) == text


# ---------------------------------------------------------------------------- generation


def scripted(script: list[int]) -> tuple[ModelConfig, dict]:
    """Untied model whose greedy continuation of script[i] is script[i+1] (zero layers)."""
    cfg = ModelConfig(32, 64, 1, 4, 4, 300, 24, shared_classifier=False, version=1)
    w = {k: np.zeros(s, np.float32) for k, s in formats.weight_shapes(cfg).items()}
    rng = np.random.default_rng(0)
    w["token_embedding"] = rng.standard_normal((300, 32)).astype(np.float32)
    for k in ("rms_att", "rms_ffn", "rms_final"):
        w[k][...] = 1
    for a, b in zip(script, script[1:]):
        w["wcls"][b] = 10 * w["token_embedding"][a] / np.linalg.norm(w["token_embedding"][a])
    return cfg, w


def test_generation_stops_at_eos_and_at_seq_len():
    ref = Reference(scripted([1, 50, 60, 70, EOS, 80]))
    assert list(ref.generate_tokens([1], 10)) == [50, 60, 70]
    assert list(ref.generate_tokens([1], 2)) == [50, 60]
    assert list(ref.generate_tokens([1], 0)) == []
    script = [1] + list(range(100, 140))
    ref = Reference(scripted(script))
    out = list(ref.generate_tokens([1], 100))
    assert out == script[1:24]  # prompt (1) + generated == seq_len (24)
    assert ref.generate_greedy([1], 5) == script[1:6]


def test_generation_records_the_prompt_and_sampled_tokens_for_the_penalties():
    """The window holds the context's last repeat_last_n tokens, the prompt's included."""
    ref = Reference(scripted([1, 50, 60, 70, 80, 90, EOS]))
    sampler = Sampler(0.0, repeat_last_n=3)
    assert list(ref.generate_tokens([1, 50], 10, sampler)) == [60, 70, 80, 90]
    assert list(sampler.recent) == [70, 80, 90]  # the EOS that ended the text is not recorded
    # greedy after the prompt BOS 60 50 follows the script (60 next) unless 60 is in the window
    for window, penalized in ((0, False), (1, False), (2, True), (3, True)):
        sampler = Sampler(0.0, repeat_last_n=window, presence_penalty=100.0)
        first = list(ref.generate_tokens([1, 60, 50], 1, sampler))
        assert (first != [60]) == penalized, window


def test_cli(tmp_path, capsys, built):
    cfg, w = scripted([1, 3 + ord("H"), 3 + ord("i"), 3 + ord("!"), EOS])
    formats.write_model(tmp_path / "m.bin", cfg, w)
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)]
    pieces += [b"p%d" % i for i in range(300 - len(pieces))]
    formats.write_tokenizer(tmp_path / "t.bin", pieces, [0.0] * 300)
    assert main([str(tmp_path / "m.bin"), "-z", str(tmp_path / "t.bin"), "-n", "10", "-t", "0"]) == 0
    assert capsys.readouterr().out == "Hi!\n"
    (tmp_path / "t.bin").rename(tmp_path / "tokenizer.bin")  # found next to the model, as ./run finds it
    assert main([str(tmp_path / "m.bin"), "-t", "0", "-i", "H"]) == 0
    assert capsys.readouterr().out == "Hi!\n"
    assert main([str(tmp_path / "nope.bin"), "-z", str(tmp_path / "t.bin")]) == 1
    assert "error:" in capsys.readouterr().err
