"""Leaks: loading and freeing a Model 1000 times keeps the process's resident memory flat,
both from files (mmap) and from bytes, with generation and failed loads in the mix.

The bound: RSS may not grow by more than 5 MB between iteration 100 (allocator pools and
caches warmed up) and iteration 1000, so any leak above ~6 KB per load fails: the tokenizer's
copy and tables (~11 KB), a session's KV cache and buffers (~20 KB).  Leaked mappings of the
model file are counted in /proc/self/maps, whatever their size.  Smaller leaks are the job of
LeakSanitizer (`make sanitize-check`) and valgrind (`make valgrind`).
"""

from __future__ import annotations

import gc
import os

import pytest

from arianna_c import AriannaError, Model

ITERATIONS = 1000
WARM = 100
BOUND = 5 * 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mappings_of(path) -> int:
    with open("/proc/self/maps") as f:
        return sum(line.rstrip().endswith(str(path)) for line in f)


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
    assert mappings_of(files.model.resolve()) == 0


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
