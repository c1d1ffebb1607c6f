"""Sessions: a context that stays in the KV cache between calls, and the generation loop.

    with model.session() as s:
        s.feed("Q: What is resonance?\\nA:")
        reply = s.generate(max_new_tokens=64, stop=["\\nQ:"], seed=1)
        s.position                    # tokens in the context (prompt + reply)
        s.rewind(len(reply.tokens))   # forget the reply; the prompt stays cached

Everything that decides what a generation produces lives here, once, for Session, the chat
loop, the CLI and the server: stop strings (matched on the decoded text; text that could be
the start of a stop string is held back, so a partial one is never shown), the stop reasons
(``stop``: the model's end of text or a stop string; ``length``: max_new_tokens or a full
context), per-token log-probabilities, and the prefix reuse that lets a new prompt keep the
cached part it shares with the old one.  Sampling itself (temperature, top-k, top-p, min-p,
penalties, logit bias) is the C library's sampler.

The KV caches are the sequences of a C ``ac_batch`` driven step by step (:class:`Slots`): a
lone Session owns a batch of one; the server lends each request one sequence of a shared
batch and runs one decode step for all of them together.  A row's result does not depend on
the other rows of its step, so a request gives the same text alone or batched.
"""

from __future__ import annotations

import codecs
import dataclasses
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence, Union

from . import chat
from ._lib import _error_check, ffi
from .errors import AriannaError, ErrorCode
from .runtime import _c_params, _c_sampler_params
from .sampling import SamplingParams, _count, _real, sampling_params

if TYPE_CHECKING:
    from . import Model

__all__ = ["Chat", "Completion", "Generation", "Options", "Session", "Slots", "StopMatcher", "TokenLogprob",
           "chat_completion"]

Text = Union[str, bytes]

# ---------------------------------------------------------------------------- KV caches


class Slots:
    """n sequences' KV caches (one C ac_batch) that sessions borrow one each.

    ``acquire()`` hands out a free sequence, ``release(seq)`` takes it back; ``prefill`` runs
    tokens of one sequence, ``decode`` one token of each of several sequences in one forward
    pass.  Calls are serialized by a lock: one batch is one set of C buffers."""

    def __init__(self, model: "Model", n: int) -> None:
        self.lib = model._lib
        self.n = n
        self.vocab_size = model.config.vocab_size
        self._free = list(range(n - 1, -1, -1))
        self._lock = threading.Lock()
        self._batch = ffi.NULL
        self._use = model._h.use()  # the model stays loaded while its caches exist
        handles = self._use.__enter__()
        try:
            out = ffi.new("ac_batch **")
            params = _c_params(self.lib, SamplingParams(), model._threads)
            _error_check(self.lib.ac_batch_create(handles.model, handles.tokenizer, n, params, out))
            self._batch = out[0]
        except BaseException:
            self.close()
            raise
        self._logits = ffi.new("float[]", n * self.vocab_size)
        self._rows = [ffi.new("int[]", n) for _ in range(3)]  # sequences, tokens, positions

    def acquire(self) -> Optional[int]:
        """A free sequence, or None when all are lent."""
        with self._lock:
            return self._free.pop() if self._free else None

    def release(self, seq: int) -> None:
        with self._lock:
            self._free.append(seq)

    @property
    def n_free(self) -> int:
        return len(self._free)

    def prefill(self, seq: int, tokens: Sequence[int], pos: int) -> Any:
        """Runs tokens at positions pos.. of sequence seq; returns the last one's logits (a C
        float pointer, valid until the next call)."""
        ids = ffi.new("int[]", list(tokens))
        with self._lock:
            _error_check(self.lib.ac_batch_prefill(self._batch, seq, ids, len(tokens), pos, self._logits))
        return self._logits

    def decode(self, rows: Sequence[tuple[int, int, int]]) -> list[Any]:
        """One step over rows of (sequence, token, position), one row per sequence; returns
        each row's logits (C float pointers, valid until the next call)."""
        seqs, tokens, positions = self._rows
        with self._lock:
            for r, (seq, token, pos) in enumerate(rows):
                seqs[r], tokens[r], positions[r] = seq, token, pos
            _error_check(self.lib.ac_batch_decode(self._batch, len(rows), seqs, tokens, positions, self._logits))
        return [self._logits + r * self.vocab_size for r in range(len(rows))]

    def close(self) -> None:
        """Frees the caches (idempotent); the model may close once every Slots has."""
        batch, self._batch = self._batch, ffi.NULL
        if batch != ffi.NULL:
            self.lib.ac_batch_free(batch)
        use, self._use = getattr(self, "_use", None), None
        if use is not None:
            use.__exit__(None, None, None)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------- stop strings


