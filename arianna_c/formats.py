"""The on-disk layouts arianna_c reads and writes, in pure NumPy.

NumPy is imported inside the functions that use it: ``import arianna_c`` needs only ModelConfig
from here, and importing numpy would be most of its start-up time.

Model files are llama2.c's two float32 layouts:

* legacy v0: seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len),
  vocab_size negative when the classifier is NOT shared with the embedding; then the weights in
  v0 order, then two RoPE tables (seq_len x head_size/2 floats each) that readers skip, then the
  classifier when it is not shared.
* v1: uint32 magic 0x616b3432 ("ak42"), int32 version 1, the seven int32 params (vocab_size
  positive), one byte shared_classifier, zeros up to byte 256, then the weights in v1 order (the
  norms first) and the classifier when it is not shared.

Tokenizer files are llama2.c's layout: int32 max_token_length, then per piece float32 score,
int32 byte length and the bytes.

Weights travel as a dict of stacked arrays, matrices stored (out_features, in_features) as
PyTorch's nn.Linear holds them:

    token_embedding (V, D)   rms_att (L, D)   wq (L, D, D)   wk (L, KV, D)   wv (L, KV, D)
    wo (L, D, D)   rms_ffn (L, D)   w1 (L, H, D)   w2 (L, D, H)   w3 (L, H, D)   rms_final (D,)
    wcls (V, D) only when the classifier is not shared
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import numpy as np

MAGIC_V1 = 0x616B3432
V1_HEADER_BYTES = 256
V0_HEADER_BYTES = 7 * 4

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]


class FormatError(ValueError):
    """A file does not hold what its layout promises."""


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool = True
    version: int = 0

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def with_version(self, version: int) -> "ModelConfig":
        return replace(self, version=version)


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight array's shape, keyed by the names the module docstring lists."""
    L, D, H, KV, V = cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.kv_dim, cfg.vocab_size
    shapes = {
        "token_embedding": (V, D),
        "rms_att": (L, D),
        "wq": (L, D, D),
        "wk": (L, KV, D),
        "wv": (L, KV, D),
        "wo": (L, D, D),
        "rms_ffn": (L, D),
        "w1": (L, H, D),
        "w2": (L, D, H),
        "w3": (L, H, D),
        "rms_final": (D,),
    }
    if not cfg.shared_classifier:
        shapes["wcls"] = (V, D)
    return shapes


