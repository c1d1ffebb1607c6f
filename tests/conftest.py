"""Shared fixtures: build libarianna.so and ./run once per test run with `make`, and make
seeded random model + tokenizer files (both layouts, tied and untied, GQA) in temp dirs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # import the checkout's arianna_c, not an installed copy

from arianna_c import formats  # noqa: E402
from arianna_c.formats import ModelConfig  # noqa: E402

# Small enough to run in milliseconds, big enough to exercise every code path.
TINY = dict(dim=48, hidden_dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=320, seq_len=64)

# (name, config overrides) for the layouts every runtime test runs on.
LAYOUTS = {
    "v1-tied-gqa": dict(version=1, shared_classifier=True),
    "v1-untied-mha": dict(version=1, shared_classifier=False, n_heads=4, n_kv_heads=4),
    "v0-tied-gqa": dict(version=0, shared_classifier=True),
    "v0-untied-gqa": dict(version=0, shared_classifier=False, n_heads=6, n_kv_heads=3),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "persona: needs the trained persona files in persona/")


# ---------------------------------------------------------------------------- build


@pytest.fixture(scope="session")
def built() -> Path:
    """Runs `make` once; returns the repo root holding ./run and libarianna.so."""
    result = subprocess.run(["make", "-s", "all"], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"make failed:\n{result.stdout}\n{result.stderr}")
    return REPO


@pytest.fixture(scope="session")
def lib(built: Path):
    """The cffi handle on the freshly built library."""
    from arianna_c import _lib

    return _lib.load()


@pytest.fixture(scope="session")
def ffi(lib):
    from arianna_c._lib import ffi as the_ffi

    return the_ffi


@pytest.fixture(scope="session")
def run_binary(built: Path) -> Path:
    """./run, or the binary named by $ARIANNA_C_RUN (e.g. a sanitizer build)."""
    override = os.environ.get("ARIANNA_C_RUN")
    return Path(override).resolve() if override else built / "run"


# ---------------------------------------------------------------------------- tokenizers


def synthetic_tokenizer(vocab_size: int) -> tuple[list[bytes], list[float]]:
    """A SentencePiece-shaped vocabulary without training: <unk> <s> </s>, the 256 byte pieces,
    space, lowercase letters and a little punctuation (SentencePiece's ▁ is mapped to a space),
    then common English merges with decreasing scores, truncated/padded to vocab_size.
    Everything else (capitals, digits...) falls back to byte pieces."""
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)]
    singles = [bytes([c]) for c in b" abcdefghijklmnopqrstuvwxyz.,'"]
    merges = [b" t", b"th", b"he", b" the", b"in", b"er", b"an", b" a", b"re", b"on", b" s",
              b"ou", b"it", b"is", b"at", b"en", b"ed", b"nd", b"or", b"es", b" w", b"ar",
              b"al", b"le", b" c", b" o", b" i", b"ing", b" b", b"ro", b"st", b"de", b" m",
              b" th", b" in", b" and", b" of", b" to", b"ly", b"ion", b" is", b"ll", b"ce"]
    pieces += (singles + merges)[: max(0, vocab_size - len(pieces))]
    n = 0
    while len(pieces) < vocab_size:  # filler pieces nobody types
        pieces.append(b"~x%d" % n)
        n += 1
    pieces = pieces[:vocab_size]
    scores = [0.0] * min(259, vocab_size) + [-float(i) for i in range(vocab_size - 259)]
    return pieces, scores


def write_synthetic_tokenizer(path: Path, vocab_size: int) -> Path:
    formats.write_tokenizer(path, *synthetic_tokenizer(vocab_size))
    return path


TRAINING_TEXT = """Resonance is the quiet agreement of two things that vibrate together.
The river remembers every stone it has ever touched, and the stones remember the river.
In 1984 there were 12 lamps and 365 windows; on 2024-03-15 only 7 remained.
Café, naïve, résumé, façade, jalapeño, Ångström, über, crème brûlée, ça va?
東京の夜は静かです。 我喜欢读书。 한국어 문장입니다.
Emoji: 🙂 🚀 🌊 ✨ — quotes “like this” and ‘this’, (brackets) [and] {braces}!
\tTabs\tand  double  spaces   and    more.
Once upon a time, a small model learned to speak, slowly, word by word.
I wandered lonely as a cloud / That floats on high o'er vales and hills,
When all at once I saw a crowd, / A host, of golden daffodils;
What is 3.14159 times 2? About 6.28318 - give or take 0.00001%.
She said: "Hello, world!" and he answered: 'Goodbye, moon...'
"""


@dataclass
class SentencePieceTok:
    sp: object  # sentencepiece.SentencePieceProcessor
    model_file: Path
    bin_file: Path
    vocab_size: int


@pytest.fixture(scope="session")
def sp_tok(tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTok:
    """A tiny SentencePiece BPE model trained here with the project's settings, and its .bin
    tokenizer written by arianna_c.export."""
    import sentencepiece as spm

    from arianna_c.export import tokenizer_from_sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    model_file = folder / "tiny.model"
    lines = TRAINING_TEXT.splitlines() * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=450,
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, character_coverage=1.0,
        hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2,
    )
    model_file.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    bin_file = folder / "tiny.bin"
    tokenizer_from_sentencepiece(model_file, bin_file)  # the project's exporter
    return SentencePieceTok(sp, model_file, bin_file, sp.get_piece_size())


# ---------------------------------------------------------------------------- models


@dataclass
class ModelFiles:
    model: Path
    tokenizer: Path
    cfg: ModelConfig
    weights: dict


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(TINY, shared_classifier=True, version=1)
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., ModelFiles]:
    """Factory: make_model(seed=0, tokenizer_name="tokenizer.bin", folder=None, **cfg) writes
    a seeded random model (model.bin) and a matching synthetic tokenizer into a temp dir."""
    counter = [0]

    def make(seed: int = 0, tokenizer_name: Optional[str] = "tokenizer.bin",
             folder: Optional[Path] = None, weights: Optional[dict] = None, **overrides) -> ModelFiles:
        cfg = tiny_config(**overrides)
        if folder is None:
            counter[0] += 1
            folder = tmp_path / f"m{counter[0]}"
        folder.mkdir(parents=True, exist_ok=True)
        weights = weights if weights is not None else formats.random_weights(cfg, seed)
        model = folder / "model.bin"
        formats.write_model(model, cfg, weights)
        tok = folder / (tokenizer_name or "tokenizer.bin")
        if tokenizer_name:
            write_synthetic_tokenizer(tok, cfg.vocab_size)
        return ModelFiles(model, tok, cfg, weights)

    return make


@pytest.fixture(params=list(LAYOUTS), ids=list(LAYOUTS))
def layout_model(request, make_model) -> ModelFiles:
    """One random model per layout in LAYOUTS (parametrized)."""
    return make_model(seed=7, **LAYOUTS[request.param])


def scripted_weights(cfg: ModelConfig, script: list[int], seed: int = 0) -> dict:
    """Weights of a model that greedily follows script: after token script[i] it predicts
    script[i+1].  Every layer is zero, so the residual stream is just the token's embedding
    and the logits depend on the current token only; wcls row script[i+1] points along the
    embedding of script[i].  Tokens in script must be distinct (each has one successor)."""
    assert not cfg.shared_classifier and len(set(script)) == len(script)
    weights = {name: np.zeros(shape, np.float32) for name, shape in formats.weight_shapes(cfg).items()}
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((cfg.vocab_size, cfg.dim)).astype(np.float32)
    weights["token_embedding"] = emb
    for name in ("rms_att", "rms_ffn", "rms_final"):
        weights[name][...] = 1.0
    for a, b in zip(script, script[1:]):
        weights["wcls"][b] = 10.0 * emb[a] / np.linalg.norm(emb[a])
    return weights


def rounding_edge_cases(weights: dict) -> dict:
    """A copy of weights whose embedding starts with the groups int8 rounding can get wrong:
    halves (scale exactly 1, so w / scale lands on .5), an all-zero group, subnormals."""
    weights = {name: array.copy() for name, array in weights.items()}
    halves = np.arange(-16, 16, dtype=np.float32) + np.float32(0.5)
    halves[0] = np.float32(-127.0)
    rows = weights["token_embedding"].reshape(-1, 32)
    rows[0], rows[1], rows[2] = halves, 0.0, halves * np.float32(1e-42)
    return weights


@pytest.fixture
def scripted_model(make_model) -> Callable[..., ModelFiles]:
    """Factory: scripted_model(script) -> a v1 untied model that greedily emits script."""

    def make(script: list[int], **overrides) -> ModelFiles:
        cfg = tiny_config(shared_classifier=False, **overrides)
        return make_model(weights=scripted_weights(cfg, script), shared_classifier=False, **overrides)

    return make


def piece_id(text: bytes, vocab_size: int = TINY["vocab_size"]) -> int:
    """Id of a piece of the synthetic tokenizer."""
    return synthetic_tokenizer(vocab_size)[0].index(text)


def byte_id(b: int) -> int:
    return b + 3
