"""PyTorch eager baseline with a KV cache, over the modules of ``arianna_c.model.Transformer``.

The model's own ``forward`` recomputes the whole sequence; a fair decode baseline keeps keys
and values instead.  :class:`KVDecoder` runs one token per step through the Transformer's
modules (its RMSNorms, Linear layers, ``apply_rope`` and SwiGLU FeedForward), writing the
rotated key and the value into preallocated (layers, kv_heads, seq_len, head_size) caches and
attending over the filled part with ``scaled_dot_product_attention`` (a single query needs no
mask).  Everything runs under ``torch.no_grad()`` with ``torch.set_num_threads(threads)``.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

BOS, EOS = 1, 2


def load_model(path: str):
    """A Transformer (eval mode) holding a model file's weights."""
    from arianna_c.export import torch_from_bin

    return torch_from_bin(path)


class KVDecoder:
    """One-token-at-a-time forward through a Transformer with a key/value cache."""

    def __init__(self, model) -> None:
        from arianna_c.model import apply_rope

        self.model = model
        self.apply_rope = apply_rope
        args = model.args
        first = model.layers[0].attention
        self.n_heads, self.n_kv_heads, self.head_dim = first.n_heads, first.n_kv_heads, first.head_dim
        self.dim = args.dim
        self.seq_len = args.max_seq_len
        shape = (len(model.layers), self.n_kv_heads, self.seq_len, self.head_dim)
        self.keys = torch.zeros(shape)
        self.values = torch.zeros(shape)

    @torch.no_grad()
    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits (vocab,) for token at position pos; positions < pos must have run."""
        m = self.model
        x = m.tok_embeddings.weight[token].view(1, 1, self.dim)
        cos, sin = m.rope_cos[pos : pos + 1], m.rope_sin[pos : pos + 1]
        repeat = self.n_heads // self.n_kv_heads
        for i, layer in enumerate(m.layers):
            att = layer.attention
            h = layer.attention_norm(x)
            q = self.apply_rope(att.wq(h).view(1, 1, self.n_heads, self.head_dim), cos, sin)
            k = self.apply_rope(att.wk(h).view(1, 1, self.n_kv_heads, self.head_dim), cos, sin)
            self.keys[i, :, pos] = k[0, 0]
            self.values[i, :, pos] = att.wv(h).view(self.n_kv_heads, self.head_dim)
            keys, values = self.keys[i, :, : pos + 1], self.values[i, :, : pos + 1]
            if repeat > 1:
                keys = keys.repeat_interleave(repeat, dim=0)
                values = values.repeat_interleave(repeat, dim=0)
            out = F.scaled_dot_product_attention(q.view(self.n_heads, 1, self.head_dim), keys, values)
            x = x + att.wo(out.reshape(1, 1, self.dim))
            x = x + layer.feed_forward(layer.ffn_norm(x))
        return m.output(m.norm(x)).view(-1)


def decode(model, prompt_ids: Sequence[int], max_new_tokens: int,
           ignore_eos: bool = False) -> tuple[list[int], list[float]]:
    """Greedy decode after the prompt; returns the new tokens and the time each was produced.
    Stops like the C runtime: at BOS/EOS (unless ignore_eos), after max_new_tokens, or when the
    context is full."""
    dec = KVDecoder(model)
    logits: Optional[torch.Tensor] = None
    for pos, tok in enumerate(prompt_ids):
        logits = dec.step(int(tok), pos)
    pos = len(prompt_ids)
    tokens: list[int] = []
    times: list[float] = []
    while len(tokens) < max_new_tokens and pos < dec.seq_len and logits is not None:
        token = int(torch.argmax(logits))
        if token in (BOS, EOS) and not ignore_eos:
            break
        tokens.append(token)
        times.append(time.perf_counter())
        if pos + 1 >= dec.seq_len:
            break
        logits = dec.step(token, pos)
        pos += 1
    return tokens, times


@torch.no_grad()
def prefill(model, prompt_ids: Sequence[int]) -> float:
    """Seconds for one full forward over the prompt (all positions' logits, as one batch)."""
    x = torch.tensor([list(prompt_ids)], dtype=torch.long)
    t0 = time.perf_counter()
    model(x)
    return time.perf_counter() - t0
