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
* The sampler is the C one: logit bias and repetition / presence / frequency penalties over the
  last repeat_last_n tokens of the context (prompt included); then temperature 0 = greedy argmax,
  otherwise softmax(logits / T), top-k, top-p (smallest prefix of the sorted candidates whose mass
  exceeds p), min-p, picked with a seeded xorshift64* coin.  Greedy agrees with C exactly (given
  the same logits); seeded sampling uses the same coin sequence and float32 arithmetic, so it
  agrees too unless the last bit of an exp (see ``_softmax_f32``) moves a cumulative sum across
  the coin.
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
import collections
import dataclasses
import heapq
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from .formats import FormatError, ModelConfig, read_model, read_tokenizer, rope_tables, weight_shapes
from .paths import tokenizer_lookup_text

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
                        sampler: Optional["Sampler"] = None, ignore_eos: bool = False) -> Iterator[int]:
        """Yields sampled tokens after running prompt_tokens (BOS included by the caller).

        Mirrors the C ``ac_generate``: stops after max_new_tokens, when BOS or EOS is sampled
        (not yielded; with ignore_eos they are yielded and run like any token), or when the
        context is full (prompt + generated <= seq_len).  The sampler records every token of
        the context (prompt and yielded ones) for its penalties.
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
            sampler.accept(int(tok))
        pos = len(toks)
        for _ in range(max_new_tokens):
            if pos >= c.seq_len:       # the sampled token could never be run
                return
            token = sampler.sample(logits)
            if token in (BOS, EOS) and not ignore_eos:
                return
            sampler.accept(token)
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


MAX_WINDOW = 1 << 20   # AC_MAX_SEQ_LEN: the longest repeat_last_n


def _argmax(x: np.ndarray) -> int:
    """First index of the largest value; NaNs never win (0 when all are NaN), as the C argmax."""
    finite = np.flatnonzero(~np.isnan(x))
    return int(finite[np.argmax(x[finite])]) if finite.size else 0


def _softmax_f32(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """float32 softmax as the C one: subtract the max, exp, sequential sum, divide; and the sum
    (not finite when the logits overflowed or were NaN).  exp runs in float64 and is rounded
    to float32 once: that agrees with C's expf but for about 1 value in 1,600 (NumPy's own
    float32 exp differs from it in the last bit for about a third of them)."""
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp((x - x.max()).astype(np.float64)).astype(np.float32)
    total = np.cumsum(e, dtype=np.float32)[-1]   # cumsum accumulates sequentially, like C
    with np.errstate(invalid="ignore", divide="ignore"):
        return e / total, total


def _f32(value: float) -> np.float32:
    """A setting as the C float it becomes (so checks and arithmetic see the same number)."""
    with np.errstate(over="ignore"):
        return np.float32(value)


class Sampler:
    """The C sampler (src/sampler.c), operation for operation in float32.

    The logits first get the logit bias (``{id: value}``, -inf bans a token) and, for every
    token among the last ``repeat_last_n`` recorded with :meth:`accept` (the prompt's tokens,
    BOS included, and each sampled one), llama.cpp's penalties: a positive logit divided by
    ``repeat_penalty``, a non-positive one multiplied by it, then ``count * frequency_penalty
    + presence_penalty`` subtracted.  Temperature 0 is greedy argmax of those logits; else
    softmax(logits / T), then top-k, then top-p (smallest prefix of the sorted candidates whose
    mass exceeds p), then min-p (candidates whose logit is within log(min_p) of the best one's),
    picked with a seeded xorshift64* coin.  With a logit bias set, candidates of probability 0
    are dropped and the rest sorted even when no filter is on, as C does.

    Every setting defaults to off (plain softmax sampling at temperature 1); the library's
    defaults are :func:`library_defaults` (``Sampler.from_settings(library_defaults())``).
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, *,
                 min_p: float = 0.0, repeat_penalty: float = 1.0, repeat_last_n: int = 0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: Optional[dict[int, float]] = None):
        self.temperature = _f32(temperature)
        self.top_p = _f32(top_p)
        self.min_p = _f32(min_p)
        self.repeat_penalty = _f32(repeat_penalty)
        self.presence_penalty = _f32(presence_penalty)
        self.frequency_penalty = _f32(frequency_penalty)
        self.top_k, self.repeat_last_n = int(top_k), int(repeat_last_n)
        self._check()
        self.bias = self._bias_table(logit_bias or {})
        self.state = (int(seed) & _MASK64) or DEFAULT_SEED
        self.recent: collections.deque[int] = collections.deque(maxlen=max(self.repeat_last_n, 1))
        self.counts: collections.Counter[int] = collections.Counter()

    @classmethod
    def from_settings(cls, settings, seed: Optional[int] = None) -> "Sampler":
        """The sampler of an arianna_c.SamplingParams whose sampler fields are all set (e.g.
        :func:`library_defaults`'s); seed overrides settings.seed."""
        return cls(settings.temperature, settings.top_p, settings.top_k,
                   settings.seed if seed is None else seed, min_p=settings.min_p,
                   repeat_penalty=settings.repeat_penalty, repeat_last_n=settings.repeat_last_n,
                   presence_penalty=settings.presence_penalty, frequency_penalty=settings.frequency_penalty,
                   logit_bias=settings.logit_bias)

    def _check(self) -> None:
        """The checks (and messages) of the C ac_sampler_check_params."""
        if np.isnan(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature {self.temperature:g} is invalid: it must be >= 0 (0 = greedy)")
        if np.isnan(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p {self.top_p:g} is invalid: it must be in (0, 1] (1 = off)")
        if self.top_k < 0:
            raise ValueError(f"top_k {self.top_k} is invalid: it must be >= 0 (0 = off)")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p {self.min_p:g} is invalid: it must be in [0, 1] (0 = off)")
        if not (self.repeat_penalty >= 0.0 and np.isfinite(self.repeat_penalty)):
            raise ValueError(f"repeat_penalty {self.repeat_penalty:g} is invalid: it must be finite and >= 0 "
                             "(1 or 0 = off)")
        if not 0 <= self.repeat_last_n <= MAX_WINDOW:
            raise ValueError(f"repeat_last_n {self.repeat_last_n} is invalid: it must be in 0..{MAX_WINDOW} "
                             "(0 = no penalties)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name):g} is invalid: it must be finite (0 = off)")

    @staticmethod
    def _bias_table(bias: dict[int, float]) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 values) of a logit bias, or None for none (as C frees an empty one)."""
        if not bias:
            return None
        ids = np.array([int(k) for k in bias], dtype=np.int64)
        values = np.array([_f32(v) for v in bias.values()], dtype=np.float32)
        for i, v in zip(ids, values):
            if i < 0:
                raise ValueError(f"logit bias token {i} is outside the vocabulary")
            if np.isnan(v) or v == np.inf:
                raise ValueError(f"logit bias {v:g} of token {i} is invalid: it must be finite or -inf")
        return ids, values

    # ------------------------------------------------------------------ recorded context
    def accept(self, token: int) -> None:
        """Records token as the latest of the context (the C ``ac_sampler_accept``)."""
        if self.repeat_last_n == 0:
            return
        if len(self.recent) == self.repeat_last_n:
            oldest = self.recent[0]
            self.counts[oldest] -= 1
            if not self.counts[oldest]:
                del self.counts[oldest]
        self.recent.append(int(token))
        self.counts[int(token)] += 1

    def reset_history(self) -> None:
        """Forgets the recorded tokens; the PRNG goes on where it was."""
        self.recent.clear()
        self.counts.clear()

    # ------------------------------------------------------------------ PRNG
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

    # ------------------------------------------------------------------ drawing
    def _penalties_apply(self) -> bool:
        repeat = self.repeat_penalty not in (0.0, 1.0)
        return bool(self.counts) and (repeat or self.presence_penalty != 0 or self.frequency_penalty != 0)

    def adjusted_logits(self, logits: np.ndarray) -> np.ndarray:
        """The logits the draw uses: bias added, then the penalties on the recorded tokens."""
        x = np.asarray(logits, dtype=np.float32)
        penalize = self._penalties_apply()
        if self.bias is None and not penalize:
            return x
        x = x.copy()
        if self.bias is not None:
            ids, values = self.bias
            if ids.max() >= len(x):
                bad = int(ids[ids >= len(x)][0])
                raise ValueError(f"logit bias token {bad} is outside the vocabulary [0, {len(x)})")
            table = np.zeros(len(x), np.float32)
            np.add.at(table, ids, values)
            x += table
        if penalize:
            ids = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
            n = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            repeat = np.float32(1) if self.repeat_penalty == 0 else self.repeat_penalty
            v = x[ids]
            v = np.where(v <= 0, v * repeat, v / repeat).astype(np.float32)
            with np.errstate(over="ignore", invalid="ignore"):   # inf and NaN as in C
                v -= n * self.frequency_penalty + self.presence_penalty
            x[ids] = v
        return x

    def sample(self, logits: np.ndarray) -> int:
        x = self.adjusted_logits(logits)
        V = x.shape[-1]
        if self.temperature == 0:
            return _argmax(x)
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = x / self.temperature
        probs, total = _softmax_f32(scaled)
        if not np.isfinite(total):   # logits / T overflowed (the limit is greedy) or were NaN
            return _argmax(x)
        coin = self.coin()
        use_k = 0 < self.top_k < V
        use_p = self.top_p < 1
        use_min_p = self.min_p > 0
        banned = self.bias is not None   # -inf bias: probability 0, never a candidate
        if not (use_k or use_p or use_min_p or banned):
            return self._pick(probs, coin)
        # top-p alone: a token below (1 - p) / (V - 1) can never be in the nucleus
        cutoff = (np.float32(1) - self.top_p) / np.float32(V - 1) if (not use_k and use_p and V > 1) \
            else np.float32(0)
        keep = probs >= cutoff
        if banned:
            keep &= probs > 0
        cand = np.flatnonzero(keep)
        if cand.size == 0:
            return _argmax(x)
        # descending probability, ties by id (a stable sort of ids already in id order)
        cand = cand[np.argsort(-probs[cand], kind="stable")]
        if use_k:
            cand = cand[: self.top_k]
        p = probs[cand]
        total = np.cumsum(p, dtype=np.float32)[-1]
        if use_p:   # mass of the top-k after top-k, else of the whole distribution (as C)
            whole = total if use_k else np.float32(1)
            cum = np.cumsum(p / whole, dtype=np.float32)
            over = np.flatnonzero(cum > self.top_p)
            if over.size and over[0] + 1 < len(cand):
                cand, p = cand[: over[0] + 1], p[: over[0] + 1]
                total = np.cumsum(p, dtype=np.float32)[-1]
        if use_min_p:
            # log in double rounded once to float, as C computes it (logf's last bit varies by libm)
            floor = x[cand[0]] + np.float32(math.log(float(self.min_p)))
            below = np.flatnonzero(~(x[cand[1:]] >= floor))
            if below.size:
                cand, p = cand[: below[0] + 1], p[: below[0] + 1]
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
        self.byte_ids: dict[int, int] = {}   # a byte's token: the first piece for it, never a special
        for i, b in enumerate(self.byte_value):
            if b >= 0 and i > EOS:
                self.byte_ids.setdefault(b, i)
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
                  seed: Optional[int] = None, on_text=None, **settings) -> str:
    """Generated text (without the prompt); on_text(str) receives it piece by piece.  The
    keyword settings are those of arianna_c.SamplingParams for the sampler (min_p,
    repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, logit_bias) and
    ignore_eos (BOS/EOS do not end the text).  A setting left as None
    takes the C library's default (arianna_c.default_sampling(), which loads the library), so
    by default this gives ./run's and Model.generate's text for the same seed; seed None (the
    default) draws a random one, as they do."""
    if tokenizer.vocab_size != model.config.vocab_size:
        raise FormatError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size "
                          f"is {model.config.vocab_size}")
    unknown = set(settings) - set(SAMPLER_SETTINGS)
    if unknown:
        raise TypeError(f"unknown setting {sorted(unknown)[0]!r}; the other settings are: "
                        f"{', '.join(SAMPLER_SETTINGS)}")
    given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                 **settings)
    chosen = library_defaults(**{k: v for k, v in given.items() if v is not None})
    tokens = tokenizer.encode(prompt, bos=True)
    sampler = Sampler.from_settings(chosen, seed=_seed(chosen.seed))
    stream = tokenizer.stream(prev=tokens[-1])
    parts = []
    for tok in model.generate_tokens(tokens, chosen.max_new_tokens, sampler, ignore_eos=chosen.ignore_eos):
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


# The settings of generate_text beyond temperature, top_p and top_k (SamplingParams' names).
SAMPLER_SETTINGS = ("min_p", "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty",
                    "logit_bias", "ignore_eos")


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
                                                  f"{tokenizer_lookup_text()}")
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
    parser.add_argument("-e", "--ignore-eos", type=int, choices=(0, 1), default=int(defaults.ignore_eos),
                        help="1: BOS/EOS do not end the text (always -n tokens); default %(default)s")
    parser.add_argument("--min-p", type=float, default=defaults.min_p,
                        help="keep tokens at least this fraction as likely as the likeliest, 0 = off; "
                             "default %(default)s")
    parser.add_argument("--repeat-penalty", type=float, default=defaults.repeat_penalty,
                        help="divides a positive logit (multiplies a negative one) of a token among the last "
                             "--repeat-last-n of the context, 1 = off; default %(default)s")
    parser.add_argument("--repeat-last-n", type=int, default=defaults.repeat_last_n,
                        help="the window of recent tokens (prompt included) the penalties look at, 0 = none; "
                             "default %(default)s")
    parser.add_argument("--presence-penalty", type=float, default=defaults.presence_penalty,
                        help="subtracted once from the logit of every token in the window; default %(default)s")
    parser.add_argument("--frequency-penalty", type=float, default=defaults.frequency_penalty,
                        help="subtracted from a token's logit per occurrence in the window; default %(default)s")
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
                      on_text=write, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                      repeat_last_n=args.repeat_last_n, presence_penalty=args.presence_penalty,
                      frequency_penalty=args.frequency_penalty, ignore_eos=bool(args.ignore_eos))
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
