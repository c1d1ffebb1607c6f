"""The speed paths of the runtime, for correctness only (no timing assertions): SIMD vs scalar
kernels, threads, int8 (Q8_0) weights and v2 files, prompt prefill vs token-by-token decode,
batched decode vs single sequences, and the CLI flags -T / -q / -o / -b."""

from __future__ import annotations

import functools
import os
import platform
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from capi import (c_logits, create_state, header_constant, int8_copy, last_error, load_model, load_tokenizer,
                  error_lines, loaded_model, model_config, quantize, run_cli)
from conftest import LAYOUTS, REPO, rounding_edge_cases, tiny_config

MAX_THREADS = header_constant("AC_MAX_THREADS")
# dim and hidden_dim multiples of 32, so the int8 SIMD kernel (32-byte groups) is exercised.
WIDE = dict(dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2)


def tokens_for(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(3, vocab_size, n - 1).tolist()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture
def wide_model(make_model):
    return make_model(seed=11, **WIDE)


# ---------------------------------------------------------------------------- kernels

# Every kernel set with the /proc/cpuinfo flags it needs, best first: the library picks the first
# one the CPU has (src/kernels.c keeps the same order).
KERNEL_SETS = {
    "avx512-amx": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_tile", "amx_int8"),
    "avx512-vnni": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
    "avx512": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl"),
    "avx2-vnni": ("avx2", "fma", "avx_vnni"),
    "avx2": ("avx2", "fma"),
    "scalar": (),
}
# Sets with the same float32 lanes, promised to give bitwise equal logits for float32 and int8
# weights alike: every set adds its exact int8 sums in the scalar set's order (kernel_check.c
# checks their int8 GEMM against the scalar set's, bit for bit).
SAME_LANES = [("avx2", "avx2-vnni"), ("avx512", "avx512-vnni"), ("avx512", "avx512-amx"), ("avx512-vnni", "avx512-amx")]
X86 = platform.machine().lower() in ("x86_64", "amd64")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def missing_features(name: str) -> list[str]:
    """What this CPU lacks for kernel set name (empty: it can run it)."""
    if name != "scalar" and not X86:
        return ["an x86-64 CPU"]
    return [f for f in KERNEL_SETS[name] if f not in cpu_flags()]


def need_kernels(*names: str) -> None:
    for name in names:
        missing = missing_features(name)
        if missing:
            pytest.skip(f"this CPU cannot run the {name} kernels (lacks {', '.join(missing)})")


def test_kernel_choice(lib, ffi):
    """The best set this CPU runs, unless AC_KERNEL names another set it runs (a name it
    cannot run keeps the automatic choice)."""
    name = ffi.string(lib.ac_kernel_name()).decode()
    forced = os.environ.get("AC_KERNEL")
    if forced in KERNEL_SETS and not missing_features(forced):
        assert name == forced
    else:
        assert name == next(k for k in KERNEL_SETS if not missing_features(k))


# Prints ac_default_threads() after limiting the process to the CPUs named in argv[2].
DEFAULT_THREADS_SCRIPT = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
os.sched_setaffinity(0, {int(c) for c in sys.argv[2].split(",")})
from arianna_c import _lib
print(_lib.load().ac_default_threads())
"""


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity (Linux)")
def test_default_threads_are_the_cpus_the_process_may_use(lib):
    cpus = sorted(os.sched_getaffinity(0))
    assert lib.ac_default_threads() == min(len(cpus), MAX_THREADS)
    env = dict(os.environ, ARIANNA_C_LIB=library_path())
    for allowed in ({cpus[0]}, set(cpus)):
        r = subprocess.run([sys.executable, "-c", DEFAULT_THREADS_SCRIPT, str(REPO), ",".join(map(str, allowed))],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) == min(len(allowed), MAX_THREADS)


# Runs under AC_KERNEL=<set> in a child process (the set is chosen once per process) and saves
# the logits of one prompt, float32 and int8, after checking the set's own bitwise promises:
# prefill = token-by-token decode, 1 thread = 2 threads, batched greedy decode = one by one.
KERNEL_SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
import arianna_c
from arianna_c import Model
assert arianna_c.kernel_name() == sys.argv[2], arianna_c.kernel_name()
model, tokenizer, out = sys.argv[3], sys.argv[4], sys.argv[5]
tokens = [int(t) for t in sys.argv[6].split(",")]
saved = {}
for quantize in (None, "int8"):
    with Model(model, tokenizer, threads=1, quantize=quantize) as m, \
         Model(model, tokenizer, threads=2, quantize=quantize) as m2:
        prefill = m.logits(tokens)
        assert np.array_equal(prefill, m.logits(tokens, stepwise=True)), "prefill != stepwise"
        assert np.array_equal(prefill, m2.logits(tokens)), "1 thread != 2 threads"
        prompts = ["the", "it is a", "once upon a time there was"]
        batch = m2.generate_batch(prompts, max_new_tokens=24, temperature=0.0)
        assert batch == [m.generate(p, max_new_tokens=24, temperature=0.0) for p in prompts], "batch != single"
    saved[quantize or "float32"] = prefill
np.savez(out, **saved)
"""


def library_path() -> str:
    """The library the tests run on ($ARIANNA_C_LIB, e.g. a sanitizer build, else make's)."""
    return os.environ.get("ARIANNA_C_LIB") or str(REPO / "libarianna.so")


def kernel_logits(name: str, files, tmp_path: Path, tokens: list[int]) -> dict:
    """{"float32": ..., "int8": ...} logits of tokens under kernel set name."""
    out = tmp_path / f"{name}.npz"
    env = dict(os.environ, AC_KERNEL=name, ARIANNA_C_LIB=library_path())
    r = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT, str(REPO), name, str(files.model),
                        str(files.tokenizer), str(out), ",".join(map(str, tokens))],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "AC_KERNEL" not in r.stderr, r.stderr  # no fallback message: the set really ran
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def kernel_results(built, tmp_path_factory):
    """Each kernel set's logits on one model, computed once for the tests below (None for a
    set this CPU lacks).  dim 64 with 8 heads: head_size 8 is below 16 lanes, so attention
    sums the same terms in the same order in every x86-64 set and only the matrix kernels
    differ."""
    from conftest import ModelFiles, write_synthetic_tokenizer
    from arianna_c import formats

    folder = tmp_path_factory.mktemp("kernels")
    cfg = tiny_config(dim=64, hidden_dim=128, n_heads=8, n_kv_heads=4)
    weights = formats.random_weights(cfg, seed=21)
    formats.write_model(folder / "model.bin", cfg, weights)
    files = ModelFiles(folder / "model.bin", write_synthetic_tokenizer(folder / "tokenizer.bin", cfg.vocab_size),
                       cfg, weights)
    tokens = tokens_for(cfg.vocab_size, 40, seed=3)
    return {name: None if missing_features(name) else kernel_logits(name, files, folder, tokens)
            for name in KERNEL_SETS}


