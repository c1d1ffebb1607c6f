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
import stat
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from ._ffi import ffi
from .errors import AriannaError, ErrorCode

LIB_NAME = "libarianna.so"

_lib: Optional[Any] = None
_lock = threading.Lock()


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
                    _lib = _checked(ffi.dlopen(str(path)), path)
                    break
            else:
                raise ImportError(
                    f"arianna_c: cannot find {LIB_NAME}; tried: "
                    + ", ".join(str(p) for p in tried)
                    + ". Run `make` in the source checkout or `pip install .`."
                )
    return _lib


def _checked(lib: Any, path: Path) -> Any:
    """lib, if it is the library this package was written for: the same ABI and version (a
    library left from an older build, or from another install, is an ImportError naming it)."""
    from ._version import __version__

    want_abi = ffi.integer_const("AC_ABI_VERSION")
    try:
        abi = lib.ac_abi_version()
    except (AttributeError, ffi.error):  # a library older than ac_abi_version
        abi = None
    version = ffi.string(lib.ac_version()).decode()
    if abi != want_abi or version != __version__:
        raise ImportError(
            f"arianna_c: {path} is a stale libarianna.so: it is version {version} (ABI {abi}), but this "
            f"arianna_c is {__version__} (ABI {want_abi}).  Rebuild it (`make`) or reinstall (`pip install .`)."
        )
    return lib


def error_message() -> str:
    return ffi.string(load().ac_last_error()).decode("utf-8", "replace")


def _error_check(rc: int, path: Optional[str] = None) -> None:
    """Raises the Python exception for a C result code (AC_OK does nothing): the one place
    where codes become exceptions.

    AC_ERR_IO becomes the OSError the system reports for path (FileNotFoundError,
    PermissionError, IsADirectoryError, ... with the library's message), AC_ERR_NOMEM
    MemoryError, every other code AriannaError, all with the library's message.
    """
    if rc == ErrorCode.OK:
        return
    lib = load()
    message = error_message()
    if rc == ErrorCode.IO:
        raise _os_error(message, path)
    if rc == ErrorCode.NOMEM:
        raise MemoryError(message)
    raise AriannaError(message, rc, ffi.string(lib.ac_strerror(rc)).decode())


def _os_error(message: str, path: Optional[str]) -> OSError:
    """The OSError for a file the library could not use: the library reports why in words, the
    system's own open of the same path gives the errno (and so the OSError subclass)."""
    if path is None:
        return OSError(message)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return OSError(exc.errno, message, path)  # OSError(errno, ...) picks the subclass
    try:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    return OSError(errno.EISDIR, message, path) if is_dir else OSError(message)


def library_version() -> str:
    """The version of the libarianna.so in use (opens the library)."""
    return ffi.string(load().ac_version()).decode()


def kernel_name() -> str:
    """The compute kernels the library picked for this CPU, e.g. "avx2" or "scalar" (opens
    the library)."""
    return ffi.string(load().ac_kernel_name()).decode()
