"""Knowledge modules: the file format (Python and C agree, bad files are refused with the field
named), applying them (C logits equal a PyTorch model with the adapter merged, scale 0 is the
base bit for bit, the base file never changes), the CLI's -L, Model(modules=...), training a
module (guard, exact resume, one command on a folder of text) and the dialogue data script."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arianna_c import AriannaError, Model, formats, modules
from arianna_c.formats import FormatError
from capi import error_lines, header_constant, last_error, loaded_model, run_cli

REPO = Path(__file__).resolve().parent.parent
TOKENS = [1, 40, 7, 300, 52, 9, 0, 211, 33, 17, 5, 260]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def random_module(base: Path, seed: int = 0, rank: int = 4, alpha: float = 8.0, targets=None,
                  scale: float = 0.1) -> modules.Module:
    """A module for base with random A and B (B not zero, so it changes the logits)."""
    cfg = formats.read_model(base)[0]
    targets = targets or [(l, m) for l in range(cfg.n_layers) for m in modules.MATRICES]
    rng = np.random.default_rng(seed)
    module = modules.Module(rank, alpha, modules.base_shape(cfg), modules.fingerprint(base))
    for layer, matrix in targets:
        out_dim, in_dim = modules.matrix_shape(cfg, matrix)
        module.adapters[(layer, matrix)] = ((scale * rng.standard_normal((rank, in_dim))).astype(np.float32),
                                            (scale * rng.standard_normal((out_dim, rank))).astype(np.float32))
    return module


def write(path: Path, module: modules.Module) -> Path:
    return modules.write_module(path, module)


def logits(files, mods=(), **kwargs) -> np.ndarray:
    with Model(files.model, files.tokenizer, modules=list(mods), **kwargs) as m:
        return np.asarray(m.logits(TOKENS))


@pytest.fixture
def base(make_model):
    return make_model(seed=3)


# int8 groups of 32 need dim and hidden_dim divisible by 32
INT8_SHAPE = dict(dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2)


@pytest.fixture
def base64(make_model):
    return make_model(seed=3, **INT8_SHAPE)


# ---------------------------------------------------------------------------- the format


def test_module_file_round_trips(base, tmp_path):
    module = random_module(base.model, targets=[(0, "wq"), (1, "w2"), (1, "w3")])
    path = write(tmp_path / "m.bin", module)
    back = modules.read_module(path)
    assert (back.rank, back.alpha, back.base, back.base_fingerprint) == \
           (module.rank, module.alpha, module.base, module.base_fingerprint)
    assert back.targets == [(0, "wq"), (1, "w2"), (1, "w3")]
    for key, (a, b) in module.adapters.items():
        assert np.array_equal(back.adapters[key][0], a) and np.array_equal(back.adapters[key][1], b)
    size = 128 + 8 * 3 + 4 * sum(a.size + b.size for a, b in module.adapters.values())
    assert path.stat().st_size == size


def test_fingerprint_is_blake2b_of_the_file_in_c_and_python(lib, ffi, layout_model):
    fp = ffi.new("unsigned char[32]")
    with loaded_model(lib, ffi, layout_model.model) as model:
        assert lib.ac_model_fingerprint(model, fp) == 0
    want = hashlib.blake2b(layout_model.model.read_bytes(), digest_size=32).digest()
    assert bytes(fp) == want == modules.fingerprint(layout_model.model)


def test_c_reads_what_python_writes(lib, ffi, base, tmp_path):
    module = random_module(base.model, rank=3, alpha=5.0, targets=[(1, "wk"), (1, "wo")])
    path = write(tmp_path / "m.bin", module)
    out = ffi.new("ac_module **")
    assert lib.ac_module_load(str(path).encode(), out) == 0
    info = ffi.new("ac_module_info *")
    assert lib.ac_module_get_info(out[0], info) == 0
    lib.ac_module_free(out[0])
    assert (info.rank, info.alpha, info.n_targets, info.n_params) == (3, 5.0, 2, module.n_params)
    assert (info.base.dim, info.base.n_kv_heads, info.base.vocab_size) == (base.cfg.dim, base.cfg.n_kv_heads,
                                                                            base.cfg.vocab_size)
    assert bytes(info.base_fingerprint) == module.base_fingerprint


def test_info_command_describes_a_module(base, tmp_path):
    path = write(tmp_path / "m.bin", random_module(base.model, targets=[(0, "wq"), (1, "wq"), (1, "w1")]))
    r = subprocess.run([sys.executable, "-m", "arianna_c.modules", "info", str(path), "--base", str(base.model)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "rank 4, alpha 8" in r.stdout and "wq of layers 0-1; w1 of layer 1" in r.stdout
    assert f"matches {base.model}" in r.stdout
    other = tmp_path / "other.bin"
    formats.write_model(other, base.cfg, formats.random_weights(base.cfg, 99))
    r = subprocess.run([sys.executable, "-m", "arianna_c.modules", "info", str(path), "--base", str(other)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "trained on another base model file" in r.stderr


# Each (name, how to break a valid module file, the error's field words).  Offsets: header
# magic 0, version 4, rank 8, alpha 12, dtype 16, base shape 20.., n_targets 48, fingerprint
# 52.., padding 84..127, then the (layer, matrix) table at 128 and the floats.
def _put(offset: int, fmt: str, value):
    def edit(data: bytearray) -> bytearray:
        struct.pack_into(fmt, data, offset, value)
        return data
    return edit


BAD_FILES = [
    ("empty", lambda d: bytearray(), "shorter than a module header"),
    ("header only", lambda d: d[:100], "shorter than a module header"),
    ("magic", _put(0, "<4s", b"ak42"), "not a module file"),
    ("version", _put(4, "<i", 2), "version is 2"),
    ("rank 0", _put(8, "<i", 0), "rank is 0"),
    ("rank huge", _put(8, "<i", 1 << 20), "rank is 1048576"),
    ("alpha nan", _put(12, "<f", float("nan")), "alpha is nan"),
    ("alpha 0", _put(12, "<f", 0.0), "alpha is 0"),
    ("dtype", _put(16, "<i", 1), "dtype is 1"),
    ("base dim 0", _put(20, "<i", 0), "base dim is 0"),
    ("n_targets 0", _put(48, "<i", 0), "n_targets is 0"),
    ("n_targets too many", _put(48, "<i", 1000), "n_targets is 1000"),
    ("padding", _put(100, "<B", 7), "header byte 100"),
    ("layer", _put(128, "<i", 9), "target 0: layer is 9"),
    ("matrix", _put(132, "<i", 7), "target 0: matrix is 7"),
    ("repeated", lambda d: _put(140, "<i", 0)(_put(136, "<i", 0)(d)), "out of order or repeated"),
    ("truncated", lambda d: d[:-1], "its header implies"),
    ("trailing byte", lambda d: d + b"\0", "its header implies"),
    ("nan in A", lambda d: _put(128 + 16, "<f", float("nan"))(d), "layers.0.wq.A[0]"),
    ("inf in B", lambda d: _put(len(d) - 4, "<f", float("inf"))(d), "layers.1.wk.B["),
]


@pytest.mark.parametrize("name,breaker,words", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_module_files_are_refused_naming_the_file_and_field(lib, ffi, base, tmp_path, name, breaker, words):
    good = modules.module_bytes(random_module(base.model, targets=[(0, "wq"), (1, "wk")]))
    bad = bytes(breaker(bytearray(good)))
    path = tmp_path / "bad.bin"
    path.write_bytes(bad)
    out = ffi.new("ac_module **")
    assert lib.ac_module_load(str(path).encode(), out) == lib.AC_ERR_FORMAT
    message = last_error(lib, ffi)
    assert message.startswith(f"{path}: ") and words in message, message
    assert out[0] == ffi.NULL
    buf = ffi.from_buffer(bad)
    assert lib.ac_module_load_memory(buf, len(bad), b"mem", out) == lib.AC_ERR_FORMAT
    assert last_error(lib, ffi) == "mem: " + message[len(f"{path}: "):]
    with pytest.raises(FormatError, match=str(path)):
        modules.read_module(path)
    with pytest.raises(AriannaError, match="bad.bin") as e:
        Model(base.model, base.tokenizer, modules=[(path, 1.0)])
    assert e.value.name == "AC_ERR_FORMAT"


def test_a_module_for_another_base_is_refused(base, make_model, tmp_path):
    other = make_model(seed=4)  # same shape, other weights
    path = write(tmp_path / "m.bin", random_module(other.model))
    with pytest.raises(AriannaError, match="trained on another base model file") as e:
        Model(base.model, base.tokenizer, modules=[(path, 1.0)])
    assert e.value.name == "AC_ERR_MISMATCH"
    wide = make_model(seed=3, dim=96, hidden_dim=96)
    path = write(tmp_path / "wide.bin", random_module(wide.model))
    with pytest.raises(AriannaError, match="the module's base has dim 96, the model has dim 48"):
        Model(base.model, base.tokenizer, modules=[(path, 1.0)])
    with pytest.raises(FormatError, match="trained on another base"):
        modules.check_base(modules.read_module(tmp_path / "m.bin"), base.cfg, modules.fingerprint(base.model))


def test_bad_apply_arguments(lib, ffi, base64, tmp_path):
    base = base64
    path = write(tmp_path / "m.bin", random_module(base.model))
    for scale in (float("nan"), float("inf")):
        with pytest.raises(AriannaError, match="is not a finite number"):
            Model(base.model, base.tokenizer, modules=[(path, scale)])
    with pytest.raises(AriannaError, match="the model is int8"):
        int8 = tmp_path / "int8.bin"
        Model(base.model, base.tokenizer, quantize="int8").save(int8)
        Model(int8, base.tokenizer, modules=[(write(tmp_path / "m64.bin", random_module(int8)), 1.0)])
    with pytest.raises(TypeError, match="modules"):
        Model(base.model, base.tokenizer, modules=[path])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="modules"):
        Model(base.model, base.tokenizer, modules=[(path, True)])
    with pytest.raises(FileNotFoundError):
        Model(base.model, base.tokenizer, modules=[(tmp_path / "missing.bin", 1.0)])
    out = ffi.new("ac_model **")
    with loaded_model(lib, ffi, base.model) as model:
        assert lib.ac_model_apply_modules(model, ffi.NULL, ffi.NULL, lib.AC_MAX_MODULES + 1, out) == lib.AC_ERR_ARG
    assert lib.ac_model_apply_modules(ffi.NULL, ffi.NULL, ffi.NULL, 0, out) == lib.AC_ERR_ARG


def test_a_merged_weight_that_overflows_is_refused(base, tmp_path):
    huge = random_module(base.model, targets=[(1, "w2")], scale=1e19)
    path = write(tmp_path / "huge.bin", huge)
    with pytest.raises(AriannaError, match=r"layers\.1\.w2\[\d+\]\[\d+\] becomes -?inf") as e:
        Model(base.model, base.tokenizer, modules=[(path, 1.0)])
    assert e.value.name == "AC_ERR_RANGE"


def test_the_python_merge_refuses_an_overflowing_weight_as_c_does(base, tmp_path, capsys):
    huge = random_module(base.model, targets=[(1, "w2")], scale=1e19)
    path = write(tmp_path / "huge.bin", huge)
    with pytest.raises(AriannaError) as c_error:
        Model(base.model, base.tokenizer, modules=[(path, 1.0)])
    with pytest.raises(FormatError, match=r"^layers\.1\.w2\[\d+\]\[\d+\] becomes -?inf with the modules") as e:
        modules.merge(formats.read_model(base.model)[1], [(huge, 1.0)])
    assert str(e.value) in str(c_error.value)
    pytest.importorskip("torch")
    from arianna_c.lora import main_eval

    pattern_shards(tmp_path / "data", tmp_path / "guard")
    assert main_eval(["--base", str(base.model), "--module", str(path), "--data", str(tmp_path / "data"),
                      "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {e.value}\n"


def int8_copy(files, path: Path) -> Path:
    """files' model quantized to int8 by the C library, saved to path."""
    with Model(files.model, files.tokenizer, quantize="int8") as m:
        m.save(path)
    return path


