"""Leaks: loading and freeing a Model 1000 times keeps the process's resident memory flat,
both from files and from bytes, with generation and failed loads in the mix; so does loading
a mapped model file (use_mmap) through the C API, which leaves no mapping behind.

The bound: RSS may not grow by more than 5 MB between iteration 100 (allocator pools and
caches warmed up) and iteration 1000, so any leak above ~6 KB per load fails: the tokenizer's
copy and tables (~11 KB), a session's KV cache and buffers (~20 KB).  Leaked mappings of a
mapped model file are counted in /proc/self/maps, whatever their size.  Smaller leaks are the job of
LeakSanitizer (`make sanitize-check`) and valgrind (`make valgrind`).
"""

from __future__ import annotations

import gc
import os

import pytest

from arianna_c import AriannaError, Model
from capi import load_api, load_model_file, mappings_of

ITERATIONS = 1000
WARM = 100
BOUND = 5 * 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_growth(step) -> int:
    """Runs step(i) ITERATIONS times; returns RSS growth from iteration WARM to the end."""
    base = 0
    for i in range(ITERATIONS):
        step(i)
        if i == WARM:
            gc.collect()
            base = rss_bytes()
    gc.collect()
    return rss_bytes() - base


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_load_free_from_files_keeps_rss_flat(make_model):
    files = make_model(seed=1)

    def step(i: int) -> None:
        with Model(files.model, files.tokenizer) as m:
            if i % 10 == 0:
                m.generate("the", max_new_tokens=4, seed=i + 1)
                m.logits([1, 5])

    growth = rss_growth(step)
    assert growth < BOUND, f"RSS grew by {growth / 2**20:.1f} MB over {ITERATIONS - WARM} loads"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_mapped_model_files_are_unmapped_when_freed(lib, make_model):
    files = make_model(seed=3)
    api = load_api(lib)
    api_ffi, api_lib = api

    def step(i: int) -> None:
        rc, model = load_model_file(api, files.model, use_mmap=1)
        assert rc == 0, api_ffi.string(api_lib.ac_last_error())
        try:
            assert mappings_of(files.model) > 0  # it is mapped while loaded
            if i % 10 == 0:
                state, logits = api_ffi.new("ac_state **"), api_ffi.new("float[]", 2 * files.cfg.vocab_size)
                assert api_lib.ac_state_create(model, state) == 0
                assert api_lib.ac_logits(state[0], api_ffi.new("int[]", [1, 5]), 2, logits) == 0
                api_lib.ac_state_free(state[0])
        finally:
            api_lib.ac_model_free(model)
        assert mappings_of(files.model) == 0

    growth = rss_growth(step)
    assert growth < BOUND, f"RSS grew by {growth / 2**20:.1f} MB over {ITERATIONS - WARM} loads"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_load_free_from_bytes_and_failed_loads_keep_rss_flat(make_model):
    files = make_model(seed=2, version=0)
    model, tok = files.model.read_bytes(), files.tokenizer.read_bytes()

    def step(i: int) -> None:
        if i % 2:
            with Model(model, tok) as m:
                for piece in m.stream("a", max_new_tokens=8, seed=i + 1):
                    break  # an abandoned stream frees its session too
            return
        with pytest.raises(AriannaError):
            Model(model, tok[:-1])  # model loaded, tokenizer refused: the model is freed

    growth = rss_growth(step)
    assert growth < BOUND, f"RSS grew by {growth / 2**20:.1f} MB over {ITERATIONS - WARM} loads"
