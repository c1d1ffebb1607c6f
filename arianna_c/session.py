"""Sessions: a context that stays in the KV cache between calls, and the generation loop.

    with model.session() as s:
        s.feed("Q: What is resonance?\\nA:")
        reply = s.generate(max_new_tokens=64, stop=["\\nQ:"], seed=1)
        s.position                    # tokens in the context (prompt + reply)
        s.rewind(len(reply.tokens))   # forget the reply; the prompt stays cached

What a generation produces is decided by the C library (ac_generation): sampling, the stop
rule and the stop strings (matched on the decoded bytes; bytes that could start a stop
string are held back, so a partial one is never shown).  Here: the context and the prefix
reuse that lets a new prompt keep the cached part it shares with the old one, per-token
log-probabilities, the names of the stop reasons (``stop``: the model's end of text or a
stop string; ``length``: max_new_tokens or a full context), and chat.

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
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

from . import chat
from ._lib import _error_check, ffi
from .errors import AriannaError, ErrorCode
from .runtime import _c_generation, _c_params, _Closing, _text_bytes, _token_list
from .sampling import SamplingParams, _count, _int, sampling_params

if TYPE_CHECKING:
    from . import Model

__all__ = ["Chat", "Completion", "Generation", "Session", "Slots", "TokenLogprob", "chat_completion"]

Text = Union[str, bytes]

# The stop strings one generation holds (src/run.h), a chat template's among them.
AC_MAX_STOPS = ffi.integer_const("AC_MAX_STOPS")

# ---------------------------------------------------------------------------- KV caches


class Slots(_Closing):
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


# ---------------------------------------------------------------------------- one generation

# What each of the library's stop reasons is called in a Completion.
FINISH_REASONS = {"AC_STOP_END": "stop", "AC_STOP_STRING": "stop", "AC_STOP_LENGTH": "length",
                  "AC_STOP_CONTEXT": "length", "AC_STOP_CALLER": "cancelled"}


def with_stops(params: SamplingParams, extra: Sequence[str]) -> SamplingParams:
    """params with the stop strings in extra added (e.g. where a chat template's next turn
    starts).  AriannaError (AC_ERR_ARG) when they are more than the library's AC_MAX_STOPS,
    saying how many the caller may give."""
    combined = sampling_params(params, {"stop": params.stop + tuple(extra)})
    added = len(combined.stop) - len(params.stop)
    if len(combined.stop) > AC_MAX_STOPS:
        of_template = f", less the chat template's {added}" if added else ""
        raise AriannaError(f"stop has {len(params.stop)} strings; at most {AC_MAX_STOPS - added} (the library's "
                           f"AC_MAX_STOPS, {AC_MAX_STOPS} per generation{of_template})", ErrorCode.ARG)
    return combined


class Generation:
    """One generation in progress on a Session: the library's ac_generation (sampler, stop
    rule, stop strings) and what it has produced so far.  It never runs the model: whoever
    drives it (Session.generate alone, or the server stepping many together) hands it each
    step's logits with :meth:`step`, which samples the next token and returns it while the
    generation goes on.  Final text comes out of :meth:`take_text` as it is produced.

    ``logprobs``: None, or report each token's log-probability with that many alternatives
    (0..vocab_size; more is an AriannaError before anything runs)."""

    def __init__(self, session: "Session", params: SamplingParams, logprobs: Optional[int] = None) -> None:
        lib = session.lib
        self.session, self.params, self.lib = session, params, lib
        self.n_top = _logprobs_count(logprobs, session.vocab_size)
        self._gen = _c_generation(session.model, params)
        context = ffi.new("int[]", session.tokens)
        _error_check(lib.ac_generation_begin(self._gen, context, len(session.tokens)))
        self.prompt_tokens = session.position
        self.tokens: list[int] = []
        self.logprobs: Optional[list[TokenLogprob]] = [] if self.n_top is not None else None
        self.finish_reason: Optional[str] = None
        self._reasons = {getattr(lib, name): reason for name, reason in FINISH_REASONS.items()}
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._prev = session.tokens[-1]
        self._text: list[str] = []
        self._taken = 0
        self._token, self._piece, self._size = ffi.new("int *"), ffi.new("const char **"), ffi.new("size_t *")
        self._update(b"")

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def step(self, logits: Any) -> Optional[int]:
        """Samples the next token from logits (those after the session's last token) and
        appends it to the session.  Returns it when it is to be run through the model (the
        generation goes on); None when the generation has ended (see finish_reason)."""
        _error_check(self.lib.ac_generation_next(self._gen, logits, self._token, self._piece, self._size))
        token = self._token[0]
        if token >= 0:
            if self.logprobs is not None:
                self.logprobs.append(self._logprob(logits, self._prev, token))
            self._prev = token
            self.tokens.append(token)
            self.session._append(token)
        self._update(ffi.unpack(self._piece[0], self._size[0]))
        return None if self.done else token

    def cancel(self) -> None:
        """Ends the generation now (finish_reason ``"cancelled"``), e.g. when a client left."""
        self.lib.ac_generation_cancel(self._gen)
        self._update(b"")

    def take_text(self) -> str:
        """The final text produced since the last call."""
        new = "".join(self._text[self._taken:])
        self._taken = len(self._text)
        return new

    def result(self) -> Completion:
        return Completion("".join(self._text), self.tokens, self.finish_reason or "length",
                          self.prompt_tokens, self.logprobs)

    def _update(self, data: bytes) -> None:
        """Takes in the bytes the library says are final, and its stop reason."""
        if self.done:
            return
        reason = self.lib.ac_generation_stop_reason(self._gen)
        ended = reason != self.lib.AC_STOP_NONE
        text = self._utf8.decode(data, final=ended)
        if text:
            self._text.append(text)
        if ended:
            self.finish_reason = self._reasons[reason]

    def _logprob(self, logits: Any, prev: int, token: int) -> TokenLogprob:
        n = self.n_top or 0
        lp, ids, lps = ffi.new("float *"), ffi.new("int[]", max(n, 1)), ffi.new("float[]", max(n, 1))
        _error_check(self.lib.ac_logprobs(logits, self.session.vocab_size, token, n, lp, ids, lps))
        top = []
        for i in range(n):
            alt = self.session.piece(prev, ids[i])
            top.append((ids[i], alt.decode("utf-8", "replace"), alt, lps[i]))
        piece = self.session.piece(prev, token)
        return TokenLogprob(token, piece.decode("utf-8", "replace"), piece, lp[0], top)


def _logprobs_count(logprobs: Any, vocab_size: int) -> Optional[int]:
    """How many alternatives each token's log-probability comes with: None (none asked for)
    or 0..vocab_size."""
    n = _count("logprobs", logprobs)
    if n is not None and not 0 <= n <= vocab_size:
        raise AriannaError(f"logprobs {n} is invalid: it must be in 0..{vocab_size} (the vocabulary's size; "
                           "None = off)", ErrorCode.ARG)
    return n


# ---------------------------------------------------------------------------- session


class _Open(_Closing):
    """A _Closing with ``closed``: once it is closed, every method but close() raises
    ValueError ("the session is closed", "the chat is closed"), as a Model's do."""

    kind: str
    closed: bool

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"the {self.kind} is closed")