class StopMatcher:
    """Finds the first stop string in text that arrives piece by piece.

    ``push(text)`` returns the text that is final: all but a tail that could still grow into
    a stop string.  When a stop string completes, ``stopped`` is set and nothing from its
    start on is returned.  ``flush()`` releases the held tail at the end of the text."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + text
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            self._held = ""
            return buf[: min(found)]
        keep = max((self._partial(buf, s) for s in self.stops), default=0)
        self._held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep]

    @staticmethod
    def _partial(buf: str, stop: str) -> int:
        """Length of the longest end of buf that is a beginning of stop."""
        for n in range(min(len(buf), len(stop) - 1), 0, -1):
            if buf.endswith(stop[:n]):
                return n
        return 0

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


# ---------------------------------------------------------------------------- results


@dataclass
class TokenLogprob:
    """One generated token: its id, text and bytes, its log-probability under the model
    (softmax of the logits, before temperature and penalties), and the ``top`` most likely
    tokens at that step as (id, text, bytes, log-probability), most likely first."""

    token: int
    text: str
    bytes: bytes
    logprob: float
    top: list[tuple[int, str, bytes, float]] = field(default_factory=list)


@dataclass
class Completion:
    """What one generation produced.  ``finish_reason``: ``"stop"`` (the model ended the text,
    or a stop string came: it is not in ``text``), ``"length"`` (max_new_tokens reached, or
    the context is full) or ``"cancelled"``.  ``tokens``: the sampled ids (a stop string's
    included); ``logprobs``: one entry per token, when asked for."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: Optional[list[TokenLogprob]] = None

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    """What a Session's generation does besides sampling (SamplingParams): ``stop`` strings
    that end the text (not included in it, never partly shown), ``logprobs`` (None, or
    report each token's log-probability with that many alternatives) and ``logit_bias``
    ({token id: value added to its logit}; -inf bans a token)."""

    stop: tuple[str, ...] = ()
    logprobs: Optional[int] = None
    logit_bias: Optional[Mapping[int, float]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        n = _count("logprobs", self.logprobs)
        if n is not None and n < 0:
            raise AriannaError(f"logprobs {n} is invalid: it must be >= 0 (None = off)", ErrorCode.ARG)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise TypeError(f"logit_bias must be a dict of token id -> bias, not {type(self.logit_bias).__name__}")
            bias = {_count("logit_bias key", k): _real(f"logit_bias[{k!r}]", v) for k, v in self.logit_bias.items()}
            object.__setattr__(self, "logit_bias", bias)

    def bias_arrays(self, vocab_size: int) -> tuple[list[int], list[float]]:
        """The logit bias as ids and values for the library; AriannaError (AC_ERR_RANGE) for
        an id outside the vocabulary (the library checks the values)."""
        bias = self.logit_bias or {}
        bad = [t for t in bias if not 0 <= t < vocab_size]
        if bad:
            raise AriannaError(f"logit_bias token {bad[0]} is outside the vocabulary [0, {vocab_size})",
                               ErrorCode.RANGE)
        return list(bias), list(bias.values())

    def with_stops(self, extra: Sequence[str]) -> "Options":
        """These options with the stop strings in extra added."""
        more = tuple(s for s in extra if s not in self.stop)
        return dataclasses.replace(self, stop=self.stop + more) if more else self


def _stop_strings(value: Any) -> tuple[str, ...]:
    """One str or a list of them (empty ones are ignored)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise TypeError(f"stop must be a str or a list of str, not {type(value).__name__}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"stop must hold str, not {type(item).__name__}")
    return tuple(s for s in items if s)


def split_settings(params: Optional[SamplingParams], settings: dict) -> tuple[SamplingParams, Options]:
    """Keyword settings of Session.generate and friends: stop / logprobs / logit_bias are
    Options, the rest SamplingParams (which reports an unknown one)."""
    settings = dict(settings)
    options = Options(**{k: settings.pop(k) for k in ("stop", "logprobs", "logit_bias") if k in settings})
    return sampling_params(params, settings), options


# ---------------------------------------------------------------------------- one generation


def c_sampler_params(lib: Any, p: SamplingParams) -> Any:
    """The C ac_sampler_params of p, with the library's range checks done now (AriannaError
    AC_ERR_ARG naming the setting)."""
    params = _c_sampler_params(lib, p)
    _error_check(lib.ac_sampler_check_params(params))
    return params


class Generation:
    """One generation in progress on a Session: its own C sampler, the stop rules, and what
    it has produced so far.  It never runs the model: whoever drives it (Session.generate
    alone, or the server stepping many together) hands it each step's logits with
    :meth:`step`, which samples the next token and returns it while the generation goes on.
    Final text comes out of :meth:`take_text` as it is produced."""

    def __init__(self, session: "Session", params: SamplingParams, options: Options = Options()) -> None:
        lib = session.lib
        self.session, self.params, self.options, self.lib = session, params, options, lib
        c_params = c_sampler_params(lib, params)
        out = ffi.new("ac_sampler **")
        _error_check(lib.ac_sampler_create(c_params, session.vocab_size, out))
        self._sampler = ffi.gc(out[0], lib.ac_sampler_free)
        if options.logit_bias:
            ids, biases = options.bias_arrays(session.vocab_size)
            _error_check(lib.ac_sampler_set_logit_bias(self._sampler, ffi.new("int[]", ids),
                                                       ffi.new("float[]", biases), len(ids)))
        window = c_params.repeat_last_n
        for token in session.tokens[max(0, len(session.tokens) - window):] if window else ():
            _error_check(lib.ac_sampler_accept(self._sampler, token))  # what the penalties see
        self.end_tokens = () if params.ignore_eos else (lib.AC_TOKEN_BOS, lib.AC_TOKEN_EOS)
        self.max_new_tokens = _c_params(lib, params, 0).max_new_tokens  # the library's default for None
        if self.max_new_tokens < 0:
            raise AriannaError(f"max_new_tokens {self.max_new_tokens} is invalid: it must be >= 0", ErrorCode.ARG)
        self.prompt_tokens = session.position
        self.tokens: list[int] = []
        self.logprobs: Optional[list[TokenLogprob]] = [] if options.logprobs is not None else None
        self.finish_reason: Optional[str] = None
        self._matcher = StopMatcher(options.stop)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._prev = session.tokens[-1] if session.tokens else lib.AC_TOKEN_BOS
        self._text: list[str] = []
        self._taken = 0
        self._out = ffi.new("int *")
        if self.max_new_tokens == 0 or session.position >= session.seq_len:
            self._finish("length")

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def step(self, logits: Any) -> Optional[int]:
        """Samples the next token from logits (those after the session's last token) and
        appends it to the session.  Returns it when it is to be run through the model (the
        generation goes on); None when the generation has ended (see finish_reason)."""
        lib, session = self.lib, self.session
        _error_check(lib.ac_sample(self._sampler, logits, self._out))
        token = self._out[0]
        if token in self.end_tokens:
            self._finish("stop")
            return None
        _error_check(lib.ac_sampler_accept(self._sampler, token))
        prev, self._prev = self._prev, token
        piece = session.piece(prev, token)
        if self.logprobs is not None:
            self.logprobs.append(self._logprob(logits, prev, token, piece))
        self.tokens.append(token)
        session._append(token)
        text = self._matcher.push(self._utf8.decode(piece))
        if text:
            self._text.append(text)
        if self._matcher.stopped:
            self._finish("stop")
        elif len(self.tokens) >= self.max_new_tokens or session.position >= session.seq_len:
            self._finish("length")  # the sampled token took the last position
        return None if self.done else token

    def cancel(self) -> None:
        """Ends the generation now (finish_reason ``"cancelled"``), e.g. when a client left."""
        if not self.done:
            self.finish_reason = "cancelled"

    def take_text(self) -> str:
        """The final text produced since the last call."""
        new = "".join(self._text[self._taken:])
        self._taken = len(self._text)
        return new

    def result(self) -> Completion:
        return Completion("".join(self._text), self.tokens, self.finish_reason or "length",
                          self.prompt_tokens, self.logprobs)

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        text = self._matcher.push(self._utf8.decode(b"", final=True)) + self._matcher.flush()
        if text:
            self._text.append(text)

    def _logprob(self, logits: Any, prev: int, token: int, piece: bytes) -> TokenLogprob:
        n = self.options.logprobs or 0
        lp, ids, lps = ffi.new("float *"), ffi.new("int[]", max(n, 1)), ffi.new("float[]", max(n, 1))
        _error_check(self.lib.ac_logprobs(logits, self.session.vocab_size, token, n, lp, ids, lps))
        top = []
        for i in range(n):
            alt = self.session.piece(prev, ids[i])
            top.append((ids[i], alt.decode("utf-8", "replace"), alt, lps[i]))
        return TokenLogprob(token, piece.decode("utf-8", "replace"), piece, lp[0], top)


# ---------------------------------------------------------------------------- session


class Session:
    """A context kept in a KV cache between calls.

    ``feed(text)`` appends text (BOS first when the context is empty), ``generate(...)``
    continues the context and appends what it generates, ``rewind(n)`` forgets the last n
    tokens, ``sync(tokens)`` makes the context exactly tokens (keeping the cached prefix
    they share), ``shift(keep, drop)`` drops tokens from the middle.  Tokens are run through
    the model lazily, by the next generation, all together (one prefill).

    A Session owns one sequence of ``slots`` (a batch of one of its own by default) and is
    meant for one thread at a time.  ``position``: tokens in the context; it never exceeds
    the model's seq_len (feeding more raises AriannaError AC_ERR_RANGE; a generation stops
    with finish_reason "length" when the context is full).
    """

    def __init__(self, model: "Model", slots: Optional[Slots] = None) -> None:
        self.model = model
        self.lib = model._lib
        self.vocab_size = model.config.vocab_size
        self.seq_len = model.config.seq_len
        self._own_slots = slots is None
        self.slots = Slots(model, 1) if slots is None else slots
        seq = self.slots.acquire()
        if seq is None:
            raise AriannaError("no free sequence in the batch", ErrorCode.RANGE)
        self.seq = seq
        self.tokens: list[int] = []  # the context
        self._n_run = 0  # how many of them are in the KV cache
        self._piece, self._size = ffi.new("const char **"), ffi.new("size_t *")
        self._tokenizer = model._h.tokenizer

    # ------------------------------------------------------------ context

    @property
    def position(self) -> int:
        """Tokens in the context."""
        return len(self.tokens)

    def feed(self, text: Text, bos: Optional[bool] = None) -> int:
        """Appends text's tokens (BOS first if bos, by default when the context is empty);
        returns how many.  AriannaError (AC_ERR_RANGE) if they do not fit."""
        if bos is None:
            bos = not self.tokens
        return self.feed_tokens(self.model.encode(text, bos=bos, eos=False))

    def feed_tokens(self, tokens: Sequence[int]) -> int:
        ids = [_token_id(t, self.vocab_size) for t in tokens]
        if len(self.tokens) + len(ids) > self.seq_len:
            raise AriannaError(f"{len(ids)} tokens do not fit: {len(self.tokens)} of the model's seq_len "
                               f"{self.seq_len} are in use", ErrorCode.RANGE)
        self.tokens += ids
        return len(ids)

    def rewind(self, n: int) -> None:
        """Forgets the last n tokens of the context (the cache keeps the rest)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(self.tokens):
            raise AriannaError(f"rewind {n!r} is invalid: it must be an int in 0..{len(self.tokens)}", ErrorCode.ARG)
        self._truncate(len(self.tokens) - n)

    def reset(self) -> None:
        """Empties the context."""
        self._truncate(0)

    def sync(self, tokens: Sequence[int]) -> int:
        """Makes the context exactly tokens, keeping the cached part it shares with them;
        returns the number of tokens kept (not to be run again)."""
        ids = [_token_id(t, self.vocab_size) for t in tokens]
        if len(ids) > self.seq_len:
            raise AriannaError(f"{len(ids)} tokens exceed the model's seq_len {self.seq_len}", ErrorCode.RANGE)
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        self._truncate(common)
        self.tokens += ids[common:]
        return common

    def shift(self, keep: int, drop: int) -> None:
        """Context shift: keeps the first keep tokens, drops the drop tokens after them and
        moves the rest down; the moved tokens are run again by the next generation (their
        positions changed)."""
        n = len(self.tokens)
        if not (0 <= keep <= n and 0 <= drop <= n - keep):
            raise AriannaError(f"shift(keep={keep}, drop={drop}) is invalid for a context of {n} tokens",
                               ErrorCode.ARG)
        rest = self.tokens[keep + drop:]
        self._truncate(keep)
        self.tokens += rest

    def _truncate(self, n: int) -> None:
        del self.tokens[n:]
        self._n_run = min(self._n_run, n)

    def _append(self, token: int) -> None:
        self.tokens.append(token)

    # ------------------------------------------------------------ text

    def piece(self, prev: int, token: int) -> bytes:
        """The bytes token adds to the text after prev (the library's ac_decode_piece)."""
        _error_check(self.lib.ac_decode_piece(self._tokenizer, prev, token, self._piece, self._size))
        return ffi.unpack(self._piece[0], self._size[0])

    @property
    def text(self) -> str:
        """The context as text (special tokens give none)."""
        return self.model.decode(self.tokens)

    # ------------------------------------------------------------ generation

    def start(self, params: Optional[SamplingParams] = None, options: Optional[Options] = None,
              **settings: Any) -> Generation:
        """A Generation continuing the context (an empty context starts from BOS).  settings:
        those of SamplingParams and of Options (stop, logprobs, logit_bias)."""
        params, more = split_settings(params, settings)
        options = more if options is None else dataclasses.replace(
            options, **{k: getattr(more, k) for k in ("stop", "logprobs", "logit_bias") if k in settings})
        started_empty = not self.tokens
        if started_empty:
            self.tokens.append(self.lib.AC_TOKEN_BOS)
        try:
            return Generation(self, params, options)
        except BaseException:
            if started_empty:
                self.tokens.clear()  # bad settings change nothing
            raise

    def first_logits(self) -> Any:
        """Runs the tokens not yet in the cache (the last one at least, so its logits are
        fresh) in one prefill; returns the logits after the last token."""
        if self._n_run >= len(self.tokens):
            self._n_run = len(self.tokens) - 1
        logits = self.slots.prefill(self.seq, self.tokens[self._n_run:], self._n_run)
        self._n_run = len(self.tokens)
        return logits

    def advance(self, token: int) -> tuple[int, int, int]:
        """The decode row that runs token (just appended by a Generation) into the cache."""
        pos = self._n_run
        self._n_run += 1
        return (self.seq, token, pos)

    def run(self, generation: Generation) -> Iterator[str]:
        """Drives generation alone, one decode step per token; yields final text."""
        if generation.done:
            text = generation.take_text()
            if text:
                yield text
            return
        logits = self.first_logits()
        while True:
            token = generation.step(logits)
            text = generation.take_text()
            if text:
                yield text
            if token is None:
                return
            logits = self.slots.decode([self.advance(token)])[0]

    def stream(self, params: Optional[SamplingParams] = None, options: Optional[Options] = None,
               **settings: Any) -> Iterator[str]:
        """generate() that yields text as it becomes final (whole characters, never part of
        a stop string).  ``last`` holds the Completion afterwards."""
        generation = self.start(params, options, **settings)
        try:
            yield from self.run(generation)
        finally:
            generation.cancel()  # a loop left early: the tokens so far stay in the context
            self.last = generation.result()

    def generate(self, params: Optional[SamplingParams] = None, options: Optional[Options] = None,
                 **settings: Any) -> Completion:
        """Continues the context; the generated tokens join it.  Settings as Model.generate
        (max_new_tokens, temperature, top_p, top_k, min_p, seed, penalties, ignore_eos) and
        those of Options: stop strings, logprobs, logit_bias."""
        generation = self.start(params, options, **settings)
        for _ in self.run(generation):
            pass
        return generation.result()

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Returns the sequence to its batch (and frees a batch of its own).  Idempotent."""
        slots, self.slots = getattr(self, "slots", None), None
        if slots is None:
            return
        if self._own_slots:
            slots.close()
        else:
            slots.release(self.seq)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _token_id(value: Any, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"a token id must be an int, not {type(value).__name__}")
    if not 0 <= value < vocab_size:
        raise AriannaError(f"token {value} is outside the vocabulary [0, {vocab_size})", ErrorCode.RANGE)
    return value


# ---------------------------------------------------------------------------- chat


def vocabulary(model: "Model") -> list[str]:
    """The model's pieces as stored (e.g. "<0x0A>", " the"), for choosing a chat template."""
    lib, piece, size, score = model._lib, ffi.new("const char **"), ffi.new("size_t *"), ffi.new("float *")
    with model._h.use() as h:
        out = []
        for i in range(model.config.vocab_size):
            _error_check(lib.ac_tokenizer_piece(h.tokenizer, i, piece, size, score))
            out.append(ffi.unpack(piece[0], size[0]).decode("utf-8", "replace"))
    return out


