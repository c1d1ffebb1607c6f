"""The benchmark harness (python -m bench) runs end to end on a tiny random model and writes
JSON of the documented structure.  No timing assertions: only that the numbers are there."""

from __future__ import annotations

import json
import os
import shutil
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
    assert res["schema"] == 2
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
    return dict(id=rid, group=group, impl=impl, dtype=dtype, threads=int(threads[1:]), median=median,
                **{"status": "ok", **extra})


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


def test_crashed_rows_miss_their_targets():
    """A row whose measurement crashed or timed out fails its targets; one left out or not
    built, and a number the run lacks, stay n/a."""
    from bench.report import _targets
    from bench.targets import apply_targets

    rows = [_row("decode/cli/f32/T1", None, status="error: timed out after 600 s"),
            _row("decode/cli/int8/T1", None, status="error: exit 1: bad model"),
            _row("decode/cli/f32/T2", None, status="n/a (not built): no -T in ./run"),
            _row("decode/python/int8/T1", 900.0)]  # the CLI row it is compared with crashed
    apply_targets(rows, {"weights_fit_l3": {"f32": True, "int8": True}})
    timed_out, crashed, not_built, python = rows
    for row in (timed_out, crashed):
        assert row["pass"] is False and row["targets"]
        assert all(t["pass"] is False and t["measured"] is None for t in row["targets"])
        assert all(part.endswith(": FAIL (error)") for part in _targets(row).split("; "))
    assert not_built["pass"] is None and all(t["pass"] is None for t in not_built["targets"])
    assert "n/a" in _targets(not_built) and "error" not in _targets(not_built)
    assert python["targets"][0]["pass"] is None  # no vs_cli without the CLI's median


def _result(rows: list[dict], schema: int, batch: int = 16) -> dict:
    """A results dict with what the report reads around the rows."""
    cfg = dict(dim=288, hidden_dim=768, n_layers=6, n_heads=6, vocab_size=4096, seq_len=256)
    return {"schema": schema, "timestamp": "then", "rows": rows, "notes": [],
            "machine": {"cpu": "cpu", "cpus": 2, "simd_flags": ["avx2"]},
            "model": {"path": "m.bin", "random_weights": False, "config": cfg, "file_bytes": 28.7e6},
            "settings": {"runs": 1, "decode_new_tokens": 250, "decode_prompt_tokens": 6,
                         "prefill_prompt_tokens": 250, "batch": batch},
            "roofline": {"bytes_per_token": {"f32": 30.4e6, "int8": 9.9e6}, "int8_group_assumed": 32,
                         "flops_per_token": {"prefill": 15.2e6}, "weights_fit_l3": {"f32": True, "int8": True}}}


def _table_row(table: str, rid: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(rid + " "))


def test_report_judges_a_file_that_predates_the_targets():
    """Schema 1 rows carry one "target" each, set when the file was written: the report judges
    them by the current targets, from the file's own numbers, and says so."""
    from bench.report import format_table, markdown_table

    peer = {"peer": "decode/llama2c/f32/T1", "ratio": 1.02}
    old = [_row("decode/cli/f32/T1", 900.0, roofline_fraction=0.97, vs_best_peer=peer, metric="tok/s", min=890.0,
                max=910.0, errors=0, target={"kind": "min", "value": 880}, **{"pass": True}),
           _row("startup/cli/f32/T1", 70.0, metric="ms", min=69.0, max=71.0, errors=0,
                target={"kind": "max", "value": 150}, **{"pass": True})]
    table = format_table(_result(old, schema=1))
    assert "targets: judged by the current bench/targets.py; the file predates them" in table
    decode = _table_row(table, "decode/cli/f32/T1")
    assert ">= 880 tok/s: PASS; >= 1.5x best peer: FAIL; >= 85% of roof: PASS (97%)" in decode
    assert decode.rstrip().endswith("FAIL")
    assert "< 60 ms: FAIL" in _table_row(table, "startup/cli/f32/T1")  # the current target, not < 150 ms
    assert "targets: 2 met, 2 missed, 0 n/a (of 4)" in table
    assert "| >= 880 tok/s: PASS; >= 1.5x best peer: FAIL" in markdown_table(_result(old, schema=1))
    assert "targets" not in old[0]  # the file's rows are left as they were

    current = [dict(old[1], targets=[], **{"pass": None})]
    assert "predates" not in format_table(_result(current, schema=2))


