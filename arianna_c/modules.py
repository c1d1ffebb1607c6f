"""Knowledge modules: low-rank adapters for one base model, each in its own file.

A module adapts some matrices (wq wk wv wo w1 w2 w3) of some layers of a base model: applied at
scale s, a matrix W (out, in) becomes ``W + s * (alpha / rank) * B @ A`` with A (rank, in) and
B (out, rank).  The base file is never written: the C library merges modules into its own copy
of the weights at load (``ac_model_apply_modules``, ``./run -L``, ``Model(modules=...)``).

A module records the base it was trained on: the base's seven shape fields and its fingerprint,
BLAKE2b-256 of the whole base model file (header and weights), so a module for another base is
refused.  File layout (little-endian; ``src/module.c`` reads the same):

    0    4 bytes   magic b"aklm"
    4    int32     version 1
    8    int32     rank
    12   float32   alpha
    16   int32     dtype, 0 = float32
    20   7 int32   base dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
    48   int32     n_targets
    52   32 bytes  base fingerprint
    84   zeros up to byte 128
    128  n_targets x (int32 layer, int32 matrix index into MATRICES), strictly increasing
    then per target: A (rank, in) float32, then B (out, rank) float32

    python -m arianna_c.modules info MODULE.bin [--base BASE.bin]

NumPy is imported inside the functions that use it, as in :mod:`arianna_c.formats`.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from .formats import FormatError, ModelConfig, PathOrBytes, _load_bytes, weight_shapes

MAGIC = b"aklm"
VERSION = 1
HEADER_BYTES = 128
PAD_START = 84
MAX_RANK = 4096  # AC_MAX_MODULE_RANK
MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the matrix index of the target table
BASE_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
FINGERPRINT_BYTES = 32
_HEADER = struct.Struct("<4siifi7ii32s")


def fingerprint(source: PathOrBytes) -> bytes:
    """BLAKE2b-256 of a base model file's bytes: what a module records as its base."""
    digest = hashlib.blake2b(digest_size=FINGERPRINT_BYTES)
    if isinstance(source, (bytes, bytearray, memoryview)):
        digest.update(source)
        return digest.digest()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


def base_shape(cfg: ModelConfig) -> tuple[int, ...]:
    return tuple(getattr(cfg, name) for name in BASE_FIELDS)


def shape_config(shape: Sequence[int]) -> ModelConfig:
    """A float32 v1 ModelConfig with the seven shape fields (classifier sharing is irrelevant)."""
    return ModelConfig(*shape, shared_classifier=True, version=1)


def matrix_shape(cfg: ModelConfig, matrix: str) -> tuple[int, int]:
    """(out, in) of one layer's matrix."""
    return weight_shapes(cfg)[matrix][1:]


def file_order(target: tuple[int, str]) -> tuple[int, int]:
    """The sort key of a (layer, matrix) target: the order of a module's target table."""
    return target[0], MATRICES.index(target[1])


@dataclass
class Module:
    """A module in memory: adapters[(layer, matrix name)] = (A (rank, in), B (out, rank))."""

    rank: int
    alpha: float
    base: tuple[int, ...]  # the seven BASE_FIELDS of the base model
    base_fingerprint: bytes
    adapters: dict = field(default_factory=dict)

    @property
    def targets(self) -> list[tuple[int, str]]:
        """(layer, matrix) pairs in file order."""
        return sorted(self.adapters, key=file_order)

    @property
    def n_params(self) -> int:
        return sum(a.size + b.size for a, b in self.adapters.values())

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


# ---------------------------------------------------------------------------- writing


def module_bytes(module: Module) -> bytes:
    """The file contents of module (checked against its own rank and base shape)."""
    import numpy as np

    cfg = shape_config(module.base)
    if not 1 <= module.rank <= MAX_RANK:
        raise FormatError(f"rank {module.rank} must be in 1..{MAX_RANK}")
    if not (math.isfinite(module.alpha) and module.alpha > 0):
        raise FormatError(f"alpha {module.alpha} must be finite and > 0")
    if len(module.base_fingerprint) != FINGERPRINT_BYTES:
        raise FormatError(f"base_fingerprint must be {FINGERPRINT_BYTES} bytes")
    if not module.adapters:
        raise FormatError("a module needs at least one target")
    targets = module.targets
    header = _HEADER.pack(MAGIC, VERSION, module.rank, module.alpha, 0, *module.base, len(targets),
                          module.base_fingerprint)
    parts = [header + b"\0" * (HEADER_BYTES - len(header))]
    parts += [struct.pack("<ii", layer, MATRICES.index(matrix)) for layer, matrix in targets]
    for layer, matrix in targets:
        if not 0 <= layer < cfg.n_layers:
            raise FormatError(f"target layers.{layer}.{matrix}: the base has {cfg.n_layers} layers")
        out_dim, in_dim = matrix_shape(cfg, matrix)
        a, b = (np.ascontiguousarray(x, dtype="<f4") for x in module.adapters[(layer, matrix)])
        for name, array, shape in (("A", a, (module.rank, in_dim)), ("B", b, (out_dim, module.rank))):
            if array.shape != shape:
                raise FormatError(f"layers.{layer}.{matrix}.{name} has shape {array.shape}, expected {shape}")
            if not np.isfinite(array).all():
                raise FormatError(f"layers.{layer}.{matrix}.{name} holds non-finite values")
        parts += [a.tobytes(), b.tobytes()]
    return b"".join(parts)


