"""Model: a loaded model and its tokenizer, and everything run on them (encode, decode, logits,
generate, stream, generate_batch, save); the bundled persona behind the module functions.

Every call goes into libarianna.so through cffi and releases the GIL while it runs.
"""

from __future__ import annotations

import codecs
import os
import struct
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, TypeVar, Union

from . import paths
from ._lib import _error_check, ffi, load
from .errors import AriannaError, ErrorCode
from .formats import ModelConfig
from .sampling import SamplingParams, _count, _int, sampling_params

if TYPE_CHECKING:  # numpy is imported by the calls that use it: it is most of the import time
    import numpy as np

Text = Union[str, bytes, bytearray, memoryview]
Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]
_BUFFERS = (bytes, bytearray, memoryview)

INT_MAX = 2**31 - 1
# Sessions a Model keeps for reuse once their streams end: each holds a KV cache and threads.
IDLE_SESSIONS = 4


def _text_bytes(text: Text, what: str = "text") -> bytes:
    """The bytes the tokenizer sees.  A str is encoded as UTF-8 (lone surrogates pass as their
    3-byte forms); bytes are used as they are.  Invalid UTF-8 and NUL are ordinary bytes: each
    becomes a byte-fallback token (<0xNN>), and decodes to nothing for control bytes."""
    if isinstance(text, str):
        return text.encode("utf-8", "surrogatepass")
    if isinstance(text, _BUFFERS):
        return bytes(text)
    raise TypeError(f"{what} must be str or bytes, not {type(text).__name__}")


def _token_list(tokens: Any) -> list[int]:
    """Token ids as C ints; TypeError for anything but ints (bool and float are not token
    ids).  Which ids exist is the library's to check."""
    if isinstance(tokens, (str, *_BUFFERS)) or not hasattr(tokens, "__iter__"):
        raise TypeError(f"tokens must be a sequence of ints, not {type(tokens).__name__}")
    ids = [_int(f"tokens[{i}]", t) for i, t in enumerate(tokens)]
    for i, t in enumerate(ids):
        if not -INT_MAX - 1 <= t <= INT_MAX:
            raise AriannaError(f"token {t} (at index {i}) is outside the vocabulary", ErrorCode.RANGE)
    return ids


class _Handles:
    """The C objects of one Model: model, tokenizer, the state logits() reuses and the
    sessions streams reuse.  Freed when the Model is closed and the last call or stream using
    them has finished (so close() never pulls memory from under a running generation)."""

    def __init__(self) -> None:
        self.model: Any = ffi.NULL
        self.tokenizer: Any = ffi.NULL
        self.buffers: list[Any] = []  # memory the C model views (load from bytes), kept alive
        self.state: Any = ffi.NULL    # logits(): one KV cache and thread pool, under state_lock
        self.state_lock = threading.Lock()
        self._idle: list[Any] = []    # sessions of finished streams, at most IDLE_SESSIONS
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False

    def take_session(self) -> Any:
        """An idle session (ffi.NULL if none): its settings and context are the last user's."""
        with self._lock:
            return self._idle.pop() if self._idle else ffi.NULL

    def give_session(self, session: Any) -> None:
        """Keeps a session whose stream ended for the next one, or frees it."""
        with self._lock:
            keep = not self._closed and len(self._idle) < IDLE_SESSIONS
            if keep:
                self._idle.append(session)
        if not keep:
            load().ac_session_free(session)

    def acquire(self) -> "_Handles":
        with self._lock:
            if self._closed:
                raise ValueError("the model is closed")
            self._users += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            free_now = self._closed and self._users == 0
        if free_now:
            self._free()

    @contextmanager
    def use(self) -> Iterator["_Handles"]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            free_now = self._users == 0
        if free_now:
            self._free()

    @property
    def closed(self) -> bool:
        return self._closed

    def _free(self) -> None:
        if self.model == ffi.NULL:  # nothing was loaded (a tokenizer is only loaded after it)
            return
        lib = load()
        for session in self._idle:
            lib.ac_session_free(session)
        self._idle.clear()
        lib.ac_state_free(self.state)
        lib.ac_tokenizer_free(self.tokenizer)
        lib.ac_model_free(self.model)
        self.state = self.tokenizer = self.model = ffi.NULL
        self.buffers.clear()


