"""The benchmark harness (python -m bench) runs end to end on a tiny random model and writes
JSON of the documented structure.  No timing assertions: only that the numbers are there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

from arianna_c import formats  # noqa: E402

TINY_BENCH = dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=96)


def _tokenizer() -> tuple[list[bytes], list[float]]:
    """<unk> <s> </s>, the 256 byte pieces, then every printable ASCII character."""
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)]
    pieces += [bytes([c]) for c in range(32, 127)]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces) - 259)]
    return pieces, scores


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("bench")
    pieces, scores = _tokenizer()
    cfg = formats.ModelConfig(**TINY_BENCH, vocab_size=len(pieces), shared_classifier=True, version=1)
    formats.write_model(d / "tiny.bin", cfg, formats.random_weights(cfg, seed=7))
    formats.write_tokenizer(d / "tiny_tok.bin", pieces, scores)
    return d / "tiny.bin", d / "tiny_tok.bin"


def _bench(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


ROW_KEYS = {"id", "group", "impl", "dtype", "threads", "metric", "status", "samples", "values", "median",
            "min", "max", "peak_rss_mb", "roofline", "roofline_fraction", "cold_roofline",
            "cold_roofline_fraction", "target", "pass"}


def test_quick_run_writes_results_json(built, tiny_files, tmp_path):
    model, tok = tiny_files
    out = tmp_path / "results.json"
    only = r"roofline|decode/(cli|python|numpy)/f32/T1|batch16/cli/f32|startup/python"
    r = _bench(["--quick", "--only", only, "--model", str(model), "--tokenizer", str(tok),
                "--json", str(out), "--roofline-ms", "5", "--quiet"])
    assert r.returncode == 0, r.stderr
    assert "decode/cli/f32/T1" in r.stdout and "roofline" in r.stdout  # the table was printed

    res = json.loads(out.read_text())
    assert res["schema"] == 1
    for key in ("timestamp", "settings", "machine", "model", "features", "roofline", "rows", "notes"):
        assert key in res, key
    assert res["settings"]["runs"] == 1 and res["settings"]["quick"] is True
    assert res["model"]["config"]["dim"] == TINY_BENCH["dim"]
    assert res["settings"]["prefill_prompt_tokens"] <= TINY_BENCH["seq_len"] - 2

    roof = res["roofline"]
    assert set(roof["bandwidth_gbs"]) == {"f32", "int8"}
    assert set(roof["bandwidth_gbs"]["f32"]) >= {"T1"}
    assert set(roof["cold_bandwidth_gbs"]) == {"f32", "int8"}
    assert roof["cold_bandwidth_gbs"]["f32"]["T1"] > 0  # reads after evicting the caches
    assert roof["fma_gflops"]["T1"] > 0
    assert roof["bytes_per_token"]["f32"] > roof["bytes_per_token"]["int8"] > 0

    rows = {row["id"]: row for row in res["rows"]}
    assert set(rows) == {"decode/cli/f32/T1", "decode/python/f32/T1", "decode/numpy/f32/T1",
                         "batch16/cli/f32/T2", "startup/python/f32/T1"}
    for row in rows.values():
        assert ROW_KEYS <= set(row), row["id"]
        assert len(row["samples"]) == 1
        assert row["status"] == "ok" or row["status"].startswith("n/a"), (row["id"], row["status"])
    for rid in ("decode/cli/f32/T1", "decode/python/f32/T1", "decode/numpy/f32/T1", "startup/python/f32/T1"):
        row = rows[rid]
        assert row["status"] == "ok", (rid, row["samples"])
        assert row["median"] > 0 and row["min"] <= row["median"] <= row["max"]
        assert row["peak_rss_mb"]["max"] > 0
    assert rows["decode/cli/f32/T1"]["roofline"] > 0
    assert 0 < rows["decode/cli/f32/T1"]["roofline_fraction"]
    assert rows["decode/cli/f32/T1"]["cold_roofline"] > 0 and rows["decode/cli/f32/T1"]["cold_roofline_fraction"] > 0
    assert rows["startup/python/f32/T1"]["cold_roofline"] is None  # only rows that read the weights per step
    assert rows["decode/cli/f32/T1"]["target"]["value"] == 880
    assert rows["decode/cli/f32/T1"]["pass"] in (True, False)
    assert "ratio_of_medians" in rows["decode/python/f32/T1"]["vs_cli"]
    assert rows["decode/python/f32/T1"]["pass"] in (True, False)
    startup = rows["startup/python/f32/T1"]["samples"][0]
    assert {"import_ms", "load_ms", "first_token_ms"} <= set(startup)


def test_list_rows(built, tiny_files):
    model, tok = tiny_files
    r = _bench(["--list", "--quick", "--model", str(model), "--tokenizer", str(tok)])
    assert r.returncode == 0, r.stderr
    ids = r.stdout.split()
    for rid in ("decode/cli/f32/T1", "decode/cli/int8/T2", "decode/python/f32/T1", "decode/numpy/f32/T1",
                "decode/torch/f32/T2", "decode/torch/int8/T1", "prefill/cli/f32/T1", "batch16/cli/f32/T2",
                "startup/python/f32/T1", "machine/roofline"):
        assert rid in ids


def test_torch_kv_decoder_matches_full_forward(tiny_files):
    """The PyTorch baseline's KV-cache step gives the logits of the model's own full forward."""
    torch = pytest.importorskip("torch")
    from bench import torch_kv

    model, _ = tiny_files
    net = torch_kv.load_model(str(model))
    tokens = [1, 40, 300, 7, 99, 120, 5, 260]
    with torch.no_grad():
        full = net(torch.tensor([tokens]))[0]
    dec = torch_kv.KVDecoder(net)
    for pos, tok in enumerate(tokens):
        step = dec.step(tok, pos)
        assert torch.allclose(step, full[pos], atol=1e-4, rtol=1e-4), pos
    new, times = torch_kv.decode(net, tokens[:3], 5)
    assert len(new) == len(times) <= 5