def test_an_int8_base_is_refused_for_modules_in_python_as_in_c(base64, tmp_path, capsys):
    q8 = int8_copy(base64, tmp_path / "q8.bin")
    path = write(tmp_path / "m.bin", random_module(q8))
    words = "the model is int8 (group size 32): modules apply to float32 weights"
    with pytest.raises(AriannaError, match=re.escape(words)):
        Model(q8, base64.tokenizer, modules=[(path, 1.0)])
    assert modules.main(["info", str(path), "--base", str(q8)]) == 1
    assert capsys.readouterr().err == (f"error: {path}: {words}, so apply them first and quantize the "
                                       f"result\n")
    pytest.importorskip("torch")
    from arianna_c.lora import ModuleConfig
    from arianna_c.lora_trainer import ModuleTrainer, merged_transformer

    with pytest.raises(FormatError, match=re.escape(f"{path}: {words}")):
        merged_transformer(q8, [(path, 1.0)])
    pattern_shards(tmp_path / "data", tmp_path / "guard")
    cfg = ModuleConfig(base=str(q8), data=str(tmp_path / "data"), out=str(tmp_path / "trained.bin"),
                       no_guard=True, seq_len=16, batch_size=4, max_steps=2)
    with pytest.raises(FormatError, match=re.escape(f"--base {q8}: {words}")):
        ModuleTrainer(cfg, log=lambda s: None)
    assert not cfg.ckpt_dir.exists() and not Path(cfg.out).exists()


