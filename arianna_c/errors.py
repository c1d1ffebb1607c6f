"""The library's result codes and the exception that carries them.

The values come from the cffi declarations (CDEF in _ffi_build.py, which mirrors src/run.h),
so this module needs neither the library nor a copy of the numbers.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Optional, Union

from ._ffi import ffi


class ErrorCode(IntEnum):
    """The ``AC_ERR_*`` result codes of libarianna (``AC_OK`` is 0)."""

    OK = ffi.integer_const("AC_OK")
    IO = ffi.integer_const("AC_ERR_IO")              # a file could not be opened, sized or read
    FORMAT = ffi.integer_const("AC_ERR_FORMAT")      # a file does not follow its layout
    MISMATCH = ffi.integer_const("AC_ERR_MISMATCH")  # valid inputs disagree
    ARG = ffi.integer_const("AC_ERR_ARG")            # a bad argument
    NOMEM = ffi.integer_const("AC_ERR_NOMEM")        # an allocation failed
    RANGE = ffi.integer_const("AC_ERR_RANGE")        # a value out of range
    NUMERIC = ffi.integer_const("AC_ERR_NUMERIC")    # NaN or infinite logits; int8 would zero a tensor

    @property
    def c_name(self) -> str:
        """The name in src/run.h, e.g. ``AC_ERR_FORMAT``."""
        return "AC_OK" if self is ErrorCode.OK else f"AC_ERR_{self.name}"


class AriannaError(ValueError):
    """An error reported by libarianna: bad file contents, bad arguments, out-of-range values.

    ``code`` is the result code (an :class:`ErrorCode`, or the plain int for a code this
    package does not know), ``name`` its C name (``AC_ERR_*``), and the message is the
    library's own (it names the file, the field, and expected vs actual values).  ``name``
    is only needed for a code newer than this package (the library's ac_strerror gives it).
    """

    __module__ = "arianna_c"

    def __init__(self, message: str, code: Union[ErrorCode, int], name: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = as_error_code(code)
        self.name = self.code.c_name if isinstance(self.code, ErrorCode) else (name or f"AC_ERR_{int(code)}")


def as_error_code(code: int) -> Union[ErrorCode, int]:
    try:
        return ErrorCode(code)
    except ValueError:
        return int(code)