_Self = TypeVar("_Self", bound="_Closing")


class _Closing:
    """close() (the subclass's) at the end of a with block and when the object is collected;
    an error there is dropped (at interpreter exit the library may be gone already)."""

    close: Callable[[], None]

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Model(_Closing):
    """A loaded model and its tokenizer.

    ``path``: a model file (v0, v1 or int8 v2 layout), or the file's bytes; default: the
    bundled persona.  ``tokenizer``: a tokenizer file (resolved like the CLI's ``-z``), or its
    bytes; default: ``tokenizer.bin``, then ``tok4096.bin`` next to the model.

    ``threads``: threads per call (its matrix products and attention); default: all available
    cores.  Results do not depend on it.
    ``quantize``: ``"int8"`` quantizes a float32 model at load (Q8_0: groups of 32 weights
    sharing a float scale; activations are quantized on the fly); an int8 (v2) file is used
    as it is, with or without it.
    ``modules``: knowledge modules ``[(path or bytes, scale), ...]`` merged into a private copy
    of the weights at load (before ``quantize``); the base file is only read.

    One Model may serve several threads at once: generations run on C objects of their own;
    logits() calls take turns on the Model's one state.
    """

    config: ModelConfig

    def __init__(self, path: Optional[Source] = None, tokenizer: Optional[Source] = None, *,
                 threads: Optional[int] = None, quantize: Optional[str] = None,
                 modules: Sequence[tuple[Source, float]] = ()) -> None:
        self._h = _Handles()  # first: close() and __del__ need it whatever fails below
        self._lib = load()
        self._threads = _thread_count(self._lib, threads)
        if quantize not in (None, "int8"):
            self._h.close()
            raise AriannaError(f"quantize {quantize!r} is invalid: it must be None or 'int8'", ErrorCode.ARG)
        try:
            model_path = self._load_model(path, quantize, modules)
            self._load_tokenizer(model_path, tokenizer)
        except BaseException:
            self._h.close()
            raise

    # ---------------------------------------------------------------- loading

    def _load_model(self, source: Optional[Source], quantize: Optional[str],
                    modules: Sequence[tuple[Source, float]]) -> Optional[str]:
        lib, out = self._lib, ffi.new("ac_model **")
        if isinstance(source, _BUFFERS):
            buf = ffi.from_buffer("char[]", source)
            self._h.buffers.append(buf)  # the model views these bytes: keep them alive
            _error_check(lib.ac_model_load_memory(buf, len(buf), b"<memory>", out))
            model_path = None
        else:
            model_path = paths.default_model_path() if source is None else paths.path_argument(source, "model")
            paths.check_file(model_path, "model")
            _error_check(lib.ac_model_load(os.fsencode(model_path), out), model_path)
        self._h.model = out[0]
        if modules:
            self._merge_modules(modules)
        cfg = ffi.new("ac_config *")
        _error_check(lib.ac_model_config(self._h.model, cfg))
        if quantize == "int8" and cfg.group_size == 0:
            _error_check(lib.ac_model_quantize(self._h.model, 0, out))
            lib.ac_model_free(self._h.model)
            self._h.model = out[0]
            self._h.buffers.clear()  # the int8 model owns its weights
            _error_check(lib.ac_model_config(self._h.model, cfg))
        self.quantization: Optional[str] = "int8" if cfg.group_size else None
        self.config = ModelConfig(
            dim=cfg.dim, hidden_dim=cfg.hidden_dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
            shared_classifier=bool(cfg.shared_classifier), version=cfg.version, group_size=cfg.group_size,
        )
        return model_path

    def _merge_modules(self, modules: Sequence[tuple[Source, float]]) -> None:
        """Replaces the model with a copy that has the modules merged in (C checks each was
        trained on this base, and the scales)."""
        lib = self._lib
        if isinstance(modules, (str, bytes)) or not isinstance(modules, Sequence):
            raise TypeError(f"modules must be a list of (path, scale) pairs, not {type(modules).__name__}")
        loaded = []
        try:
            for item in modules:
                if not (isinstance(item, tuple) and len(item) == 2) or isinstance(item[1], bool) \
                        or not isinstance(item[1], (int, float)):
                    raise TypeError(f"modules: each entry must be a (path, scale) pair, not {item!r}")
                source, out = item[0], ffi.new("ac_module **")
                if isinstance(source, _BUFFERS):
                    buf = ffi.from_buffer("char[]", source)
                    _error_check(lib.ac_module_load_memory(buf, len(buf), b"<memory>", out))
                else:
                    path = paths.path_argument(source, "module")
                    paths.check_file(path, "module")
                    _error_check(lib.ac_module_load(os.fsencode(path), out), path)
                loaded.append(out[0])
            merged = ffi.new("ac_model **")
            scales = ffi.new("float[]", [float(scale) for _, scale in modules])
            _error_check(lib.ac_model_apply_modules(self._h.model, ffi.new("ac_module *[]", loaded), scales,
                                                    len(loaded), merged))
        finally:
            for module in loaded:
                lib.ac_module_free(module)
        lib.ac_model_free(self._h.model)
        self._h.model = merged[0]
        self._h.buffers.clear()  # the merged model owns its weights

    def _load_tokenizer(self, model_path: Optional[str], source: Optional[Source]) -> None:
        lib, out = self._lib, ffi.new("ac_tokenizer **")
        vocab = self.config.vocab_size
        if isinstance(source, _BUFFERS):
            buf = ffi.from_buffer("char[]", source)
            _error_check(lib.ac_tokenizer_load_memory(buf, len(buf), vocab, b"<memory>", out))
        else:
            name = None if source is None else paths.path_argument(source, "tokenizer")
            path = paths.find_tokenizer(model_path, name)
            paths.check_file(path, "tokenizer")
            _error_check(lib.ac_tokenizer_load(os.fsencode(path), vocab, out), path)
        self._h.tokenizer = out[0]

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Frees the C model and tokenizer (once running streams finish).  Idempotent; every
        method but close() then raises ValueError."""
        h = getattr(self, "_h", None)
        if h is not None:
            h.close()

    @property
    def closed(self) -> bool:
        return self._h.closed

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<arianna_c.Model {state} {getattr(self, 'config', None)}>"

    # ---------------------------------------------------------------- tokenizer

    def encode(self, text: Text, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of text (str, or bytes that need not be valid UTF-8), exactly as
        SentencePiece encodes it (plus BOS/EOS if asked)."""
        data = _text_bytes(text)
        cap = len(data) + 3
        tokens, count = ffi.new("int[]", cap), ffi.new("int *")
        with self._h.use() as h:
            _error_check(self._lib.ac_encode(h.tokenizer, data, len(data), int(bool(bos)), int(bool(eos)),
                                             tokens, cap, count))
        return list(tokens[0 : count[0]])

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of a token sequence, decoded as a whole so characters split over byte
        pieces come out intact.  A leading dummy-prefix space is dropped as after BOS."""
        ids = _token_list(tokens)
        with self._h.use():
            return self._decode(ids, self._lib.AC_TOKEN_BOS)

    def _decode(self, tokens: Sequence[int], prev: int) -> str:
        """decode() of tokens that follow token prev (the caller holds the handles)."""
        return self._decode_bytes(tokens, prev).decode("utf-8", "replace")

    def _decode_bytes(self, tokens: Sequence[int], prev: int) -> bytes:
        lib, piece, size = self._lib, ffi.new("const char **"), ffi.new("size_t *")
        parts = []
        for token in tokens:
            _error_check(lib.ac_decode_piece(self._h.tokenizer, prev, token, piece, size))
            parts.append(ffi.buffer(piece[0], size[0])[:])
            prev = token
        return b"".join(parts)

    # ---------------------------------------------------------------- forward

    def logits(self, tokens: Sequence[int], stepwise: bool = False) -> "np.ndarray":
        """float32 logits of shape (len(tokens), vocab_size): row t follows tokens[0..t],
        run from position 0 (len(tokens) <= seq_len).  The tokens go through the layers
        together (prefill); stepwise=True runs them one at a time as decoding does (the
        library's test aid ac_logits_stepwise, for comparing the two paths)."""
        import numpy as np

        ids = np.array(_token_list(tokens), dtype=np.int32)
        with self._h.use() as h:
            out = np.empty((len(ids), self.config.vocab_size), dtype=np.float32)
            if len(ids) == 0:
                return out
            run = self._lib.ac_logits_stepwise if stepwise else self._lib.ac_logits
            with h.state_lock:
                state = self._logits_state()
                rc = run(state, ffi.from_buffer("int[]", ids), len(ids),
                         ffi.from_buffer("float[]", out, require_writable=True))
            _error_check(rc)
        return out

    def _logits_state(self) -> Any:
        """The state logits() runs on, created on first use (the caller holds state_lock)."""
        h = self._h
        if h.state == ffi.NULL:
            out = ffi.new("ac_state **")
            _error_check(self._lib.ac_state_create(h.model, out))
            rc = self._lib.ac_state_set_threads(out[0], self._threads)
            if rc:
                self._lib.ac_state_free(out[0])
                _error_check(rc)
            h.state = out[0]
        return h.state

    # ---------------------------------------------------------------- generation

    def generate(self, prompt: Text = "", max_new_tokens: Optional[int] = None, *,
                 params: Optional[SamplingParams] = None, logprobs: Optional[int] = None,
                 **settings: Any) -> Any:
        """The continuation of prompt (without the prompt).  Stops after max_new_tokens, at
        the model's end of text (BOS/EOS, unless ignore_eos), at a stop string (not part of
        the text), or when prompt + continuation fill seq_len (so max_new_tokens beyond it
        is clamped).  A prompt longer than seq_len tokens (BOS included) raises AriannaError
        (AC_ERR_RANGE); it is never truncated.  prompt may be bytes (invalid UTF-8 and NUL
        become byte tokens).

        The settings (keywords or params=SamplingParams(...); keywords win) are those of
        :class:`SamplingParams`: max_new_tokens (alias max_tokens), temperature, top_p,
        top_k, seed (None = random), ignore_eos, min_p, repeat_penalty, repeat_last_n,
        presence_penalty, frequency_penalty, stop, logit_bias.

        Returns the text (a str); with ``logprobs=N`` (0 <= N <= vocab_size) a
        :class:`arianna_c.session.Completion` instead: the same text, the tokens, the
        finish_reason, and each token's log-probability with the N most likely
        alternatives."""
        p = _settings(params, max_new_tokens, settings)
        if logprobs is None:
            return _generate_text(self, _text_bytes(prompt, "prompt"), p)
        with self.session() as session:
            session.feed(prompt)
            return session.generate(p, logprobs=logprobs)

    def stream(self, prompt: Text = "", max_new_tokens: Optional[int] = None, *,
               params: Optional[SamplingParams] = None, **settings: Any) -> Iterator[str]:
        """Like generate(), yielding text as it is produced, complete characters only.
        Bad settings and a too-long prompt raise here, before the first piece.  Breaking out
        of the loop (or dropping the iterator) ends the generation and leaves the Model
        usable.  (Per-token log-probabilities: generate(..., logprobs=N) or a Session.)"""
        p = _settings(params, max_new_tokens, _no_logprobs(settings, "stream"))
        return _TextStream(self, _text_bytes(prompt, "prompt"), p)

    def generate_batch(self, prompts: Sequence[Text], max_new_tokens: Optional[int] = None, *,
                       params: Optional[SamplingParams] = None, **settings: Any) -> list[str]:
        """generate() for several prompts at once: the sequences advance together (each
        weight read serves all of them), sequence i sampling with seed + i, so
        generate_batch(ps, seed=s)[i] == generate(ps[i], seed=s + i) with the same other
        settings.  seed=None picks a random base seed."""
        if isinstance(prompts, (str, *_BUFFERS)):
            raise TypeError(f"prompts must be a sequence of str or bytes, not {type(prompts).__name__}")
        texts = [_text_bytes(t, f"prompts[{i}]") for i, t in enumerate(prompts)]
        p = _settings(params, max_new_tokens, _no_logprobs(settings, "generate_batch"))
        with self._h.use() as h:
            if not texts:
                return []
            lib, n = self._lib, len(texts)
            c_texts = [ffi.new("char[]", t) for t in texts]  # kept alive for the call
            c_prompts = ffi.new("const char *[]", c_texts)
            lens = ffi.new("size_t[]", [len(t) for t in texts])
            results = ffi.new("ac_batch_result[]", n)
            batch = ffi.new("ac_batch **")
            _error_check(lib.ac_batch_create(h.model, h.tokenizer, n, _c_params(lib, p, self._threads), batch))
            try:
                _set_text_rules(lib, lib.ac_batch_set_stops, lib.ac_batch_set_logit_bias, batch[0], p)
                stride = lib.ac_batch_max_tokens(batch[0])
                tokens = ffi.new("int[]", max(1, n * stride))
                _error_check(lib.ac_batch_generate(batch[0], c_prompts, lens, tokens, results))
            finally:
                lib.ac_batch_free(batch[0])
            return [self._decode_bytes(tokens[i * stride : i * stride + results[i].n_generated],
                                       results[i].last_prompt_token)[: results[i].text_len].decode("utf-8", "replace")
                    for i in range(n)]

    def session(self) -> Any:
        """A Session: a context kept in a KV cache of its own between calls (feed, generate,
        rewind; see arianna_c.session)."""
        from .session import Session

        return Session(self)

    def chat(self, messages: Sequence[Any], template: Optional[str] = None, *,
             params: Optional[SamplingParams] = None, **settings: Any) -> Any:
        """The assistant's reply to messages ([{"role": ..., "content": ...}, ...]) in a chat
        template (by name; default: chosen from the vocabulary): a Completion whose text is
        the reply.  Settings as generate(), plus stop and logprobs."""
        from .session import chat_completion

        return chat_completion(self, messages, template, params, **settings)

    # ---------------------------------------------------------------- saving

    def save(self, path: paths.PathLike) -> None:
        """Writes the model file: an int8 model (quantize="int8" or a v2 file) as a v2 file
        that loads without quantizing again, a float32 model in its own layout."""
        target = paths.path_argument(path, "output")
        with self._h.use() as h:
            _error_check(self._lib.ac_model_save(h.model, os.fsencode(target)), target)


class _Lease:
    """One C session and the Model handles it needs, held together: the session goes back to
    the Model for the next stream (or is freed), the handles are released, both once."""

    def __init__(self, handles: _Handles) -> None:
        self.session: Any = ffi.NULL
        self._handles: Optional[_Handles] = handles.acquire()

    def free(self) -> None:
        handles, self._handles = self._handles, None
        if handles is None:
            return
        if self.session != ffi.NULL:
            handles.give_session(self.session)
            self.session = ffi.NULL
        handles.release()


class _TextStream(Iterator[str], _Closing):
    """The iterator Model.stream returns.  It holds one C session (and the Model's handles, so
    a close() of the Model waits for it) from the call until the text ends, the loop breaks
    (close()) or the iterator is dropped.  The generator that samples references the lease,
    not this object, so dropping the iterator gives the session back at once."""

    def __init__(self, model: Model, prompt: bytes, params: SamplingParams) -> None:
        self._lease = _Lease(model._h)
        try:
            _open_session(model, self._lease, prompt, params)
        except BaseException:
            self._lease.free()
            raise
        self._pieces = _pieces(model._lib, self._lease)

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Ends the generation and gives its session back.  Idempotent."""
        pieces = getattr(self, "_pieces", None)
        if pieces is not None:
            pieces.close()  # runs its finally (if it ever started)
        self._lease.free()


def _open_session(model: Model, lease: _Lease, prompt: bytes, params: SamplingParams) -> None:
    """Gives the lease a session with params and feeds it the prompt (bad settings and a prompt
    longer than the context raise here, from the library)."""
    lib, h = model._lib, model._h
    c_params = _c_params(lib, params, model._threads)
    lease.session = h.take_session()
    if lease.session == ffi.NULL:
        out = ffi.new("ac_session **")
        _error_check(lib.ac_session_create(h.model, h.tokenizer, c_params, out))
        lease.session = out[0]
    else:
        _error_check(lib.ac_session_set_params(lease.session, c_params))
        lib.ac_session_reset(lease.session)
    _set_text_rules(lib, lib.ac_session_set_stops, lib.ac_session_set_logit_bias, lease.session, params)
    _error_check(lib.ac_session_feed(lease.session, prompt, len(prompt), 1))


# Tokens per ac_session_next_text call in generate(): the Python work of a call is spread over
# that many tokens, and Ctrl-C is seen between calls.
TEXT_CHUNK_TOKENS = 64


def _generate_text(model: Model, prompt: bytes, params: SamplingParams) -> str:
    """The whole continuation as stream() would give it, gathered in C a chunk of tokens per
    call: a return to the interpreter after a token's forward pass measured 15-25 us (3-5% of
    a persona token; the same Python work in a loop without forward passes: 2.3 us)."""
    lease = _Lease(model._h)
    try:
        _open_session(model, lease, prompt, params)
        lib, chunks = model._lib, []
        text, size, n = ffi.new("const char **"), ffi.new("size_t *"), ffi.new("int *")
        while True:
            rc = lib.ac_session_next_text(lease.session, TEXT_CHUNK_TOKENS, text, size, n)
            chunks.append(ffi.unpack(text[0], size[0]))
            _error_check(rc)
            if n[0] < TEXT_CHUNK_TOKENS:
                return b"".join(chunks).decode("utf-8", "replace")
    finally:
        lease.free()


def _pieces(lib: Any, lease: _Lease) -> Iterator[str]:
    """The text of the session's tokens until the library ends the generation."""
    session, token, piece, size = lease.session, ffi.new("int *"), ffi.new("const char **"), ffi.new("size_t *")
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    # looked up once: this loop's own cost is per token (~10 us, 1-3% of a token)
    next_token, decode, unpack = lib.ac_session_next, decoder.decode, ffi.unpack
    try:
        while True:
            _error_check(next_token(session, token, piece, size))
            text = decode(unpack(piece[0], size[0]))  # at the end: bytes held for the stop strings
            if text:
                yield text
            if token[0] < 0:
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail
    finally:
        lease.free()