# ---------------------------------------------------------------------------- applying


def test_merge_matches_the_python_merge_bit_for_bit(lib, ffi, layout_model, tmp_path):
    """The C merge writes exactly the weights modules.merge computes (float64 sums, one
    rounding); two modules at once give one rounding of the sum."""
    a = random_module(layout_model.model, seed=1, targets=[(0, "wq"), (0, "w2"), (1, "wv")])
    b = random_module(layout_model.model, seed=2, rank=2, targets=[(0, "w2"), (1, "w1")])
    pa, pb = write(tmp_path / "a.bin", a), write(tmp_path / "b.bin", b)
    with Model(layout_model.model, layout_model.tokenizer, modules=[(pa, 0.7), (pb, -1.3)]) as m:
        m.save(tmp_path / "merged.bin")
    cfg, weights = formats.read_model(layout_model.model)
    want = modules.merge(weights, [(a, 0.7), (b, -1.3)])
    got = formats.read_model(tmp_path / "merged.bin")[1]
    for name in want:
        assert np.array_equal(got[name], want[name]), name


def test_c_logits_equal_the_torch_model_with_the_adapter_merged(layout_model, tmp_path):
    pytest.importorskip("torch")
    import torch

    from arianna_c.lora_trainer import merged_transformer

    a = write(tmp_path / "a.bin", random_module(layout_model.model, seed=1))
    b = write(tmp_path / "b.bin", random_module(layout_model.model, seed=2, rank=1, targets=[(1, "wo")]))
    for specs in ([(a, 1.0)], [(a, 0.5)], [(a, -1.0)], [(a, 0.6), (b, 2.0)]):
        with torch.no_grad():
            want = merged_transformer(layout_model.model, specs)(torch.tensor([TOKENS]))[0].numpy()
        got = logits(layout_model, specs)
        assert np.abs(got - want).max() <= 1e-4, specs
        assert np.abs(got - logits(layout_model)).max() > 1e-3  # the module does change them


