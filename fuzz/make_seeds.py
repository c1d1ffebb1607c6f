"""Writes the seed corpora of the fuzz harnesses: `python3 fuzz/make_seeds.py DIR` creates
DIR/fuzz_model_load, DIR/fuzz_tokenizer_load, DIR/fuzz_encode, DIR/fuzz_generate and
DIR/fuzz_module_load holding small valid (and a few nearly valid) inputs.

The models are tiny (dim 8) so that the model harness also runs their forward pass; int8
(v2) seeds are written by libarianna.so itself (`make` first).  The modules have the shape of
fuzz_module_load's built-in base (the harness writes that base's fingerprint into a copy of
each input, so a module with any fingerprint reaches the merge).
"""

from __future__ import annotations

import struct
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from arianna_c import formats, modules  # noqa: E402
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


def generate_input(prompts: list[bytes], *, model: int = 0, threads: int = 1, ignore_eos: bool = False,
                   by_hand: bool = False, null_tokens: bool = False, max_new: int = 8, temp: int = 0,
                   stop: int = 0, top_p: int = 0, top_k: tuple[int, int] = (0, 0), seed: int = 1,
                   sep: bytes = b"|", logit_bytes: int = 0) -> bytes:
    """One fuzz_generate input: the 12 settings bytes its header comment describes (temp and
    top_p index its tables; stop 12..15 stops the callback; top_k is bytes 4 and 5), then the
    prompts joined by the separator."""
    assert 1 <= len(prompts) <= 4 and all(sep not in p for p in prompts[:-1])
    b0 = (len(prompts) - 1) | (threads - 1) << 2 | ignore_eos << 3 | model << 4 | by_hand << 6 | null_tokens << 7
    b1 = max_new if max_new >= 0 else 245 - max_new
    header = bytes([b0, b1, temp | stop << 4, top_p, *top_k]) + struct.pack("<I", seed)
    header += sep + bytes([logit_bytes])
    return header + sep.join(prompts)


def generate_seeds() -> dict[str, bytes]:
    t = TEXTS
    seeds = {}
    for model in range(4):  # 0 v1 float32, 1 its int8 g16, 2 v0 seq_len 72, 3 its int8 g32
        m = f"m{model}"
        seeds[f"{m}-greedy"] = generate_input([t[0]], model=model, max_new=16)
        seeds[f"{m}-greedy-batch4-ignore-eos"] = generate_input(t[:4], model=model, ignore_eos=True, max_new=40)
        seeds[f"{m}-sample-top-p"] = generate_input([t[1], t[5]], model=model, temp=8, top_p=3, max_new=20, seed=7)
        seeds[f"{m}-sample-top-k-by-hand"] = generate_input([t[2]], model=model, temp=7, top_k=(0x60, 5),
                                                            by_hand=True, max_new=30, threads=2)
    # 69 tokens with BOS: two prefill blocks (64 + 5 rows) in the seq_len 72 model, 3 positions left
    seeds["long-prompt"] = generate_input([b"0123456789" * 6 + b"0123456"], model=2, max_new=5, by_hand=True)
    # 24 tokens with BOS (dummy-prefix space + 22 digits): exactly model 0's seq_len, no room left
    seeds["prompt-fills-context"] = generate_input([b"0" * 22, b"ab"], max_new=5, by_hand=True)
    # 12 + 2 tokens, then the 11-token continuation needs 25 positions: refused by one
    seeds["continuation-one-too-many"] = generate_input([b"0123456789"], max_new=2, ignore_eos=True,
                                                        by_hand=True)
    seeds["too-long-prompt"] = generate_input([b"x" * 30, b"ok"], max_new=5)
    seeds["stop-callback"] = generate_input([t[6], t[0]], temp=10, stop=13, max_new=12)
    seeds["top-k-around-vocab"] = generate_input([t[4]], temp=8, top_k=(0xA0, 3), top_p=6, max_new=10)
    seeds["huge-temperature"] = generate_input([t[3]], temp=12, max_new=10, ignore_eos=True)
    seeds["tiny-temperature"] = generate_input([t[0]], temp=4, max_new=10)
    seeds["seed-wraps"] = generate_input([b"a", b"b", b"c", b"d"], temp=8, seed=0xFF000002, max_new=6)
    seeds["max-new-0-null-tokens"] = generate_input([b"ab", b""], max_new=0, null_tokens=True)
    seeds["odd-logits"] = generate_input([b"\xff\xfe\x80\xfd\x00\xfc\xfb" * 3], temp=8, top_k=(0x60, 1),
                                         logit_bytes=21, max_new=2)
    seeds["top-k-2-on-logits"] = generate_input([b"ponmlkjihgfedcba"], temp=8, top_k=(0x60, 1), logit_bytes=16,
                                                max_new=4)
    seeds["top-p-on-logits"] = generate_input([bytes(range(0x7A, 0x60, -1))], temp=10, top_p=4, logit_bytes=26,
                                              max_new=4)
    seeds["nan-temperature"] = generate_input([t[0]], temp=13)
    seeds["negative-top-k"] = generate_input([t[0]], top_k=(0xE0, 1))
    seeds["top-p-zero"] = generate_input([t[0]], top_p=9)
    seeds["negative-max-new"] = generate_input([t[0]], max_new=-1)
    seeds["empty"] = b""
    return seeds


