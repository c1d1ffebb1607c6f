"""Writes a tiny seeded random model and its tokenizer for the sanitizer / valgrind checks:

    python3 tests/make_tiny_model.py DIR    ->  DIR/model.bin, DIR/tokenizer.bin

Same configuration and synthetic tokenizer as the test suite's fixtures (tests/conftest.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_config, write_synthetic_tokenizer  # noqa: E402

from arianna_c import formats  # noqa: E402


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config()
    formats.write_model(folder / "model.bin", cfg, formats.random_weights(cfg, seed=0))
    write_synthetic_tokenizer(folder / "tokenizer.bin", cfg.vocab_size)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 tests/make_tiny_model.py DIR")
    main(Path(sys.argv[1]))
