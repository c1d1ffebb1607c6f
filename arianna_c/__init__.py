"""arianna_c: a small, fast, correct runtime for tiny Llama-architecture models.

    import arianna_c
    print(arianna_c.generate("Resonance is"))          # the bundled persona
    with arianna_c.Model("model.bin", "tok.bin") as m:
        for piece in m.stream("Once upon a time", max_new_tokens=64, seed=1):
            print(piece, end="", flush=True)

The work is done by libarianna.so (src/run.c) through cffi; calls into it release the GIL.
Importing this package does not load the library: the first Model does.
"""

from __future__ import annotations

import codecs
import errno
import os
import random
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

from ._lib import AriannaError, _error_check, ffi, load
from .formats import ModelConfig

if TYPE_CHECKING:  # numpy is imported by the calls that use it: it is most of the import time
    import numpy as np

__all__ = ["AriannaError", "Model", "ModelConfig", "generate", "stream", "__version__"]
__version__ = "0.1.0"

PathLike = Union[str, "os.PathLike[str]"]
Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

DEFAULT_MODEL = "arianna_v1_base.bin"
# Looked up next to the model when no tokenizer is named.
DEFAULT_TOKENIZERS = ("tok4096.bin", "tokenizer.bin")

_PACKAGE_DIR = Path(__file__).resolve().parent


def _default_model_path() -> Path:
    """The bundled persona: inside the installed package, else persona/ in a source checkout."""
    tried = [_PACKAGE_DIR / "persona" / DEFAULT_MODEL, _PACKAGE_DIR.parent / "persona" / DEFAULT_MODEL]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(
        errno.ENOENT,
        "no bundled persona model found; tried: " + ", ".join(map(str, tried)),
        str(tried[0]),
    )


def _tokenizer_candidates(model_path: Optional[Path], name: Optional[PathLike]) -> list[Path]:
    """A named tokenizer resolves like the CLI's -z: NAME, NAME.bin, then both in the model's
    folder.  Without a name: tok4096.bin, then tokenizer.bin in the model's folder."""
    folder = model_path.parent if model_path is not None else None
    if name is None:
        return [folder / n for n in DEFAULT_TOKENIZERS] if folder is not None else []
    raw = os.fspath(name)
    found = [Path(raw), Path(raw + ".bin")]
    if folder is not None and not os.path.isabs(raw):
        found += [folder / raw, folder / (raw + ".bin")]
    return found


def _as_buffer(data: Union[bytes, bytearray, memoryview]) -> Any:
    return ffi.from_buffer("char[]", data)


def _check_path(path: Path, what: str) -> None:
    """The errors Python can name better than the C library: a missing path
    (FileNotFoundError), a directory (IsADirectoryError), a NUL byte in the name (AriannaError).
    Everything else (FIFOs, unreadable or malformed files) is left to the library."""
    if "\0" in str(path):
        raise AriannaError(f"{what} path {str(path)!r} contains a NUL byte", 4, "AC_ERR_ARG")
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{path}: is a directory, not a {what} file", str(path))
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, f"{what} file not found: {path}", str(path))


def _text_bytes(text: Union[str, bytes, bytearray, memoryview]) -> bytes:
    """The bytes the tokenizer sees.  A str is encoded as UTF-8 (lone surrogates pass as their
    3-byte forms); bytes are used as they are.  Invalid UTF-8 and NUL are ordinary bytes: each
    becomes a byte-fallback token (<0xNN>), and decodes to nothing for control bytes."""
    if isinstance(text, str):
        return text.encode("utf-8", "surrogatepass")
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise TypeError(f"text must be str or bytes, not {type(text).__name__}")