def _no_logprobs(settings: dict, call: str) -> dict:
    """settings of a call that returns text only: logprobs is refused, naming what has them."""
    if "logprobs" in settings:
        raise TypeError(f"{call}() returns text only and takes no logprobs; use generate(..., logprobs=N) "
                        "or a Session for per-token log-probabilities")
    return settings


def _settings(params: Optional[SamplingParams], max_new_tokens: Optional[int], settings: dict) -> SamplingParams:
    if max_new_tokens is not None:
        settings = {"max_new_tokens": max_new_tokens, **settings}
    return sampling_params(params, settings)


def _c_int(name: str, value: int) -> int:
    """A count as a C int: more than a C int holds is the same as INT_MAX (the library
    clamps counts to what fits); less is out of range."""
    if value > INT_MAX:
        return INT_MAX
    if value < -INT_MAX - 1:
        raise AriannaError(f"{name} {value} is invalid: it is outside the range of a C int", ErrorCode.ARG)
    return value


def _c_params(lib: Any, p: SamplingParams, threads: int) -> Any:
    """The C ac_session_params for p: the library's defaults, with p's settings over them
    (the sampler's own settings are the fields of SamplingParams that ac_sampler_params has)."""
    c = ffi.new("ac_session_params *", lib.ac_session_default_params())
    changed = {}  # the settings a C type holds only approximately (a clamped int, a float32)
    for name, c_type in SAMPLER_FIELDS.items():
        value = getattr(p, name)
        if value is not None:
            setattr(c.sampler, name, _c_int(name, value) if c_type == "int" else value)
            if getattr(c.sampler, name) != value:
                changed[name] = value
    if p.max_new_tokens is not None:
        c.max_new_tokens = _c_int("max_new_tokens", p.max_new_tokens)
    if p.ignore_eos is not None:
        c.ignore_eos = int(p.ignore_eos)
    c.n_threads = threads
    if changed:
        _check_as_given(lib, c, changed)
    return c


