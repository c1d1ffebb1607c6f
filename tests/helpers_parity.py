"""Shared pieces of the parity tests (test_parity, test_export, test_persona_golden) and of the
API tests (test_python_api, test_generation).

* ``need_torch()`` / ``need_sentencepiece()``: the module, or a skip that says why -- except in CI
  (``CI`` set in the environment), where a missing dependency FAILS the test, so the parity
  checks can never silently disappear there.
* ``PARITY_SHAPES``: the random-model shapes every golden-logits test runs on.
* ``c_generate_tokens``: token ids of a C generation, through the session API (the Python
  ``Model.generate`` returns text only); the library decides where it stops.
* ``CallCounter``: counts the C calls a Model makes (how often it creates states, sessions...).
* ``report``: prints a measured maximum difference (visible with ``pytest -rA`` or ``-s``) and
  records it as a junit property.
* ``persona_golden()``: the shipped persona's golden logits (tests/golden/, written by
  tests/make_golden.py), failing the test when they are missing or belong to another file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from arianna_c import formats  # noqa: E402
from arianna_c.formats import ModelConfig  # noqa: E402
import capi  # noqa: E402

TOL = 1e-4
PERSONA_TOKENIZER_MODEL = REPO / "persona" / "tok4096.model"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _need(module: str, install: str):
    try:
        return __import__(module)
    except ImportError as exc:
        message = f"{module} is not installed ({exc}); `pip install {install}` to run this parity check"
        if in_ci():
            pytest.fail(f"CI must run every parity check, but {message}", pytrace=False)
        pytest.skip(message)


def need_torch():
    return _need("torch", "torch==2.13.0")


def need_sentencepiece():
    return _need("sentencepiece", "sentencepiece")


# (id, config) of the random models the golden-logits tests use.  Every sequence is seq_len long
# (>= 64 tokens), so the last position is the last one the KV cache holds.
PARITY_SHAPES = {
    # LLiSA's own width and heads (head_size 48), fewer layers, tied, legacy v0
    "llisa-tied-mha-v4096-v0": ModelConfig(288, 768, 2, 6, 6, 4096, 64, shared_classifier=True, version=0),
    # grouped-query attention with 2 kv heads, untied, odd vocab, v1
    "untied-gqa2-v517-v1": ModelConfig(96, 256, 3, 6, 2, 517, 80, shared_classifier=False, version=1),
    # multi-query (1 kv head), tied, odd vocab above 4096, v1
    "tied-mqa1-v4099-v1": ModelConfig(64, 176, 2, 4, 1, 4099, 70, shared_classifier=True, version=1),
    # untied, kv heads == heads, vocab 4096, small head_size, v0
    "untied-mha-v4096-v0": ModelConfig(32, 96, 2, 4, 4, 4096, 72, shared_classifier=False, version=0),
}


def parity_weights(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """formats.random_weights, with the embedding rows of <unk>, <s>, </s> shrunk so greedy
    decoding never picks them (a generation that stops early would prove less)."""
    weights = formats.random_weights(cfg, seed, scale=0.1)
    # Logits like a trained model's (std ~2.5, extremes ~10-15) whatever the width: the
    # embedding / classifier rows get norm ~2.5 (logit = row . rmsnorm(x), |rmsnorm(x)| ~ sqrt(D)).
    row_scale = 2.5 / np.sqrt(cfg.dim) / 0.1
    # Matrices with gain ~1 (std 1/sqrt(fan_in)), q and k a little more so attention is peaked,
    # as in a trained model; a fixed 0.1 would blow up the residual stream of the wide shapes.
    for name, gain in (("wq", 1.5), ("wk", 1.5), ("wv", 1.0), ("wo", 1.0), ("w1", 1.0), ("w2", 1.0), ("w3", 1.0)):
        fan_in = weights[name].shape[-1]
        weights[name] = (weights[name] * (gain / np.sqrt(fan_in) / 0.1)).astype(np.float32)
    for name in ("token_embedding", "wcls"):
        if name in weights:
            weights[name] = (weights[name] * row_scale).astype(np.float32)
            weights[name][:3] *= 0.01
    return weights


def parity_tokens(cfg: ModelConfig, seed: int, n: Optional[int] = None) -> list[int]:
    """BOS then seeded random ids (never 0..2), n tokens (default: the whole context)."""
    n = cfg.seq_len if n is None else n
    rng = np.random.default_rng(seed + 1000)
    return [1] + rng.integers(3, cfg.vocab_size, n - 1).tolist()


def placeholder_tokenizer(vocab_size: int) -> bytes:
    from arianna_c.export import placeholder_tokenizer as make

    return make(vocab_size)


def report(record_property, name: str, value: float, tol: float = TOL) -> None:
    """Prints and records a measured max |difference|."""
    print(f"[parity] {name}: max |diff| = {value:.3e} (tolerance {tol:g})")
    if record_property is not None:
        record_property(name, f"{value:.3e}")


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def persona_golden() -> tuple[dict, np.ndarray]:
    """(prompts file contents, logits (prompts, last positions, vocab)) of tests/golden/ for the
    shipped persona.  Fails, saying how to regenerate them, when they are missing or were made
    for another persona file."""
    import make_golden as mg

    if not (mg.LOGITS_FILE.is_file() and mg.PROMPTS_FILE.is_file()):
        pytest.fail(f"the persona exists but {mg.LOGITS_FILE.relative_to(mg.REPO)} does not: "
                    f"run `python -m tests.make_golden` and commit tests/golden/", pytrace=False)
    meta = json.loads(mg.PROMPTS_FILE.read_text(encoding="utf-8"))
    actual = mg.sha256(mg.PERSONA_MODEL)
    if meta["model_sha256"] != actual:
        pytest.fail(f"tests/golden/ was made for another persona file (sha256 {meta['model_sha256'][:12]}..., "
                    f"now {actual[:12]}...); if the persona was retrained on purpose, run "
                    f"`python -m tests.make_golden` and commit tests/golden/", pytrace=False)
    logits = np.load(mg.LOGITS_FILE)
    assert logits.dtype == np.float32
    assert logits.shape == (len(meta["prompts"]), meta["last_positions"], meta["config"]["vocab_size"])
    return meta, logits


def c_generate_tokens(model_path: Path, tokenizer: bytes, prompt_tokens: Sequence[int], max_new: int,
                      temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                      seed: int = 0, **sampler: float) -> list[int]:
    """Token ids the C library generates after prompt_tokens (session API: feed, then next
    until the library ends the generation).  The other sampler settings (min_p, the
    penalties) are off unless given, as in the reference's Sampler."""
    from arianna_c._lib import _error_check, ffi, load

    lib = load()
    rc, model = capi.load_model(lib, ffi, model_path)
    _error_check(rc)
    session = ffi.NULL
    tok = ffi.NULL
    try:
        rc, tok = capi.load_tokenizer_bytes(lib, ffi, tokenizer, capi.model_config(lib, ffi, model).vocab_size)
        _error_check(rc)
        params = ffi.new("ac_session_params *", lib.ac_session_default_params())
        params.sampler.temperature, params.sampler.top_p, params.sampler.top_k = temperature, top_p, top_k
        params.sampler.seed, params.max_new_tokens = seed, max_new
        for name, value in {**NEUTRAL_SAMPLER, **sampler}.items():
            setattr(params.sampler, name, value)
        rc, session = capi.create_session(lib, ffi, model, tok, params)
        _error_check(rc)
        ids = ffi.new("int[]", list(prompt_tokens))
        _error_check(lib.ac_session_feed_tokens(session, ids, len(prompt_tokens)))
        out, token = [], ffi.new("int *")
        while True:
            _error_check(lib.ac_session_next(session, token, ffi.NULL, ffi.NULL))
            if token[0] < 0:
                return out
            out.append(int(token[0]))
    finally:
        if session != ffi.NULL:
            lib.ac_session_free(session)
        if tok != ffi.NULL:
            lib.ac_tokenizer_free(tok)
        lib.ac_model_free(model)