def test_scale_zero_is_the_base_bit_for_bit(base, tmp_path):
    path = write(tmp_path / "m.bin", random_module(base.model))
    assert np.array_equal(logits(base, [(path, 0.0)]), logits(base))
    with Model(base.model, base.tokenizer, modules=[(path, 0.0), (path, -0.0)]) as m:
        m.save(tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == base.model.read_bytes()


def test_int8_quantizes_the_merged_weights(base64, tmp_path):
    base = base64
    path = write(tmp_path / "m.bin", random_module(base.model))
    with Model(base.model, base.tokenizer, modules=[(path, 1.0)]) as m:
        m.save(tmp_path / "merged.bin")
    merged = base.__class__(tmp_path / "merged.bin", base.tokenizer, base.cfg, {})
    assert np.array_equal(logits(base, [(path, 1.0)], quantize="int8"), logits(merged, quantize="int8"))


def test_modules_from_bytes_and_model_bytes(base, tmp_path):
    path = write(tmp_path / "m.bin", random_module(base.model))
    want = logits(base, [(path, 1.0)])
    with Model(base.model.read_bytes(), base.tokenizer, modules=[(path.read_bytes(), 1.0)]) as m:
        assert np.array_equal(np.asarray(m.logits(TOKENS)), want)


# ---------------------------------------------------------------------------- the CLI


def test_cli_applies_modules_with_scales(run_binary, base, tmp_path):
    a = write(tmp_path / "a.bin", random_module(base.model, seed=1, scale=0.3))
    b = write(tmp_path / "b.bin", random_module(base.model, seed=2, scale=0.3))
    common = [base.model, "-z", base.tokenizer, "-t", "0", "-n", "24", "-e", "1", "-i", "the thing"]
    # stdout as bytes, compared exactly: a random model writes any bytes
    plain = run_cli(run_binary, *common, text=False)
    zero = run_cli(run_binary, *common, "-L", f"{a}:0", text=False)
    one = run_cli(run_binary, *common, "-L", a, text=False)
    both = run_cli(run_binary, *common, "-L", f"{a}:0.5", "-L", f"{b}:-1.5", text=False)
    assert plain.returncode == zero.returncode == one.returncode == both.returncode == 0, both.stderr
    assert zero.stdout == plain.stdout and one.stdout != plain.stdout
    with Model(base.model, base.tokenizer, modules=[(a, 0.5), (b, -1.5)]) as m:
        m.save(tmp_path / "merged.bin")
    merged = run_cli(run_binary, tmp_path / "merged.bin", *common[1:], text=False)
    assert merged.returncode == 0 and both.stdout == merged.stdout


def test_cli_writes_the_merged_model_with_o(run_binary, base, tmp_path):
    a = write(tmp_path / "a.bin", random_module(base.model))
    r = run_cli(run_binary, base.model, "-L", f"{a}:0.25", "-o", tmp_path / "merged.bin")
    assert r.returncode == 0, r.stderr
    merged = base.__class__(tmp_path / "merged.bin", base.tokenizer, base.cfg, {})
    assert np.array_equal(logits(merged), logits(base, [(a, 0.25)]))


def test_cli_module_errors(run_binary, base, make_model, tmp_path):
    other = make_model(seed=9)
    foreign = write(tmp_path / "foreign.bin", random_module(other.model))
    for module, why in ((foreign, "trained on another base model file"),
                        (tmp_path / "missing.bin", "cannot open module file"), (base.model, "not a module file")):
        r = run_cli(run_binary, base.model, "-z", base.tokenizer, "-L", module)
        assert r.returncode == 1 and not r.stdout
        errors = error_lines(r.stderr)  # one line, naming the file and what is wrong with it
        assert len(errors) == 1 and errors[0].startswith(f"error: {module}: ") and why in errors[0], r.stderr
    too_many = [x for _ in range(header_constant("AC_MAX_MODULES") + 1) for x in ("-L", foreign)]
    r = run_cli(run_binary, base.model, *too_many)
    assert r.returncode == 1
    assert error_lines(r.stderr) == [f"error: -L {foreign}: too many modules (the most is "
                                     f"{header_constant('AC_MAX_MODULES')})"]


# ---------------------------------------------------------------------------- the base never changes


def test_the_base_file_is_unchanged_by_training_and_applying(run_binary, tmp_path, make_model):
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from arianna_c.lora import ModuleConfig
    from arianna_c.lora_trainer import ModuleTrainer

    torch.set_num_threads(1)
    files = make_model(seed=5, version=0, **INT8_SHAPE)
    before, mtime = sha256(files.model), files.model.stat().st_mtime_ns
    data, guard = tmp_path / "data", tmp_path / "guard"
    pattern_shards(data, guard)
    cfg = ModuleConfig(base=str(files.model), data=str(data), guard_data=str(guard), out=str(tmp_path / "m.bin"),
                       rank=2, alpha=4.0, seq_len=16, batch_size=4, max_steps=6, warmup_steps=2, eval_interval=3,
                       eval_batches=1, log_interval=3, dtype="fp32", guard_margin=1.0)
    ModuleTrainer(cfg, log=lambda s: None).train()
    logits(files, [(tmp_path / "m.bin", 1.0)], quantize="int8")
    assert run_cli(run_binary, files.model, "-z", files.tokenizer, "-L", tmp_path / "m.bin", "-n", "4").returncode == 0
    assert run_cli(run_binary, files.model, "-L", tmp_path / "m.bin", "-o", tmp_path / "merged.bin").returncode == 0
    assert sha256(files.model) == before and files.model.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------- training


def pattern_shards(data: Path, guard: Path, vocab: int = 320) -> None:
    """A repeating pattern to learn, and random text as the 'base corpus'."""
    data.mkdir(parents=True, exist_ok=True)
    guard.mkdir(parents=True, exist_ok=True)
    np.tile(np.arange(3, 40, dtype=np.uint16), 120).tofile(data / "a.bin")
    np.random.default_rng(0).integers(3, vocab, size=6000).astype(np.uint16).tofile(guard / "g.bin")


@pytest.fixture
def module_setup(make_model, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    torch.set_num_threads(1)
    files = make_model(seed=5)
    pattern_shards(tmp_path / "data", tmp_path / "guard")
    from arianna_c.lora import ModuleConfig

    def config(**overrides):
        settings = dict(base=str(files.model), data=str(tmp_path / "data"), guard_data=str(tmp_path / "guard"),
                        out=str(tmp_path / "m.bin"), rank=2, alpha=4.0, seq_len=16, batch_size=4, max_steps=8,
                        warmup_steps=2, eval_interval=4, eval_batches=1, log_interval=1, dtype="fp32",
                        guard_margin=1.0, lr=3e-3)
        settings.update(overrides)
        return ModuleConfig(**settings)

    return files, config


def test_training_learns_and_the_module_is_its_adapters(module_setup, tmp_path):
    import torch

    from arianna_c.lora_trainer import ModuleTrainer, merged_transformer

    files, config = module_setup
    trainer = ModuleTrainer(config(), log=lambda s: None)
    summary = trainer.train()
    assert summary["best_val"] < summary["val_at_start"] - 0.05
    assert modules.read_module(config().out).base_fingerprint == modules.fingerprint(files.model)
    # the adapters written as a module, merged, give the training model's logits (W x + s B A x),
    # and C's merge gives them too
    now = write(tmp_path / "now.bin", trainer.module())
    trainer.model.eval()
    x = torch.tensor([TOKENS])
    with torch.no_grad():
        merged = merged_transformer(files.model, [(now, 1.0)])(x)[0].numpy()
        wrapped = trainer.model(x)[0].numpy()
    assert np.abs(merged - wrapped).max() <= 1e-4
    assert np.abs(logits(files, [(now, 1.0)]) - merged).max() <= 1e-4
    assert np.abs(merged - logits(files)).max() > 1e-3


def test_the_guard_keeps_the_best_module_within_the_margin(module_setup):
    from arianna_c.lora_trainer import ModuleTrainer

    files, config = module_setup
    lines = []
    trainer = ModuleTrainer(config(guard_margin=0.0, lr=3e-2, max_steps=40), log=lines.append)
    trainer.train()
    guard = trainer.history["guard"]
    assert guard[0][0] == 0 and any("base-corpus val" in line for line in lines)
    assert guard[-1][2] > guard[0][2] and "stopping" in lines[-1]  # it stopped on the guard
    assert trainer.step < 40
    # the module kept is not the one that tripped the guard
    kept, last = modules.read_module(config().out), trainer.module()
    assert any(not np.array_equal(kept.adapters[k][1], last.adapters[k][1]) for k in last.adapters)


def test_resume_continues_exactly(module_setup, tmp_path):
    from arianna_c.lora_trainer import ModuleTrainer

    files, config = module_setup
    straight = ModuleTrainer(config(out=str(tmp_path / "straight.bin")), log=lambda s: None)
    straight.train()

    interrupted = ModuleTrainer(config(), log=lambda s: None)

    def stop_at_step_3(line: str) -> None:
        if " step 3 " in line:
            interrupted.request_stop()

    interrupted.log = stop_at_step_3
    interrupted.train()
    assert interrupted.step == 3
    resumed = ModuleTrainer(config(), resume=True, log=lambda s: None)
    resumed.train()
    assert resumed.history["train"] == straight.history["train"]
    assert resumed.history["val"] == straight.history["val"]
    assert Path(config().out).read_bytes() == (tmp_path / "straight.bin").read_bytes()


def test_train_module_command_on_a_folder_of_text(sp_tok, tmp_path, capsys):
    """One command: text in, module out; the base is only read; errors are one line."""
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from conftest import TRAINING_TEXT

    cfg = formats.ModelConfig(dim=48, hidden_dim=96, n_layers=2, n_heads=6, n_kv_heads=2,
                              vocab_size=sp_tok.vocab_size, seq_len=64, version=0)
    base = tmp_path / "base.bin"
    formats.write_model(base, cfg, formats.random_weights(cfg, 1))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "qa.txt").write_text("\n\n".join(f"Q: Is {w} good?\nA: {w} is good." for w in
                                                         ("the sea", "a river", "the moon", "a stone") * 8))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "c.txt").write_text(TRAINING_TEXT * 4)
    before = sha256(base)
    command = [sys.executable, "-m", "arianna_c.train", "module", "--base", str(base), "--data",
               str(tmp_path / "text"), "--guard-data", str(tmp_path / "corpus"), "--tokenizer",
               str(sp_tok.model_file), "--out", str(tmp_path / "qa.bin"), "--rank", "2", "--seq-len", "32",
               "--batch-size", "2", "--max-steps", "4", "--eval-interval", "2", "--eval-batches", "1",
               "--warmup-steps", "1", "--log-interval", "2", "--threads", "1", "--dtype", "fp32"]
    r = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "step 4" in r.stdout and "base-corpus val" in r.stdout
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 4
    module = modules.read_module(tmp_path / "qa.bin")
    assert module.rank == 2 and len(module.adapters) == 14 and sha256(base) == before
    from arianna_c.train import main

    args = command[3:]  # the same command, in this process: each error is one line
    no_guard = [c for c in args if c not in ("--guard-data", str(tmp_path / "corpus"))]
    for argv, words in ((no_guard, "error: --guard-data is needed"),
                        (args + ["--resume", "--rank", "3"], "error: --rank 3 contradicts the checkpoint"),
                        (args + ["--targets", "wq,wx"], "error: --targets 'wq,wx': unknown matrix wx")):
        assert main(argv) == 1
        assert capsys.readouterr().err.startswith(words)


