"""The NumPy reference implementation of arianna_c: forward pass, tokenizer, sampler, generation.

Everything here follows the C runtime (``src/forward.c``, ``src/sampler.c``, ``src/tokenizer.c``)
operation for operation, in plain NumPy:

* RMSNorm ``x * (1 / sqrt(mean(x^2) + 1e-5)) * w``; RoPE on interleaved pairs ``(x[2i], x[2i+1])``
  of each head with ``freq_i = 1 / 10000^(2i / head_size)`` and ``angle = pos * freq_i`` in
  float32; grouped-query attention (query head ``h`` reads kv head ``h // (n_heads // n_kv_heads)``)
  with scores divided by ``sqrt(head_size)``; SwiGLU ``w2(silu(w1 x) * w3 x)``; final RMSNorm;
  logits ``wcls @ x`` (``wcls`` is the token embedding when the classifier is shared).
* Two forward paths that must agree: :meth:`Reference.step` (one token at a time through a
  preallocated KV cache, as the C library runs) and :meth:`Reference.logits` (the whole sequence
  at once, matrix form with a causal mask).
* The sampler is the C one: temperature 0 = greedy argmax; otherwise softmax(logits / T), then
  top-k, then top-p (smallest prefix of the sorted candidates whose mass exceeds p), picked with
  a seeded xorshift64* coin.  Greedy agrees with C exactly; seeded sampling uses the same coin
  sequence, so it agrees too unless a float32 ulp moves a cumulative sum across the coin.
* Decoding accumulates the bytes of every token (byte-fallback pieces ``<0xNN>`` become raw
  bytes) and UTF-8 decodes them together, so a character split over byte pieces comes out
  whole; :class:`StreamDecoder` emits only complete characters.

Encoding: with a SentencePiece ``.model`` (passed explicitly, or found next to the tokenizer
``.bin`` with the same stem) the ``sentencepiece`` package encodes; otherwise a pure-Python
SentencePiece-style BPE over the tokenizer ``.bin`` does (identity normalization, dummy prefix,
spaces as U+2581, highest-score merge first with ties to the left, byte fallback), which gives
the same ids for byte-fallback BPE models like the persona tokenizer.

Command line: ``python -m arianna_c.reference MODEL -i "Resonance is"`` (the tokenizer is
looked up as ./run does, and the settings default to the C library's, so the same seed gives
./run's text).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import heapq
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from .formats import FormatError, ModelConfig, read_model, read_tokenizer, rope_tables, weight_shapes

BOS, EOS = 1, 2
NORM_EPS = 1e-5
DEFAULT_SEED = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_CONFIG_KEY = "__config__"
SPACE_MARK = "\u2581"

PathLike = Union[str, os.PathLike]


# ============================================================================ weights


def load_weights(path: PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and weights of a model ``.bin`` or a ``.npz`` written by :func:`save_npz`.  The int8
    matrices of a v2 ``.bin`` come back dequantized (q * scale, float32)."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as npz:
            if _CONFIG_KEY not in npz.files:
                raise FormatError(f"{path}: no {_CONFIG_KEY} entry; not an arianna_c .npz export")
            cfg = ModelConfig(**json.loads(str(npz[_CONFIG_KEY])))
            weights = {name: np.asarray(npz[name]) for name in npz.files if name != _CONFIG_KEY}
        shapes = weight_shapes(cfg)
        if set(weights) != set(shapes):
            raise FormatError(f"{path}: holds {sorted(weights)}, expected {sorted(shapes)}")
        for name, shape in shapes.items():
            if weights[name].shape != shape:
                raise FormatError(f"{path}: {name} has shape {weights[name].shape}, expected {shape}")
        return cfg, weights
    return read_model(path)


def save_npz(path: PathLike, cfg: ModelConfig, weights: dict[str, np.ndarray]) -> None:
    """Weights (float32, the names of :mod:`arianna_c.formats`) plus the config as JSON text."""
    shapes = weight_shapes(cfg)
    arrays = {name: np.ascontiguousarray(weights[name], dtype=np.float32) for name in shapes}
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            raise FormatError(f"weight {name} has shape {arrays[name].shape}, expected {shape}")
    fields = {k: getattr(cfg, k) for k in ModelConfig.__dataclass_fields__}
    arrays[_CONFIG_KEY] = np.array(json.dumps(fields))
    with open(path, "wb") as f:  # a file object: np.savez must not append ".npz" to the name
        np.savez(f, **arrays)


# ============================================================================ forward pass


_HUGE_PAGE = 2 << 20


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized C-contiguous array that starts on a 2 MiB boundary.

    NumPy asks Linux for transparent huge pages on allocations of 4 MiB and more; aligned, the
    whole array can get them.  Decoding streams every weight from memory once per token, and
    with huge pages it misses the TLB far less (about 5-10% faster on the persona model).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _HUGE_PAGE, dtype=np.uint8)
    offset = -raw.ctypes.data % _HUGE_PAGE
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


class Reference:
    """A model in NumPy: ``step`` (KV cache), ``logits`` (full sequence), ``generate``.

    ``source`` is a path (``.bin`` v0/v1 or ``.npz``) or a ``(ModelConfig, weights)`` pair.
    ``dtype`` is np.float32 (default, what the C library computes in) or np.float64.
    """

    def __init__(self, source, dtype=np.float32):
        if isinstance(source, tuple):
            cfg, weights = source
        else:
            cfg, weights = load_weights(source)
        self.config: ModelConfig = cfg
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, not {self.dtype}")
        c = cfg
        dt = self.dtype
        as_dt = lambda a: np.ascontiguousarray(a, dtype=dt)  # noqa: E731
        self.emb = as_dt(weights["token_embedding"])          # (vocab, D): row t is token t
        self.rms_att = as_dt(weights["rms_att"])
        self.rms_ffn = as_dt(weights["rms_ffn"])
        self.rms_final = as_dt(weights["rms_final"])
        # Matrix layouts.  Decoding one token multiplies each matrix by one vector, which
        # streams the matrix from memory once: the layouts are the ones OpenBLAS's gemv reads
        # fastest (measured on the persona model).  Matrices whose input is dim wide are stored
        # transposed, (in, out), and applied as ``x @ w`` (gemv's column kernel); w2, whose
        # input is hidden_dim wide, keeps the file's (out, in) and is applied as ``w2 @ h``
        # (row dot products).  q, k and v share their input, so one (D, D + 2 KV) matrix per
        # layer gives all three; w1 and w3 likewise, (D, 2 H).  Every output element is still
        # its own dot product of the same numbers.
        t = lambda a: np.swapaxes(a, -1, -2)  # noqa: E731  (out, in) -> (in, out)
        per_layer = {
            "wqkv": t(np.concatenate([weights["wq"], weights["wk"], weights["wv"]], axis=1)),
            "wo": t(weights["wo"]),                                            # (L, D, D)
            "w13": t(np.concatenate([weights["w1"], weights["w3"]], axis=1)),  # (L, D, 2 H)
            "w2": weights["w2"],                                               # (L, D, H)
        }
        wcls = t(weights["token_embedding"] if c.shared_classifier else weights["wcls"])  # (D, V)
        # All matrices share one huge-page-aligned buffer (see _aligned_empty), in the order a
        # step reads them: layer 0's wqkv, wo, w13, w2, then layer 1's, ..., then wcls.
        L = c.n_layers
        block = sum(a[0].size for a in per_layer.values())      # one layer's matrices
        buf = _aligned_empty((L * block + wcls.size,), dt)
        layers = buf[: L * block].reshape(L, block)
        start = 0
        for name, a in per_layer.items():
            view = layers[:, start : start + a[0].size].reshape(a.shape)
            view[...] = a
            setattr(self, name, view)
            start += a[0].size
        self.wcls = buf[L * block :].reshape(wcls.shape)
        self.wcls[...] = wcls
        hs = c.head_size
        self.kv_mul = c.n_heads // c.n_kv_heads
        self.scale = dt.type(np.sqrt(dt.type(hs)))
        cos, sin = rope_tables(hs, c.seq_len, dt)
        # RoPE rotates the pairs (a, b) = (x[2i], x[2i+1]) of each head: (a c - b s, a s + b c)
        # = (a, b) * (c, c) + (b, a) * (-s, s), with no rounding difference (negation is exact).
        # Tables (seq_len, hs) of (c, c) and (-s, s) per pair; _pair_swap turns a row of heads
        # (a, b, ...) into (b, a, ...) (one gather: pairs never straddle heads, hs is even).
        self.rope_cos = np.repeat(cos, 2, axis=1)
        self.rope_sin = np.stack([-sin, sin], axis=-1).reshape(c.seq_len, hs)
        self._pair_swap = np.arange(c.dim + c.kv_dim) ^ 1
        self.eps = dt.type(NORM_EPS)
        self.dt1 = dt.type(1.0)
        self._dim = dt.type(c.dim)
        # KV cache: (layers, kv heads, positions, head_size), so each head's keys are contiguous
        kv = _aligned_empty((2, L, c.n_kv_heads, c.seq_len, hs), dt)
        kv[...] = 0
        self.key_cache, self.value_cache = kv
        # each layer's weights and cache, unpacked once instead of indexed on every step
        self._layers = list(zip(self.rms_att, self.wqkv, self.wo, self.rms_ffn, self.w13, self.w2,
                                self.key_cache, self.value_cache))

    # ------------------------------------------------------------------ pieces of the math
    def _rmsnorm(self, x: np.ndarray, w: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """x * (1 / sqrt(mean(x^2) + eps)) * w, rounded in that order (into out if given)."""
        if x.ndim == 1:  # the decoding step: one BLAS dot beats a ufunc reduction
            ms = (x @ x) / self._dim + self.eps
        else:
            ms = np.mean(x * x, axis=-1, keepdims=True) + self.eps
        out = np.multiply(x, self.dt1 / np.sqrt(ms), out=out)
        out *= w
        return out

    def _rope(self, qk: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """q and k (..., n_heads + n_kv_heads, head_size), each head's pairs rotated; cos/sin are
        rows of rope_cos/rope_sin broadcastable to them."""
        swapped = qk.reshape(*qk.shape[:-2], -1).take(self._pair_swap, axis=-1)   # (b, a) pairs
        swapped = swapped.reshape(qk.shape)
        swapped *= sin
        out = qk * cos
        out += swapped
        return out

    def _silu_gate(self, h: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """silu(w1 x) * w3 x = g * (1 / (1 + exp(-g))) * u from h = (g, u) = (w1 x, w3 x), rounded
        in that order (into out if given).  For g << 0, exp(-g) overflows to inf and silu(g)
        becomes 0, as in C: callers run this under ``np.errstate(over="ignore")``."""
        H = self.config.hidden_dim
        g, u = h[..., :H], h[..., H:]
        out = np.negative(g, out=out)
        np.exp(out, out=out)
        out += self.dt1
        np.divide(self.dt1, out, out=out)     # sigmoid(g)
        out *= g
        out *= u
        return out

    def _check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        V = self.config.vocab_size
        if toks.size and (toks.min() < 0 or toks.max() >= V):
            bad = int(toks[(toks < 0) | (toks >= V)][0])
            raise ValueError(f"token {bad} is outside the vocabulary [0, {V})")
        return toks

    # ------------------------------------------------------------------ KV-cache path
    def step(self, token: int, pos: int) -> np.ndarray:
        """Logits (vocab_size,) after running token at position pos through the KV cache.

        Positions 0..pos-1 must have been run before (as with the C ``ac_forward``).
        """
        c = self.config
        if not 0 <= token < c.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary [0, {c.vocab_size})")
        if not 0 <= pos < c.seq_len:
            raise ValueError(f"position {pos} is outside the context [0, {c.seq_len})")
        D, KV, hs, H, nkv = c.dim, c.kv_dim, c.head_size, c.n_heads, c.n_kv_heads
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        T = pos + 1
        # Scratch vectors, reused by every layer (in-place NumPy ops round exactly as the
        # expressions they stand for; fewer fresh arrays keep a step's memory small).
        xb, hb, y = np.empty(D, self.dtype), np.empty(c.hidden_dim, self.dtype), np.empty(D, self.dtype)
        x = self.emb[token].copy()                          # the residual stream
        with np.errstate(over="ignore"):                    # silu's exp: see _silu_gate
            for rms_att, wqkv, wo, rms_ffn, w13, w2, key_cache, value_cache in self._layers:
                # attention: q, k, v of every head in one product, RoPE on q and k together
                self._rmsnorm(x, rms_att, out=xb)
                qkv = xb @ wqkv                                            # (D + 2 KV,)
                qk = self._rope(qkv[: D + KV].reshape(H + nkv, hs), cos, sin)
                key_cache[:, pos] = qk[H:]                  # this position's k and v
                value_cache[:, pos] = qkv[D + KV :].reshape(nkv, hs)
                # scores of every query head against positions 0..pos of its kv head, query
                # heads grouped by kv head: (nkv, kv_mul, T); / sqrt(head_size); softmax
                qg = qk[:H].reshape(nkv, self.kv_mul, hs)
                att = np.matmul(qg, key_cache[:, :T].transpose(0, 2, 1))
                att /= self.scale
                att -= np.maximum.reduce(att, axis=-1, keepdims=True)
                np.exp(att, out=att)
                att /= np.add.reduce(att, axis=-1, keepdims=True)
                out = np.matmul(att, value_cache[:, :T])   # (nkv, kv_mul, hs): heads in order
                x += np.matmul(out.reshape(D), wo, out=y)
                # feed-forward: SwiGLU
                self._rmsnorm(x, rms_ffn, out=xb)
                x += np.matmul(w2, self._silu_gate(xb @ w13, out=hb), out=y)
        x = self._rmsnorm(x, self.rms_final, out=xb)
        return x @ self.wcls

    def logits_cached(self, tokens: Sequence[int]) -> np.ndarray:
        """(len, vocab) logits of every position, one ``step`` at a time from position 0."""
        toks = self._check_tokens(tokens)
        if len(toks) > self.config.seq_len:
            raise ValueError(f"{len(toks)} tokens exceed the model's seq_len {self.config.seq_len}")
        out = np.empty((len(toks), self.config.vocab_size), dtype=self.dtype)
        for pos, tok in enumerate(toks):
            out[pos] = self.step(int(tok), pos)
        return out

    # ------------------------------------------------------------------ full-sequence path
    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """(len, vocab) logits of every position, the whole sequence at once (causal mask).

        Independent of the KV cache (which it leaves untouched).
        """
        c = self.config
        toks = self._check_tokens(tokens)
        T = len(toks)
        if T > c.seq_len:
            raise ValueError(f"{T} tokens exceed the model's seq_len {c.seq_len}")
        if T == 0:
            return np.zeros((0, c.vocab_size), dtype=self.dtype)
        D, KV, hs, nkv = c.dim, c.kv_dim, c.head_size, c.n_kv_heads
        cos, sin = self.rope_cos[:T, None], self.rope_sin[:T, None]      # (T, 1, hs)
        future = np.triu(np.ones((T, T), dtype=bool), k=1)
        x = self.emb[toks]                                            # (T, D)
        with np.errstate(over="ignore"):                              # silu's exp: see _silu_gate
            for l in range(c.n_layers):
                xb = self._rmsnorm(x, self.rms_att[l])
                qkv = xb @ self.wqkv[l]                                   # (T, D + 2 KV)
                qk = self._rope(qkv[:, : D + KV].reshape(T, c.n_heads + nkv, hs), cos, sin)
                q, k = qk[:, : c.n_heads], qk[:, c.n_heads :]
                v = qkv[:, D + KV :].reshape(T, nkv, hs)
                qg = q.reshape(T, nkv, self.kv_mul, hs).transpose(1, 2, 0, 3)   # (nkv, kv_mul, T, hs)
                kt = k.transpose(1, 2, 0)[:, None]                              # (nkv, 1, hs, T)
                att = np.matmul(qg, kt) / self.scale                            # (nkv, kv_mul, T, T)
                att[..., future] = -np.inf
                att = np.exp(att - att.max(axis=-1, keepdims=True))
                att /= att.sum(axis=-1, keepdims=True)
                out = np.matmul(att, v.transpose(1, 0, 2)[:, None])             # (nkv, kv_mul, T, hs)
                out = out.transpose(2, 0, 1, 3).reshape(T, D)
                x = x + out @ self.wo[l]
                xb = self._rmsnorm(x, self.rms_ffn[l])
                x = x + self._silu_gate(xb @ self.w13[l]) @ self.w2[l].T
        x = self._rmsnorm(x, self.rms_final)
        return x @ self.wcls

    # ------------------------------------------------------------------ generation
    def generate_tokens(self, prompt_tokens: Sequence[int], max_new_tokens: int,
                        sampler: Optional["Sampler"] = None) -> Iterator[int]:
        """Yields sampled tokens after running prompt_tokens (BOS included by the caller).

        Mirrors the C ``ac_generate``: stops after max_new_tokens, when BOS or EOS is sampled
        (not yielded), or when the context is full (prompt + generated <= seq_len).
        """
        c = self.config
        toks = self._check_tokens(prompt_tokens)
        if len(toks) > c.seq_len:
            raise ValueError(f"the prompt is {len(toks)} tokens but the model's seq_len is {c.seq_len}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens {max_new_tokens} is invalid: it must be >= 0")
        if len(toks) == 0 or max_new_tokens == 0:
            return
        sampler = sampler or Sampler(temperature=0.0)
        logits = None
        for pos, tok in enumerate(toks):
            logits = self.step(int(tok), pos)
        pos = len(toks)
        for _ in range(max_new_tokens):
            if pos >= c.seq_len:       # the sampled token could never be run
                return
            token = sampler.sample(logits)
            if token in (BOS, EOS):
                return
            yield token
            if pos + 1 >= c.seq_len:   # no room for another: stop without running it
                return
            logits = self.step(token, pos)
            pos += 1

    def generate_greedy(self, prompt_tokens: Sequence[int], steps: int) -> list[int]:
        """Greedy continuation of ``steps`` tokens, not stopping at BOS/EOS (for parity tests)."""
        toks = [int(t) for t in self._check_tokens(prompt_tokens)]
        if len(toks) + steps > self.config.seq_len:
            raise ValueError("prompt + steps exceed seq_len")
        logits = None
        for pos, tok in enumerate(toks):
            logits = self.step(tok, pos)
        out = []
        for i in range(steps):
            token = int(np.argmax(logits))
            out.append(token)
            if i + 1 < steps:
                logits = self.step(token, len(toks) + i)
        return out


# ============================================================================ sampler


def _softmax_f32(x: np.ndarray) -> np.ndarray:
    """float32 softmax as the C one: subtract the max, exp, sequential sum, divide."""
    e = np.exp(x - x.max())
    total = np.cumsum(e, dtype=np.float32)[-1]   # cumsum accumulates sequentially, like C
    return e / total


class Sampler:
    """The C sampler: greedy at temperature 0; else temperature, top-k, top-p, xorshift64* coin."""

    def __init__(self, temperature: float = 1.0, top_p: float = 0.9, top_k: int = 0, seed: int = 0):
        temperature, top_p = float(np.float32(temperature)), float(np.float32(top_p))
        if np.isnan(temperature) or temperature < 0:
            raise ValueError(f"temperature {temperature} is invalid: it must be >= 0 (0 = greedy)")
        if np.isnan(top_p) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p {top_p} is invalid: it must be in (0, 1] (1 = off)")
        if top_k < 0:
            raise ValueError(f"top_k {top_k} is invalid: it must be >= 0 (0 = off)")
        self.temperature = np.float32(temperature)
        self.top_p = np.float32(top_p)
        self.top_k = int(top_k)
        self.state = (int(seed) & _MASK64) or DEFAULT_SEED

    def _next_u64(self) -> int:
        x = self.state
        x ^= x >> 12
        x = (x ^ (x << 25)) & _MASK64
        x ^= x >> 27
        self.state = x
        return (x * 0x2545F4914F6CDD1D) & _MASK64

    def coin(self) -> np.float32:
        """Uniform in [0, 1) from the top 24 bits, as the C ``rng_float``."""
        return np.float32(self._next_u64() >> 40) / np.float32(16777216.0)

    @staticmethod
    def _pick(weights: np.ndarray, r: np.float32) -> int:
        """First index whose float32 cumulative weight exceeds r (the last one if none does)."""
        cdf = np.cumsum(weights, dtype=np.float32)
        idx = int(np.searchsorted(cdf, r, side="right"))
        return min(idx, len(weights) - 1)

    def sample(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float32)
        V = logits.shape[-1]
        if self.temperature == 0:
            return int(np.argmax(logits))
        probs = _softmax_f32(logits / self.temperature)
        coin = self.coin()
        use_k = 0 < self.top_k < V
        use_p = self.top_p < 1
        if not use_k and not use_p:
            return self._pick(probs, coin)
        cutoff = (np.float32(1) - self.top_p) / np.float32(V - 1) if (not use_k and V > 1) else np.float32(0)
        cand = np.nonzero(probs >= cutoff)[0]
        if cand.size == 0:
            return int(np.argmax(logits))
        # descending probability, ties by id (a stable sort of ids already in id order)
        cand = cand[np.argsort(-probs[cand], kind="stable")]
        if use_k:
            cand = cand[: self.top_k]
        p = probs[cand]
        total = np.cumsum(p, dtype=np.float32)[-1]
        if use_p:
            cum = np.cumsum(p / total, dtype=np.float32)
            over = np.nonzero(cum > self.top_p)[0]
            if over.size and over[0] + 1 < len(cand):
                keep = int(over[0]) + 1
                cand, p = cand[:keep], p[:keep]
                total = np.cumsum(p, dtype=np.float32)[-1]
        return int(cand[self._pick(p, coin * total)])


# ============================================================================ tokenizer


def _byte_piece_value(piece: bytes) -> int:
    """The byte of a "<0xNN>" piece, else -1."""
    if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return -1
    return -1


def _find_sp_model(bin_path: PathLike) -> Optional[str]:
    candidate = Path(bin_path).with_suffix(".model")
    return str(candidate) if candidate.exists() else None


class Tokenizer:
    """Pieces and scores of a llama2.c-layout tokenizer ``.bin``; encode, decode, stream-decode.

    ``sp_model``: a SentencePiece ``.model`` to encode with (default: the ``.model`` next to
    ``path`` if there is one; ``False`` forces the pure-Python BPE).
    """

    def __init__(self, path: PathLike, sp_model: Union[PathLike, None, bool] = None):
        self.pieces, self.scores = read_tokenizer(path)
        self.vocab_size = len(self.pieces)
        self.byte_value = [_byte_piece_value(p) for p in self.pieces]
        self.byte_ids = {b: i for i, b in enumerate(self.byte_value) if b >= 0 and i > EOS}
        self.lookup: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            if i > EOS and self.byte_value[i] < 0:
                self.lookup.setdefault(p, i)
        if sp_model is None:
            sp_model = _find_sp_model(path)
        self.sp = None
        if sp_model:
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=os.fspath(sp_model))
            if self.sp.get_piece_size() != self.vocab_size:
                raise FormatError(f"{sp_model} has {self.sp.get_piece_size()} pieces, "
                                  f"{path} has {self.vocab_size}")

    # ------------------------------------------------------------------ encode
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text) if self.sp is not None else self.encode_bpe(text)
        return ([BOS] if bos else []) + list(ids) + ([EOS] if eos else [])

    def encode_bpe(self, text: str) -> list[int]:
        """Pure-Python SentencePiece BPE (identity normalization, dummy prefix, byte fallback)."""
        if not text:
            return []
        norm = (" " + text).encode("utf-8")        # pieces store U+2581 as a plain space
        # symbols start as single UTF-8 characters
        symbols: list[bytes] = []
        i = 0
        while i < len(norm):
            n = _utf8_len(norm, i)
            symbols.append(norm[i : i + n])
            i += n
        alive = [True] * len(symbols)
        nxt = list(range(1, len(symbols))) + [-1]
        prv = list(range(-1, len(symbols) - 1))
        heap: list[tuple[float, int, int, bytes, bytes]] = []

        def push(left: int) -> None:
            right = nxt[left]
            if right < 0:
                return
            merged = symbols[left] + symbols[right]
            pid = self.lookup.get(merged)
            if pid is not None:
                heapq.heappush(heap, (-self.scores[pid], left, right, symbols[left], symbols[right]))

        for k in range(len(symbols) - 1):
            push(k)
        while heap:
            _, left, right, ls, rs = heapq.heappop(heap)
            if not (alive[left] and alive[right] and nxt[left] == right
                    and symbols[left] == ls and symbols[right] == rs):
                continue                             # stale entry
            symbols[left] = ls + rs
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            if prv[left] >= 0:
                push(prv[left])
            push(left)
        ids: list[int] = []
        k = 0
        while k >= 0 and k < len(symbols):
            pid = self.lookup.get(symbols[k])
            if pid is not None:
                ids.append(pid)
            else:
                ids.extend(self.byte_ids.get(b, 0) for b in symbols[k])
            k = nxt[k]
        return ids

    # ------------------------------------------------------------------ decode
    def piece_bytes(self, prev: int, token: int) -> bytes:
        """The bytes token adds to the text after prev (the C ``ac_decode_piece``)."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary [0, {self.vocab_size})")
        if token <= EOS:
            return b""
        b = self.byte_value[token]
        piece = bytes([b]) if b >= 0 else self.pieces[token]
        if b < 0 and prev == BOS and piece.startswith(b" "):
            piece = piece[1:]
        if len(piece) == 1:
            v = piece[0]
            if (v < 0x20 and v not in (0x0A, 0x09, 0x0D)) or v == 0x7F:
                return b""
        return piece

    def decode_bytes(self, tokens: Iterable[int], prev: int = BOS) -> bytes:
        out = bytearray()
        for tok in tokens:
            tok = int(tok)
            out += self.piece_bytes(prev, tok)
            prev = tok
        return bytes(out)

    def decode(self, tokens: Iterable[int], prev: int = BOS) -> str:
        """Text of tokens, decoded together: byte pieces joined first, then UTF-8 decoded.

        prev is the token before the first one; the default BOS drops the dummy-prefix space
        of the first piece, as SentencePiece's decode and ``arianna_c.Model.decode`` do (a list
        that starts with BOS gets the same).  Invalid UTF-8 becomes U+FFFD.
        """
        return self.decode_bytes(tokens, prev).decode("utf-8", errors="replace")

    def stream(self, prev: int = BOS) -> "StreamDecoder":
        return StreamDecoder(self, prev)


