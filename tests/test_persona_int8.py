"""int8 (Q8_0, quantized at load) keeps the persona's validation loss within 1% of
float32, and its greedy output is checked against float32's.

The validation set is the one the persona was trained against: the corpus in
``../shared/corpus`` tokenized with ``persona/tok4096.model`` exactly as
``python -m arianna_c.train pretokenize`` does it (``arianna_c.data.pretokenize``, into a temp
folder; about 5 s for the ~9.8M tokens on two cores), and the last 5% of EVERY shard
(``arianna_c.data.load_split``).  Exact tails need each file's full token count, so the whole
corpus is tokenized.

A missing corpus or sentencepiece skips outside CI and fails under CI=true (CI has both).

Run it alone, with the measured numbers shown:
``python -m pytest -q -s tests/test_persona_int8.py``  (lines starting ``[persona-int8]``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capi  # noqa: E402
import helpers_parity as hp  # noqa: E402
import make_golden as mg  # noqa: E402

pytestmark = pytest.mark.persona

CORPUS = mg.REPO.parent / "shared" / "corpus"
VAL_FRACTION = 0.05  # TrainConfig.val_fraction, what the persona was trained with
# 32 windows of seq_len (256) tokens, evenly spread over the whole validation set
# (data.eval_batches): 8,192 scored next-token predictions.  Each model takes ~4 s for them
# on this project's 2-core machine.
N_WINDOWS = 32
MAX_REL_LOSS_DIFF = 0.01  # int8 may cost at most 1% of the validation loss

GREEDY_PROMPTS = ["Resonance is", "The sea", "Once upon a time"]
GREEDY_TOKENS = 64
# Measured on the shipped persona (avx512-amx kernels): float32 and int8 greedy agree on all 64
# tokens of "Resonance is" and of "The sea", and on the first 24 of "Once upon a time".  They
# part at a near-tie, where float32's top two logits are closer than int8's rounding moves
# logits (0.033 there): that is expected quantization behaviour, not a bug.  On the first 8
# tokens the smallest top-2 margin is 0.058 for float32 and 0.047 for int8, thousands of times
# what kernel or thread changes move (~1e-5), so K = 8 does not flake, yet fails if int8
# derails greedy decoding early.
MIN_COMMON_PREFIX = 8
# Teacher-forced top-1 (argmax) agreement on the same validation windows: measured 98.43%.
MIN_TOP1_AGREEMENT = 0.97


def _need_corpus() -> Path:
    if not any(CORPUS.glob("*.txt")):
        message = f"the training corpus {CORPUS} is not there (no .txt files)"
        if hp.in_ci():
            pytest.fail(f"CI must run the persona int8 check, but {message}", pytrace=False)
        pytest.skip(message)
    return CORPUS


@pytest.fixture(scope="module")
def val_tokens(tmp_path_factory) -> np.ndarray:
    """The persona's validation tokens: the last 5% of every corpus shard, concatenated."""
    from arianna_c import data

    corpus = _need_corpus()
    hp.need_sentencepiece()
    shards = tmp_path_factory.mktemp("persona_shards")
    data.pretokenize(corpus, mg.PERSONA_TOKENIZER_MODEL, shards)
    return data.load_split(shards, VAL_FRACTION).val


@pytest.fixture(scope="module")
def models(built, tmp_path_factory):
    """(float32, int8) C models of the persona; int8 quantized at load."""
    import arianna_c

    tok = mg.persona_tokenizer(tmp_path_factory.mktemp("tok"))
    f32 = arianna_c.Model(mg.PERSONA_MODEL, tokenizer=tok)
    i8 = arianna_c.Model(mg.PERSONA_MODEL, tokenizer=tok, quantize="int8")
    assert f32.quantization is None and i8.quantization == "int8"
    yield f32, i8
    f32.close()
    i8.close()