# fuzz_module_load's base: dim 8, hidden 16, 2 layers, 2 heads, 1 kv head, vocab 6, seq_len 4
MODULE_BASE = ModelConfig(dim=8, hidden_dim=16, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=6, seq_len=4)


def module_file(rank: int, targets: list[tuple[int, str]], cfg: ModelConfig = MODULE_BASE, scale: float = 0.1,
                alpha: float = 2.0, seed: int = 1) -> bytes:
    """A module for a base of cfg's shape (fingerprint: zeros) with random A and B."""
    rng = np.random.default_rng(seed)
    module = modules.Module(rank, alpha, modules.base_shape(cfg), bytes(modules.FINGERPRINT_BYTES))
    for layer, matrix in targets:
        out_dim, in_dim = modules.matrix_shape(cfg, matrix)
        module.adapters[(layer, matrix)] = ((scale * rng.standard_normal((rank, in_dim))).astype(np.float32),
                                            (scale * rng.standard_normal((out_dim, rank))).astype(np.float32))
    return modules.module_bytes(module)


def module_seeds() -> dict[str, bytes]:
    every = [(layer, m) for layer in range(MODULE_BASE.n_layers) for m in modules.MATRICES]
    seeds = {
        "rank1-all-targets": module_file(1, every),
        "rank3-wq-w2": module_file(3, [(0, "wq"), (1, "wq"), (1, "w2")], alpha=6.0),
        "rank2-attention-layer1": module_file(2, [(1, m) for m in ("wq", "wk", "wv", "wo")], seed=2),
        "rank8-ffn-layer0": module_file(8, [(0, m) for m in ("w1", "w2", "w3")], alpha=16.0, seed=3),
        "overflowing-merge": module_file(1, [(0, "w2")], scale=1e20),  # B A passes float32's range
        "another-base": module_file(2, [(0, "wq")], cfg=ModelConfig(dim=16, hidden_dim=32, n_layers=1, n_heads=2,
                                                                     n_kv_heads=2, vocab_size=6, seq_len=4)),
    }
    valid = seeds["rank3-wq-w2"]
    seeds["truncated"] = valid[:-4]
    seeds["header-only"] = valid[:modules.HEADER_BYTES]
    seeds["version-2"] = valid[:4] + struct.pack("<i", 2) + valid[8:]
    nan_at = modules.HEADER_BYTES + 8 * 3  # the first float of A of the first target
    seeds["nan-in-A"] = valid[:nan_at] + struct.pack("<f", float("nan")) + valid[nan_at + 4:]
    return seeds


def main(out: Path) -> None:
    corpora = {"fuzz_model_load": model_seeds(), "fuzz_tokenizer_load": tokenizer_seeds(),
               "fuzz_encode": encode_seeds(), "fuzz_generate": generate_seeds(),
               "fuzz_module_load": module_seeds()}
    for corpus, seeds in corpora.items():
        folder = out / corpus
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 fuzz/make_seeds.py OUT_DIR")
    main(Path(sys.argv[1]))