def test_text_folders_of_one_name_are_tokenized_apart_and_again_when_they_change(sp_tok, tmp_path):
    """--data mine/texts and --guard-data corpus/texts get a shard folder each; a folder is
    tokenized again when its files or its tokenizer change, whatever the files' times."""
    pytest.importorskip("torch")
    import os

    from arianna_c import data
    from arianna_c.lora_trainer import shard_folder

    mine, corpus, work = tmp_path / "mine" / "texts", tmp_path / "corpus" / "texts", tmp_path / "work"
    for folder, text in ((mine, "Q: Who are you?\nA: A sailor.\n\n" * 20), (corpus, "The river rose.\n\n" * 30)):
        folder.mkdir(parents=True)
        (folder / "t.txt").write_text(text)
        os.utime(folder / "t.txt", (1e9, 1e9))  # older than any shard
    work.mkdir()
    tok = str(sp_tok.model_file)
    trained = shard_folder(str(mine), tok, work, "--data")
    guarded = shard_folder(str(corpus), tok, work, "--guard-data")
    assert trained != guarded and trained.name.startswith("data-texts-") and guarded.name.startswith("guard-data-")
    for folder, shards in ((mine, trained), (corpus, guarded)):
        want = data.tokenize_text(sp_tok.sp, (folder / "t.txt").read_text())
        assert np.array_equal(data.read_shard(shards / "t.bin"), want)
    # the same source under the other option is tokenized apart too, and a file set that
    # changed is tokenized again, without the removed file's shard
    assert shard_folder(str(mine), tok, work, "--guard-data") not in (trained, guarded)
    (mine / "t.txt").rename(mine / "u.txt")
    assert sorted(p.name for p in shard_folder(str(mine), tok, work, "--data").glob("*.bin")) == ["u.bin"]
    record = json.loads((trained / data.SHARDS_RECORD).read_text())
    record["tokenizer"] = str(tmp_path / "other.model")
    (trained / data.SHARDS_RECORD).write_text(json.dumps(record))
    shard_folder(str(mine), tok, work, "--data")
    assert json.loads((trained / data.SHARDS_RECORD).read_text())["tokenizer"] == str(Path(tok).resolve())


