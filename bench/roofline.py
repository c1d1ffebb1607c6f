"""The roofline: build and run bench/roofline.c, and turn a model's shape into bytes and FLOPs
per token.

Decode (one token at a time) reads every weight once per token, so its ceiling is
``bandwidth / bytes_per_token``; the bandwidth is measured over a buffer of the weights' size
(float32: the model file's size; int8: about a quarter of it) because a 28.6 MB model sits in a
32 MiB L3 and an 8 MB one in a quarter of it, and the cache level decides the speed.
Prefill (a whole prompt as one matrix product) is compute bound: ``FMA peak / FLOPs_per_token``.
Batched decode reads the weights once per step for B tokens: ``B / max(bytes/bw, B*flops/peak)``.
The FMA peak is float32's: int8 products run on int8 dot-product instructions, whose peak is not
measured, so int8 prefill has no roofline and int8 batched decode only ``B / (bytes/bw)``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from arianna_c.formats import ModelConfig

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "roofline.c"



def _int8_group() -> int:
    """The runtime's default int8 group size (AC_DEFAULT_GROUP_SIZE in src/), else 64."""
    import re

    for header in sorted((HERE.parent / "src").glob("*.[hc]")):
        try:
            m = re.search(r"#define\s+AC_DEFAULT_GROUP_SIZE\s+(\d+)", header.read_text(errors="replace"))
        except OSError:
            continue
        if m:
            return int(m.group(1))
    return 64


# int8 layout for the bytes per token: 1 byte per weight plus one float32 scale per group of
# INT8_GROUP weights (the tied embedding/classifier too); norms and the KV cache stay float32.
INT8_GROUP = _int8_group()


def compile_c(source: Path, binary: Path, threads: bool = True, cc: Optional[str] = None) -> tuple[Optional[Path], str]:
    """Compiles one C file with the system C compiler (-O2, with -pthread for threads).
    Returns (binary or None, the flags used or why it failed)."""
    cc = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    flags = [cc, "-O2"] + (["-pthread"] if threads else [])
    cmd = flags + ["-o", str(binary), str(source)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{' '.join(cmd)}: {exc}"
    if r.returncode == 0:
        return binary, " ".join(flags)
    return None, f"{' '.join(cmd)}: {r.stderr.strip()[-400:]}"


def roofline_command(binary: Path, sizes: list[int], threads: list[int], ms: float) -> list[str]:
    cmd = [str(binary), "-m", f"{ms:g}", "-f"]
    for s in sizes:
        cmd += ["-b", str(int(s))]
    for t in threads:
        cmd += ["-t", str(int(t))]
    return cmd


def parse_roofline(stdout: str) -> dict:
    return json.loads(stdout)


# ---------------------------------------------------------------------------- model arithmetic


@dataclass(frozen=True)
class Shape:
    """The bytes and FLOPs per token of a model of cfg's shape (a formats.ModelConfig)."""

    cfg: ModelConfig

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Shape":
        return cls(cfg)

    @property
    def matmul_params(self) -> int:
        """Weights multiplied per token: attention + FFN of every layer, and the classifier."""
        c = self.cfg
        D, H, KV, L, V = c.dim, c.hidden_dim, c.kv_dim, c.n_layers, c.vocab_size
        return L * (2 * D * D + 2 * D * KV + 3 * D * H) + V * D

    @property
    def norm_params(self) -> int:
        return (2 * self.cfg.n_layers + 1) * self.cfg.dim

    def kv_bytes_read(self, pos: float) -> float:
        """float32 KV cache read (keys and values of every layer) by a token at position pos."""
        return 4.0 * self.cfg.n_layers * 2 * self.cfg.kv_dim * (pos + 1)

    def bytes_per_token(self, dtype: str, avg_pos: float) -> float:
        """Bytes one decode step reads: weights (+ int8 scales), norms, the token's embedding row
        (float32 in both), and the KV cache up to the average position."""
        if dtype == "int8":
            weights = self.matmul_params * (1.0 + 4.0 / INT8_GROUP)
        else:
            weights = 4.0 * self.matmul_params
        return weights + 4.0 * (self.norm_params + self.cfg.dim) + self.kv_bytes_read(avg_pos)

    def weight_bytes(self, dtype: str) -> float:
        return self.bytes_per_token(dtype, -1.0)

    def flops_per_token(self, avg_pos: float) -> float:
        """2 FLOP per multiply-add of the matrices, plus attention (q.k and att.v over pos+1
        positions in every layer); elementwise work (norms, RoPE, SiLU, softmax) left out."""
        return 2.0 * self.matmul_params + 4.0 * self.cfg.n_layers * self.cfg.dim * (avg_pos + 1)


def decode_roofline(shape: Shape, dtype: str, avg_pos: float, gbs: Optional[float]) -> Optional[float]:
    if not gbs:
        return None
    return gbs * 1e9 / shape.bytes_per_token(dtype, avg_pos)


def prefill_roofline(shape: Shape, avg_pos: float, gflops: Optional[float]) -> Optional[float]:
    if not gflops:
        return None
    return gflops * 1e9 / shape.flops_per_token(avg_pos)


def batch_roofline(shape: Shape, dtype: str, batch: int, avg_pos: float, gbs: Optional[float],
                   gflops: Optional[float]) -> Optional[float]:
    """Tokens per second of batch sequences: the weights read once per step, the KV cache once
    per sequence, and (with gflops; None for int8) batch tokens' FLOPs at the peak."""
    if not gbs:
        return None
    step_time = (shape.weight_bytes(dtype) + batch * shape.kv_bytes_read(avg_pos)) / (gbs * 1e9)
    if gflops:
        step_time = max(step_time, batch * shape.flops_per_token(avg_pos) / (gflops * 1e9))
    return batch / step_time


if __name__ == "__main__":  # handy: python -m bench.roofline [args for the binary]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        binary, note = compile_c(SOURCE, Path(d) / "roofline")
        if binary is None:
            sys.exit(note)
        args = sys.argv[1:] or ["-m", "200", "-b", "28600000", "-b", "8000000", "-t", "1", "-t", "2", "-f"]
        sys.exit(subprocess.call([str(binary), *args]))
