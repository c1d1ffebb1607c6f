"""The generation settings shared by Model.generate, Model.stream, Model.generate_batch and the
module functions: one frozen dataclass, and the one function that builds it from keywords.

Python checks types only (a wrong type is a TypeError naming the setting); ranges are the
library's to check, and a setting left as None takes the library's default.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from ._ffi import ffi
from .errors import AriannaError, ErrorCode

# The seed the library reads as "draw a random one" (src/run.h): the fixed seeds are below it.
AC_SEED_RANDOM = ffi.integer_const("AC_SEED_RANDOM")


def _int(name: str, value: Any) -> int:
    """An int argument: an int or any integer type (NumPy's), but not bool."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None


def _count(name: str, value: Any) -> Optional[int]:
    """An int setting (None: not set)."""
    return None if value is None else _int(name, value)


def _real(name: str, value: Any) -> Optional[float]:
    """A float setting: any real number but bool (a str such as "0.5" is not one)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, not {type(value).__name__}")
    return float(value)


def _flag(name: str, value: Any) -> Optional[bool]:
    if value is None:
        return None
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__}")
    return value


def _seed(name: str, value: Any) -> Optional[int]:
    """None (a fresh random seed for each call) or the PRNG seed, a C uint64 (the library reads
    its largest value, AC_SEED_RANDOM, as None)."""
    seed = _count(name, value)
    if seed is not None and not 0 <= seed < 2**64:
        raise AriannaError(f"seed {seed} is invalid: it must be an int in [0, 2**64) (None = random)",
                           ErrorCode.ARG)
    return seed


def _stops(name: str, value: Any) -> tuple[str, ...]:
    """One str or a list of them; empty ones are ignored (they would match anywhere)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a str or a list of str, not {type(value).__name__}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name} must hold str, not {type(item).__name__}")
    return tuple(dict.fromkeys(s for s in items if s))


def _bias(name: str, value: Any) -> Optional[dict[int, float]]:
    """{token id: value added to its logit}; which ids and values are valid is the library's
    to check."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict of token id -> bias, not {type(value).__name__}")
    bias = {_count(f"{name} key", k): _real(f"{name}[{k!r}]", v) for k, v in value.items()}
    for k in bias:
        if not -2**31 <= k < 2**31:
            raise AriannaError(f"{name} token {k} is outside the vocabulary", ErrorCode.RANGE)
    return bias


@dataclass(frozen=True)
class SamplingParams:
    """How a generation samples and when it stops.

    ``max_new_tokens``: tokens to generate at most (prompt + generated never exceed the
    model's seq_len: more is clamped).  ``temperature``: 0 = greedy.  ``top_p``: nucleus in
    (0, 1], 1 = off.  ``top_k``: 0 = off (applied before top_p).  ``seed``: the sampler's
    seed; None picks a random one for each call.  ``ignore_eos``: go on past the model's end
    of text (BOS/EOS), e.g. to time a fixed number of tokens.

    ``min_p``: keep tokens at least min_p times as likely as the best (0 = off).
    ``repeat_penalty`` (1 = off), ``repeat_last_n`` (the window of recent context tokens it
    looks at), ``presence_penalty`` and ``frequency_penalty`` (0 = off): llama.cpp's
    penalties over the recent tokens of the context.

    ``stop``: a str or a list of them; the text ends before the first to appear (it is not
    part of the text, and never partly shown while streaming).  ``logit_bias``: {token id:
    value added to its logit at every step} (OpenAI's; -inf bans a token).

    A field left as None takes the library's default (:func:`arianna_c.default_sampling`
    lists them).  Types are checked here (TypeError); ranges by the library, when the
    settings are used (AriannaError, code ``AC_ERR_ARG``).
    """

    max_new_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    ignore_eos: Optional[bool] = None
    min_p: Optional[float] = None
    repeat_penalty: Optional[float] = None
    repeat_last_n: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    stop: Union[str, Sequence[str], None] = ()
    logit_bias: Optional[Mapping[int, float]] = None

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            object.__setattr__(self, name, check(name, getattr(self, name)))


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "max_new_tokens": _count, "temperature": _real, "top_p": _real, "top_k": _count,
    "seed": _seed, "ignore_eos": _flag, "min_p": _real, "repeat_penalty": _real,
    "repeat_last_n": _count, "presence_penalty": _real, "frequency_penalty": _real,
    "stop": _stops, "logit_bias": _bias,
}
NAMES = tuple(f.name for f in dataclasses.fields(SamplingParams))
ALIASES = {"max_tokens": "max_new_tokens"}  # the OpenAI API's name


def sampling_params(params: Optional[SamplingParams] = None, settings: Mapping[str, Any] = {}) -> SamplingParams:
    """params (default: all library defaults) with the keyword settings applied: the one
    place where the keywords of generate/stream/generate_batch are read.  An unknown keyword
    is a TypeError naming it, as is a setting given twice (max_tokens is max_new_tokens)."""
    if params is None:
        params = SamplingParams()
    elif not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, not {type(params).__name__}")
    changes: dict[str, Any] = {}
    for key, value in settings.items():
        name = ALIASES.get(key, key)
        if name not in NAMES:
            raise TypeError(f"unknown setting {key!r}; the settings are: {', '.join(NAMES)}")
        if name in changes:
            raise TypeError(f"{name} is given twice (as {name} and as its alias max_tokens)")
        changes[name] = value
    return dataclasses.replace(params, **changes) if changes else params