class _Handles:
    """The C model and tokenizer of one Model, freed when the Model is closed and the last
    call or stream using them has finished (so close() never pulls memory from under a
    running generation)."""

    def __init__(self) -> None:
        self.model: Any = ffi.NULL
        self.tokenizer: Any = ffi.NULL
        self.buffers: list[Any] = []  # memory the C model views (load from bytes), kept alive
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False

    @contextmanager
    def use(self) -> Iterator["_Handles"]:
        with self._lock:
            if self._closed:
                raise AriannaError("the model is closed")
            self._users += 1
        try:
            yield self
        finally:
            with self._lock:
                self._users -= 1
                free_now = self._closed and self._users == 0
            if free_now:
                self._free()

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
        lib = load()
        if self.tokenizer != ffi.NULL:
            lib.ac_tokenizer_free(self.tokenizer)
            self.tokenizer = ffi.NULL
        if self.model != ffi.NULL:
            lib.ac_model_free(self.model)
            self.model = ffi.NULL
        self.buffers.clear()


class Model:
    """A loaded model and its tokenizer.

    ``path``: a model file (v0 or v1 layout), or the file's bytes; default: the bundled persona.
    ``tokenizer``: a tokenizer file (resolved like the CLI's ``-z``), or its bytes; default:
    ``tok4096.bin`` then ``tokenizer.bin`` next to the model.

    ``threads``: threads per call (its matrix products and attention); default: all available
    cores.  Results do not depend on it.
    ``quantize``: ``"int8"`` quantizes a float32 model at load (Q8_0: groups of 32 weights
    sharing a float scale; activations are quantized on the fly); an int8 (v2) file is used
    as it is, with or without it.

    Each call runs on its own C state, so one Model may serve several threads at once.
    """

    config: ModelConfig

    def __init__(self, path: Optional[Source] = None, tokenizer: Optional[Source] = None,
                 threads: Optional[int] = None, quantize: Optional[str] = None) -> None:
        self._lib = load()
        self._h = _Handles()
        self._threads = _thread_count(threads)
        if quantize not in (None, "int8"):
            self._h.close()
            raise AriannaError(f"quantize {quantize!r} is invalid: it must be None or 'int8'",
                               self._lib.AC_ERR_ARG, "AC_ERR_ARG")
        try:
            model_path = self._load_model(path, quantize)
            self._load_tokenizer(model_path, tokenizer)
        except BaseException:
            self._h.close()
            raise

    # ---------------------------------------------------------------- loading

    def _load_model(self, source: Optional[Source], quantize: Optional[str]) -> Optional[Path]:
        lib, out = self._lib, ffi.new("ac_model **")
        if isinstance(source, (bytes, bytearray, memoryview)):
            buf = _as_buffer(source)
            self._h.buffers.append(buf)  # the model views these bytes: keep them alive
            _error_check(lib.ac_model_load_memory(buf, len(buf), b"<memory>", out))
            model_path = None
        else:
            model_path = Path(os.fspath(source)) if source is not None else _default_model_path()
            _check_path(model_path, "model")
            _error_check(lib.ac_model_load(os.fsencode(model_path), out), str(model_path))
        self._h.model = out[0]
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
            shared_classifier=bool(cfg.shared_classifier), version=cfg.version,
        )
        return model_path

    def _load_tokenizer(self, model_path: Optional[Path], source: Optional[Source]) -> None:
        lib, out = self._lib, ffi.new("ac_tokenizer **")
        vocab = self.config.vocab_size
        if isinstance(source, (bytes, bytearray, memoryview)):
            buf = _as_buffer(source)
            _error_check(lib.ac_tokenizer_load_memory(buf, len(buf), vocab, b"<memory>", out))
        else:
            tried = _tokenizer_candidates(model_path, source)
            path = next((p for p in tried if p.is_file()), None)
            if path is None:
                shown = ", ".join(map(str, tried)) or "(nothing: name a tokenizer for a model loaded from memory)"
                raise FileNotFoundError(errno.ENOENT, f"no tokenizer file found; tried: {shown}",
                                        str(tried[0]) if tried else None)
            _error_check(lib.ac_tokenizer_load(os.fsencode(path), vocab, out), str(path))
        self._h.tokenizer = out[0]

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Frees the C model and tokenizer (once running streams finish).  Idempotent."""
        h = getattr(self, "_h", None)
        if h is not None:
            h.close()

    @property
    def closed(self) -> bool:
        return self._h.closed

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<arianna_c.Model {state} {self.config}>"

    # ---------------------------------------------------------------- tokenizer

    def encode(self, text: Union[str, bytes], bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of text (str, or bytes that need not be valid UTF-8), exactly as
        SentencePiece encodes it (plus BOS/EOS if asked)."""
        data = _text_bytes(text)
        cap = len(data) + 3
        tokens, count = ffi.new("int[]", cap), ffi.new("int *")
        with self._h.use() as h:
            _error_check(self._lib.ac_encode(h.tokenizer, data, len(data), int(bool(bos)),
                                             int(bool(eos)), tokens, cap, count))
        return list(tokens[0 : count[0]])

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of a token sequence, decoded as a whole so characters split over byte
        pieces come out intact.  A leading dummy-prefix space is dropped as after BOS."""
        return self._decode(tokens, self._lib.AC_TOKEN_BOS)

    def _decode(self, tokens: Sequence[int], prev: int) -> str:
        """decode() of tokens that follow token prev."""
        lib, piece, size = self._lib, ffi.new("const char **"), ffi.new("size_t *")
        parts = []
        with self._h.use() as h:
            for token in tokens:
                token = _as_token(token, self.config.vocab_size)
                _error_check(lib.ac_decode_piece(h.tokenizer, prev, token, piece, size))
                parts.append(ffi.buffer(piece[0], size[0])[:])
                prev = token
        return b"".join(parts).decode("utf-8", "replace")

    # ---------------------------------------------------------------- forward

    def logits(self, tokens: Sequence[int], stepwise: bool = False) -> np.ndarray:
        """float32 logits of shape (len(tokens), vocab_size): row t follows tokens[0..t],
        run from position 0 (len(tokens) <= seq_len).  The tokens go through the layers
        together (prefill); stepwise=True runs them one at a time as decoding does."""
        import numpy as np

        ids = np.array([_as_token(t, self.config.vocab_size) for t in tokens], dtype=np.int32)
        out = np.empty((len(ids), self.config.vocab_size), dtype=np.float32)
        if len(ids) > self.config.seq_len:
            raise AriannaError(f"{len(ids)} tokens exceed the model's seq_len {self.config.seq_len}",
                               self._lib.AC_ERR_RANGE, "AC_ERR_RANGE")
        if len(ids) == 0:
            return out
        lib, state = self._lib, ffi.new("ac_state **")
        with self._h.use() as h:
            _error_check(lib.ac_state_create(h.model, state))
            try:
                _error_check(lib.ac_state_set_threads(state[0], self._threads))
                run = lib.ac_logits_stepwise if stepwise else lib.ac_logits
                _error_check(run(state[0], ffi.from_buffer("int[]", ids), len(ids),
                                 ffi.from_buffer("float[]", out, require_writable=True)))
            finally:
                lib.ac_state_free(state[0])
        return out

    # ---------------------------------------------------------------- generation

    def generate(self, prompt: Union[str, bytes] = "", max_new_tokens: int = 256,
                 temperature: float = 0.8, top_p: float = 0.9, top_k: int = 0,
                 seed: Optional[int] = None, ignore_eos: bool = False) -> str:
        """The continuation of prompt (without the prompt).  Stops after max_new_tokens, at
        EOS/BOS (unless ignore_eos: then those are run like any token and the text goes on,
        e.g. to time a fixed number of tokens), or when prompt + continuation fill seq_len (so
        max_new_tokens beyond it is clamped).  A prompt longer than seq_len tokens (BOS
        included) raises AriannaError (AC_ERR_RANGE); it is never truncated.  prompt may be
        bytes (invalid UTF-8 and NUL become byte tokens).  seed=None picks a random seed."""
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_p, top_k, seed, ignore_eos))

    def stream(self, prompt: Union[str, bytes] = "", max_new_tokens: int = 256,
               temperature: float = 0.8, top_p: float = 0.9, top_k: int = 0,
               seed: Optional[int] = None, ignore_eos: bool = False) -> Iterator[str]:
        """Like generate(), yielding text as it is produced, complete characters only.
        Bad settings and a too-long prompt raise here, before the first piece.  Breaking out
        of the loop ends the generation and leaves the Model usable."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise AriannaError(f"max_new_tokens {max_new_tokens!r} is invalid: it must be an int >= 0",
                               self._lib.AC_ERR_ARG, "AC_ERR_ARG")
        params = _sampler_params(temperature, top_p, top_k, seed)
        self._check_sampler(params)
        prompt_ids = self.encode(prompt, bos=True)
        if len(prompt_ids) > self.config.seq_len:
            raise AriannaError(
                f"the prompt is {len(prompt_ids)} tokens (BOS included) but the model's "
                f"seq_len is {self.config.seq_len}", self._lib.AC_ERR_RANGE, "AC_ERR_RANGE")
        return self._stream(prompt_ids, max_new_tokens, params, ignore_eos)

    def _check_sampler(self, params: Any) -> None:
        """Runs the C sampler's own range checks now, not at the first piece of a stream."""
        out = ffi.new("ac_sampler **")
        _error_check(self._lib.ac_sampler_create(params, self.config.vocab_size, out))
        self._lib.ac_sampler_free(out[0])

    def _stream(self, prompt_ids: list[int], max_new_tokens: int, params: Any,
                ignore_eos: bool) -> Iterator[str]:
        lib = self._lib
        with self._h.use() as h:
            out = ffi.new("ac_session **")
            _error_check(lib.ac_session_create(h.model, h.tokenizer, params, out))
            session = out[0]
            try:
                _error_check(lib.ac_session_set_threads(session, self._threads))
                ids = ffi.new("int[]", prompt_ids)
                _error_check(lib.ac_session_feed_tokens(session, ids, len(prompt_ids)))
                token, piece, size = ffi.new("int *"), ffi.new("const char **"), ffi.new("size_t *")
                decoder = codecs.getincrementaldecoder("utf-8")("replace")
                stops = () if ignore_eos else (lib.AC_TOKEN_BOS, lib.AC_TOKEN_EOS)
                # looked up once: this loop's own cost is per token (~10 us, 1-3% of a token)
                next_token, decode, unpack = lib.ac_session_next, decoder.decode, ffi.unpack
                for _ in range(max_new_tokens):
                    _error_check(next_token(session, token, piece, size))
                    t = token[0]
                    if t < 0 or t in stops:
                        break
                    text = decode(unpack(piece[0], size[0]))
                    if text:
                        yield text
                tail = decoder.decode(b"", final=True)
                if tail:
                    yield tail
            finally:
                lib.ac_session_free(session)


    def generate_batch(self, prompts: Sequence[Union[str, bytes]], max_new_tokens: int = 256,
                       temperature: float = 0.8, top_p: float = 0.9, top_k: int = 0,
                       seed: Optional[int] = None, ignore_eos: bool = False) -> list[str]:
        """generate() for several prompts at once: the sequences advance together (each
        weight read serves all of them), sequence i sampling with seed + i, so
        generate_batch(ps, seed=s, ignore_eos=e)[i] == generate(ps[i], seed=s + i,
        ignore_eos=e).  seed=None picks a random base seed."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise AriannaError(f"max_new_tokens {max_new_tokens!r} is invalid: it must be an int >= 0",
                               self._lib.AC_ERR_ARG, "AC_ERR_ARG")
        params = _sampler_params(temperature, top_p, top_k, seed)
        texts = [_text_bytes(p) for p in prompts]
        if not texts:
            return []
        last_prompt_tokens = [self.encode(t, bos=True)[-1] for t in texts]
        lib, n = self._lib, len(texts)
        c_texts = [ffi.new("char[]", t) for t in texts]  # kept alive for the call
        c_prompts = ffi.new("const char *[]", c_texts)
        lens = ffi.new("size_t[]", [len(t) for t in texts])
        tokens = ffi.new("int[]", n * max_new_tokens)
        counts = ffi.new("int[]", n)
        batch = ffi.new("ac_batch **")
        with self._h.use() as h:
            _error_check(lib.ac_batch_create(h.model, h.tokenizer, n, params, batch))
            try:
                _error_check(lib.ac_batch_set_threads(batch[0], self._threads))
                _error_check(lib.ac_batch_set_ignore_eos(batch[0], int(ignore_eos)))
                _error_check(lib.ac_batch_generate(batch[0], c_prompts, lens, max_new_tokens, tokens, counts))
            finally:
                lib.ac_batch_free(batch[0])
        return [self._decode(tokens[i * max_new_tokens : i * max_new_tokens + counts[i]], last_prompt_tokens[i])
                for i in range(n)]

    # ---------------------------------------------------------------- saving

    def save(self, path: PathLike) -> None:
        """Writes the model file: an int8 model (quantize="int8" or a v2 file) as a v2 file
        that loads without quantizing again, a float32 model in its own layout."""
        with self._h.use() as h:
            _error_check(self._lib.ac_model_save(h.model, os.fsencode(os.fspath(path))), os.fspath(path))

def _as_token(value: Any, vocab_size: int) -> int:
    try:
        token = int(value)
    except (TypeError, ValueError):
        raise AriannaError(f"token {value!r} is not an integer", 4, "AC_ERR_ARG") from None
    if not 0 <= token < vocab_size:
        raise AriannaError(f"token {token} is outside the vocabulary [0, {vocab_size})", 6, "AC_ERR_RANGE")
    return token


def _thread_count(threads: Optional[int]) -> int:
    """The C thread count of Model(threads=...): 0 (the library's default) for None."""
    if threads is None:
        return 0
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 256:
        raise AriannaError(f"n_threads {threads!r} is invalid: it must be an int in 1..256 (None = all "
                           "available cores)", 4, "AC_ERR_ARG")
    return threads


def _sampler_params(temperature: float, top_p: float, top_k: int, seed: Optional[int]) -> Any:
    """A C ac_sampler_params; the C library validates the ranges (AC_ERR_ARG on bad ones)."""
    if seed is None:
        seed = random.SystemRandom().getrandbits(64) or 1
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise AriannaError(f"seed {seed!r} is invalid: it must be an int in [0, 2**64)", 4, "AC_ERR_ARG")
    if not isinstance(top_k, int) or not -(2**31) <= top_k < 2**31:
        raise AriannaError(f"top_k {top_k!r} is invalid: it must be an int >= 0", 4, "AC_ERR_ARG")
    params = ffi.new("ac_sampler_params *")
    params.temperature = float(temperature)
    params.top_p = float(top_p)
    params.top_k = top_k
    params.seed = seed
    return params


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


def generate(prompt: str = "", max_new_tokens: int = 256, temperature: float = 0.8, top_p: float = 0.9,
             top_k: int = 0, seed: Optional[int] = None, ignore_eos: bool = False) -> str:
    """Model.generate on the bundled persona."""
    return default_model().generate(prompt, max_new_tokens, temperature, top_p, top_k, seed, ignore_eos)


def stream(prompt: str = "", max_new_tokens: int = 256, temperature: float = 0.8, top_p: float = 0.9,
           top_k: int = 0, seed: Optional[int] = None, ignore_eos: bool = False) -> Iterator[str]:
    """Model.stream on the bundled persona."""
    return default_model().stream(prompt, max_new_tokens, temperature, top_p, top_k, seed, ignore_eos)
