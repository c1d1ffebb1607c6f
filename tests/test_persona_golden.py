"""Regression guard for the shipped persona: logits of three fixed prompts (the last 4 positions
of each) stored in tests/golden/ must be reproduced by the C library and the NumPy reference.

If the golden files are missing (or belong to another model file), the tests fail and say how
to regenerate them: ``python -m tests.make_golden``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers_parity as hp  # noqa: E402
import make_golden as mg  # noqa: E402

pytestmark = pytest.mark.persona


@pytest.fixture(scope="module")
def golden():
    return hp.persona_golden()


@pytest.fixture(scope="module")
def c_model(built, tmp_path_factory):
    import arianna_c

    tok = mg.persona_tokenizer(tmp_path_factory.mktemp("tok"))
    model = arianna_c.Model(mg.PERSONA_MODEL, tokenizer=tok)
    yield model
    model.close()


def test_prompts_encode_the_same(golden, c_model):
    meta, _ = golden
    assert meta["prompts"] == mg.PROMPTS
    hp.need_sentencepiece()
    assert mg.prompt_tokens() == meta["tokens"]
    for prompt, tokens in zip(meta["prompts"], meta["tokens"]):
        assert c_model.encode(prompt) == tokens
        assert c_model.decode(tokens) == prompt


def test_c_matches_golden(golden, c_model, record_property):
    meta, logits = golden
    k = meta["last_positions"]
    for i, tokens in enumerate(meta["tokens"]):
        c = c_model.logits(tokens)[-k:]
        diff = hp.max_abs_diff(c, logits[i])
        hp.report(record_property, f"persona prompt {i} C vs golden", diff)
        assert diff <= hp.TOL


def test_numpy_matches_golden(golden, record_property):
    from arianna_c.reference import Reference

    meta, logits = golden
    ref = Reference(mg.PERSONA_MODEL)
    k = meta["last_positions"]
    for i, tokens in enumerate(meta["tokens"]):
        full = ref.logits(tokens)[-k:]
        step = ref.logits_cached(tokens)[-k:]
        for what, value in (("full", full), ("step", step)):
            diff = hp.max_abs_diff(value, logits[i])
            hp.report(record_property, f"persona prompt {i} NumPy {what} vs golden", diff)
            assert diff <= hp.TOL


def test_persona_greedy_identical(c_model):
    """64 greedy tokens of the real persona: C == NumPy."""
    from arianna_c.reference import Reference, Sampler

    ref = Reference(mg.PERSONA_MODEL)
    prompt = c_model.encode(mg.PROMPTS[0])
    tok = hp.placeholder_tokenizer(c_model.config.vocab_size)
    c_tokens = hp.c_generate_tokens(mg.PERSONA_MODEL, tok, prompt, 64)
    np_tokens = list(ref.generate_tokens(prompt, 64, Sampler(temperature=0.0)))
    assert c_tokens == np_tokens