def chat_template(model: "Model", name: Optional[str] = None) -> chat.Template:
    """The chat template for model: the one named, else the one its vocabulary suggests."""
    return chat.choose_template(name, vocabulary(model) if name is None else ())


def chat_prompt(model: "Model", messages: Sequence[chat.Message], template: chat.Template) -> list[int]:
    """The token ids of messages in template, ending with the opening of the reply."""
    return chat.prompt_tokens(chat.render(template, messages), lambda text: model.encode(text, bos=False))


class ReplyText:
    """A reply's text as it streams: the whitespace a template leaves before the reply
    (``A:`` then `` The...``) is not part of it."""

    def __init__(self) -> None:
        self.started = False

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text


class Chat:
    """A conversation that keeps its session: each turn renders the whole conversation with
    the template, keeps the cached tokens it shares with the context (so only the new turn is
    run through the model), and generates the reply.

    Context shift: when the conversation plus room for the reply (max_new_tokens, at most half
    the context) does not fit in seq_len, the oldest exchanges are dropped (the system prompt
    stays) and what remains is fed again.  A single turn too long for the context raises
    AriannaError (AC_ERR_RANGE) saying how many tokens it has and how many fit; the
    conversation stays as it was."""

    def __init__(self, model: "Model", template: Optional[str] = None, system: Optional[str] = None,
                 session: Optional[Session] = None) -> None:
        self.model = model
        self.template = chat_template(model, template)
        self.session = session if session is not None else Session(model)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def stream(self, text: str, params: Optional[SamplingParams] = None, **settings: Any) -> Iterator[str]:
        """Sends the user's text; yields the reply as it is produced.  ``last`` then holds the
        Completion (its text is the reply)."""
        params, options = split_settings(params, settings)
        options = options.with_stops(self.template.stop)  # a reply ends where a next turn would start
        tokens = self._fit(self.messages + [{"role": "user", "content": text}], params)
        self.session.sync(tokens)
        self.messages.append({"role": "user", "content": text})
        reply, parts = ReplyText(), []
        generation = self.session.start(params, options)
        try:
            for piece in self.session.run(generation):
                piece = reply.push(piece)
                if piece:
                    parts.append(piece)
                    yield piece
        finally:
            generation.cancel()
            self.messages.append({"role": "assistant", "content": "".join(parts)})
            self.last = dataclasses.replace(generation.result(), text="".join(parts))

    def say(self, text: str, params: Optional[SamplingParams] = None, **settings: Any) -> Completion:
        """Sends the user's text; returns the reply (a Completion)."""
        for _ in self.stream(text, params, **settings):
            pass
        return self.last

    def _fit(self, messages: list[dict], params: SamplingParams) -> list[int]:
        """The prompt of messages (self.messages + the new turn), the oldest exchanges after
        the system prompt dropped until it leaves room for the reply; they leave
        self.messages too, but only once the turn is known to fit."""
        seq_len = self.model.config.seq_len
        room = min(params.max_new_tokens or seq_len, seq_len // 2)
        first = 1 if messages[0]["role"] == "system" else 0
        dropped = 0
        while True:
            tokens = chat_prompt(self.model, messages[:first] + messages[first + dropped:], self.template)
            if len(tokens) + room <= seq_len or len(messages) - first - dropped <= 1:
                break
            dropped += 2 if len(messages) - first - dropped > 2 else 1  # a user turn and its reply
        if len(tokens) >= seq_len:
            raise AriannaError(f"the turn is {len(tokens)} tokens with the template; the context holds "
                               f"{seq_len - 1} (one left for the reply)", ErrorCode.RANGE)
        del self.messages[first:first + dropped]
        return tokens

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "Chat":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def chat_completion(model: "Model", messages: Sequence[chat.Message], template: Optional[str] = None,
                    params: Optional[SamplingParams] = None, **settings: Any) -> Completion:
    """Model.chat: the assistant's reply to messages (a list of {"role", "content"}), with the
    chat template named (default: chosen from the vocabulary)."""
    tmpl = chat_template(model, template)
    params, options = split_settings(params, settings)
    with Session(model) as session:
        session.sync(chat_prompt(model, messages, tmpl))
        result = session.generate(params, options.with_stops(tmpl.stop))
    return dataclasses.replace(result, text=result.text.lstrip())
