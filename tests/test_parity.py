"""Golden-logits parity: the C library, the NumPy reference and the PyTorch model agree.

Random seeded models of several shapes (tied / untied classifier; 1, 2 and n_heads kv heads;
vocab 4096, 517 and 4099; both file layouts), a sequence that fills the whole context
(seq_len >= 64 tokens), and logits at every position through:

* C: ``arianna_c.Model.logits`` (the KV-cache path from position 0),
* NumPy: ``Reference.logits`` (full sequence, causal mask) and ``Reference.logits_cached``
  (one KV-cache step at a time), float32 and float64,
* PyTorch: the .bin loaded back into ``arianna_c.model.Transformer``.

Every pair must agree to max |diff| <= 1e-4; the measured maxima are printed (``pytest -rA`` or
``-s``) and recorded as junit properties.  Then greedy generation (64 tokens) must be identical
in all three, seeded sampling identical in C and NumPy, and the tokenizer must agree with
SentencePiece on the real persona tokenizer.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers_parity as hp  # noqa: E402
from conftest import rounding_edge_cases  # noqa: E402

from arianna_c import formats  # noqa: E402
from arianna_c.reference import Reference, Sampler, Tokenizer  # noqa: E402

SHAPE_IDS = list(hp.PARITY_SHAPES)


class ShapeCase:
    """One random model on disk, and its logits through each path (computed once, lazily)."""

    def __init__(self, name: str, folder: Path, seed: int):
        self.name = name
        self.cfg = hp.PARITY_SHAPES[name]
        self.weights = hp.parity_weights(self.cfg, seed)
        self.path = folder / f"{name}.bin"
        formats.write_model(self.path, self.cfg, self.weights)
        self.tokens = hp.parity_tokens(self.cfg, seed)
        self._cache: dict = {}

    def _get(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def reference(self, dtype=np.float32) -> Reference:
        return self._get(("ref", np.dtype(dtype).name), lambda: Reference(self.path, dtype=dtype))

    def c_model(self):
        import arianna_c

        return self._get("cmodel", lambda: arianna_c.Model(
            self.path, tokenizer=hp.placeholder_tokenizer(self.cfg.vocab_size)))

    def c_logits(self) -> np.ndarray:
        return self._get("c", lambda: self.c_model().logits(self.tokens))

    def np_full(self, dtype=np.float32) -> np.ndarray:
        return self._get(("full", np.dtype(dtype).name), lambda: self.reference(dtype).logits(self.tokens))

    def np_step(self, dtype=np.float32) -> np.ndarray:
        return self._get(("step", np.dtype(dtype).name), lambda: self.reference(dtype).logits_cached(self.tokens))

    def torch_model(self):
        from arianna_c.export import torch_from_bin

        return self._get("torch_model", lambda: torch_from_bin(self.path))

    def torch_logits(self) -> np.ndarray:
        from arianna_c.export import torch_logits

        return self._get("torch", lambda: torch_logits(self.torch_model(), self.tokens))


@pytest.fixture(scope="module")
def cases(built, tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity")
    made = {name: ShapeCase(name, folder, seed=11 + i) for i, name in enumerate(SHAPE_IDS)}
    yield made
    for case in made.values():
        if "cmodel" in case._cache:
            case._cache["cmodel"].close()


@pytest.fixture(params=SHAPE_IDS)
def case(request, cases) -> ShapeCase:
    return cases[request.param]


def check(record_property, case: ShapeCase, what: str, a, b, tol: float = hp.TOL) -> float:
    diff = hp.max_abs_diff(a, b)
    hp.report(record_property, f"{case.name} {what}", diff, tol)
    assert diff <= tol, f"{case.name}: {what} differ by {diff:.3e} > {tol:g}"
    return diff


# ---------------------------------------------------------------------------- logits


def test_logits_are_not_trivial(case):
    """Activations like a real model's: logits spread over several units, rows that differ."""
    logits = case.np_full()
    assert len(case.tokens) == case.cfg.seq_len >= 64
    assert logits.shape == (case.cfg.seq_len, case.cfg.vocab_size)
    assert np.all(np.isfinite(logits))
    assert 0.5 < float(logits.std()) < 50, logits.std()
    assert float(np.abs(np.diff(logits, axis=0)).max()) > 0.5
    # attention at the last position is not uniform (otherwise RoPE/masking bugs could hide)
    assert len(set(np.argmax(logits, axis=1).tolist())) > 4


def test_c_vs_numpy_full_sequence(case, record_property):
    check(record_property, case, "C vs NumPy full-sequence", case.c_logits(), case.np_full())


def test_c_vs_numpy_kv_cache(case, record_property):
    check(record_property, case, "C vs NumPy KV-cache step", case.c_logits(), case.np_step())


def test_numpy_full_vs_kv_cache(case, record_property):
    check(record_property, case, "NumPy full vs NumPy step", case.np_full(), case.np_step())