class CallCounter:
    """Stands in for a Model's cffi library object and counts the calls of some functions."""

    def __init__(self, lib, names):
        self._lib = lib
        self.calls = {name: 0 for name in names}

    def __getattr__(self, name):
        attr = getattr(self._lib, name)
        if name not in self.calls:
            return attr

        def counted(*args):
            self.calls[name] += 1
            return attr(*args)

        return counted


# The sampler settings that change nothing (min-p and the penalties off).
NEUTRAL_SAMPLER = dict(min_p=0.0, repeat_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)


def c_sample(logits: np.ndarray, temperature: float, top_p: float, top_k: int, seed: int, n: int) -> list[int]:
    """n draws of the C sampler (one sampler, so its PRNG advances) from the same logits."""
    from arianna_c._lib import _error_check, ffi, load

    lib = load()
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    params = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
    rc, sampler = capi.create_sampler(lib, ffi, params, len(logits))
    _error_check(rc)
    try:
        token = ffi.new("int *")
        buf = ffi.from_buffer("float[]", logits)
        draws = []
        for _ in range(n):
            _error_check(lib.ac_sample(sampler, buf, token))
            draws.append(int(token[0]))
        return draws
    finally:
        lib.ac_sampler_free(sampler)


# Texts the tokenizer round trip runs on.
TOKENIZER_TEXTS = [
    "",
    "Resonance is the quiet agreement of two things that vibrate together.",
    "I wandered lonely as a cloud\nThat floats on high o'er vales and hills,\n\nWhen all at once I saw a crowd,\n",
    "spaces:  two,   three,    four;\ttab,\t\ttwo tabs; trailing   ",
    "   leading spaces and a lone\ttab",
    "Digits 0123456789, 3.14159, 2024-03-15, 1,000,000 and 42%.",
    "Punctuation!? (brackets) [and] {braces} <angle> \"quotes\" 'single' -- dashes... ; : @#$^&*_+=|\\/~`",
    "Café, naïve, résumé, façade, jalapeño, Ångström, über, crème brûlée, ça va? Żółć, ĳ, Œuvre.",
    "東京の夜は静かです。我喜欢读书。한국어 문장입니다.",
    "Emoji 🙂🚀🌊✨ and a family 👨‍👩‍👧 and flags 🇺🇦🇯🇵 and ∑ ∫ ≈ ≠ ∞ → ★",
    "Mixed: résonance 共鳴 🎶 — «guillemets» „quotes“ “curly” ‘single’ …",
    " ",
    "\n",
    "a",
]
