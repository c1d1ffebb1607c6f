"""The version of the package: the same as the library's (src/run.h AC_VERSION_*) and the
one pyproject.toml reads from here; tests/test_python_api.py checks that they agree."""

__version__ = "0.4.0"