def _check_as_given(lib: Any, c: Any, given: dict[str, Any]) -> None:
    """The library's check of c, whose settings in given are not exactly what the caller gave
    (2**70 is INT_MAX in C, 1e39 a float inf): a refusal of one of them names the value as
    given, with the library's rule (as the CLI names the value as typed)."""
    try:
        _error_check(lib.ac_session_check_params(c))
    except AriannaError as e:
        what, _, rule = str(e).partition(" is invalid: ")
        name = what.split(" ")[0]
        if not rule or name not in given:
            raise
        raise AriannaError(f"{name} {given[name]} is invalid: {rule}", e.code) from None


# The settings SamplingParams shares with the C sampler, and their C types.
SAMPLER_FIELDS = {name: field.type.cname for name, field in ffi.typeof("ac_sampler_params").fields
                  if name in SamplingParams.__dataclass_fields__}


def _set_text_rules(lib: Any, set_stops: Any, set_bias: Any, target: Any, p: SamplingParams) -> None:
    """p's stop strings and logit bias onto a C session, batch or generation (target), with
    that kind's two setters; the library checks them (AriannaError naming what is wrong)."""
    stops = [ffi.new("char[]", s.encode("utf-8", "surrogatepass")) for s in p.stop]
    lens = ffi.new("size_t[]", [len(s) - 1 for s in stops]) if stops else ffi.NULL
    _error_check(set_stops(target, ffi.new("const char *[]", stops) if stops else ffi.NULL, lens, len(stops)))
    bias = p.logit_bias or {}
    ids = ffi.new("int[]", list(bias)) if bias else ffi.NULL
    values = ffi.new("float[]", list(bias.values())) if bias else ffi.NULL
    _error_check(set_bias(target, ids, values, len(bias)))