def test_c_vs_numpy_float64(case, record_property):
    check(record_property, case, "C vs NumPy float64", case.c_logits(), case.np_full(np.float64))
    check(record_property, case, "NumPy float64 full vs step", case.np_full(np.float64),
          case.np_step(np.float64), tol=1e-9)


def test_c_vs_torch(case, record_property):
    hp.need_torch()
    check(record_property, case, "C vs PyTorch", case.c_logits(), case.torch_logits())


def test_numpy_vs_torch(case, record_property):
    hp.need_torch()
    check(record_property, case, "NumPy vs PyTorch", case.np_full(), case.torch_logits())


def test_c_logits_of_a_prefix_match(case):
    """A shorter sequence gives the first rows of the longer one (state fully reset)."""
    c = case.c_model()
    n = 17
    np.testing.assert_array_equal(c.logits(case.tokens[:n]), case.c_logits()[:n])


# ---------------------------------------------------------------------------- int8 (v2) files and RoPE


INT8_CASES = ["llisa-tied-mha-v4096-v0", "untied-gqa2-v517-v1", "untied-mha-v4096-v0"]  # 32 | dim, hidden


@pytest.mark.parametrize("edge_cases", [False, True], ids=["random", "edge-cases"])
@pytest.mark.parametrize("name", INT8_CASES)
def test_int8_file_written_by_numpy_is_the_c_quantizers(cases, tmp_path, name, edge_cases):
    """formats writes the v2 layout byte for byte as the C quantizer + ac_model_save do, and
    reads back what C wrote; both files load in C and give the same logits."""
    import arianna_c

    case = cases[name]
    weights = rounding_edge_cases(case.weights) if edge_cases else case.weights
    source = tmp_path / "f32.bin"
    formats.write_model(source, case.cfg, weights)
    tok = hp.placeholder_tokenizer(case.cfg.vocab_size)
    c_file, py_file = tmp_path / "c_q8.bin", tmp_path / "py_q8.bin"
    with arianna_c.Model(source, tok, quantize="int8") as m:
        m.save(c_file)
        c_logits = m.logits(case.tokens[:20])
    int8_cfg = dataclasses.replace(case.cfg, version=2, group_size=32)
    formats.write_model(py_file, int8_cfg, weights)
    assert py_file.read_bytes() == c_file.read_bytes()
    read_cfg, stored = formats.read_model(c_file, dequantize=False)
    assert read_cfg == int8_cfg
    q = formats.quantize_q8(weights["token_embedding"], 32)
    np.testing.assert_array_equal(stored["token_embedding"].values, q.values)
    with arianna_c.Model(py_file, tok) as m:
        assert m.config == int8_cfg
        np.testing.assert_array_equal(m.logits(case.tokens[:20]), c_logits)


def test_one_rope_table_for_numpy_and_torch():
    hp.need_torch()
    from arianna_c import model as torch_model
    from arianna_c.reference import rope_tables

    for head_size, seq_len in ((48, 256), (8, 70), (16, 80)):
        cos, sin = formats.rope_tables(head_size, seq_len)
        t_cos, t_sin = torch_model.rope_tables(head_size, seq_len)
        np.testing.assert_array_equal(t_cos.numpy(), cos)
        np.testing.assert_array_equal(t_sin.numpy(), sin)
        assert rope_tables is formats.rope_tables


# ---------------------------------------------------------------------------- generation


GEN_CASES = ["tied-mqa1-v4099-v1", "untied-gqa2-v517-v1", "untied-mha-v4096-v0"]  # seq_len >= 69


@pytest.mark.parametrize("name", GEN_CASES)
def test_greedy_generation_identical(cases, name):
    """64 greedy tokens after a short prompt: C session API == NumPy == PyTorch."""
    case = cases[name]
    steps = 64
    prompt = case.tokens[: min(5, case.cfg.seq_len - steps)]
    assert len(prompt) >= 1 and len(prompt) + steps <= case.cfg.seq_len
    tok = hp.placeholder_tokenizer(case.cfg.vocab_size)
    c_tokens = hp.c_generate_tokens(case.path, tok, prompt, steps, temperature=0.0)
    np_tokens = case.reference().generate_greedy(prompt, steps)
    np_tokens2 = list(case.reference().generate_tokens(prompt, steps, Sampler(temperature=0.0)))
    assert len(c_tokens) == steps, "the C generation stopped early"
    assert c_tokens == np_tokens == np_tokens2
    print(f"[parity] {name}: greedy 64 tokens identical in C and NumPy: {c_tokens[:12]}...")
    hp.need_torch()
    torch_tokens = case.torch_model().generate_greedy(prompt, steps)
    assert torch_tokens == c_tokens


def test_generation_stops_at_the_end_of_the_context(cases):
    """A prompt near seq_len: C and NumPy both stop when prompt + generated == seq_len."""
    case = cases["untied-gqa2-v517-v1"]
    prompt = case.tokens[: case.cfg.seq_len - 10]
    tok = hp.placeholder_tokenizer(case.cfg.vocab_size)
    c_tokens = hp.c_generate_tokens(case.path, tok, prompt, 64)
    np_tokens = list(case.reference().generate_tokens(prompt, 64, Sampler(temperature=0.0)))
    assert c_tokens == np_tokens
    assert len(c_tokens) == 10


