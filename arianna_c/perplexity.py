"""Perplexity of a model on a text, the way llama.cpp's llama-perplexity measures it.

    from arianna_c import Model, perplexity
    r = perplexity.evaluate(Model("model.bin"), open("test.txt").read(), context=256)
    print(r)            # PPL = 41.2345 +/- 0.81234 (...)

Chunks (the default, llama-perplexity's method): the text is tokenized as a whole with BOS in
front; the tokens are cut into non-overlapping chunks of ``context`` tokens (a tail shorter
than a chunk is left out), the first token of each chunk is replaced by BOS, and only the
second half of each chunk is scored: the logits at positions context/2 .. context-2 predict
the next token, so every scored token has at least context/2 tokens before it.  The result is
``PPL = exp(mean NLL)`` with the uncertainty llama-perplexity prints,
``PPL * sqrt(var(NLL) / (count - 1))``; the text needs at least 2 * context tokens.

Sliding window (``stride=S``): every token of the text after the first is scored exactly once.
Each window is BOS followed by context - 1 tokens of the text; windows start S tokens apart
and each scores the tokens the previous one did not, so a token has at least
context - 1 - S tokens of text before it (the first window scores all of its tokens).

Bits per byte: the scored tokens' total NLL in bits over the UTF-8 bytes those tokens spell,
comparable across tokenizers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

from .errors import AriannaError, ErrorCode
from .sampling import _count

if TYPE_CHECKING:
    import numpy as np

    from . import Model

__all__ = ["Result", "evaluate", "token_nll", "windows"]

_BYTE_PIECE = re.compile(rb"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class Result:
    """``ppl`` and its uncertainty ``ppl_error`` (as llama-perplexity's ``+/-``), the mean
    NLL in nats per token, ``bits_per_byte``, and what was scored."""

    ppl: float
    ppl_error: float
    nll: float
    bits_per_byte: float
    tokens_scored: int
    bytes_scored: int
    windows: int
    context: int
    stride: Optional[int]

    def __str__(self) -> str:
        mode = "chunks" if self.stride is None else f"sliding window, stride {self.stride}"
        return (f"PPL = {self.ppl:.4f} +/- {self.ppl_error:.5f}  ({self.nll:.4f} nats/token, "
                f"{self.bits_per_byte:.4f} bits/byte; {self.tokens_scored} tokens, {self.bytes_scored} bytes "
                f"scored in {self.windows} windows of {self.context} tokens, {mode})")


@dataclass(frozen=True)
class Window:
    """The tokens one forward pass runs (BOS first), and which of its positions are scored:
    the logits at position p predict tokens[p + 1] for p in range(first, last)."""

    tokens: list[int]
    first: int
    last: int


def windows(tokens: Sequence[int], context: int, stride: Optional[int] = None, bos: int = 1) -> list[Window]:
    """The forward passes of either method over tokens (the text's ids, BOS first); stride
    None or an int (TypeError for anything else, bool included)."""
    stride = _count("stride", stride)
    n = len(tokens)
    if stride is None:
        if n < 2 * context:
            raise AriannaError(f"the text is {n} tokens; a context of {context} needs at least {2 * context} "
                               "(two chunks)", ErrorCode.RANGE)
        out = []
        for start in range(0, n - context + 1, context):
            chunk = list(tokens[start:start + context])
            chunk[0] = bos
            out.append(Window(chunk, context // 2, context - 1))
        return out
    if not 1 <= stride <= context - 1:
        raise AriannaError(f"stride {stride} is invalid: it must be in 1..{context - 1} (context - 1)", ErrorCode.ARG)
    if n < 2:
        raise AriannaError(f"the text is {n} tokens; at least 2 are needed", ErrorCode.RANGE)
    text = list(tokens[1:])  # the text after its BOS
    width = context - 1
    out, scored = [], 0  # text tokens scored so far
    start = 0
    while scored < len(text):
        piece = text[start:start + width]
        # positions of piece (1-based in the window) not scored yet: start+1+p > scored
        first = max(0, scored - start)
        out.append(Window([bos] + piece, first, len(piece)))
        scored = start + len(piece)
        if start + width >= len(text):
            break
        start += stride
    return out


def token_nll(logits: "np.ndarray", targets: Sequence[int]) -> "np.ndarray":
    """The negative log-likelihood in nats of each target token: for logits of shape
    (n, vocab) and n target ids, ``-log softmax(logits[i])[targets[i]]``, computed in float64
    (shape (n,)).  The logits at position i predict the token at i + 1, so for a window's ids
    ``token_nll(model.logits(ids[:-1]), ids[1:])`` scores every token after the first."""
    import numpy as np

    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    log_total = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    return log_total - x[np.arange(len(targets)), np.asarray(targets)]


def _byte_lengths(model: "Model") -> list[int]:
    """UTF-8 bytes each token id spells (a byte piece one, specials none)."""
    from .session import vocabulary

    out = []
    for i, piece in enumerate(vocabulary(model)):
        if i <= 2:
            out.append(0)
        elif _BYTE_PIECE.fullmatch(piece.encode()):
            out.append(1)
        else:
            out.append(len(piece.encode("utf-8", "surrogatepass")))
    return out


def evaluate(model: "Model", text: Union[str, bytes], context: Optional[int] = None, stride: Optional[int] = None,
             progress: Optional[Callable[[int, int, float], None]] = None) -> Result:
    """Perplexity of model on text (see the module's description): a str, or bytes tokenized
    as they are, valid UTF-8 or not (as ./run reads a file).  ``context``: tokens per window
    (default: the model's seq_len; at most seq_len).  ``stride``: None for llama-perplexity's
    chunks, else the sliding window's step (an int).  ``progress(done, total, running_ppl)``
    is called after each window."""
    seq_len = model.config.seq_len
    context = seq_len if context is None else context
    if isinstance(context, bool) or not isinstance(context, int) or not 4 <= context <= seq_len:
        raise AriannaError(f"context {context!r} is invalid: it must be an int in 4..{seq_len} (the model's seq_len)",
                           ErrorCode.ARG)
    tokens = model.encode(text, bos=True)
    plan = windows(tokens, context, stride)
    sizes = _byte_lengths(model)
    total = total2 = 0.0
    count = n_bytes = 0
    for i, w in enumerate(plan):
        logits = model.logits(w.tokens)
        targets = w.tokens[w.first + 1:w.last + 1]
        nll = token_nll(logits[w.first:w.last], targets)
        total += float(nll.sum())
        total2 += float((nll * nll).sum())
        count += len(targets)
        n_bytes += sum(sizes[t] for t in targets)
        if progress is not None:
            progress(i + 1, len(plan), math.exp(total / count))
    if stride is not None:
        n_bytes -= 1  # the first token of the text carries SentencePiece's dummy-prefix space
    mean = total / count
    var = total2 / count - mean * mean
    ppl = math.exp(mean)
    error = ppl * math.sqrt(var / (count - 1)) if count > 1 and var > 0 else 0.0
    return Result(ppl, error, mean, total / math.log(2) / max(n_bytes, 1), count, n_bytes, len(plan), context, stride)
