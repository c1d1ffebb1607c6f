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
            "cold_roofline_fraction", "targets", "pass"}


def test_quick_run_writes_results_json(built, tiny_files, tmp_path):
    model, tok = tiny_files
    out = tmp_path / "results.json"
    only = r"roofline|decode/(cli|python|numpy)/f32/T1|batch16/cli/f32/T2|startup/python"
    r = _bench(["--quick", "--only", only, "--model", str(model), "--tokenizer", str(tok),
                "--json", str(out), "--roofline-ms", "5", "--quiet"])
    assert r.returncode == 0, r.stderr
    assert "decode/cli/f32/T1" in r.stdout and "roofline" in r.stdout  # the table was printed
    assert "targets: " in r.stdout and " met, " in r.stdout

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
    assert roof["isa"] in ("avx512", "avx2", "portable")
    assert set(roof["bandwidth_gbs"]["f32"]) == {"T1", "T2"}  # the 2-thread probe runs without OpenMP
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
    by_kind = {t["kind"]: t for t in rows["decode/cli/f32/T1"]["targets"]}
    assert by_kind["min"]["value"] == 880 and by_kind["min"]["pass"] in (True, False)
    assert by_kind["vs_peer"]["pass"] is None  # no --peers: neither met nor missed
    assert by_kind["roofline"]["measured"] is not None
    assert "ratio_of_medians" in rows["decode/python/f32/T1"]["vs_cli"]
    assert rows["decode/python/f32/T1"]["pass"] in (True, False)
    startup = rows["startup/python/f32/T1"]["samples"][0]
    assert {"import_ms", "load_ms", "first_token_ms"} <= set(startup)


def _row(rid: str, median: float, **extra) -> dict:
    group, impl, dtype, threads = rid.split("/")
    return dict(id=rid, group=group, impl=impl, dtype=dtype, threads=int(threads[1:]), median=median, **extra)


def test_targets_judge_each_kind_from_the_run():
    from bench.targets import apply_targets

    rows = [_row("decode/cli/int8/T1", 1000.0, roofline_fraction=0.9, cold_roofline_fraction=1.5,
                 vs_best_peer={"ratio": 1.6}),
            _row("decode/cli/int8/T2", 1700.0, roofline_fraction=0.5, cold_roofline_fraction=0.8,
                 vs_best_peer={"ratio": 1.4}),
            _row("decode/python/int8/T1", 960.0, vs_cli={"ratio_of_medians": 0.96}),
            _row("prefill/cli/f32/T1", 5000.0, roofline_fraction=0.4, cold_roofline_fraction=None),
            _row("startup/cli/f32/T1", 61.0),
            _row("decode/torch/f32/T1", 10.0)]
    apply_targets(rows, {"weights_fit_l3": {"f32": True, "int8": True}})
    verdicts = {r["id"]: {t["kind"]: (t["measured"], t["pass"]) for t in r["targets"]} for r in rows}
    one, two = verdicts["decode/cli/int8/T1"], verdicts["decode/cli/int8/T2"]
    assert one == {"min": (1000.0, False), "vs_peer": (1.6, True), "roofline": (0.9, True)}
    assert two["scaling"] == (1.7, False) and two["vs_peer"] == (1.4, False)
    assert two["roofline"] == (0.5, False)  # the weights fit in the L3: the back-to-back roofline
    assert verdicts["decode/python/int8/T1"] == {"vs_cli": (0.96, True)}
    assert verdicts["prefill/cli/f32/T1"]["vs_peer"] == (None, None)  # no peer rows in this run
    assert verdicts["startup/cli/f32/T1"] == {"max": (61.0, False)}
    passes = {r["id"]: r["pass"] for r in rows}
    assert passes == {"decode/cli/int8/T1": False, "decode/cli/int8/T2": False, "decode/python/int8/T1": True,
                      "prefill/cli/f32/T1": False, "startup/cli/f32/T1": False, "decode/torch/f32/T1": None}

    # weights larger than the L3: the roofline from memory applies; unknown L3: not judged
    apply_targets(rows, {"weights_fit_l3": {"f32": False, "int8": False}})
    assert rows[1]["targets"][-1]["kind"] == "scaling"
    assert next(t for t in rows[1]["targets"] if t["kind"] == "roofline")["measured"] == 0.8
    apply_targets(rows, {})
    assert next(t for t in rows[0]["targets"] if t["kind"] == "roofline")["pass"] is None


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


