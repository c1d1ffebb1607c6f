"""Where Python meets the C API: the shared ``ffi`` object, finding and opening libarianna.so,
and turning C result codes into Python exceptions.

The declarations are CDEF in _ffi_build.py; ``ffi`` comes from the module generated from them
(_ffi.py, cffi's out-of-line ABI mode), so importing it parses no C.

The library is opened lazily (on the first :func:`load`), so ``import arianna_c`` and its pure
Python submodules (formats, export, train) work on a machine where it has not been built.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from ._ffi import ffi

LIB_NAME = "libarianna.so"

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
    inside the package, then the `make` build at the root of a source checkout.

    The package's folders are its __path__: its own folder, plus the install tree that an
    editable install (scikit-build-core's redirect) lists beside the source tree; the folders
    importlib.resources.files() would search, without the start-up cost of importing it."""
    paths = []
    env = os.environ.get("ARIANNA_C_LIB")
    if env:
        paths.append(Path(env))
    paths += [Path(folder) / LIB_NAME for folder in sys.modules[__package__].__path__]
    paths.append(Path(__file__).resolve().parent.parent / LIB_NAME)
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
