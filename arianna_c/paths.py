"""Where the files a Model loads are found: the bundled persona and the tokenizer next to a
model, and the checks that turn an unusable path into the OSError that names it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_MODEL = "arianna_v1_base.bin"
# Looked up next to the model when no tokenizer is named.
DEFAULT_TOKENIZERS = ("tok4096.bin", "tokenizer.bin")

PACKAGE_DIR = Path(__file__).resolve().parent


def default_model_path() -> str:
    """The bundled persona: inside the installed package, else persona/ in a source checkout."""
    tried = [PACKAGE_DIR / "persona" / DEFAULT_MODEL, PACKAGE_DIR.parent / "persona" / DEFAULT_MODEL]
    for path in tried:
        if path.is_file():
            return str(path)
    raise FileNotFoundError(errno.ENOENT, "no bundled persona model found; tried: " + ", ".join(map(str, tried)),
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
        from .errors import AriannaError, ErrorCode

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


def tokenizer_candidates(model_path: Optional[str], name: Optional[str]) -> list[str]:
    """A named tokenizer resolves like the CLI's -z: NAME, NAME.bin, then both in the model's
    folder.  Without a name: tok4096.bin, then tokenizer.bin in the model's folder."""
    folder = None if model_path is None else os.path.dirname(model_path)
    if name is None:
        return [os.path.join(folder, n) for n in DEFAULT_TOKENIZERS] if folder is not None else []
    found = [name, name + ".bin"]
    if folder is not None and not os.path.isabs(name):
        found += [os.path.join(folder, name), os.path.join(folder, name + ".bin")]
    return found


def find_tokenizer(model_path: Optional[str], name: Optional[str]) -> str:
    """The first candidate that exists (whatever it is: a directory found first is an
    IsADirectoryError, not skipped); FileNotFoundError listing every path tried."""
    tried = tokenizer_candidates(model_path, name)
    for path in tried:
        if os.path.lexists(path):
            check_file(path, "tokenizer")
            return path
    shown = ", ".join(tried) or "(nothing: name a tokenizer for a model loaded from memory)"
    raise FileNotFoundError(errno.ENOENT, f"no tokenizer file found; tried: {shown}", tried[0] if tried else None)