# Stand-ins for the peer programs: each prints what the real one prints (the rate as its own
# format has it), so the peer rows, their parsing and the ratios run without building the peers.
FAKE_PEERS = {
    "llama2.c/run_noeos": 'echo "achieved tok/s: 500.0" >&2',
    "llama2.c/runq_noeos": 'echo "achieved tok/s: 800.0" >&2',
    "llama.cpp/build/bin/llama-bench":
        'case "$*" in *"-n 0"*) r=3000;; *q8_0*) r=1500;; *) r=600;; esac; echo "[{\\"avg_ts\\": $r}]"',
    "llama.cpp/build/bin/llama-batched-bench": 'echo "noise"; echo "{\\"speed_tg\\": 2000.5, \\"speed\\": 1}" >&2',
    "ct2venv/bin/python": 'echo "achieved tok/s: 700.0"',
}


def _fake_peers(root: Path) -> Path:
    for name, body in FAKE_PEERS.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    for name in ("persona_q8.bin", "gguf/persona-f32.gguf", "gguf/persona-q8_0.gguf", "ct2_run.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    (root / "ct2-float32").mkdir()  # no ct2-int8: its rows are left out with a note
    return root


def test_peer_rows_and_ratios(built, tiny_files, tmp_path):
    if not (REPO / "persona" / "tok4096.model").is_file():
        pytest.skip("the CTranslate2 rows need persona/tok4096.model")
    model, tok = tiny_files
    out = tmp_path / "results.json"
    only = r"(decode|prefill|batch16)/(cli|llama2c|llamacpp|ct2)/(f32|int8)/T1"
    r = _bench(["--quick", "--only", only, "--model", str(model), "--tokenizer", str(tok), "--json", str(out),
                "--quiet", "--peers", str(_fake_peers(tmp_path / "peers"))])
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    rows = {row["id"]: row for row in res["rows"]}
    want = {"decode/llama2c/f32/T1": 500.0, "decode/llama2c/int8/T1": 800.0, "decode/llamacpp/f32/T1": 600.0,
            "decode/llamacpp/int8/T1": 1500.0, "prefill/llamacpp/f32/T1": 3000.0, "prefill/llamacpp/int8/T1": 3000.0,
            "batch16/llamacpp/f32/T1": 2000.5, "batch16/llamacpp/int8/T1": 2000.5, "decode/ct2/f32/T1": 700.0,
            "batch16/ct2/f32/T1": 700.0}
    for rid, value in want.items():
        assert rows[rid]["status"] == "ok", (rid, rows[rid]["samples"])
        assert rows[rid]["median"] == value, rid
    assert "decode/ct2/int8/T1" not in rows
    assert any("ct2/int8 left out: missing" in note for note in res["notes"])
    best = {"decode/cli/f32/T1": ("decode/ct2/f32/T1", 700.0), "decode/cli/int8/T1": ("decode/llamacpp/int8/T1", 1500.0),
            "prefill/cli/f32/T1": ("prefill/llamacpp/f32/T1", 3000.0),
            "batch16/cli/f32/T1": ("batch16/llamacpp/f32/T1", 2000.5)}
    for rid, (peer, value) in best.items():
        ours = rows[rid]
        assert ours["status"] == "ok", (rid, ours["samples"])
        assert ours["vs_best_peer"]["peer"] == peer
        assert ours["vs_best_peer"]["ratio"] == pytest.approx(ours["median"] / value)
        judged = next(t for t in ours["targets"] if t["kind"] == "vs_peer")
        assert judged["measured"] == ours["vs_best_peer"]["ratio"]
        assert judged["pass"] == (judged["measured"] >= judged["value"])
    assert "vs best peer" in r.stdout and "x llamacpp" in r.stdout
    assert res["machine"]["kernels"] in r.stdout


def test_console_script_runs_the_benchmark():
    """`arianna-c bench ARGS` is `python -m bench ARGS` (the same row list)."""
    direct = _bench(["--list"], timeout=60)
    via_cli = subprocess.run([sys.executable, "-m", "arianna_c.cli", "bench", "--list"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert direct.returncode == 0 and via_cli.returncode == 0, via_cli.stderr
    assert via_cli.stdout == direct.stdout and "decode/cli/f32/T1" in via_cli.stdout


def test_python_rows_time_past_the_end_of_text():
    """The binding takes ignore_eos through **settings: the Python decode and batch rows must
    see it, or they time only up to the model's first paragraph end instead of the CLI's
    fixed token count."""
    import arianna_c
    from bench import worker

    assert worker._ignores_eos(arianna_c.Model.generate)
    assert worker._ignores_eos(arianna_c.Model.generate_batch)