def _weight_order(cfg: ModelConfig) -> list[str]:
    """Order of the weight arrays after the header (the RoPE tables sit at "rope" in v0)."""
    if cfg.version == 0:
        order = ["token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn",
                 "w1", "w2", "w3", "rms_final", "rope"]
    elif cfg.version == 1:
        order = ["rms_att", "rms_ffn", "rms_final", "token_embedding",
                 "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    else:
        raise FormatError(f"unknown model file version {cfg.version} (known: 0, 1)")
    if not cfg.shared_classifier:
        order.append("wcls")
    return order


def rope_table_floats(cfg: ModelConfig) -> int:
    """Floats in the two RoPE tables a v0 file carries (skipped by every reader)."""
    return 2 * cfg.seq_len * (cfg.head_size // 2)


def expected_file_size(cfg: ModelConfig) -> int:
    shapes = weight_shapes(cfg)
    floats = sum(math.prod(shapes[name]) for name in _weight_order(cfg) if name != "rope")
    if cfg.version == 0:
        return V0_HEADER_BYTES + 4 * (floats + rope_table_floats(cfg))
    return V1_HEADER_BYTES + 4 * floats


def _rope_tables(cfg: ModelConfig) -> np.ndarray:
    import numpy as np

    half = cfg.head_size // 2
    freqs = 1.0 / (10000.0 ** (np.arange(0, cfg.head_size, 2, dtype=np.float32) / cfg.head_size))
    angles = np.outer(np.arange(cfg.seq_len, dtype=np.float32), freqs[:half])
    return np.concatenate([np.cos(angles).ravel(), np.sin(angles).ravel()]).astype(np.float32)


def encode_header(cfg: ModelConfig) -> bytes:
    params = [cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads]
    if cfg.version == 0:
        vocab = cfg.vocab_size if cfg.shared_classifier else -cfg.vocab_size
        return struct.pack("<7i", *params, vocab, cfg.seq_len)
    header = struct.pack("<Ii7iB", MAGIC_V1, 1, *params, cfg.vocab_size, cfg.seq_len,
                         int(cfg.shared_classifier))
    return header + b"\0" * (V1_HEADER_BYTES - len(header))


def model_bytes(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> bytes:
    """The complete file contents for cfg's layout (cfg.version picks v0 or v1)."""
    import numpy as np

    shapes = weight_shapes(cfg)
    parts = [encode_header(cfg)]
    for name in _weight_order(cfg):
        if name == "rope":
            parts.append(_rope_tables(cfg).tobytes())
            continue
        array = np.ascontiguousarray(weights[name], dtype="<f4")
        if array.shape != shapes[name]:
            raise FormatError(f"weight {name} has shape {array.shape}, expected {shapes[name]}")
        parts.append(array.tobytes())
    return b"".join(parts)


def write_model(path: Union[str, os.PathLike], cfg: ModelConfig, weights: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        f.write(model_bytes(cfg, weights))


def _load_bytes(source: PathOrBytes) -> tuple[memoryview, str]:
    import numpy as np

    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source), "<memory>"
    name = os.fspath(source)
    if os.path.getsize(name) == 0:
        return memoryview(b""), name
    return memoryview(np.memmap(name, dtype=np.uint8, mode="r")), name


def decode_header(data: memoryview, name: str = "<memory>") -> ModelConfig:
    if len(data) < V0_HEADER_BYTES:
        raise FormatError(f"{name}: {len(data)} bytes is shorter than a model header")
    (magic,) = struct.unpack_from("<I", data, 0)
    if magic == MAGIC_V1:
        if len(data) < V1_HEADER_BYTES:
            raise FormatError(f"{name}: {len(data)} bytes is shorter than a v1 header (256)")
        version, *params, shared = struct.unpack_from("<i7iB", data, 4)
        if version != 1:
            raise FormatError(f"{name}: unknown model file version {version} (known: 1)")
        return ModelConfig(*params, shared_classifier=bool(shared), version=1)
    params = list(struct.unpack_from("<7i", data, 0))
    shared = params[5] > 0
    params[5] = abs(params[5])
    return ModelConfig(*params, shared_classifier=shared, version=0)


def _check_config(cfg: ModelConfig, name: str) -> None:
    fields = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    for field in fields:
        if getattr(cfg, field) <= 0:
            raise FormatError(f"{name}: header field {field} is {getattr(cfg, field)}, must be positive")
    if cfg.dim % cfg.n_heads:
        raise FormatError(f"{name}: dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise FormatError(f"{name}: n_heads {cfg.n_heads} is not divisible by n_kv_heads {cfg.n_kv_heads}")
    if cfg.head_size % 2:
        raise FormatError(f"{name}: head size {cfg.head_size} is odd; RoPE needs pairs")


def read_model(source: PathOrBytes) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and weights of a v0 or v1 file; the arrays view the mapped file (no copy)."""
    import numpy as np

    data, name = _load_bytes(source)
    cfg = decode_header(data, name)
    _check_config(cfg, name)
    expected = expected_file_size(cfg)
    if len(data) != expected:
        raise FormatError(f"{name}: file is {len(data)} bytes, header implies {expected}")
    floats = np.frombuffer(data, dtype="<f4", offset=V0_HEADER_BYTES if cfg.version == 0 else V1_HEADER_BYTES)
    shapes = weight_shapes(cfg)
    weights, pos = {}, 0
    for key in _weight_order(cfg):
        if key == "rope":
            pos += rope_table_floats(cfg)
            continue
        count = math.prod(shapes[key])
        weights[key] = floats[pos : pos + count].reshape(shapes[key])
        pos += count
    return cfg, weights


def random_weights(cfg: ModelConfig, seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    """Seeded random weights of cfg's shapes; norms near 1 like a trained model's."""
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(cfg).items():
        if name.startswith("rms"):
            weights[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            weights[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return weights


# ---------------------------------------------------------------------------- tokenizer files


def tokenizer_bytes(pieces: list[bytes], scores: list[float]) -> bytes:
    if len(pieces) != len(scores):
        raise FormatError(f"{len(pieces)} pieces but {len(scores)} scores")
    max_len = max((len(p) for p in pieces), default=0)
    parts = [struct.pack("<i", max_len)]
    for piece, score in zip(pieces, scores):
        parts.append(struct.pack("<fi", score, len(piece)) + piece)
    return b"".join(parts)


def write_tokenizer(path: Union[str, os.PathLike], pieces: list[bytes], scores: list[float]) -> None:
    with open(path, "wb") as f:
        f.write(tokenizer_bytes(pieces, scores))


def read_tokenizer(source: PathOrBytes) -> tuple[list[bytes], list[float]]:
    """Pieces (raw bytes) and scores of a tokenizer file; errors name what is wrong."""
    data, name = _load_bytes(source)
    if len(data) < 4:
        raise FormatError(f"{name}: {len(data)} bytes is too short for a tokenizer header")
    (max_len,) = struct.unpack_from("<i", data, 0)
    pieces, scores, pos = [], [], 4
    while pos < len(data):
        if pos + 8 > len(data):
            raise FormatError(f"{name}: piece {len(pieces)} header runs past the end of the file")
        score, length = struct.unpack_from("<fi", data, pos)
        pos += 8
        if length < 0 or length > max_len or pos + length > len(data):
            raise FormatError(f"{name}: piece {len(pieces)} has bad length {length}")
        pieces.append(bytes(data[pos : pos + length]))
        scores.append(score)
        pos += length
    return pieces, scores