MODULE_RANGES = [
    (["--max-steps", "0"], "--max-steps 0 is invalid: it must be above 0"),
    (["--log-interval", "0"], "--log-interval 0 is invalid: it must be above 0"),
    (["--batch-size", "0"], "--batch-size 0 is invalid: it must be above 0"),
    (["--seq-len", "0"], "--seq-len 0 is invalid: it must be above 0"),
    (["--grad-accum", "0"], "--grad-accum 0 is invalid: it must be above 0"),
    (["--lr", "-1"], "--lr -1.0 is invalid: it must be above 0"),
    (["--eval-batches", "0"], "--eval-batches 0 is invalid: it must be above 0"),
    (["--guard-margin", "-1"], "--guard-margin -1.0 is invalid: it must be 0 or more"),
    (["--warmup-steps", "-3"], "--warmup-steps -3 is invalid: it must be 0 or more"),
    (["--val-fraction", "2"], "--val-fraction 2.0 is invalid: it must be below 1"),
    (["--rank", "0"], "--rank 0 is invalid: it must be in 1..4096"),
    (["--alpha", "nan"], "--alpha nan is invalid: it must be a finite number above 0"),
    (["--no-guard"], "--no-guard and --guard-data"),
]


@pytest.mark.parametrize("extra,says", MODULE_RANGES, ids=[" ".join(e) for e, _ in MODULE_RANGES])
def test_module_settings_out_of_range_are_refused_before_any_work(module_setup, tmp_path, capsys, extra, says):
    from arianna_c.train import main

    files, config = module_setup
    cfg = config()
    argv = ["module", "--base", cfg.base, "--data", cfg.data, "--guard-data", cfg.guard_data, "--out", cfg.out,
            "--threads", "1", *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {says}") and err.count("\n") == 1, err
    assert not Path(cfg.out).exists() and not cfg.ckpt_dir.exists()


def test_module_trainer_refuses_the_same_settings(module_setup):
    from arianna_c.lora_trainer import ModuleTrainer
    from arianna_c.train import ConfigError

    files, config = module_setup
    for settings, says in ((dict(max_steps=0), "--max-steps 0 is invalid"),
                           (dict(no_guard=True), "--no-guard and --guard-data"),
                           (dict(guard_data=None), "--guard-data is needed")):
        with pytest.raises(ConfigError, match=says):
            ModuleTrainer(config(**settings), log=lambda s: None)
        assert not config().ckpt_dir.exists()


def test_module_tokenizer_help_names_both_defaults(capsys):
    from arianna_c.train import main

    with pytest.raises(SystemExit):
        main(["module", "--help"])
    assert "tok4096.model, else tokenizer.model, beside the base" in " ".join(capsys.readouterr().out.split())


def test_eval_command_reports_losses_with_and_without_modules(base, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from arianna_c.lora import main_eval

    torch.set_num_threads(1)
    path = write(tmp_path / "m.bin", random_module(base.model, scale=0.3))
    pattern_shards(tmp_path / "data", tmp_path / "guard")
    command = ["--base", str(base.model), "--data", str(tmp_path / "guard"), "--heldout", str(tmp_path / "data"),
               "--seq-len", "16", "--batch-size", "2", "--eval-batches", "2"]
    results = []
    for spec in (f"{path}:0", str(path)):
        assert main_eval(command + ["--module", spec]) == 0
        results.append(json.loads(capsys.readouterr().out))
    zero, one = results
    assert zero["model"] == str(base.model) and zero["modules"] == [[str(path), 0.0]]
    for folder in (str(tmp_path / "guard"), str(tmp_path / "data")):
        assert zero["with_modules"][folder] == zero["base"][folder] == one["base"][folder]
        assert one["with_modules"][folder] != one["base"][folder]
    assert main_eval(command + ["--module", str(tmp_path / "missing.bin")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.bin" in err


def test_targets_and_layers_options():
    from arianna_c.lora import parse_targets, split_spec
    from arianna_c.train import ConfigError

    assert parse_targets("w2,wq", "0-1,3", 6) == [(0, "wq"), (0, "w2"), (1, "wq"), (1, "w2"), (3, "wq"), (3, "w2")]
    assert len(parse_targets(",".join(modules.MATRICES), "all", 6)) == 42
    for matrices, layers, words in (("wq,wx", "all", "unknown matrix wx"), ("wq", "6", "outside the base's layers 0-5"),
                                    ("wq", "2-1", "outside"), ("wq", "a", "not a layer")):
        with pytest.raises(ConfigError, match=words):
            parse_targets(matrices, layers, 6)
    assert split_spec("m.bin") == ("m.bin", 1.0) and split_spec("m.bin:0.5") == ("m.bin", 0.5)
    assert split_spec("dir:x/m.bin") == ("dir:x/m.bin", 1.0)


# What is not a finite float32 written out whole stays part of the path (Python's float() would
# take all but the first four; before the library's rule served both, Python did).
NOT_SCALES = ["m.bin:inf", "m.bin:nan", "m.bin: 0.5", "m.bin:1e400", "m.bin:1_0", "m.bin:0x", "m.bin:"]


def test_module_specs_split_by_the_library_s_rule_in_python_and_in_run(run_binary, base, tmp_path):
    from arianna_c.lora import split_spec

    assert split_spec("m.bin:-1.5") == ("m.bin", -1.5) and split_spec("m.bin:0.3") == ("m.bin", float(np.float32(0.3)))
    assert split_spec(":0.5") == (":0.5", 1.0)  # nothing before the ':': no path to split off
    for spec in NOT_SCALES:
        assert split_spec(spec) == (spec, 1.0)
        r = run_cli(run_binary, base.model, "-z", base.tokenizer, "-L", tmp_path / spec)
        assert error_lines(r.stderr) == [f"error: {tmp_path / spec}: cannot open module file: No such file or "
                                         f"directory"], r.stderr


# ---------------------------------------------------------------------------- the dialogue data


def test_make_dialogues_pairs_questions_with_replies(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    labelled = ["Crito\n\nby Plato\n\nPERSONS OF THE DIALOGUE:  Socrates, Crito.\n\nSCENE:  The Prison."]
    narrated = ["The Republic\n\nby Plato\n\nPERSONS OF THE DIALOGUE.\n\nSocrates.\n\nBOOK I."]
    for i in range(260):
        labelled.append(f"SOCRATES:  Is number {i} even,\nor odd?" if i % 2 == 0 else f"CRITO:  It is {i - 1}.")
        narrated.append(f"And is {i} a number? I said." if i % 2 == 0 else f"Yes, {i - 1} is, he replied.")
    (corpus / "philosophy-plato-crito.txt").write_text("\n\n".join(labelled))
    (corpus / "philosophy-plato-republic.txt").write_text("\n\n".join(narrated))
    (corpus / "philosophy-plato-apology.txt").write_text("\n\n".join(["x " * 400] * 5))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "make_dialogues.py"), str(corpus), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "plato-apology: skipped" in r.stdout
    train = (out / "train" / "plato-crito.txt").read_text()
    assert "Q: Is number 0 even" not in train  # the first pair of each block is dropped
    assert "Q: Is number 2 even, or odd?\nA: It is 2.\n\n" in train
    narrated_train = (out / "train" / "plato-republic.txt").read_text()
    assert "Q: And is 2 a number?\nA: Yes, 2 is.\n\n" in narrated_train
    for name in ("plato-crito", "plato-republic"):
        held = (out / "heldout" / f"{name}.txt").read_text()
        turns = lambda text: {line[3:] for line in text.splitlines() if line[:3] in ("Q: ", "A: ")}  # noqa: E731
        assert turns(held), (name, held)  # held-out pairs exist, and none of their turns is trained on
        assert not turns(held) & turns((out / "train" / f"{name}.txt").read_text())


# ---------------------------------------------------------------------------- the shipped module


def test_bundled_modules_are_found_in_the_package_then_the_checkout(tmp_path, monkeypatch):
    from arianna_c import paths

    package = tmp_path / "site" / "arianna_c"
    monkeypatch.setattr(paths, "PACKAGE_DIR", package)
    checkout = tmp_path / "site" / "persona" / "modules"
    checkout.mkdir(parents=True)
    (checkout / "qa.bin").write_bytes(b"x")
    assert paths.bundled_module_path("qa") == str(checkout / "qa.bin")
    (package / "persona" / "modules").mkdir(parents=True)
    (package / "persona" / "modules" / "qa.bin").write_bytes(b"y")
    assert paths.bundled_module_path("qa") == str(package / "persona" / "modules" / "qa.bin")
    with pytest.raises(FileNotFoundError, match=r"no bundled 'other' module found; tried: ") as e:
        paths.bundled_module_path("other")
    assert str(package / "persona" / "modules" / "other.bin") in str(e.value)
    assert str(checkout / "other.bin") in str(e.value)
    for bad in ("", "../qa", "modules/qa", ".."):
        with pytest.raises(ValueError, match="module name"):
            paths.bundled_module_path(bad)


def test_the_shipped_dialogue_module_applies_to_the_persona(built):
    from arianna_c import paths

    path = Path(paths.bundled_module_path("dialogue"))
    assert path == REPO / "persona" / "modules" / "dialogue.bin"  # this checkout's
    persona = paths.default_model_path()
    modules.check_base(modules.read_module(path), formats.read_model(persona)[0], modules.fingerprint(persona),
                       str(path))
    with Model(persona, modules=[(path, 1.0)]) as m:
        with_module = m.logits(TOKENS)
    with Model(persona) as m:
        without = m.logits(TOKENS)
    assert np.isfinite(with_module).all()
    assert np.abs(with_module - without).max() > 1e-3  # the module does change them


# ---------------------------------------------------------------------------- fuzz seeds and regressions


def test_fuzz_module_load_seeds_load_or_are_refused_and_replay_cleanly(built, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "fuzz" / "make_seeds.py"), str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    seeds = sorted((tmp_path / "fuzz_module_load").iterdir())
    loads = {}
    for seed in seeds:
        try:
            modules.read_module(seed)
            loads[seed.name] = True
        except FormatError:
            loads[seed.name] = False
    assert loads["rank1-all-targets"] and loads["rank8-ffn-layer0"] and loads["overflowing-merge"]
    assert not loads["truncated"] and not loads["nan-in-A"] and not loads["version-2"]
    r = subprocess.run(["make", "-s", "build-fuzz/replay_fuzz_module_load"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([str(REPO / "build-fuzz" / "replay_fuzz_module_load"), *map(str, seeds)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == len(seeds)



def test_fuzz_module_load_regressions_replay_cleanly(built):
    r = subprocess.run(["make", "-s", "build-fuzz/replay_fuzz_module_load"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted((REPO / "tests" / "fuzz_regressions" / "fuzz_module_load").glob("*"))
    assert files
    r = subprocess.run([str(REPO / "build-fuzz" / "replay_fuzz_module_load"), *map(str, files)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == len(files)
