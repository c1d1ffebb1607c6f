"""Writes the seed corpora of the fuzz harnesses: `python3 fuzz/make_seeds.py DIR` creates
DIR/fuzz_model_load, DIR/fuzz_tokenizer_load and DIR/fuzz_encode holding small valid (and a
few nearly valid) inputs.

The models are tiny (dim 8) so that the model harness also runs their forward pass; int8
(v2) seeds are written by libarianna.so itself (`make` first).
"""

from __future__ import annotations

import struct
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arianna_c import formats  # noqa: E402
from arianna_c.formats import ModelConfig  # noqa: E402

TINY = dict(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=6, seq_len=4)
LAYOUTS = [
    ("v0-tied", dict(version=0, shared_classifier=True)),
    ("v0-untied", dict(version=0, shared_classifier=False)),
    ("v1-tied", dict(version=1, shared_classifier=True)),
    ("v1-untied-mha", dict(version=1, shared_classifier=False, n_kv_heads=2)),
    ("v1-2layers", dict(version=1, shared_classifier=True, n_layers=2, seq_len=3)),
]

TEXTS = [b"hello world", b"the thing in the east", "caf\u00e9 \u6771\u4eac \U0001F642".encode(),
         b"\xff\xfe\xc3(\xe2\x82\xed\xa0\x80", b"a\x00b\tc\n\nd", b"   spaces   ", b"<0x41>x abc"]


def int8_file(data: bytes, group_size: int) -> Optional[bytes]:
    """The int8 (v2) file of a float32 model, as the library writes it (None when
    libarianna.so is not built)."""
    try:
        from arianna_c._lib import ffi, load

        lib = load()
    except ImportError:
        return None
    src, q = ffi.new("ac_model **"), ffi.new("ac_model **")
    buf = ffi.from_buffer("char[]", data)
    try:
        if lib.ac_model_load_memory(buf, len(data), b"seed", src) or lib.ac_model_quantize(src[0], group_size, q):
            raise RuntimeError(ffi.string(lib.ac_last_error()).decode())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "v2.bin"
            if lib.ac_model_save(q[0], str(path).encode()):
                raise RuntimeError(ffi.string(lib.ac_last_error()).decode())
            return path.read_bytes()
    finally:
        lib.ac_model_free(q[0])
        lib.ac_model_free(src[0])


def model_seeds() -> dict[str, bytes]:
    seeds = {}
    for name, overrides in LAYOUTS:
        cfg = ModelConfig(**dict(TINY, **overrides))
        seeds[name] = formats.model_bytes(cfg, formats.random_weights(cfg, seed=1))
    for name in ("v1-tied", "v1-untied-mha"):
        for group_size in (4, 8):
            v2 = int8_file(seeds[name], group_size)
            if v2 is not None:
                seeds[f"{name}-int8-g{group_size}"] = v2
    data = bytearray(seeds["v1-tied"])
    data[4:8] = struct.pack("<i", 2)  # unknown version
    seeds["bad-version"] = bytes(data)
    seeds["truncated"] = seeds["v0-tied"][:-8]
    return seeds


def tokenizer_seeds() -> dict[str, bytes]:
    specials = [b"<unk>", b"<s>", b"</s>"]
    small = specials + [b"<0x41>", b"a", b"b", b"ab", b" ", b" a", "\u00e9".encode()]
    full = specials + [b"<0x%02X>" % b for b in range(256)] + [bytes([c]) for c in range(0x20, 0x7F)]
    full += [b" t", b"th", b"he", b" the", b"in", b"er"]
    return {
        "small": formats.tokenizer_bytes(small, [0.0] * 3 + [-float(i) for i in range(len(small) - 3)]),
        "full": formats.tokenizer_bytes(full, [0.0] * 259 + [-float(i) for i in range(len(full) - 259)]),
        "empty-pieces": formats.tokenizer_bytes([b"", b"", b"x"], [0.0, 1.5, -2.0]),
        "header-only": struct.pack("<i", 0),
    }


def encode_seeds() -> dict[str, bytes]:
    # first byte: bit 0 = full tokenizer, bit 1 = BOS, bit 2 = EOS
    return {f"text{i}-{flags}": bytes([flags]) + text for i, text in enumerate(TEXTS) for flags in (1, 6, 7)}


def main(out: Path) -> None:
    corpora = {"fuzz_model_load": model_seeds(), "fuzz_tokenizer_load": tokenizer_seeds(),
               "fuzz_encode": encode_seeds()}
    for corpus, seeds in corpora.items():
        folder = out / corpus
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 fuzz/make_seeds.py OUT_DIR")
    main(Path(sys.argv[1]))