def token_losses(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Next-token cross-entropy (nats) of every position, log-softmax in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return log_norm - z[np.arange(len(targets)), targets]


def test_int8_validation_loss_within_1_percent(models, val_tokens, record_property):
    from arianna_c.data import eval_batches

    f32, i8 = models
    seq_len = f32.config.seq_len
    losses = {"float32": [], "int8": []}
    agree = 0
    windows = 0
    for x, y in eval_batches(val_tokens, N_WINDOWS, seq_len, 1):
        for inputs, targets in zip(x, y):
            a, b = f32.logits(inputs), i8.logits(inputs)
            losses["float32"].append(token_losses(a, targets))
            losses["int8"].append(token_losses(b, targets))
            agree += int((a.argmax(axis=1) == b.argmax(axis=1)).sum())
            windows += 1
    assert windows == N_WINDOWS
    n_tokens = windows * seq_len
    loss32 = float(np.concatenate(losses["float32"]).mean())
    loss8 = float(np.concatenate(losses["int8"]).mean())
    rel = (loss8 - loss32) / loss32
    top1 = agree / n_tokens
    print(f"[persona-int8] validation loss over {n_tokens:,} tokens ({windows} windows of {seq_len}, "
          f"of {len(val_tokens):,} validation tokens): float32 {loss32:.5f}, int8 {loss8:.5f} nats/token, "
          f"relative difference {rel:+.4%} (limit {MAX_REL_LOSS_DIFF:.0%}); top-1 agreement {top1:.2%}")
    for name, value in (("loss_float32", loss32), ("loss_int8", loss8), ("loss_rel_diff", rel),
                        ("tokens", n_tokens), ("top1_agreement", top1)):
        record_property(f"persona_int8_{name}", f"{value:.6g}")
    assert np.isfinite(loss32) and np.isfinite(loss8)
    assert abs(rel) <= MAX_REL_LOSS_DIFF
    assert top1 >= MIN_TOP1_AGREEMENT


def greedy_tokens(model, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """n argmax tokens after prompt_ids, one ac_forward step each (KV cache), NOT stopping at
    BOS (the persona's paragraph end); and the model's top-2 logit margin at every step."""
    from arianna_c._lib import _error_check, ffi

    lib, vocab = model._lib, model.config.vocab_size
    logits = ffi.new("const float **")
    with model._h.use() as h:
        rc, state = capi.create_state(lib, ffi, h.model)
        _error_check(rc)
        try:
            for pos, token in enumerate(prompt_ids):
                _error_check(lib.ac_forward(state, token, pos, logits))
            out, margins = [], []
            for pos in range(len(prompt_ids), len(prompt_ids) + n):
                row = np.frombuffer(ffi.buffer(logits[0], 4 * vocab), dtype=np.float32)
                token = int(np.argmax(row))
                top2 = np.partition(row, vocab - 2)[-2:]
                out.append(token)
                margins.append(float(top2[1] - top2[0]))
                _error_check(lib.ac_forward(state, token, pos, logits))
        finally:
            lib.ac_state_free(state)
    return out, margins


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_int8_greedy_matches_float32(models, record_property):
    f32, i8 = models
    prefixes = {}
    for prompt in GREEDY_PROMPTS:
        ids = f32.encode(prompt)
        assert i8.encode(prompt) == ids
        a, margins = greedy_tokens(f32, ids, GREEDY_TOKENS)
        b, _ = greedy_tokens(i8, ids, GREEDY_TOKENS)
        k = common_prefix(a, b)
        prefixes[prompt] = k
        where = (f"; float32's top-2 margin there {margins[k]:.4f}" if k < GREEDY_TOKENS else "")
        print(f"[persona-int8] greedy {prompt!r}: first {k}/{GREEDY_TOKENS} tokens identical{where}")
        record_property(f"persona_int8_greedy_prefix {prompt}", k)
        # the loop above is the runtime's own greedy decoding: generate(temperature=0, no
        # repetition penalty) gives the same text up to the first paragraph end (BOS), where
        # generate stops
        for model, tokens in ((f32, a), (i8, b)):
            stop = next((i for i, t in enumerate(tokens) if t in (1, 2)), len(tokens))
            text = model.generate(prompt, GREEDY_TOKENS, temperature=0.0, repeat_penalty=1.0)
            assert model.decode(ids + tokens[:stop]) == prompt + text
    for prompt, k in prefixes.items():
        assert k >= MIN_COMMON_PREFIX, (
            f"int8 greedy output of {prompt!r} departs from float32 after {k} tokens "
            f"(at least {MIN_COMMON_PREFIX} expected; all: {prefixes})")
