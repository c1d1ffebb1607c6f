"""The one place that knows the C API: the cffi declarations, finding and opening
libarianna.so, and turning C result codes into Python exceptions.

The library is opened lazily (on the first :func:`load`), so ``import arianna_c`` and its pure
Python submodules (formats, export, train) work on a machine where it has not been built.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any, Optional

from cffi import FFI

LIB_NAME = "libarianna.so"

# Mirrors src/run.h (the part cffi needs; keep the two in step).
CDEF = """
enum {
    AC_OK = 0, AC_ERR_IO = 1, AC_ERR_FORMAT = 2, AC_ERR_MISMATCH = 3, AC_ERR_ARG = 4,
    AC_ERR_NOMEM = 5, AC_ERR_RANGE = 6
};
enum { AC_TOKEN_UNK = 0, AC_TOKEN_BOS = 1, AC_TOKEN_EOS = 2 };

const char *ac_last_error(void);
const char *ac_strerror(int code);
const char *ac_version(void);

typedef struct ac_model ac_model;
typedef struct {
    int dim; int hidden_dim; int n_layers; int n_heads; int n_kv_heads;
    int vocab_size; int seq_len; int shared_classifier; int version; int group_size;
} ac_config;
int ac_model_load(const char *path, ac_model **out);
int ac_model_load_memory(const void *data, size_t size, const char *name, ac_model **out);
void ac_model_free(ac_model *model);
int ac_model_config(const ac_model *model, ac_config *out);
int ac_model_quantize(const ac_model *src, int group_size, ac_model **out);
int ac_model_save(const ac_model *model, const char *path);

const char *ac_kernel_name(void);
int ac_default_threads(void);

typedef struct ac_state ac_state;
int ac_state_create(const ac_model *model, ac_state **out);
void ac_state_free(ac_state *state);
int ac_state_set_threads(ac_state *state, int n_threads);
int ac_forward(ac_state *state, int token, int pos, const float **logits);
int ac_logits(ac_state *state, const int *tokens, int n_tokens, float *out);
int ac_logits_stepwise(ac_state *state, const int *tokens, int n_tokens, float *out);

typedef struct ac_tokenizer ac_tokenizer;
int ac_tokenizer_load(const char *path, int vocab_size, ac_tokenizer **out);
int ac_tokenizer_load_memory(const void *data, size_t size, int vocab_size, const char *name,
                             ac_tokenizer **out);
void ac_tokenizer_free(ac_tokenizer *tok);
int ac_tokenizer_vocab_size(const ac_tokenizer *tok);
int ac_encode(const ac_tokenizer *tok, const char *text, size_t len, int bos, int eos,
              int *tokens, int max_tokens, int *n_tokens);
int ac_decode_piece(const ac_tokenizer *tok, int prev, int token, const char **piece, size_t *len);
int ac_tokenizer_piece(const ac_tokenizer *tok, int id, const char **piece, size_t *len,
                       float *score);

typedef struct ac_sampler ac_sampler;
typedef struct {
    float temperature; float top_p; int top_k; uint64_t seed;
} ac_sampler_params;
ac_sampler_params ac_sampler_default_params(void);
int ac_sampler_create(const ac_sampler_params *params, int vocab_size, ac_sampler **out);
void ac_sampler_free(ac_sampler *sampler);
int ac_sample(ac_sampler *sampler, const float *logits, int *token);

typedef struct ac_session ac_session;
int ac_session_create(const ac_model *model, const ac_tokenizer *tok,
                      const ac_sampler_params *params, ac_session **out);
void ac_session_free(ac_session *session);
int ac_session_set_threads(ac_session *session, int n_threads);
void ac_session_reset(ac_session *session);
int ac_session_position(const ac_session *session);
int ac_session_feed(ac_session *session, const char *text, size_t len, int bos);
int ac_session_feed_tokens(ac_session *session, const int *tokens, int n_tokens);
int ac_session_next(ac_session *session, int *token, const char **piece, size_t *len);

typedef int (*ac_piece_fn)(void *user, int token, const char *piece, size_t len);
int ac_generate(ac_session *session, const char *prompt, size_t len, int max_new_tokens,
                ac_piece_fn on_piece, void *user, int *n_generated);

typedef struct ac_batch ac_batch;
int ac_batch_create(const ac_model *model, const ac_tokenizer *tok, int n_seqs,
                    const ac_sampler_params *params, ac_batch **out);
void ac_batch_free(ac_batch *batch);
int ac_batch_set_threads(ac_batch *batch, int n_threads);
int ac_batch_generate(ac_batch *batch, const char *const *prompts, const size_t *lens,
                      int max_new_tokens, int *tokens, int *n_generated);
"""

ffi = FFI()
ffi.cdef(CDEF)

_lib: Optional[Any] = None
_lock = threading.Lock()


class AriannaError(ValueError):
    """An error reported by libarianna: bad file contents, bad arguments, out-of-range values.

    ``code`` is the C result code (``AC_ERR_*``), ``name`` its symbolic name, and the message
    is the library's own (it names the file, the field, and expected vs actual values).
    """

    __module__ = "arianna_c"

    def __init__(self, message: str, code: int = 0, name: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.name = name


def library_candidates() -> list[Path]:
    """Where libarianna.so is looked for, in order: $ARIANNA_C_LIB when set, the copy installed
    inside the package, then the `make` build at the root of a source checkout."""
    here = Path(__file__).resolve().parent
    paths = []
    env = os.environ.get("ARIANNA_C_LIB")
    if env:
        paths.append(Path(env))
    try:  # the installed package (also covers editable installs that redirect resources)
        from importlib.resources import files

        resource = files("arianna_c") / LIB_NAME
        if isinstance(resource, Path):
            paths.append(resource)
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    paths += [here / LIB_NAME, here.parent / LIB_NAME]
    unique: list[Path] = []
    for p in paths:
        if p not in unique:
            unique.append(p)
    return unique


def load() -> Any:
    """The opened library (opened once, on first use); ImportError naming the paths tried."""
    global _lib
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            tried = library_candidates()
            for path in tried:
                if path.is_file():
                    _lib = ffi.dlopen(str(path))
                    break
            else:
                raise ImportError(
                    f"arianna_c: cannot find {LIB_NAME}; tried: "
                    + ", ".join(str(p) for p in tried)
                    + ". Run `make` in the source checkout or `pip install .`."
                )
    return _lib


def error_message() -> str:
    return ffi.string(load().ac_last_error()).decode("utf-8", "replace")


def _error_check(rc: int, path: Optional[str] = None) -> None:
    """Raises the Python exception for a C result code (AC_OK does nothing).

    AC_ERR_IO becomes OSError (FileNotFoundError when path is given and does not exist),
    AC_ERR_NOMEM MemoryError, every other code AriannaError with the library's message.
    """
    if rc == 0:
        return
    lib = load()
    message = error_message()
    name = ffi.string(lib.ac_strerror(rc)).decode()
    if rc == lib.AC_ERR_IO:
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, message, path)
        raise OSError(errno.EIO, message, path)
    if rc == lib.AC_ERR_NOMEM:
        raise MemoryError(message)
    raise AriannaError(message, rc, name)
