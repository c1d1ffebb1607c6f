"""Writes the persona golden logits: ``python -m tests.make_golden [--model persona/arianna_v1_base.bin]``.

Run it from the repository root once the shipped persona model exists (and again only when the
persona is deliberately retrained).  It writes

* ``tests/golden/persona_logits.npy``: float32 (3 prompts, last 4 positions, vocab) logits,
  computed by the NumPy reference in float64 (independent of the C library), and
* ``tests/golden/persona_prompts.json``: the prompts, their token ids (SentencePiece, BOS
  first), the model file's sha256 and shape,

which ``tests/test_persona_golden.py`` checks the C library and the NumPy reference against.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GOLDEN_DIR = REPO / "tests" / "golden"
LOGITS_FILE = GOLDEN_DIR / "persona_logits.npy"
PROMPTS_FILE = GOLDEN_DIR / "persona_prompts.json"
PERSONA_MODEL = REPO / "persona" / "arianna_v1_base.bin"
PERSONA_TOKENIZER_MODEL = REPO / "persona" / "tok4096.model"
PROMPTS = [
    "Resonance is",
    "I am Arianna, and I",
    "The river remembers\nevery stone — café, 共鳴 🙂",
]
LAST_POSITIONS = 4


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def persona_tokenizer(scratch: Path) -> Path:
    """persona/tok4096.bin, or when it is missing the same file exported from
    persona/tok4096.model into the folder scratch."""
    tok = REPO / "persona" / "tok4096.bin"
    if tok.is_file():
        return tok
    from arianna_c.export import tokenizer_from_sentencepiece

    return tokenizer_from_sentencepiece(PERSONA_TOKENIZER_MODEL, scratch / "tok4096.bin")


def prompt_tokens(sp_model: Path = PERSONA_TOKENIZER_MODEL) -> list[list[int]]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    return [[1] + sp.encode(p) for p in PROMPTS]


def golden_logits(model_path: Path, tokens: list[list[int]]) -> np.ndarray:
    """(prompts, LAST_POSITIONS, vocab) float32 from the float64 NumPy reference."""
    from arianna_c.reference import Reference

    ref = Reference(model_path, dtype=np.float64)
    rows = []
    for toks in tokens:
        if len(toks) < LAST_POSITIONS:
            raise ValueError(f"prompt {toks} is shorter than {LAST_POSITIONS} tokens")
        rows.append(ref.logits(toks)[-LAST_POSITIONS:])
    return np.stack(rows).astype(np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.make_golden", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(PERSONA_MODEL))
    args = parser.parse_args(argv)
    model = Path(args.model)
    if not model.is_file():
        print(f"error: {model} does not exist (train and export the persona first)", file=sys.stderr)
        return 1
    from arianna_c.formats import read_model

    cfg = read_model(model)[0]
    tokens = prompt_tokens()
    logits = golden_logits(model, tokens)
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    np.save(LOGITS_FILE, logits)
    meta = {
        "model": str(model.resolve().relative_to(REPO)) if model.resolve().is_relative_to(REPO) else str(model),
        "model_sha256": sha256(model),
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "last_positions": LAST_POSITIONS,
        "prompts": PROMPTS,
        "tokens": tokens,
        "generated_by": "NumPy reference, float64, rounded to float32",
    }
    PROMPTS_FILE.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {LOGITS_FILE.relative_to(REPO)} {logits.shape} and {PROMPTS_FILE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
