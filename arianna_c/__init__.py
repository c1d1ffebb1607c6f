"""arianna_c: a small, fast, correct runtime for tiny Llama-architecture models.

    import arianna_c
    print(arianna_c.generate("Resonance is"))          # the bundled persona
    with arianna_c.Model("model.bin", "tok.bin") as m:
        for piece in m.stream("Once upon a time", max_new_tokens=64, seed=1):
            print(piece, end="", flush=True)

The work is done by libarianna.so through cffi; calls into it release the GIL.  Importing this
package does not load the library: the first Model (or library_version(), kernel_name()) does.

Modules: ``runtime`` (Model and the module functions), ``sampling`` (SamplingParams),
``paths`` (where model and tokenizer files are found), ``errors`` (ErrorCode, AriannaError),
``_lib`` (finding and opening the library), ``formats`` (the file layouts in NumPy),
``reference`` (the NumPy reference implementation), ``model`` (the PyTorch model).
"""

from __future__ import annotations

from ._lib import kernel_name, library_version
from ._version import __version__
from .errors import AriannaError, ErrorCode
from .formats import ModelConfig
from .runtime import Model, default_model, default_sampling, generate, stream
from .sampling import SamplingParams

__all__ = ["AriannaError", "ErrorCode", "Model", "ModelConfig", "SamplingParams", "default_model",
           "default_sampling", "generate", "kernel_name", "library_version", "stream", "__version__"]