class StreamDecoder:
    """Feeds tokens one at a time; ``feed`` returns only complete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, prev: int = BOS):
        self.tokenizer = tokenizer
        self.prev = prev
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        data = self.tokenizer.piece_bytes(self.prev, int(token))
        self.prev = int(token)
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is still pending (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def _utf8_len(data: bytes, i: int) -> int:
    """Length of the UTF-8 character starting at data[i]; 1 for an invalid lead byte."""
    lead = data[i]
    n = 1 if lead < 0x80 else 2 if 0xC2 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF5 else 1
    if i + n > len(data) or any(not 0x80 <= data[j] < 0xC0 for j in range(i + 1, i + n)):
        return 1
    return n


# ============================================================================ convenience


def generate_text(model: Reference, tokenizer: Tokenizer, prompt: str, max_new_tokens: Optional[int] = None,
                  temperature: Optional[float] = None, top_p: Optional[float] = None, top_k: Optional[int] = None,
                  seed: Optional[int] = None, on_text=None) -> str:
    """Generated text (without the prompt); on_text(str) receives it piece by piece.  A
    setting left as None takes the C library's default (arianna_c.default_sampling(), which
    loads the library), so by default this gives ./run's and Model.generate's text for the
    same seed; seed None (the default) draws a random one, as they do."""
    if tokenizer.vocab_size != model.config.vocab_size:
        raise FormatError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size "
                          f"is {model.config.vocab_size}")
    given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    settings = library_defaults(**{k: v for k, v in given.items() if v is not None})
    tokens = tokenizer.encode(prompt, bos=True)
    sampler = Sampler(settings.temperature, settings.top_p, settings.top_k, _seed(settings.seed))
    stream = tokenizer.stream(prev=tokens[-1])
    parts = []
    for tok in model.generate_tokens(tokens, settings.max_new_tokens, sampler):
        text = stream.feed(tok)
        if text:
            parts.append(text)
            if on_text:
                on_text(text)
    tail = stream.flush()
    if tail:
        parts.append(tail)
        if on_text:
            on_text(tail)
    return "".join(parts)


def library_defaults(**given):
    """arianna_c.SamplingParams: the C library's default generation settings with the given
    ones over them."""
    from . import default_sampling

    return dataclasses.replace(default_sampling(), **given)


def _seed(seed: Optional[int]) -> int:
    """The sampler seed of a setting: a random one for None or the library's AC_SEED_RANDOM."""
    from ._ffi import ffi

    if seed is None or seed == ffi.integer_const("AC_SEED_RANDOM"):
        return random.SystemRandom().getrandbits(64)
    return seed


