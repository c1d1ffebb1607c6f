"""Threads: generation in several Python threads gives exactly the text of running the same
calls one after another, and calls into libarianna release the GIL (shown by a pure-Python
thread that keeps running during one long C call)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

import pytest

from arianna_c import Model

CALLS = [("the thing", 21), ("once upon", 22), ("", 23), ("and the", 24)]


def run_in_threads(jobs: list[Callable[[], object]]) -> list[object]:
    """Runs every job in its own thread, all released at once; returns results in job order."""
    results: list[object] = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        start.wait()
        try:
            results[i] = jobs[i]()
        except BaseException as e:  # re-raised below, in the test's thread
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
        assert not t.is_alive(), "a generating thread did not finish"
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_two_models_in_two_threads_match_sequential(make_model):
    a, b = make_model(seed=1, version=1), make_model(seed=2, version=0, shared_classifier=False)
    with Model(a.model, a.tokenizer) as ma, Model(b.model, b.tokenizer) as mb:
        jobs = [lambda: ma.generate("the thing", max_new_tokens=40, seed=5),
                lambda: mb.generate("once upon", max_new_tokens=40, seed=6)]
        sequential = [job() for job in jobs]
        assert all(sequential)
        for _ in range(3):
            assert run_in_threads(jobs) == sequential


def test_one_model_shared_by_four_threads(make_model):
    files = make_model(seed=3)
    with Model(files.model, files.tokenizer) as m:
        def job(prompt: str, seed: int) -> Callable[[], str]:
            return lambda: "".join(m.stream(prompt, max_new_tokens=30, temperature=0.9, seed=seed))

        jobs = [job(p, s) for p, s in CALLS]
        sequential = [j() for j in jobs]
        assert run_in_threads(jobs) == sequential


@pytest.fixture
def slow_model(make_model):
    """A model big enough that one token-by-token ac_logits call over its whole context takes
    a while even on an idle machine (about 1.4 G multiply-adds: ~90 ms on an AMD EPYC Zen 5 core,
    where a model a third the size took 20 ms, too short for the GIL test)."""
    return make_model(seed=9, dim=256, hidden_dim=768, n_layers=6, n_heads=4, n_kv_heads=4,
                      vocab_size=1024, seq_len=256)


def test_a_long_c_call_releases_the_gil(slow_model):
    """While the main thread is inside one ac_logits call, a pure-Python thread keeps running
    (it could not run at all if the call held the GIL).  The check is on the ticker's own
    timestamps inside the call's interval, not on speed, so a busy machine cannot fail it."""
    ticks: list[float] = []
    stop = threading.Event()

    def ticker() -> None:  # needs the GIL for every tick
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.001)  # the GIL hand-over window before the call: ~1 ms
    thread = threading.Thread(target=ticker, daemon=True)
    try:
        with Model(slow_model.model, slow_model.tokenizer) as m:
            tokens = list(range(3, 3 + m.config.seq_len))
            m.logits(tokens[:4])  # warm up
            thread.start()
            while not ticks:
                time.sleep(0.001)
            t0 = time.perf_counter()
            m.logits(tokens, stepwise=True)  # a single C call
            t1 = time.perf_counter()
    finally:
        stop.set()
        thread.join(10)
        sys.setswitchinterval(old_interval)
    inside = [t for t in ticks if t0 < t < t1]
    assert t1 - t0 > 0.02, "the C call was too short to tell"
    assert len(inside) >= 3, f"the Python thread ticked {len(inside)} times in {t1 - t0:.3f} s"
    assert inside[-1] - inside[0] >= 0.5 * (t1 - t0), (
        f"ticks only spanned {inside[-1] - inside[0]:.3f} s of a {t1 - t0:.3f} s call")


def test_generation_in_threads_overlaps(slow_model):
    """Two threads generating at once: each one's generation interval overlaps the other's,
    and the texts equal the sequential ones (no speed-ratio assertion: the machine is shared)."""
    with Model(slow_model.model, slow_model.tokenizer) as m:
        def job(seed: int) -> Callable[[], tuple[str, float, float]]:
            def run() -> tuple[str, float, float]:
                t0 = time.perf_counter()
                text = m.generate("the", max_new_tokens=40, seed=seed)
                return text, t0, time.perf_counter()
            return run

        want = [job(1)()[0], job(2)()[0]]
        (text_a, a0, a1), (text_b, b0, b1) = run_in_threads([job(1), job(2)])
        assert [text_a, text_b] == want
        assert a0 < b1 and b0 < a1, "the two generations did not overlap in time"
