"""The C-API calls and ./run invocations that many test files make, written once.

C calls take the session-scoped ``lib`` and ``ffi`` fixtures (so a test that uses them also
asks for the build), return the result code with what was made, and leave freeing to the
caller, as the C API does.  ``load_api`` adds the declarations the package's binding does not
make.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

# ---------------------------------------------------------------------------- the C API

HEADER = Path(__file__).resolve().parent.parent / "src" / "run.h"


def header_constant(name: str) -> int:
    """The integer value of `#define name` in the public header src/run.h (for the limits the
    binding does not declare)."""
    found = re.search(rf"^#define {re.escape(name)} (\d+)\b", HEADER.read_text(), re.MULTILINE)
    assert found, f"{HEADER} has no #define {name} <integer>"
    return int(found.group(1))


def last_error(lib, ffi) -> str:
    """ac_last_error() as text."""
    return ffi.string(lib.ac_last_error()).decode("utf-8", "replace")


def code_name(lib, ffi, rc: int) -> str:
    """ac_strerror(rc), e.g. "AC_ERR_FORMAT"."""
    return ffi.string(lib.ac_strerror(rc)).decode()


def load_model(lib, ffi, path) -> tuple[int, object]:
    """ac_model_load: (result code, model or NULL)."""
    out = ffi.new("ac_model **")
    rc = lib.ac_model_load(os.fsencode(path), out)
    return rc, out[0]


def load_model_bytes(lib, ffi, data: bytes, name: bytes = b"mem.bin") -> tuple[int, object, object]:
    """ac_model_load_memory: (result code, model or NULL, the buffer).  The library borrows the
    buffer: keep it alive as long as the model."""
    buf = ffi.from_buffer("char[]", data)
    out = ffi.new("ac_model **")
    rc = lib.ac_model_load_memory(buf, len(data), name, out)
    return rc, out[0], buf


def load_tokenizer(lib, ffi, path, vocab_size: int) -> tuple[int, object]:
    """ac_tokenizer_load: (result code, tokenizer or NULL)."""
    out = ffi.new("ac_tokenizer **")
    rc = lib.ac_tokenizer_load(os.fsencode(path), vocab_size, out)
    return rc, out[0]


def load_tokenizer_bytes(lib, ffi, data: bytes, vocab_size: int, name: bytes = b"tok") -> tuple[int, object]:
    """ac_tokenizer_load_memory: (result code, tokenizer or NULL).  The library copies the
    bytes."""
    out = ffi.new("ac_tokenizer **")
    rc = lib.ac_tokenizer_load_memory(data, len(data), vocab_size, name, out)
    return rc, out[0]


def quantize(lib, ffi, model, group_size: int = 0) -> tuple[int, object]:
    """ac_model_quantize: (result code, int8 model or NULL)."""
    out = ffi.new("ac_model **")
    rc = lib.ac_model_quantize(model, group_size, out)
    return rc, out[0]


def model_config(lib, ffi, model):
    """ac_model_config as an ac_config."""
    cfg = ffi.new("ac_config *")
    assert lib.ac_model_config(model, cfg) == 0
    return cfg


def create_state(lib, ffi, model) -> tuple[int, object]:
    """ac_state_create: (result code, state or NULL)."""
    out = ffi.new("ac_state **")
    rc = lib.ac_state_create(model, out)
    return rc, out[0]


def create_sampler(lib, ffi, params, vocab_size: int) -> tuple[int, object]:
    """ac_sampler_create from params: an ac_sampler_params * as it is, or what initializes one
    (the struct, a dict of its fields).  (result code, sampler or NULL)."""
    if not (isinstance(params, ffi.CData) and ffi.typeof(params).kind == "pointer"):
        params = ffi.new("ac_sampler_params *", params)
    out = ffi.new("ac_sampler **")
    rc = lib.ac_sampler_create(params, vocab_size, out)
    return rc, out[0]


def create_session(lib, ffi, model, tokenizer, params) -> tuple[int, object]:
    """ac_session_create with params (an ac_session_params *, or NULL for the defaults):
    (result code, session or NULL)."""
    out = ffi.new("ac_session **")
    rc = lib.ac_session_create(model, tokenizer, params, out)
    return rc, out[0]


@contextmanager
def loaded_model(lib, ffi, path) -> Iterator[object]:
    """A model loaded from path (failing the test if it does not load), freed afterwards."""
    rc, model = load_model(lib, ffi, path)
    assert rc == 0, last_error(lib, ffi)
    try:
        yield model
    finally:
        lib.ac_model_free(model)


def c_logits(lib, ffi, model, tokens: Sequence[int], threads: int = 1, stepwise: bool = False) -> np.ndarray:
    """ac_logits (or ac_logits_stepwise) on a fresh state with the given thread count: an array
    (len(tokens), vocab_size)."""
    ids = np.asarray(tokens, dtype=np.int32)
    out = np.empty((len(ids), model_config(lib, ffi, model).vocab_size), dtype=np.float32)
    rc, state = create_state(lib, ffi, model)
    assert rc == 0, last_error(lib, ffi)
    try:
        assert lib.ac_state_set_threads(state, threads) == 0
        run = lib.ac_logits_stepwise if stepwise else lib.ac_logits
        rc = run(state, ffi.from_buffer("int[]", ids), len(ids),
                 ffi.from_buffer("float[]", out, require_writable=True))
        assert rc == 0, last_error(lib, ffi)
    finally:
        lib.ac_state_free(state)
    return out


def int8_copy(lib, ffi, model_path, out: Path, group_size: int = 16) -> Path:
    """The model at model_path quantized by the library and saved as an int8 (v2) file at out."""
    with loaded_model(lib, ffi, model_path) as src:
        rc, q = quantize(lib, ffi, src, group_size)
        assert rc == 0, last_error(lib, ffi)
        try:
            assert lib.ac_model_save(q, os.fsencode(out)) == 0, last_error(lib, ffi)
        finally:
            lib.ac_model_free(q)
    return out


# The loading calls the package's binding does not declare (the file read or mapped), with the
# types they use.  A cffi handle of its own: its objects do not mix with the binding's.
LOAD_CDEF = """
typedef struct ac_model ac_model;
typedef struct ac_state ac_state;
typedef struct { int use_mmap; } ac_model_load_params;
ac_model_load_params ac_model_default_load_params(void);
int ac_model_load_file(const char *path, const ac_model_load_params *params, ac_model **out);
int ac_model_load_memory(const void *data, size_t size, const char *name, ac_model **out);
int ac_model_quantize(const ac_model *src, int group_size, ac_model **out);
void ac_model_free(ac_model *model);
int ac_state_create(const ac_model *model, ac_state **out);
void ac_state_free(ac_state *state);
int ac_logits(ac_state *state, const int *tokens, int n_tokens, float *out);
const char *ac_last_error(void);
const char *ac_strerror(int code);
"""


def load_api(lib) -> tuple[object, object]:
    """(ffi, library) for LOAD_CDEF, opening the same libarianna.so as lib."""
    import cffi

    from arianna_c import _lib

    api_ffi = cffi.FFI()
    api_ffi.cdef(LOAD_CDEF)
    path = next(p for p in _lib.library_candidates() if p.is_file())
    return api_ffi, api_ffi.dlopen(str(path))


def load_model_file(api, path, use_mmap: int) -> tuple[int, object]:
    """ac_model_load_file with use_mmap (api from load_api): (result code, model or NULL)."""
    api_ffi, api_lib = api
    params = api_ffi.new("ac_model_load_params *", api_lib.ac_model_default_load_params())
    params.use_mmap = use_mmap
    out = api_ffi.new("ac_model **")
    rc = api_lib.ac_model_load_file(os.fsencode(path), params, out)
    return rc, out[0]


# ---------------------------------------------------------------------------- ./run


def run_cli(binary: Path, *args, stdin: Union[str, bytes, None] = None, text: bool = True,
            timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """./run with args, stdout and stderr captured: as text (undecodable bytes replaced, since
    a random model prints any bytes, and no newline translation: a "\\r" it prints stays one)
    or as bytes.  stdin None reads /dev/null."""
    if isinstance(stdin, str):
        stdin = stdin.encode()
    feed = dict(stdin=subprocess.DEVNULL) if stdin is None else dict(input=stdin)
    r = subprocess.run([str(binary), *map(str, args)], capture_output=True, timeout=timeout, **feed, **kwargs)
    if text:
        r.stdout, r.stderr = (out.decode("utf-8", "replace") for out in (r.stdout, r.stderr))
    return r


def error_lines(stderr: Union[str, bytes]) -> list[str]:
    """The lines of stderr that report an error."""
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def read_stdout_until(proc: subprocess.Popen, marker: bytes, seconds: float = 30) -> bytes:
    """Reads a running ./run's stdout (a pipe) until it ends with marker (the CLI flushes its
    questions); fails the test if that takes more than seconds or the output ends first."""
    out, deadline = b"", time.monotonic() + seconds
    while not out.endswith(marker):
        left = deadline - time.monotonic()
        assert left > 0, f"./run printed no {marker!r} within {seconds} s: {out!r}"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"./run ended early: {out!r}"
            out += chunk
    return out


def mapped_paths(pid: Union[int, str] = "self") -> list[str]:
    """The files mapped into a process (/proc/PID/maps), one entry per mapping."""
    with open(f"/proc/{pid}/maps") as f:
        rows = (line.rstrip("\n").split(maxsplit=5) for line in f)
        return [fields[5] for fields in rows if len(fields) == 6]


def mappings_of(path, pid: Union[int, str] = "self") -> int:
    """How many mappings of the file at path the process holds."""
    target = os.path.realpath(path)
    return mapped_paths(pid).count(target)