def main(argv: Optional[list[str]] = None) -> int:
    try:
        defaults = library_defaults()
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    parser = argparse.ArgumentParser(prog="python -m arianna_c.reference",
                                     description="Generate text with the NumPy reference implementation "
                                                 "(the defaults are the C library's, as ./run's).")
    parser.add_argument("model", help="model .bin (v0, v1 or int8 v2, dequantized) or .npz")
    parser.add_argument("-z", "--tokenizer", help="tokenizer .bin, looked up as ./run -z does; default: "
                                                  "tokenizer.bin, then tok4096.bin next to the model")
    parser.add_argument("-i", "--prompt", default="", help="prompt text; default: empty (from BOS)")
    parser.add_argument("-n", "--steps", type=int, default=defaults.max_new_tokens,
                        help="tokens to generate at most (prompt + generated <= seq_len); default %(default)s")
    parser.add_argument("-t", "--temperature", type=float, default=defaults.temperature,
                        help="temperature, 0 = greedy; default %(default)s")
    parser.add_argument("-p", "--top-p", type=float, default=defaults.top_p,
                        help="top-p (nucleus) in (0, 1], 1 = off; default %(default)s")
    parser.add_argument("-k", "--top-k", type=int, default=defaults.top_k,
                        help="top-k, 0 = off; default %(default)s")
    parser.add_argument("-s", "--seed", type=int, default=None, help="seed; default: a random one")
    parser.add_argument("--sp-model", help="SentencePiece .model to encode with (default: next to the tokenizer)")
    parser.add_argument("--float64", action="store_true", help="compute in float64 (default float32)")
    args = parser.parse_args(argv)
    try:
        from .paths import find_tokenizer

        model = Reference(args.model, dtype=np.float64 if args.float64 else np.float32)
        tok = Tokenizer(find_tokenizer(args.model, args.tokenizer), sp_model=args.sp_model)
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        start = time.perf_counter()

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        generate_text(model, tok, args.prompt, args.steps, args.temperature, args.top_p, args.top_k, args.seed,
                      on_text=write)
        sys.stdout.write("\n")
        sys.stdout.flush()
        elapsed = time.perf_counter() - start
        print(f"[{elapsed:.2f} s, prompt included]", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