@pytest.mark.parametrize("temperature,top_p,top_k,seed", [
    (1.0, 1.0, 0, 7),       # plain softmax sampling
    (0.8, 0.9, 0, 12345),   # nucleus
    (1.0, 1.0, 40, 99),     # top-k
    (0.7, 0.8, 20, 0),      # both, default seed
])
def test_seeded_sampling_identical(cases, temperature, top_p, top_k, seed):
    """Same sampler semantics and PRNG: seeded generation gives the same tokens in C and NumPy."""
    case = cases["untied-gqa2-v517-v1"]
    prompt = case.tokens[:4]
    tok = hp.placeholder_tokenizer(case.cfg.vocab_size)
    c_tokens = hp.c_generate_tokens(case.path, tok, prompt, 48, temperature, top_p, top_k, seed)
    sampler = Sampler(temperature, top_p, top_k, seed)
    np_tokens = list(case.reference().generate_tokens(prompt, 48, sampler))
    assert c_tokens == np_tokens
    assert len(set(c_tokens)) > 5  # really sampled


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.9, 0.5, 0), (1.3, 1.0, 5),
                                                     (1.0, 0.95, 50), (0.0, 0.9, 0)])
def test_sampler_matches_c_on_the_same_logits(built, temperature, top_p, top_k):
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(517) * 2).astype(np.float32)
    c = hp.c_sample(logits, temperature, top_p, top_k, seed=42, n=200)
    sampler = Sampler(temperature, top_p, top_k, seed=42)
    assert [sampler.sample(logits) for _ in range(200)] == c


@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (0.99, 0), (1.0, 300)])
def test_sampler_order_with_ties_matches_c(built, top_p, top_k):
    """A 4096 vocabulary of few distinct logits: thousands of candidates, most of them tied.
    The C sampler's radix sort must give NumPy's stable order (ties by id) draw for draw."""
    rng = np.random.default_rng(8)
    logits = rng.integers(-6, 3, 4096).astype(np.float32) * np.float32(0.5)
    logits[rng.integers(0, 4096, 50)] = np.float32(0.0)  # logits 0.0 and -0.0 tie too
    logits[:7] = -np.float32(0.0)
    c = hp.c_sample(logits, 1.0, top_p, top_k, seed=5, n=300)
    sampler = Sampler(1.0, top_p, top_k, seed=5)
    assert [sampler.sample(logits) for _ in range(300)] == c
    assert len(set(c)) > 100


# ---------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def persona_tok(built, tmp_path_factory):
    """The real persona tokenizer converted by the exporter, with a random 4096-vocab model."""
    sp_module = hp.need_sentencepiece()
    import arianna_c
    from arianna_c.export import tokenizer_from_sentencepiece

    folder = tmp_path_factory.mktemp("persona_tok")
    tok_bin = tokenizer_from_sentencepiece(hp.PERSONA_TOKENIZER_MODEL, folder / "tok4096.bin")
    cfg = formats.ModelConfig(32, 64, 1, 2, 2, 4096, 512, version=1)
    model_path = folder / "model.bin"
    formats.write_model(model_path, cfg, formats.random_weights(cfg, 0))
    sp = sp_module.SentencePieceProcessor(model_file=str(hp.PERSONA_TOKENIZER_MODEL))
    model = arianna_c.Model(model_path, tokenizer=tok_bin)
    yield sp, model, Path(tok_bin)
    model.close()


@pytest.mark.parametrize("text", hp.TOKENIZER_TEXTS, ids=[f"t{i}" for i in range(len(hp.TOKENIZER_TEXTS))])
def test_tokenizer_c_matches_sentencepiece(persona_tok, text):
    sp, model, tok_bin = persona_tok
    expected = sp.encode(text)
    assert model.encode(text, bos=False) == expected
    assert model.encode(text) == [1] + expected
    assert model.decode(model.encode(text)) == text
    assert sp.decode(expected) == text  # the texts themselves survive SentencePiece
    ref = Tokenizer(tok_bin, sp_model=False)  # pure-Python BPE over the exported .bin
    assert ref.encode(text) == [1] + expected
    assert ref.decode(ref.encode(text)) == text
    stream = ref.stream(prev=1)
    assert "".join(stream.feed(t) for t in expected) + stream.flush() == text


def test_tokenizer_texts_exercise_byte_fallback(persona_tok):
    """At least one text needs byte pieces, and one character is split over several of them."""
    sp, model, tok_bin = persona_tok
    ref = Tokenizer(tok_bin, sp_model=False)
    split = [t for t in hp.TOKENIZER_TEXTS for tok in sp.encode(t) if ref.byte_value[tok] >= 0x80]
    assert split, "no text uses multi-byte byte-fallback pieces"
