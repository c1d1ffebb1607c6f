"""Where the files a Model loads are found: the bundled persona, the tokenizer that goes with
a model (the library's lookup, the same as the CLI's), and the checks that turn an unusable
path into the OSError that names it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Optional, Union

from .errors import AriannaError, ErrorCode

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_MODEL = "arianna_v1_base.bin"

PACKAGE_DIR = Path(__file__).resolve().parent


def default_model_path() -> str:
    """The bundled persona: inside the installed package, else persona/ in a source checkout."""
    return _bundled(DEFAULT_MODEL, "persona model")


def bundled_module_path(name: str) -> str:
    """A knowledge module shipped with the persona, by name ("dialogue": modules/dialogue.bin
    beside the bundled persona), for ``Model(modules=[(bundled_module_path("dialogue"), 1.0)])``."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"module name {name!r} is invalid: give a bundled module's name, e.g. 'dialogue'")
    return _bundled(f"modules/{name}.bin", f"{name!r} module")


def _bundled(relative: str, what: str) -> str:
    """The persona folder's file: inside the installed package first, else in a source checkout."""
    tried = [PACKAGE_DIR / "persona" / relative, PACKAGE_DIR.parent / "persona" / relative]
    for path in tried:
        if path.is_file():
            return str(path)
    raise FileNotFoundError(errno.ENOENT, f"no bundled {what} found; tried: " + ", ".join(map(str, tried)),
                            str(tried[0]))


def path_argument(value: PathLike, what: str) -> str:
    """The path a model or tokenizer argument names, as a str: a TypeError for something that
    is not a path, a ValueError for an empty one or one with a NUL byte (C would see a
    shorter name)."""
    try:
        path = os.fspath(value)
    except TypeError:
        raise TypeError(f"{what} must be a path or bytes, not {type(value).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if path == "":
        raise ValueError(f"the {what} path is empty")
    if "\0" in path:
        raise AriannaError(f"{what} path {path!r} contains a NUL byte", ErrorCode.ARG)
    return path


def check_file(path: str, what: str) -> None:
    """Raises the OSError for a path that cannot be a file to read: missing
    (FileNotFoundError), a directory (IsADirectoryError), or one the system refuses to look at
    (a symlink loop: ELOOP, a folder without permission: PermissionError, ...).  Files that
    exist but are unusable (FIFOs, unreadable or malformed files) are left to the library."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"{what} file not found: {path}", path) from None
    except OSError as exc:
        raise OSError(exc.errno, f"{path}: cannot use it as the {what} file: {exc.strerror}", path) from None
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"{path}: is a directory, not a {what} file", path)


def tokenizer_lookup_text() -> str:
    """How find_tokenizer looks when no tokenizer is named, in the library's words (for --help
    texts); without a built library, a pointer to the library's lookup (--help still works)."""
    from ._lib import ffi, load

    try:
        return ffi.string(load().ac_tokenizer_lookup()).decode()
    except ImportError:
        return "the library's lookup beside the model"


def find_tokenizer(model_path: Optional[str], name: Optional[str]) -> str:
    """The tokenizer file for a model (model_path None: loaded from memory) and a tokenizer
    name (None: the default names), found by the library's ac_tokenizer_path; a
    FileNotFoundError listing every path tried when none exists."""
    from ._lib import _error_check, error_message, ffi, load

    cap = 4096  # PATH_MAX
    buf = ffi.new("char[]", cap)
    rc = load().ac_tokenizer_path(ffi.NULL if model_path is None else os.fsencode(model_path),
                                  ffi.NULL if name is None else os.fsencode(name), buf, cap)
    if rc == ErrorCode.IO:  # no candidate exists
        raise FileNotFoundError(errno.ENOENT, error_message(), name or model_path)
    _error_check(rc)
    return os.fsdecode(ffi.string(buf))