@pytest.mark.parametrize("name", [k for k in KERNEL_SETS if k != "scalar"])
@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_kernel_set_agrees_with_scalar(kernel_results, name, weights):
    need_kernels(name)
    diff = np.abs(kernel_results[name][weights] - kernel_results["scalar"][weights]).max()
    print(f"{weights}: max |{name} - scalar| = {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.parametrize("a, b, weights", [(a, b, w) for a, b in SAME_LANES for w in ("float32", "int8")],
                         ids=lambda v: str(v))
def test_kernel_sets_with_the_same_lanes_agree_bitwise(kernel_results, a, b, weights):
    need_kernels(a, b)
    assert np.array_equal(kernel_results[a][weights], kernel_results[b][weights])


@pytest.mark.parametrize("name", [k for k in KERNEL_SETS if k not in ("scalar", "avx2")])
def test_int8_products_equal_avx2_bitwise(kernel_results, name):
    """int8 sums are exact and every set adds them in the scalar set's order; with attention summing
    alike (head_size 8), every x86-64 set's int8 logits are bitwise avx2's."""
    need_kernels("avx2", name)
    assert np.array_equal(kernel_results[name]["int8"], kernel_results["avx2"]["int8"])


@pytest.fixture(scope="module")
def kernel_check(tmp_path_factory) -> Path:
    """tests/kernel_check.c built against the kernel sources (every set's promises, at the
    level of the kernels themselves)."""
    import shutil

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    binary = tmp_path_factory.mktemp("kernel_check") / "kernel_check"
    sources = sorted(str(p) for p in (REPO / "src").glob("kernels*.c"))
    r = subprocess.run([cc, "-O2", "-std=gnu11", "-ffp-contract=off", "-pthread", "-I", str(REPO / "src"), "-o", str(binary),
                        str(REPO / "tests" / "kernel_check.c"), *sources, "-lm"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return binary


@pytest.mark.parametrize("name", list(KERNEL_SETS))
def test_kernels_keep_their_promises(kernel_check, name):
    """Bitwise: T=1 = T=all = any row split, int8 = the scalar set's int8; close to float64: GEMMs,
    weighted sum, SwiGLU, softmax (NaN/inf give NaN); the quantizer's bytes."""
    need_kernels(name)
    r = subprocess.run([str(kernel_check), name], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == f"ok {name}", r.stdout[-4000:] + r.stderr


def test_forced_kernel_set_the_cpu_lacks_or_unknown(lib, ffi):
    """AC_KERNEL with a name that is not a set, or a set the CPU lacks: the automatic choice,
    and one line on stderr saying why."""
    auto = next(k for k in KERNEL_SETS if not missing_features(k))
    lacking = [k for k in KERNEL_SETS if missing_features(k)]
    script = "import sys; sys.path.insert(0, sys.argv[1]); import arianna_c; print(arianna_c.kernel_name())"
    for forced in ["avx9000"] + lacking[:1]:
        env = dict(os.environ, AC_KERNEL=forced, ARIANNA_C_LIB=library_path())
        r = subprocess.run([sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, env=env,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == auto
        assert f"AC_KERNEL={forced}" in r.stderr and f"using {auto}" in r.stderr, r.stderr
        if forced == "avx9000":
            assert "is not a kernel set (avx512-amx, avx512-vnni, avx512, avx2-vnni, avx2, scalar)" in r.stderr
        else:
            assert "which this CPU lacks" in r.stderr


# Unloads the library while a state with two threads is alive, then gives the pool's workers
# time to wake: they must not find their code unmapped (the library is linked -z nodelete).
UNLOAD_SCRIPT = r"""
import ctypes, _ctypes, sys, time
lib = ctypes.CDLL(sys.argv[1])
model, state = ctypes.c_void_p(), ctypes.c_void_p()
assert lib.ac_model_load(sys.argv[2].encode(), ctypes.byref(model)) == 0
assert lib.ac_state_create(model, ctypes.byref(state)) == 0
assert lib.ac_state_set_threads(state, 2) == 0
tokens = (ctypes.c_int * 4)(1, 5, 6, 7)
logits = (ctypes.c_float * (4 * int(sys.argv[3])))()
assert lib.ac_logits(state, tokens, 4, logits) == 0
_ctypes.dlclose(lib._handle)
time.sleep(0.05)
"""


def test_library_survives_unload_with_live_state(wide_model):
    for _ in range(5):
        r = subprocess.run([sys.executable, "-c", UNLOAD_SCRIPT, str(REPO / "libarianna.so"),
                            str(wide_model.model), str(wide_model.cfg.vocab_size)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (r.returncode, r.stderr)


# ---------------------------------------------------------------------------- threads, prefill


@pytest.mark.parametrize("stepwise", [False, True], ids=["prefill", "stepwise"])
def test_thread_count_does_not_change_logits(lib, ffi, layout_model, stepwise):
    tokens = tokens_for(layout_model.cfg.vocab_size, layout_model.cfg.seq_len, seed=5)
    with loaded_model(lib, ffi, layout_model.model) as model:
        one = c_logits(lib, ffi, model, tokens, threads=1, stepwise=stepwise)
        for threads in (2, 3):
            assert np.array_equal(one, c_logits(lib, ffi, model, tokens, threads=threads, stepwise=stepwise))


def test_prefill_equals_stepwise(lib, ffi, layout_model):
    tokens = tokens_for(layout_model.cfg.vocab_size, layout_model.cfg.seq_len, seed=6)
    with loaded_model(lib, ffi, layout_model.model) as model:
        prefill = c_logits(lib, ffi, model, tokens, threads=2)
        stepwise = c_logits(lib, ffi, model, tokens, threads=2, stepwise=True)
    print(f"max |prefill - stepwise| = {np.abs(prefill - stepwise).max():.3g}")
    np.testing.assert_allclose(prefill, stepwise, atol=1e-4, rtol=0)


def test_prefill_over_several_blocks_matches_reference(make_model, built):
    """A context longer than one prefill block (64 tokens), through the Python API, against
    the float64 NumPy forward of test_runtime."""
    from arianna_c import Model
    from test_runtime import numpy_forward

    files = make_model(seed=8, seq_len=150)
    tokens = tokens_for(files.cfg.vocab_size, 150, seed=8)
    with Model(files.model, files.tokenizer, threads=2) as m:
        prefill = m.logits(tokens)
        stepwise = m.logits(tokens, stepwise=True)
    np.testing.assert_allclose(prefill, stepwise, atol=1e-4, rtol=0)
    np.testing.assert_allclose(prefill, numpy_forward(files.cfg, files.weights, tokens), atol=1e-4, rtol=0)


def test_bad_thread_counts(lib, ffi, make_model, built):
    from arianna_c import AriannaError, Model

    files = make_model()
    with loaded_model(lib, ffi, files.model) as model:
        rc, state = create_state(lib, ffi, model)
        assert rc == 0, last_error(lib, ffi)
        try:
            for bad in (-1, MAX_THREADS + 1, 100000):
                assert lib.ac_state_set_threads(state, bad) == lib.AC_ERR_ARG
                assert last_error(lib, ffi) == (f"n_threads {bad} is invalid: it must be in 1..{MAX_THREADS} "
                                                "(0 = all available cores)")
            assert lib.ac_state_set_threads(state, MAX_THREADS) == 0
            assert lib.ac_state_set_threads(state, 0) == 0  # 0 = default
        finally:
            lib.ac_state_free(state)
    with pytest.raises(AriannaError, match="n_threads"):
        with Model(files.model, files.tokenizer, threads=-3) as m:
            m.generate("x", max_new_tokens=2)


# ---------------------------------------------------------------------------- int8


def test_int8_logits_close_to_float32(lib, ffi, wide_model):
    tokens = tokens_for(wide_model.cfg.vocab_size, wide_model.cfg.seq_len, seed=9)
    with loaded_model(lib, ffi, wide_model.model) as model:
        rc, q8 = quantize(lib, ffi, model)
        assert rc == 0, last_error(lib, ffi)
        f32 = c_logits(lib, ffi, model, tokens)
    cfg = model_config(lib, ffi, q8)
    assert (cfg.version, cfg.group_size) == (2, 32)
    i8 = c_logits(lib, ffi, q8, tokens)
    top1 = (f32.argmax(1) == i8.argmax(1)).mean()
    cos = cosine_rows(f32, i8).min()
    print(f"int8 vs float32: max |diff| = {np.abs(f32 - i8).max():.3g} (logit range "
          f"{np.ptp(f32):.3g}), top-1 agreement {top1:.1%}, min cosine {cos:.5f}")
    assert cos > 0.99
    assert top1 >= 0.9
    # the int8 paths keep the float32 paths' invariants
    assert np.array_equal(i8, c_logits(lib, ffi, q8, tokens, threads=2))
    np.testing.assert_allclose(i8, c_logits(lib, ffi, q8, tokens, stepwise=True), atol=1e-4, rtol=0)
    lib.ac_model_free(q8)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_int8_file_round_trip(lib, ffi, make_model, tmp_path, layout):
    """quantize -> save -> load gives the same model (bytes and logits) as quantizing at load;
    group size 16 on the 48-wide layouts exercises the non-SIMD group path."""
    files = make_model(seed=12, **LAYOUTS[layout])
    with loaded_model(lib, ffi, files.model) as model:
        rc, q8 = quantize(lib, ffi, model, 16)  # the source may be freed afterwards
    assert rc == 0, last_error(lib, ffi)
    path = tmp_path / "q8.bin"
    assert lib.ac_model_save(q8, str(path).encode()) == 0
    data = path.read_bytes()
    magic, version = struct.unpack_from("<Ii", data, 0)
    assert (magic, version) == (0x616B3432, 2)
    assert struct.unpack_from("<7i", data, 8) == (
        files.cfg.dim, files.cfg.hidden_dim, files.cfg.n_layers, files.cfg.n_heads,
        files.cfg.n_kv_heads, files.cfg.vocab_size, files.cfg.seq_len)
    assert data[36] == int(files.cfg.shared_classifier)
    assert struct.unpack_from("<i", data, 37)[0] == 16
    assert data[41:256] == bytes(215)
    tokens = tokens_for(files.cfg.vocab_size, 30, seed=1)
    with loaded_model(lib, ffi, path) as loaded:
        assert np.array_equal(c_logits(lib, ffi, q8, tokens), c_logits(lib, ffi, loaded, tokens))
        # an int8 model cannot be quantized again
        rc, again = quantize(lib, ffi, loaded)
        assert rc == lib.AC_ERR_ARG and again == ffi.NULL
        assert last_error(lib, ffi) == "the model is already int8 (group size 16)"
    lib.ac_model_free(q8)


@pytest.mark.parametrize("edge_cases", [False, True], ids=["random", "edge-cases"])
def test_int8_file_layout_matches_numpy_quantization(lib, ffi, make_model, tmp_path, edge_cases):
    """The v2 bytes follow the documented layout: norms, then per matrix (per layer) int8
    values and float32 scales with scale = max|w| / 127 and q = round(w / scale) (half to
    even; 0 for an all-zero group)."""
    from arianna_c import formats

    weights = rounding_edge_cases(formats.random_weights(tiny_config(**WIDE), seed=11)) if edge_cases else None
    wide_model = make_model(seed=11, weights=weights, **WIDE)
    path = int8_copy(lib, ffi, wide_model.model, tmp_path / "q8.bin", group_size=0)  # the default: 32
    data, cfg, w = path.read_bytes(), wide_model.cfg, wide_model.weights
    off = 256
    for name in ("rms_att", "rms_ffn", "rms_final"):
        n = w[name].size
        assert np.array_equal(np.frombuffer(data, np.float32, n, off), w[name].ravel())
        off += 4 * n
    mats = [w["token_embedding"]] + [w[k][l] for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
                                     for l in range(cfg.n_layers)]
    for m in mats:
        groups = m.reshape(-1, 32).astype(np.float32)
        scale = np.abs(groups).max(1) / np.float32(127)
        with np.errstate(invalid="ignore"):
            q = np.nan_to_num(np.round(groups / scale[:, None])).astype(np.int8)
        assert np.array_equal(np.frombuffer(data, np.int8, m.size, off), q.ravel())
        off += m.size
        assert np.array_equal(np.frombuffer(data, np.float32, scale.size, off), scale)
        off += 4 * scale.size
    assert off == len(data)


@pytest.mark.parametrize("patch, needle", [
    (lambda d: d[:-4], "header implies"),
    (lambda d: d + b"\0" * 4, "header implies"),
    (lambda d: d[:37] + struct.pack("<i", 0) + d[41:], "group_size is 0"),
    (lambda d: d[:37] + struct.pack("<i", 6) + d[41:], "multiple of 4"),
    (lambda d: d[:37] + struct.pack("<i", 32) + d[41:], "group_size 32 does not divide dim 48"),
    (lambda d: d[:37] + struct.pack("<i", 64) + d[41:], "does not divide dim"),
    (lambda d: d[:4] + struct.pack("<i", 3) + d[8:], "unknown model file version 3"),
])
def test_int8_loader_errors(lib, ffi, make_model, tmp_path, patch, needle):
    data = patch(int8_copy(lib, ffi, make_model(seed=2).model, tmp_path / "q8.bin", group_size=16).read_bytes())
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data)
    rc, model = load_model(lib, ffi, bad)
    assert rc == lib.AC_ERR_FORMAT and model == ffi.NULL
    message = last_error(lib, ffi)
    assert needle in message and str(bad) in message


def test_quantize_rejects_group_sizes_that_do_not_fit(lib, ffi, make_model):
    with loaded_model(lib, ffi, make_model().model) as model:  # dim 48, hidden_dim 96
        for gs, needle in ((32, "int8 quantization: group_size 32 does not divide dim 48"),
                           (-4, "ac_model_quantize: argument group_size is -4, must be 0 (the default, 32) "
                                "or a positive multiple of 4"),
                           (6, "ac_model_quantize: argument group_size is 6, must be 0")):
            rc, q8 = quantize(lib, ffi, model, gs)
            assert rc == lib.AC_ERR_ARG and q8 == ffi.NULL
            assert needle in last_error(lib, ffi)


def test_python_quantize_and_save(wide_model, tmp_path, built):
    from arianna_c import AriannaError, Model

    tokens = tokens_for(wide_model.cfg.vocab_size, 20)
    path = tmp_path / "saved_q8.bin"
    with Model(wide_model.model, wide_model.tokenizer, quantize="int8") as m:
        assert m.config.version == 2 and m.quantization == "int8"
        want = m.logits(tokens)
        text = m.generate("the", max_new_tokens=12, temperature=0.0)
        m.save(path)
    with Model(path, wide_model.tokenizer) as m:  # an int8 file is read as it is...
        assert m.quantization == "int8"
        assert np.array_equal(m.logits(tokens), want)
        assert m.generate("the", max_new_tokens=12, temperature=0.0) == text
    with Model(path, wide_model.tokenizer, quantize="int8") as m:  # ...also with quantize=
        assert np.array_equal(m.logits(tokens), want)
    with Model(wide_model.model, wide_model.tokenizer) as m:
        assert m.quantization is None
        m.save(tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == wide_model.model.read_bytes()
    with pytest.raises(AriannaError, match="quantize"):
        Model(wide_model.model, wide_model.tokenizer, quantize="int4")


# ---------------------------------------------------------------------------- batched decode


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_generate_batch_equals_single_sequences(wide_model, built, quantization):
    from arianna_c import Model

    prompts = ["the", "it is a", "", "once upon a time there was"]
    with Model(wide_model.model, wide_model.tokenizer, threads=2, quantize=quantization) as m:
        greedy = m.generate_batch(prompts, max_new_tokens=30, temperature=0.0)
        assert greedy == [m.generate(p, max_new_tokens=30, temperature=0.0) for p in prompts]
        # sampled: sequence i uses seed + i
        sampled = m.generate_batch(prompts, max_new_tokens=30, temperature=0.9, top_p=0.95, seed=40)
        assert sampled == [m.generate(p, max_new_tokens=30, temperature=0.9, top_p=0.95, seed=40 + i)
                           for i, p in enumerate(prompts)]
        assert m.generate_batch([], max_new_tokens=5) == []


def test_generate_batch_stops_like_generate(make_model, built):
    """Sequences end at different times (context full, max_new_tokens); the rest go on."""
    from arianna_c import Model

    files = make_model(seed=3, seq_len=24)
    full = "x" * 22  # BOS, the dummy-prefix space and 22 x: the whole context, nothing to add
    with Model(files.model, files.tokenizer) as m:
        assert len(m.encode(full)) == 24
        prompts = ["the cat sat on it and the", full, "a"]
        got = m.generate_batch(prompts, max_new_tokens=100, temperature=0.0)
        assert got[1] == ""
        assert got == [m.generate(p, max_new_tokens=100, temperature=0.0) for p in prompts]
        assert m.generate_batch(prompts, max_new_tokens=0) == ["", "", ""]


def test_batch_c_api_errors(lib, ffi, make_model):
    files = make_model()
    max_batch = header_constant("AC_MAX_BATCH")
    with loaded_model(lib, ffi, files.model) as model:
        rc, tok = load_tokenizer(lib, ffi, files.tokenizer, files.cfg.vocab_size)
        assert rc == 0, last_error(lib, ffi)
        batch = ffi.new("ac_batch **")
        for n in (0, -1, max_batch + 1, 100000):
            assert lib.ac_batch_create(model, tok, n, ffi.NULL, batch) == lib.AC_ERR_ARG
            assert last_error(lib, ffi) == f"batch size {n} is invalid: it must be in 1..{max_batch}"
        params = ffi.new("ac_session_params *", lib.ac_session_default_params())
        params.max_new_tokens = 10
        assert lib.ac_batch_create(model, tok, 2, params, batch) == 0
        prompt = b"x" * 200  # far more tokens than seq_len 64
        c_prompt = ffi.new("char[]", prompt)
        prompts = ffi.new("const char *[]", [c_prompt, c_prompt])
        lens = ffi.new("size_t[]", [len(prompt), len(prompt)])
        out, results = ffi.new("int[]", 20), ffi.new("ac_batch_result[]", 2)
        assert lib.ac_batch_generate(batch[0], prompts, lens, out, results) == lib.AC_ERR_RANGE
        assert re.fullmatch(r"prompt 0 is \d+ tokens \(BOS included\) but the model's seq_len is 64",
                            last_error(lib, ffi)), last_error(lib, ffi)
        params.max_new_tokens = -1
        assert lib.ac_batch_create(model, tok, 2, params, ffi.new("ac_batch **")) == lib.AC_ERR_ARG
        assert "max_new_tokens -1 is invalid" in last_error(lib, ffi)
        lib.ac_batch_free(batch[0])
        lib.ac_tokenizer_free(tok)


# ---------------------------------------------------------------------------- CLI


def test_cli_threads_and_speed_report(run_binary, wide_model):
    outs = []
    for threads in ("1", "2"):
        r = run_cli(run_binary, wide_model.model, "-n", "30", "-t", "0", "-i", "the", "-T", threads)
        assert r.returncode == 0, r.stderr
        assert "achieved tok/s: " in r.stderr and "prompt tok/s: " in r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1]


def test_cli_int8_write_and_read(run_binary, wide_model, tmp_path, built):
    from arianna_c import Model

    out = tmp_path / "cli_q8.bin"
    r = run_cli(run_binary, wide_model.model, "-q", "int8", "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    with Model(wide_model.model, wide_model.tokenizer, quantize="int8") as m:
        m.save(tmp_path / "py_q8.bin")
        want = m.generate("the", max_new_tokens=20, temperature=0.0)
    assert out.read_bytes() == (tmp_path / "py_q8.bin").read_bytes()
    for model_args in ([wide_model.model, "-q", "int8"], [out], [out, "-q", "int8"]):
        r = run_cli(run_binary, *model_args, "-z", wide_model.tokenizer, "-n", "20", "-t", "0", "-i", "the")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "the" + want + "\n"


def test_cli_batch_prints_each_sequence(run_binary, wide_model, built):
    r = run_cli(run_binary, wide_model.model, "-b", "3", "-s", "7", "-n", "20", "-t", "0.9", "-i", "the")
    assert r.returncode == 0, r.stderr
    assert "achieved tok/s: " in r.stderr
    parts = r.stdout.split("=== sequence ")[1:]
    assert len(parts) == 3
    for i, part in enumerate(parts):
        header, text = part.split("\n", 1)
        assert header == f"{i} (seed {7 + i}) ==="
        single = run_cli(run_binary, wide_model.model, "-s", str(7 + i), "-n", "20", "-t", "0.9", "-i", "the")
        assert single.returncode == 0
        assert text == single.stdout


BAD_SPEED_FLAGS = [
    (["-T", "0"], f"-T 0: threads must be in 1..{MAX_THREADS}"),
    (["-T", "x"], "-T x: not a whole number"),
    (["-T", "-2"], f"-T -2: threads must be in 1..{MAX_THREADS}"),
    (["-T", "100000"], f"-T 100000: threads must be in 1..{MAX_THREADS}"),
    (["-q", "int4"], "-q int4: the only quantization is int8"),
    (["-q", ""], "-q : the only quantization is int8"),
    (["-b", "0"], f"-b 0: the batch must be in 1..{header_constant('AC_MAX_BATCH')} sequences"),
    (["-b", "two"], "-b two: not a whole number"),
    (["-m", "chat", "-b", "2"], "-b applies to generate mode only"),
    (["-o"], "-o needs a value"),
]


@pytest.mark.parametrize("args, error", BAD_SPEED_FLAGS, ids=[" ".join(args) for args, _ in BAD_SPEED_FLAGS])
def test_cli_bad_speed_flags(run_binary, wide_model, args, error):
    r = run_cli(run_binary, wide_model.model, *args)
    assert r.returncode == 1 and r.stdout == ""
    assert error_lines(r.stderr) == [f"error: {error}"], r.stderr
    assert "Usage" in r.stderr