class Session(_Open):
    """A context kept in a KV cache between calls.

    ``feed(text)`` appends text (BOS first when the context is empty), ``generate(...)``
    continues the context and appends what it generates, ``rewind(n)`` forgets the last n
    tokens, ``sync(tokens)`` makes the context exactly tokens (keeping the cached prefix
    they share), ``shift(keep, drop)`` drops tokens from the middle.  Tokens are run through
    the model lazily, by the next generation, all together (one prefill).

    A Session owns one sequence of ``slots`` (a batch of one of its own by default) and is
    meant for one thread at a time.  ``position``: tokens in the context; it never exceeds
    the model's seq_len (feeding more raises AriannaError AC_ERR_RANGE; a generation stops
    with finish_reason "length" when the context is full).  After close(), every method
    raises ValueError.
    """

    kind = "session"

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
    def closed(self) -> bool:
        return getattr(self, "slots", None) is None

    @property
    def position(self) -> int:
        """Tokens in the context."""
        self._check_open()
        return len(self.tokens)

    def feed(self, text: Text, bos: Optional[bool] = None) -> int:
        """Appends text's tokens (BOS first if bos, by default when the context is empty);
        returns how many.  AriannaError (AC_ERR_RANGE) if they do not fit."""
        self._check_open()
        if bos is None:
            bos = not self.tokens
        return self.feed_tokens(self.model.encode(text, bos=bos, eos=False))

    def feed_tokens(self, tokens: Sequence[int]) -> int:
        self._check_open()
        ids = _token_ids(tokens, self.vocab_size)
        if len(self.tokens) + len(ids) > self.seq_len:
            raise AriannaError(f"{len(ids)} tokens do not fit: {len(self.tokens)} of the model's seq_len "
                               f"{self.seq_len} are in use", ErrorCode.RANGE)
        self.tokens += ids
        return len(ids)

    def rewind(self, n: int) -> None:
        """Forgets the last n tokens of the context (the cache keeps the rest)."""
        self._check_open()
        n = _int("n", n)
        if not 0 <= n <= len(self.tokens):
            raise AriannaError(f"rewind {n} is invalid: it must be in 0..{len(self.tokens)}", ErrorCode.ARG)
        self._truncate(len(self.tokens) - n)

    def reset(self) -> None:
        """Empties the context."""
        self._check_open()
        self._truncate(0)

    def sync(self, tokens: Sequence[int]) -> int:
        """Makes the context exactly tokens, keeping the cached part it shares with them;
        returns the number of tokens kept (not to be run again)."""
        self._check_open()
        ids = _token_ids(tokens, self.vocab_size)
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
        self._check_open()
        keep, drop, n = _int("keep", keep), _int("drop", drop), len(self.tokens)
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
        self._check_open()
        _error_check(self.lib.ac_decode_piece(self._tokenizer, prev, token, self._piece, self._size))
        return ffi.unpack(self._piece[0], self._size[0])

    @property
    def text(self) -> str:
        """The context as text (special tokens give none)."""
        self._check_open()
        return self.model.decode(self.tokens)

    # ------------------------------------------------------------ generation

    def start(self, params: Optional[SamplingParams] = None, *, logprobs: Optional[int] = None,
              **settings: Any) -> Generation:
        """A Generation continuing the context (an empty context starts from BOS).  settings:
        those of SamplingParams (stop and logit_bias included); logprobs: see Generation."""
        self._check_open()
        params = sampling_params(params, settings)
        started_empty = not self.tokens
        if started_empty:
            self.tokens.append(self.lib.AC_TOKEN_BOS)
        try:
            return Generation(self, params, logprobs)
        except BaseException:
            if started_empty:
                self.tokens.clear()  # bad settings change nothing
            raise

    def first_logits(self) -> Any:
        """Runs the tokens not yet in the cache (the last one at least, so its logits are
        fresh) in one prefill; returns the logits after the last token."""
        self._check_open()
        if self._n_run >= len(self.tokens):
            self._n_run = len(self.tokens) - 1
        logits = self.slots.prefill(self.seq, self.tokens[self._n_run:], self._n_run)
        self._n_run = len(self.tokens)
        return logits

    def advance(self, token: int) -> tuple[int, int, int]:
        """The decode row that runs token (just appended by a Generation) into the cache."""
        self._check_open()
        pos = self._n_run
        self._n_run += 1
        return (self.seq, token, pos)

    def run(self, generation: Generation) -> Iterator[str]:
        """Drives generation alone, one decode step per token; yields final text."""
        self._check_open()
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

    def stream(self, params: Optional[SamplingParams] = None, *, logprobs: Optional[int] = None,
               **settings: Any) -> Iterator[str]:
        """generate() that yields text as it becomes final (whole characters, never part of
        a stop string).  ``last`` holds the Completion afterwards."""
        generation = self.start(params, logprobs=logprobs, **settings)
        try:
            yield from self.run(generation)
        finally:
            generation.cancel()  # a loop left early: the tokens so far stay in the context
            self.last = generation.result()

    def generate(self, params: Optional[SamplingParams] = None, *, logprobs: Optional[int] = None,
                 **settings: Any) -> Completion:
        """Continues the context; the generated tokens join it.  Settings as Model.generate
        (max_new_tokens, temperature, top_p, top_k, min_p, seed, penalties, ignore_eos, stop,
        logit_bias), and logprobs: None, or each token's log-probability with that many
        alternatives in the Completion."""
        generation = self.start(params, logprobs=logprobs, **settings)
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