def test_batch_rows_named_from_the_batch(built, tiny_files):
    """--batch B names the batched rows batchB: the batch16 targets do not apply to them."""
    from bench.report import format_table
    from bench.targets import TARGETS, apply_targets

    model, tok = tiny_files
    r = _bench(["--list", "--quick", "--batch", "4", "--model", str(model), "--tokenizer", str(tok)])
    assert r.returncode == 0, r.stderr
    ids = r.stdout.split()
    assert {"batch4/cli/f32/T1", "batch4/cli/int8/T2", "batch4/python/f32/T2"} <= set(ids)
    assert not any(rid.startswith("batch16/") for rid in ids)
    assert not any(rid.startswith("batch4/") for rid in TARGETS) and "batch16/cli/f32/T2" in TARGETS
    rows = [_row("batch4/cli/f32/T2", 12000.0, metric="tok/s", min=1.0, max=2.0, errors=0)]
    apply_targets(rows, {})
    assert rows[0]["targets"] == [] and rows[0]["pass"] is None
    assert "tok/s total" in _table_row(format_table(_result(rows, schema=2, batch=4)), "batch4/cli/f32/T2")


def test_int8_prefill_and_batch_have_no_compute_roofline():
    """The FMA peak is float32's: int8 prefill gets no roofline, int8 batched decode only its
    bandwidth bound; float32 and every decode row keep theirs."""
    from arianna_c import formats
    from bench import roofline as rl
    from bench.harness import LLISA_SHAPE, Bench, Row

    bench = Bench.__new__(Bench)  # only what _roofline_for reads
    bench.shape = rl.Shape.of(formats.ModelConfig(**LLISA_SHAPE, shared_classifier=True, version=0))
    bench.decode_ids, bench.decode_new, bench.prefill_ids, bench.batch = [1] * 6, 250, [1] * 250, 16
    bw = {"f32": {"T1": 20.0}, "int8": {"T1": 20.0}}
    roof = {"bandwidth_gbs": bw, "cold_bandwidth_gbs": bw, "fma_gflops": {"T1": 1.0}}  # a tiny peak
    line = {f"{g}/{dt}": bench._roofline_for(Row(f"{g}/cli/{dt}/T1", g, "cli", dt, 1), roof)
            for g in ("decode", "prefill", "batch16") for dt in ("f32", "int8")}
    pos = 6 + 250 / 2
    assert line["prefill/int8"] is None
    assert line["prefill/f32"] == pytest.approx(rl.prefill_roofline(bench.shape, 249 / 2, 1.0))
    assert line["batch16/int8"] == pytest.approx(16 * 20e9 / (bench.shape.weight_bytes("int8")
                                                              + 16 * bench.shape.kv_bytes_read(pos)))
    assert line["batch16/f32"] == pytest.approx(1e9 / bench.shape.flops_per_token(pos))  # compute bound
    for dt in ("f32", "int8"):
        assert line[f"decode/{dt}"] == pytest.approx(rl.decode_roofline(bench.shape, dt, pos, 20.0))


def test_persona_model_without_its_tokenizer_bin(tmp_path, monkeypatch):
    """persona/tok4096.bin missing: the persona model is still the one measured, with the
    tokenizer found or built the fallback way; the random model only stands in for a missing
    model file."""
    from bench import harness

    pieces, scores = _tokenizer()
    cfg = formats.ModelConfig(**TINY_BENCH, vocab_size=len(pieces), shared_classifier=True, version=1)
    formats.write_model(tmp_path / "persona.bin", cfg, formats.random_weights(cfg, seed=3))
    formats.write_tokenizer(tmp_path / "tokenizer.bin", pieces, scores)
    monkeypatch.setattr(harness, "PERSONA_MODEL", tmp_path / "persona.bin")
    monkeypatch.setattr(harness, "PERSONA_TOKENIZER", tmp_path / "tok4096.bin")  # absent
    bench = harness.Bench(harness.parse_args([]))
    try:
        bench.setup_model()
        assert (bench.model_path, bench.random_model) == (tmp_path / "persona.bin", False)
        assert bench.tokenizer_path == tmp_path / "tokenizer.bin"
        assert not any("not found" in note for note in bench.notes)
    finally:
        shutil.rmtree(bench.work)


def test_ct2_run_must_exist(tmp_path):
    from bench.peers import find_ct2_run

    with pytest.raises(SystemExit, match=r"--ct2-run .*nowhere\.py: not a file"):
        find_ct2_run(tmp_path, str(tmp_path / "nowhere.py"))
    assert find_ct2_run(tmp_path, None) == tmp_path / "ct2_run.py"  # the default, checked as a row's need


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
    from bench.harness import PERSONA_MODEL, PERSONA_TOKENIZER, SP_MODEL

    for need in (SP_MODEL, PERSONA_MODEL, PERSONA_TOKENIZER):  # CTranslate2's and llama2.c's
        if not need.is_file():
            pytest.skip(f"the peer rows need {need}")
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
    for dt in ("f32", "int8"):  # llama2.c runs the persona whatever --model is
        command = rows[f"decode/llama2c/{dt}/T1"]["samples"][0]["command"].split()
        assert command[command.index("-z") + 1] == str(PERSONA_TOKENIZER) and str(model) not in command
    assert rows["decode/llama2c/f32/T1"]["samples"][0]["command"].split()[1] == str(PERSONA_MODEL)
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