def _c_generation(model: Model, p: SamplingParams) -> Any:
    """A C ac_generation with p's settings (freed when garbage): the rules of one generation
    for code that runs the model itself (Session, the server).  Bad settings raise here."""
    lib = model._lib
    out = ffi.new("ac_generation **")
    with model._h.use() as h:
        _error_check(lib.ac_generation_create(h.model, h.tokenizer, _c_params(lib, p, 0), out))
    gen = ffi.gc(out[0], lib.ac_generation_free)
    _set_text_rules(lib, lib.ac_generation_set_stops, lib.ac_generation_set_logit_bias, gen, p)
    return gen


def _thread_count(lib: Any, threads: Optional[int]) -> int:
    """The C thread count of Model(threads=...), checked by the library: 0 (the library's
    default) for None."""
    if threads is None:
        return 0
    n = _c_int("threads", _count("threads", threads))
    c = ffi.new("ac_session_params *", lib.ac_session_default_params())
    c.n_threads = n
    _error_check(lib.ac_session_check_params(c))
    return n


# -------------------------------------------------------------------- module-level helpers

_default: Optional[Model] = None
_default_lock = threading.Lock()


def default_model() -> Model:
    """The bundled persona, loaded on first use and shared by generate() and stream()."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = Model()
        return _default


def default_sampling() -> SamplingParams:
    """The settings a generation uses when none are given, as the library defines them
    (ac_session_default_params; seed None: a fresh random seed for each call)."""
    lib = load()
    c = lib.ac_session_default_params()
    sampler = {name: getattr(c.sampler, name) for name in SAMPLER_FIELDS}
    sampler = {k: _shortest_float32(v) if isinstance(v, float) else v for k, v in sampler.items()}
    sampler["seed"] = None if c.sampler.seed == lib.AC_SEED_RANDOM else int(c.sampler.seed)
    return SamplingParams(max_new_tokens=c.max_new_tokens, ignore_eos=bool(c.ignore_eos), **sampler)


def _shortest_float32(value: float) -> float:
    """The shortest decimal that is the same C float (0.9f reads back as 0.9, not 0.89999997)."""
    f32 = struct.pack("<f", value)
    for digits in range(1, 10):
        shorter = float(f"{value:.{digits}g}")
        if struct.pack("<f", shorter) == f32:
            return shorter
    return value


def generate(prompt: Text = "", max_new_tokens: Optional[int] = None, *,
             params: Optional[SamplingParams] = None, logprobs: Optional[int] = None, **settings: Any) -> Any:
    """Model.generate on the bundled persona."""
    return default_model().generate(prompt, params=_settings(params, max_new_tokens, settings), logprobs=logprobs)


def stream(prompt: Text = "", max_new_tokens: Optional[int] = None, *,
           params: Optional[SamplingParams] = None, **settings: Any) -> Iterator[str]:
    """Model.stream on the bundled persona."""
    p = _settings(params, max_new_tokens, _no_logprobs(settings, "stream"))
    return default_model().stream(prompt, params=p)