def write_module(path: Union[str, os.PathLike], module: Module) -> Path:
    """Writes the module through path + ".tmp" renamed over path (a reader never sees half)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(module_bytes(module))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------- reading


def read_module(source: PathOrBytes) -> Module:
    """A module file's contents; FormatError naming the file and the field for a bad one."""
    import numpy as np

    data, name = _load_bytes(source)
    if len(data) < HEADER_BYTES:
        raise FormatError(f"{name}: file is {len(data)} bytes, shorter than a module header ({HEADER_BYTES})")
    magic, version, rank, alpha, dtype, *rest = _HEADER.unpack_from(data, 0)
    shape, n_targets, base_fp = tuple(rest[:7]), rest[7], rest[8]
    if magic != MAGIC:
        raise FormatError(f"{name}: magic is {magic!r}, not {MAGIC!r}: not a module file")
    if version != VERSION:
        raise FormatError(f"{name}: version is {version}, expected {VERSION}")
    if not 1 <= rank <= MAX_RANK:
        raise FormatError(f"{name}: rank is {rank}, must be in 1..{MAX_RANK}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise FormatError(f"{name}: alpha is {alpha}, must be finite and > 0")
    if dtype != 0:
        raise FormatError(f"{name}: dtype is {dtype}, expected 0 (float32)")
    for field_name, value in zip(BASE_FIELDS, shape):
        if value < 1:  # enough to size the file; apply compares the shape with the model's
            raise FormatError(f"{name}: base {field_name} is {value}, must be positive")
    cfg = shape_config(shape)
    if not 1 <= n_targets <= cfg.n_layers * len(MATRICES):
        raise FormatError(f"{name}: n_targets is {n_targets}, must be in 1..{cfg.n_layers * len(MATRICES)}")
    if any(bytes(data[PAD_START:HEADER_BYTES])):
        raise FormatError(f"{name}: header bytes {PAD_START}..{HEADER_BYTES - 1} must be zero")
    table_end = HEADER_BYTES + 8 * n_targets
    if len(data) < table_end:
        raise FormatError(f"{name}: file is {len(data)} bytes, too short for its {n_targets}-entry target table")
    table = np.frombuffer(data, dtype="<i4", count=2 * n_targets, offset=HEADER_BYTES).reshape(-1, 2)
    keys = []
    for i, (layer, index) in enumerate(table.tolist()):
        if not 0 <= layer < cfg.n_layers:
            raise FormatError(f"{name}: target {i}: layer is {layer}, must be in 0..{cfg.n_layers - 1}")
        if not 0 <= index < len(MATRICES):
            raise FormatError(f"{name}: target {i}: matrix is {index}, must be in 0..6 ({' '.join(MATRICES)})")
        if keys and (layer, index) <= keys[-1]:
            raise FormatError(f"{name}: target {i} (layers.{layer}.{MATRICES[index]}) is out of order or repeated")
        keys.append((layer, index))
    sizes = [rank * sum(matrix_shape(cfg, MATRICES[index])) for _, index in keys]
    expected = table_end + 4 * sum(sizes)
    if len(data) != expected:
        raise FormatError(f"{name}: file is {len(data)} bytes, its header implies {expected}")
    floats = np.frombuffer(data, dtype="<f4", offset=table_end)
    module = Module(rank, alpha, shape, bytes(base_fp))
    pos = 0
    for layer, index in keys:
        out_dim, in_dim = matrix_shape(cfg, MATRICES[index])
        a = floats[pos : pos + rank * in_dim].reshape(rank, in_dim)
        pos += a.size
        b = floats[pos : pos + out_dim * rank].reshape(out_dim, rank)
        pos += b.size
        for part, array in (("A", a), ("B", b)):
            if not np.isfinite(array).all():
                bad = int(np.flatnonzero(~np.isfinite(array))[0])
                raise FormatError(f"{name}: layers.{layer}.{MATRICES[index]}.{part}[{bad}] is "
                                  f"{array.flat[bad]}, not a finite number")
        module.adapters[(layer, MATRICES[index])] = (a, b)
    return module


# ---------------------------------------------------------------------------- applying


def check_float32(cfg: ModelConfig, name: str) -> None:
    """FormatError for an int8 model (as the C library refuses one): modules merge into float32
    weights only."""
    if cfg.group_size:
        raise FormatError(f"{name}: the model is int8 (group size {cfg.group_size}): modules apply to "
                          f"float32 weights, so apply them first and quantize the result")


def check_base(module: Module, cfg: ModelConfig, base_fp: bytes, name: str = "module") -> None:
    """FormatError unless module applies to the float32 base with shape cfg and fingerprint base_fp."""
    check_float32(cfg, name)
    for field_name, want in zip(BASE_FIELDS, module.base):
        have = getattr(cfg, field_name)
        if want != have:
            raise FormatError(f"{name}: the module's base has {field_name} {want}, the model has {have}")
    if module.base_fingerprint != base_fp:
        raise FormatError(f"{name}: base fingerprint {module.base_fingerprint.hex()[:16]}... is not the model's "
                          f"({base_fp.hex()[:16]}...): the module was trained on another base model file")


def merge(weights: dict, modules: Iterable[tuple[Module, float]]) -> dict:
    """New weights (formats.read_model's dict) with each (module, scale) merged in, as the C
    library merges them: W + sum of scale * alpha / rank * B @ A in float64 (the scale taken as
    the float32 the C API receives), rounded once to float32.  Modules at scale 0 are skipped,
    so they leave W bit for bit; FormatError for a merged weight that is not finite."""
    import numpy as np

    merged = {name: np.array(array, dtype=np.float32) for name, array in weights.items()}
    deltas: dict = {}
    for module, scale in modules:
        if scale == 0:
            continue
        coef = float(np.float32(scale)) * module.alpha / module.rank
        for key, (a, b) in module.adapters.items():
            delta = coef * (b.astype(np.float64) @ a.astype(np.float64))
            deltas[key] = deltas[key] + delta if key in deltas else delta
    for layer, matrix in sorted(deltas, key=file_order):  # the C library's order
        delta = deltas[(layer, matrix)]
        with np.errstate(over="ignore"):  # an overflow is refused just below, naming the weight
            merged[matrix][layer] = (weights[matrix][layer].astype(np.float64) + delta).astype(np.float32)
        check_finite(merged[matrix][layer], f"layers.{layer}.{matrix}")
    return merged


def check_finite(matrix, name: str) -> None:
    """FormatError naming the first weight of a merged matrix that is not finite, as the C
    library words it."""
    import numpy as np

    bad = np.argwhere(~np.isfinite(matrix))
    if len(bad):
        row, col = (int(i) for i in bad[0])
        raise FormatError(f"{name}[{row}][{col}] becomes {float(matrix[row, col]):g} with the modules at "
                          f"these scales")


# ---------------------------------------------------------------------------- inspection


def describe_targets(module: Module) -> str:
    """e.g. "wq,wk,wv,wo,w1,w2,w3 of layers 0-5" (one line per distinct set of layers)."""
    by_matrix: dict[str, list[int]] = {}
    for layer, matrix in module.targets:
        by_matrix.setdefault(matrix, []).append(layer)
    groups: dict[tuple[int, ...], list[str]] = {}
    for matrix in MATRICES:
        if matrix in by_matrix:
            groups.setdefault(tuple(by_matrix[matrix]), []).append(matrix)

    def span(layers: tuple[int, ...]) -> str:
        contiguous = list(layers) == list(range(layers[0], layers[-1] + 1))
        if contiguous and len(layers) > 1:
            return f"layers {layers[0]}-{layers[-1]}"
        return ("layer " if len(layers) == 1 else "layers ") + ",".join(map(str, layers))

    return "; ".join(f"{','.join(ms)} of {span(layers)}" for layers, ms in groups.items())


def describe(module: Module, name: str) -> str:
    base = " ".join(f"{f}={v}" for f, v in zip(BASE_FIELDS, module.base))
    return "\n".join([
        f"module {name}",
        f"  rank {module.rank}, alpha {module.alpha:g} (update scale alpha/rank = {module.scaling:g})",
        f"  targets: {describe_targets(module)} ({len(module.adapters)} matrices)",
        f"  parameters: {module.n_params:,} float32 ({4 * module.n_params / 1e6:.2f} MB)",
        f"  base: {base}",
        f"  base fingerprint: {module.base_fingerprint.hex()}",
    ])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arianna_c.modules",
                                     description="Inspect knowledge module files.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="rank, alpha, targets, size and base of a module")
    info.add_argument("module", help="module file (.bin)")
    info.add_argument("--base", help="model file: also say whether the module was trained on it")
    args = parser.parse_args(argv)
    try:
        module = read_module(args.module)
        print(describe(module, args.module))
        if args.base:
            from .formats import read_model

            cfg = read_model(args.base)[0]
            check_base(module, cfg, fingerprint(args.base), args.module)
            print(f"  matches {args.base}")
    except (FormatError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