def _token_ids(tokens: Any, vocab_size: int) -> list[int]:
    """tokens as Model.decode takes them (TypeError otherwise), each one in the vocabulary."""
    ids = _token_list(tokens)
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise AriannaError(f"token {t} (at index {i}) is outside the vocabulary [0, {vocab_size})",
                               ErrorCode.RANGE)
    return ids


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
    """The token ids of messages in template, ending with the opening of the reply (the
    library's ac_chat_tokens, as ./run feeds them)."""
    lib, c_template = model._lib, chat._c_template(template)
    c_messages, keep = chat._c_messages(messages)
    n, cap = ffi.new("int *"), model.config.seq_len
    with model._h.use() as h:
        while True:
            out = ffi.new("int[]", cap)
            rc = lib.ac_chat_tokens(c_template, h.tokenizer, c_messages, len(messages), 1, out, cap, n)
            if rc != lib.AC_ERR_RANGE or n[0] <= cap:
                break
            cap = n[0]  # longer than the context: the count it needs, then the ids
    del keep
    _error_check(rc)
    return list(out[0:n[0]])


class Chat(_Open):
    """A conversation that keeps its session, by the library's rules (ac_conversation, those
    of ./run -m chat): each turn renders the whole conversation with the template, keeps the
    cached tokens it shares with the context (so only the new turn is run through the model),
    and generates the reply, whose text is the library's (the whitespace the template leaves
    before it dropped).

    Context shift: when the conversation plus room for the reply (max_new_tokens, at most half
    the context) does not fit in seq_len, the oldest exchanges are left out (the system prompt
    stays).  The turn and its reply join ``messages`` when the reply ends, and the exchanges
    left out leave it then.  A single turn too long for the
    context raises AriannaError (AC_ERR_RANGE) saying how many tokens it has and how many
    fit; the conversation stays as it was.  After close(), every method raises ValueError."""

    kind = "chat"

    def __init__(self, model: "Model", template: Optional[str] = None, system: Optional[str] = None,
                 session: Optional[Session] = None) -> None:
        self.model = model
        self.lib = model._lib
        self.template = chat_template(model, template)
        self._c, self._use = ffi.NULL, None
        use = model._h.use()  # the model stays loaded while the conversation exists
        handles = use.__enter__()
        self._use = use
        try:
            out = ffi.new("ac_conversation **")
            _error_check(self.lib.ac_conversation_create(handles.model, handles.tokenizer,
                                                         chat._c_template(self.template), out))
            self._c = out[0]
            if system:
                data = _utf8("system", system)
                _error_check(self.lib.ac_conversation_add(self._c, b"system", data, len(data)))
            self.session = session if session is not None else Session(model)
        except BaseException:
            self.close()
            raise
        self._tokens, self._turn = ffi.new("const int **"), ffi.new("ac_conversation_turn *")
        self._text, self._size = ffi.new("const char **"), ffi.new("size_t *")

    @property
    def closed(self) -> bool:
        return getattr(self, "_c", ffi.NULL) == ffi.NULL

    @property
    def messages(self) -> list[dict]:
        """The conversation so far: [{"role", "content"}, ...], the system prompt first."""
        self._check_open()
        out = []
        for i in range(self.lib.ac_conversation_n_messages(self._c)):
            m = self.lib.ac_conversation_message(self._c, i)
            content = ffi.unpack(m.content, m.content_len).decode("utf-8", "surrogatepass")
            out.append({"role": ffi.string(m.role).decode(), "content": content})
        return out

    def stream(self, text: str, params: Optional[SamplingParams] = None, *, logprobs: Optional[int] = None,
               **settings: Any) -> Iterator[str]:
        """Sends the user's text; yields the reply as it is produced.  ``last`` then holds the
        Completion (its text is the reply)."""
        self._check_open()
        # a reply ends where a next turn would start
        params = with_stops(sampling_params(params, settings), self.template.stop)
        data = _utf8("text", text)
        _error_check(self.lib.ac_conversation_prompt(self._c, _c_params(self.lib, params, 0), data, len(data),
                                                     self._tokens, self._turn))
        self.session.sync(ffi.unpack(self._tokens[0], self._turn.n_prompt))
        generation = self.session.start(params, logprobs=logprobs)
        parts = []
        try:
            for piece in self.session.run(generation):
                piece = self._reply(piece, False)
                if piece:
                    parts.append(piece)
                    yield piece
        finally:
            generation.cancel()
            # the turn and its reply join the conversation (the pieces were whole characters:
            # nothing is held back for this last call)
            parts.append(self._reply("", True))
            self.last = dataclasses.replace(generation.result(), text="".join(parts))

    def say(self, text: str, params: Optional[SamplingParams] = None, *, logprobs: Optional[int] = None,
            **settings: Any) -> Completion:
        """Sends the user's text; returns the reply (a Completion)."""
        for _ in self.stream(text, params, logprobs=logprobs, **settings):
            pass
        return self.last

    def _reply(self, piece: str, final: bool) -> str:
        data = piece.encode("utf-8")
        _error_check(self.lib.ac_conversation_reply(self._c, data, len(data), int(final), self._text, self._size))
        return ffi.unpack(self._text[0], self._size[0]).decode()

    def close(self) -> None:
        """Frees the conversation and closes its session (idempotent)."""
        c, self._c = getattr(self, "_c", ffi.NULL), ffi.NULL
        if c != ffi.NULL:
            self.lib.ac_conversation_free(c)
        session = getattr(self, "session", None)
        if session is not None:
            session.close()
        use, self._use = getattr(self, "_use", None), None
        if use is not None:
            use.__exit__(None, None, None)


def _utf8(name: str, text: Any) -> bytes:
    """A str argument's bytes, encoded as prompts are (lone surrogates as their 3-byte forms)."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, not {type(text).__name__}")
    return _text_bytes(text)


def chat_completion(model: "Model", messages: Sequence[chat.Message], template: Optional[str] = None,
                    params: Optional[SamplingParams] = None, *, logprobs: Optional[int] = None,
                    **settings: Any) -> Completion:
    """Model.chat: the assistant's reply to messages (a list of {"role", "content"}), with the
    chat template named (default: chosen from the vocabulary)."""
    tmpl = chat_template(model, template)
    params = with_stops(sampling_params(params, settings), tmpl.stop)
    with Session(model) as session:
        session.sync(chat_prompt(model, messages, tmpl))
        result = session.generate(params, logprobs=logprobs)
    return dataclasses.replace(result, text=chat.reply_text(result.text))
