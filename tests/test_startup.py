"""Start-up cost: `import arianna_c` + Model() + generate() stay free of the heavy imports
(numpy, cffi's C parser, importlib.resources), and the generated cffi module matches CDEF."""

from __future__ import annotations

import subprocess
import sys

import pytest

from arianna_c import _ffi_build
from conftest import REPO

# Run in a fresh interpreter: prints the modules the binding's text path imported.
TEXT_PATH_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
before = set(sys.modules)
import arianna_c
assert arianna_c.__file__.startswith(sys.argv[1]), arianna_c.__file__
with arianna_c.Model(sys.argv[2], sys.argv[3]) as m:
    m.generate("the", max_new_tokens=3, seed=1)
print(" ".join(sorted(set(sys.modules) - before)))
"""

HEAVY = ("numpy", "cffi", "pycparser", "importlib.resources")


REGENERATE = "regenerate it with `python -m arianna_c._ffi_build`"


def test_generated_ffi_module_matches_cdef():
    """arianna_c/_ffi.py is committed; it must come from the current CDEF (any cffi version)."""
    digest, _ = _ffi_build.recorded(_ffi_build.TARGET.read_text())
    assert digest == _ffi_build.cdef_digest(), f"arianna_c/_ffi.py was generated from another CDEF: {REGENERATE}"


def test_generated_ffi_module_is_what_its_cffi_writes():
    """Under the cffi version that wrote it, the file is byte for byte what that cffi writes
    now (so it was not edited by hand).  Another cffi version may write other text."""
    import cffi

    _, version = _ffi_build.recorded(_ffi_build.TARGET.read_text())
    if version != cffi.__version__:
        pytest.skip(f"arianna_c/_ffi.py was written by cffi {version}, this is cffi {cffi.__version__}")
    if _ffi_build.TARGET.read_bytes() != _ffi_build.python_source().encode():
        pytest.fail(f"arianna_c/_ffi.py differs from what cffi writes for CDEF: {REGENERATE}")


def test_text_generation_imports_nothing_heavy(make_model, built):
    files = make_model()
    args = [str(REPO), str(files.model), str(files.tokenizer)]
    r = subprocess.run([sys.executable, "-c", TEXT_PATH_SCRIPT, *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = r.stdout.split()
    assert "arianna_c._ffi" in loaded
    assert [name for name in loaded if any(name == h or name.startswith(h + ".") for h in HEAVY)] == []

