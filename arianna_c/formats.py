"""The on-disk layouts arianna_c reads and writes, in pure NumPy.

NumPy is imported inside the functions that use it: ``import arianna_c`` needs only ModelConfig
from here, and importing numpy would be most of its start-up time.

Model files are llama2.c's two float32 layouts and its int8 one:

* legacy v0: seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len),
  vocab_size negative when the classifier is NOT shared with the embedding; then the weights in
  v0 order, then two RoPE tables (seq_len x head_size/2 floats each) that readers skip, then the
  classifier when it is not shared.
* v1: uint32 magic 0x616b3432 ("ak42"), int32 version 1, the seven int32 params (vocab_size
  positive), one byte shared_classifier, zeros up to byte 256, then the weights in v1 order (the
  norms first) and the classifier when it is not shared.
* v2 (int8, Q8_0): magic, int32 version 2, the seven int32 params, one byte shared_classifier,
  int32 group_size (at byte 37), zeros up to byte 256; then the float32 norms (rms_att,
  rms_ffn, rms_final); then each matrix as its int8 values followed by its float32 scales, one
  per group of group_size values along a row (scale = max|w| / 127, w ~ q * scale):
  token_embedding, then every layer's wq, then every layer's wk, ... w3, then wcls when not
  shared.

Tokenizer files are llama2.c's layout: int32 max_token_length, then per piece float32 score,
int32 byte length and the bytes.

Weights travel as a dict of stacked arrays, matrices stored (out_features, in_features) as
PyTorch's nn.Linear holds them:

    token_embedding (V, D)   rms_att (L, D)   wq (L, D, D)   wk (L, KV, D)   wv (L, KV, D)
    wo (L, D, D)   rms_ffn (L, D)   w1 (L, H, D)   w2 (L, D, H)   w3 (L, H, D)   rms_final (D,)
    wcls (V, D) only when the classifier is not shared

An int8 matrix travels as a :class:`Q8Tensor` (its int8 values and float32 scales); give
:func:`model_bytes` float32 arrays and it quantizes them, ask :func:`read_model` for
``dequantize=False`` and it returns them as stored.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple, Union

if TYPE_CHECKING:
    import numpy as np

MAGIC_V1 = 0x616B3432
V1_HEADER_BYTES = 256  # v1 and v2 headers
V0_HEADER_BYTES = 7 * 4
V2_GROUP_SIZE_OFFSET = 37  # int32 after the shared_classifier byte
ROPE_THETA = 10000.0
NORMS = ("rms_att", "rms_ffn", "rms_final")

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
    group_size: int = 0  # int8 (v2) files: values per scale; 0 = float32 weights

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
    elif cfg.version in (1, 2):
        order = [*NORMS, "token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    else:
        raise FormatError(f"unknown model file version {cfg.version} (known: 0, 1, 2)")
    if not cfg.shared_classifier:
        order.append("wcls")
    return order


def rope_table_floats(cfg: ModelConfig) -> int:
    """Floats in the two RoPE tables a v0 file carries (skipped by every reader)."""
    return 2 * cfg.seq_len * (cfg.head_size // 2)


def _stored_bytes(cfg: ModelConfig, name: str, count: int) -> int:
    """Bytes one weight array of count values takes in cfg's layout."""
    if cfg.version == 2 and name not in NORMS:
        return count + 4 * (count // cfg.group_size)
    return 4 * count


def expected_file_size(cfg: ModelConfig) -> int:
    shapes = weight_shapes(cfg)
    stored = sum(_stored_bytes(cfg, name, math.prod(shapes[name])) for name in _weight_order(cfg)
                 if name != "rope")
    if cfg.version == 0:
        return V0_HEADER_BYTES + stored + 4 * rope_table_floats(cfg)
    return V1_HEADER_BYTES + stored


def rope_tables(head_size: int, seq_len: int, dtype=None, theta: float = ROPE_THETA
                ) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every position's rotation angles, each (seq_len, head_size // 2).

    The pair (x[2i], x[2i+1]) of a head at position pos turns by pos * freq_i, freq_i =
    1 / theta^(2i / head_size).  float32 (the default) rounds as the C runtime does:
    ``freq = 1.0f / powf(theta, (float)(2i) / (float)hs)``, ``angle = (float)pos * freq`` in
    float32, cos/sin correctly rounded from float64 (what glibc's cosf/sinf return).
    float64 computes the same formula in float64 throughout.
    """
    import numpy as np

    dtype = np.dtype(np.float32 if dtype is None else dtype)
    i2 = np.arange(0, head_size, 2)
    if dtype == np.float32:
        exponent = i2.astype(np.float32) / np.float32(head_size)
        freq = np.float32(1.0) / (theta ** exponent.astype(np.float64)).astype(np.float32)
        angles = (np.arange(seq_len, dtype=np.float32)[:, None] * freq[None, :]).astype(np.float64)
    else:
        freq = 1.0 / (theta ** (i2 / head_size))
        angles = np.arange(seq_len, dtype=np.float64)[:, None] * freq[None, :]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def encode_header(cfg: ModelConfig) -> bytes:
    params = [cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads]
    if cfg.version == 0:
        vocab = cfg.vocab_size if cfg.shared_classifier else -cfg.vocab_size
        return struct.pack("<7i", *params, vocab, cfg.seq_len)
    if cfg.version not in (1, 2):
        raise FormatError(f"unknown model file version {cfg.version} (known: 0, 1, 2)")
    header = struct.pack("<Ii7iB", MAGIC_V1, cfg.version, *params, cfg.vocab_size, cfg.seq_len,
                         int(cfg.shared_classifier))
    if cfg.version == 2:
        header += struct.pack("<i", cfg.group_size)
    return header + b"\0" * (V1_HEADER_BYTES - len(header))


# ---------------------------------------------------------------------------- int8 weights


class Q8Tensor(NamedTuple):
    """An int8 matrix as a v2 file stores it: values q (..., n) and float32 scales
    (..., n // group_size), one per group of group_size consecutive values of a row."""

    values: np.ndarray
    scales: np.ndarray

    @property
    def group_size(self) -> int:
        return self.values.shape[-1] // self.scales.shape[-1]

    def dequantize(self) -> np.ndarray:
        """float32 weights q * scale."""
        import numpy as np

        groups = self.values.reshape(*self.scales.shape, -1).astype(np.float32)
        return (groups * self.scales[..., None]).reshape(self.values.shape)


def quantize_q8(weights: np.ndarray, group_size: int) -> Q8Tensor:
    """Q8_0 quantization of a float32 matrix (..., n) along its last axis: per group of
    group_size values, scale = max|w| / 127 and q = round(w / scale), halves to even, in
    float32; an all-zero group has scale 0 and q 0."""
    import numpy as np

    w = np.ascontiguousarray(weights, dtype=np.float32)
    if group_size <= 0 or w.shape[-1] % group_size:
        raise FormatError(f"group_size {group_size} does not divide rows of {w.shape[-1]} values")
    groups = w.reshape(*w.shape[:-1], -1, group_size)
    scales = np.abs(groups).max(axis=-1) / np.float32(127)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.round(groups / scales[..., None])
    q = np.nan_to_num(q, nan=0.0).astype(np.int8)  # 0 / 0 in an all-zero group
    return Q8Tensor(q.reshape(w.shape), scales.astype(np.float32))


def _matrix_bytes(name: str, value, shape: tuple[int, ...], group_size: int) -> bytes:
    """One v2 matrix (per layer: int8 values, then float32 scales) from floats or a Q8Tensor."""
    import numpy as np

    q8 = value if isinstance(value, Q8Tensor) else quantize_q8(value, group_size)
    if q8.values.shape != shape or q8.group_size != group_size:
        raise FormatError(f"weight {name} has shape {q8.values.shape} in groups of {q8.group_size}, "
                          f"expected {shape} in groups of {group_size}")
    values = np.ascontiguousarray(q8.values, dtype=np.int8)
    scales = np.ascontiguousarray(q8.scales, dtype="<f4")
    if len(shape) == 2:
        return values.tobytes() + scales.tobytes()
    return b"".join(values[l].tobytes() + scales[l].tobytes() for l in range(shape[0]))


def model_bytes(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> bytes:
    """The complete file contents for cfg's layout (cfg.version picks v0, v1 or v2; for v2,
    float32 matrices are quantized with cfg.group_size, Q8Tensor ones stored as they are)."""
    import numpy as np

    if cfg.version == 2:
        _check_group_size(cfg, "the model")
    shapes = weight_shapes(cfg)
    parts = [encode_header(cfg)]
    for name in _weight_order(cfg):
        if name == "rope":
            cos, sin = rope_tables(cfg.head_size, cfg.seq_len)
            parts.append(cos.tobytes() + sin.tobytes())
            continue
        if cfg.version == 2 and name not in NORMS:
            parts.append(_matrix_bytes(name, weights[name], shapes[name], cfg.group_size))
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
        if version not in (1, 2):
            raise FormatError(f"{name}: unknown model file version {version} (known: 1, 2)")
        group_size = struct.unpack_from("<i", data, V2_GROUP_SIZE_OFFSET)[0] if version == 2 else 0
        return ModelConfig(*params, shared_classifier=bool(shared), version=version, group_size=group_size)
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
    if cfg.version == 2:
        _check_group_size(cfg, name)


def _check_group_size(cfg: ModelConfig, name: str) -> None:
    gs = cfg.group_size
    if gs <= 0 or gs % 4:
        raise FormatError(f"{name}: header field group_size is {gs}, must be a positive multiple of 4")
    for field in ("dim", "hidden_dim"):
        if getattr(cfg, field) % gs:
            raise FormatError(f"{name}: group_size {gs} does not divide {field} {getattr(cfg, field)}")


def _read_q8(data: memoryview, pos: int, shape: tuple[int, ...], group_size: int) -> tuple[Q8Tensor, int]:
    """A v2 matrix (per layer: values, then scales) starting at byte pos; the arrays are copies
    (the per-layer interleaving cannot be viewed as one array)."""
    import numpy as np

    layers = shape[0] if len(shape) == 3 else 1
    rows_cols = shape[-2:]
    n = math.prod(rows_cols)
    values, scales = [], []
    for _ in range(layers):
        values.append(np.frombuffer(data, np.int8, n, pos).reshape(rows_cols))
        pos += n
        scales.append(np.frombuffer(data, "<f4", n // group_size, pos).reshape(rows_cols[0], -1))
        pos += 4 * (n // group_size)
    if len(shape) == 2:
        return Q8Tensor(values[0], scales[0]), pos
    return Q8Tensor(np.stack(values), np.stack(scales)), pos


def read_model(source: PathOrBytes, dequantize: bool = True) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and weights of a v0, v1 or v2 file.  Float32 arrays view the mapped file (no
    copy).  The int8 matrices of a v2 file come back as float32 q * scale, or as stored
    (Q8Tensor) with dequantize=False."""
    import numpy as np

    data, name = _load_bytes(source)
    cfg = decode_header(data, name)
    _check_config(cfg, name)
    expected = expected_file_size(cfg)
    if len(data) != expected:
        raise FormatError(f"{name}: file is {len(data)} bytes, header implies {expected}")
    shapes = weight_shapes(cfg)
    weights: dict = {}
    pos = V0_HEADER_BYTES if cfg.version == 0 else V1_HEADER_BYTES
    for key in _weight_order(cfg):
        if key == "rope":
            pos += 4 * rope_table_floats(cfg)
        elif cfg.version == 2 and key not in NORMS:
            q8, pos = _read_q8(data, pos, shapes[key], cfg.group_size)
            weights[key] = q8.dequantize() if dequantize else q8
        else:
            count = math.prod(shapes[key])
            weights[key] = np.frombuffer(data, "<f4", count, pos).reshape(shapes[key])
            pos += 4 * count
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
