"""The benchmark driver behind ``python -m bench``: sets up the model, lists the rows, runs every
row's measurement in its own subprocess round-robin R times, and aggregates the results."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import peers as pr
from . import roofline as rl
from .report import SCHEMA, format_table
from .targets import apply_targets, batch_group

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "run"
PERSONA_MODEL = REPO / "persona" / "arianna_v1_base.bin"
PERSONA_TOKENIZER = REPO / "persona" / "tok4096.bin"
SP_MODEL = REPO / "persona" / "tok4096.model"

# The shipped LLiSA-7M shape: what the random stand-in model copies when the persona is absent.
LLISA_SHAPE = dict(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=4096, seq_len=256)

DECODE_PROMPT = "Resonance is"
PREFILL_TEXT = (
    "Resonance is the way a small voice finds the shape of a room. She listened to the rain on "
    "the window and counted the drops that fell between two heartbeats, and every number she "
    "found was a little different from the last one. The old clock in the hall kept its own "
    "time, slow and patient, while the children in the garden laughed at a bird that would not "
    "leave the fence. When the evening came, the lamps were lit one by one, and the house "
    "filled with the quiet sound of people who were happy to be home. "
)
RESULT_TAG = "BENCH_RESULT "

# Each option's default and its --quick one: the help text and the run read them here.
DEFAULTS = {"runs": (5, 1), "tokens": (256, 32), "prefill_tokens": (250, 64), "roofline_ms": (250, 30)}


# ---------------------------------------------------------------------------- rows


@dataclass
class Row:
    id: str                 # group/impl/dtype/Tn, what --only matches
    group: str              # decode | prefill | batchB (batch_group) | startup | machine
    impl: str               # cli | python | numpy | torch | roofline
    dtype: str = "f32"
    threads: int = 1
    metric: str = "tok/s"   # tok/s | ms
    note: str = ""
    runner: Optional[Callable[["Bench", "Row"], dict]] = None
    samples: list[dict] = field(default_factory=list)


def _higher_is_better(row: Row) -> bool:
    return row.metric != "ms"


# ---------------------------------------------------------------------------- subprocesses


@dataclass
class Proc:
    rc: int
    stdout: str
    stderr: str
    wall_s: float
    maxrss_mb: float
    timed_out: bool


# Built by Bench.build_tools from bench/peak_rss.c; without it wait4 on the direct child is used
# (which over-reports small children: their count starts at this process's RSS at fork time).
PEAK_RSS: Optional[Path] = None


def spawn(cmd: list[str], env: dict, timeout: float, cwd: Path = REPO) -> Proc:
    """Runs cmd to completion in its own process group; returns its output, wall time and
    peak RSS (through the peak_rss launcher when built)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        full = [str(PEAK_RSS), rss.name, *cmd] if PEAK_RSS else cmd
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            try:
                os.killpg(proc.pid, 9)
            except OSError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait
        maxrss_kb = float(usage.ru_maxrss)
        if PEAK_RSS:
            text = rss.read().strip()
            maxrss_kb = float(text) if text else float("nan")
        out.seek(0)
        err.seek(0)
        return Proc(proc.returncode, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"),
                    wall, maxrss_kb / 1024.0, killed.is_set())


def _last_float(pattern: str, text: str) -> Optional[float]:
    found = re.findall(pattern + r"\s*([0-9.eE+-]+)", text)
    return float(found[-1]) if found else None


def _stderr_tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


# ---------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.runs = self.option("runs")
        self.timeout = args.timeout
        self.peers: Optional[pr.PeerDir] = None
        if args.peers:  # checked before the temporary folder exists: a bad path leaves nothing behind
            root = Path(args.peers)
            if not root.is_dir():
                raise SystemExit(f"--peers {root}: not a folder (build it with the peers build.sh)")
            self.peers = pr.PeerDir(root, pr.find_ct2_run(root, args.ct2_run))
        self.work = Path(tempfile.mkdtemp(prefix="arianna_bench_"))
        self.pycache = self.work / "pycache"
        self.notes: list[str] = []
        self.roofline_bin: Optional[Path] = None
        self.roofline_build = ""
        self.features: dict[str, Any] = {}

    def option(self, name: str) -> Any:
        """The option as given, else its default (the --quick one under --quick)."""
        given = getattr(self.args, name)
        return DEFAULTS[name][self.quick] if given is None else given

    # ------------------------------------------------------------------ setup
    def setup_model(self) -> None:
        """--model, else the persona, else (its file missing) a random model of its shape; the
        tokenizer: --tokenizer, else the one beside the model (persona/tok4096.bin) or built."""
        a = self.args
        from arianna_c import formats

        if a.model:
            self.model_path, self.random_model = Path(a.model), False
        elif PERSONA_MODEL.is_file():
            self.model_path, self.random_model = PERSONA_MODEL, False
        else:
            cfg = formats.ModelConfig(**LLISA_SHAPE, shared_classifier=True, version=0)
            self.model_path, self.random_model = self.work / "random_llisa_shape.bin", True
            formats.write_model(self.model_path, cfg, formats.random_weights(cfg, seed=1234))
            self.notes.append(f"{PERSONA_MODEL} not found: a random-weight model of the LLiSA-7M shape "
                              "stands in (speed depends only on the shape)")
        self.tokenizer_path = Path(a.tokenizer) if a.tokenizer else self._tokenizer_near(self.model_path)
        self.config = formats.read_model(self.model_path)[0]
        self.shape = rl.Shape.of(self.config)

    def _tokenizer_near(self, model_path: Path) -> Path:
        for name in ("tok4096.bin", "tokenizer.bin"):
            if (model_path.parent / name).is_file():
                return model_path.parent / name
        if PERSONA_TOKENIZER.is_file():
            return PERSONA_TOKENIZER
        if not SP_MODEL.is_file():
            raise SystemExit(f"no tokenizer: pass --tokenizer (no {PERSONA_TOKENIZER} nor {SP_MODEL})")
        out = self.work / "tok4096.bin"
        self.notes.append(f"no tokenizer .bin beside the model nor {PERSONA_TOKENIZER}: built from {SP_MODEL}")
        try:
            from arianna_c.export import tokenizer_from_sentencepiece

            tokenizer_from_sentencepiece(SP_MODEL, out)
        except ImportError:
            import sentencepiece as spm

            from arianna_c import formats

            sp = spm.SentencePieceProcessor(model_file=str(SP_MODEL))
            pieces = [("<unk>", "<s>", "</s>")[i] if i < 3 else sp.id_to_piece(i).replace("\u2581", " ")
                      for i in range(sp.get_piece_size())]
            formats.write_tokenizer(out, [p.encode() for p in pieces],
                                    [float(sp.get_score(i)) for i in range(sp.get_piece_size())])
        return out

    def setup_prompts(self) -> None:
        """Token ids of the decode prompt and a prefill prompt of about the target length."""
        import arianna_c

        seq = self.config.seq_len
        self.decode_tokens = min(self.option("tokens"), seq)
        self.batch = self.args.batch
        want = self.option("prefill_tokens")
        want = max(4, min(want, seq - 2))
        with arianna_c.Model(str(self.model_path), str(self.tokenizer_path)) as m:
            self.decode_prompt = DECODE_PROMPT
            self.decode_ids = m.encode(DECODE_PROMPT, bos=True)
            words = (PREFILL_TEXT * (1 + 4 * want // len(PREFILL_TEXT.split()))).split()
            lo, hi = 1, len(words)  # the most words whose encoding (BOS included) fits in want
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if len(m.encode(" ".join(words[:mid]), bos=True)) <= want:
                    lo = mid
                else:
                    hi = mid - 1
            self.prefill_prompt = " ".join(words[:lo])
            self.prefill_ids = m.encode(self.prefill_prompt, bos=True)
        self.decode_new = max(1, min(self.decode_tokens, seq - len(self.decode_ids)))

    def detect_features(self) -> None:
        f = self.features
        f["cli_built"] = CLI.is_file() and os.access(CLI, os.X_OK)
        usage = ""
        if f["cli_built"]:
            r = subprocess.run([str(CLI), "-h"], capture_output=True, text=True, timeout=30)
            usage = r.stdout + r.stderr
        has = lambda flag: bool(re.search(rf"^\s*{re.escape(flag)}\b", usage, re.M))  # noqa: E731
        f["cli_threads"] = has("-T")
        f["cli_int8"] = has("-q")
        f["cli_batch"] = has("-b")
        f["cli_ignore_eos"] = has("-e")
        try:
            import arianna_c

            params = inspect.signature(arianna_c.Model.__init__).parameters
            f["py_threads"] = "threads" in params
            f["py_int8"] = "quantize" in params
            f["py_batch"] = hasattr(arianna_c.Model, "generate_batch")
        except Exception as exc:  # noqa: BLE001
            f["py_error"] = str(exc)
        try:
            import torch  # noqa: F401

            f["torch"] = torch.__version__
        except ImportError:
            f["torch"] = None
        import numpy

        f["numpy"] = numpy.__version__
        if f["cli_built"] and not f["cli_threads"]:
            self.notes.append("./run has no -T: its thread count is set only through OMP_NUM_THREADS, which a "
                              "pthread-pool build ignores (its T1 rows may then use every core)")
        if "py_threads" in f and not f["py_threads"]:
            self.notes.append("arianna_c.Model has no threads=: the binding's thread count is set only through "
                              "OMP_NUM_THREADS (see the ./run note)")

    def build_tools(self, roofline: bool) -> None:
        """Compiles bench/peak_rss.c (and bench/roofline.c when a roofline row runs)."""
        global PEAK_RSS
        PEAK_RSS, note = rl.compile_c(rl.HERE / "peak_rss.c", self.work / "peak_rss", threads=False)
        if PEAK_RSS is None:
            self.notes.append("peak_rss.c did not compile (peak RSS from wait4, inflated by fork): " + note)
        if roofline:
            self.roofline_bin, self.roofline_build = rl.compile_c(rl.SOURCE, self.work / "roofline")
            if self.roofline_bin is None:
                self.notes.append("roofline.c did not compile: " + self.roofline_build)

    # ------------------------------------------------------------------ environment
    def env(self, threads: int) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
        # Bytecode as an installed package has it (pip compiles it), kept out of the checkout:
        # without it every worker compiles arianna_c from source, ~20 ms of the startup row.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(self.pycache)
        return env

    def compile_bytecode(self) -> None:
        """arianna_c and bench compiled into the workers' bytecode cache, before any row runs."""
        cmd = [sys.executable, "-m", "compileall", "-q", str(REPO / "arianna_c"), str(REPO / "bench")]
        p = spawn(cmd, self.env(1), self.timeout)
        if p.rc != 0:
            self.notes.append(f"compileall failed (rc {p.rc}): the workers compile from source")

    # ------------------------------------------------------------------ runners
    def cli_args(self, row: Row) -> tuple[list[str], Optional[str]]:
        """The ./run command for a row, or why it cannot run."""
        f = self.features
        if not f["cli_built"]:
            return [], "n/a (not built): ./run missing (run make)"
        # greedy without the default repetition penalty: the peers' decode rows do no penalty work
        cmd = [str(CLI), str(self.model_path), "-z", str(self.tokenizer_path), "-t", "0", "--repeat-penalty", "1",
               "-s", "1"]
        if f["cli_threads"]:
            cmd += ["-T", str(row.threads)]
        if row.dtype == "int8":
            if not f["cli_int8"]:
                return [], "n/a (not built): no -q in ./run"
            cmd += ["-q", "int8"]
        if row.group == batch_group(self.batch):
            if not f["cli_batch"]:
                return [], "n/a (not built): no -b in ./run"
            cmd += ["-b", str(self.batch)]
        if row.group == "prefill":
            cmd += ["-n", "1", "-i", self.prefill_prompt]
        elif row.group == "startup":
            cmd += ["-n", "1", "-i", self.decode_prompt]
        else:
            cmd += ["-n", str(self.decode_new), "-i", self.decode_prompt]
            if f["cli_ignore_eos"]:  # time decode_new tokens even where the model ends the text
                cmd += ["-e", "1"]
        return cmd, None

    def run_cli(self, row: Row) -> dict:
        cmd, why = self.cli_args(row)
        if why:
            return {"status": why}
        p = spawn(cmd, self.env(row.threads), self.timeout)
        out = {"rss_mb": p.maxrss_mb, "wall_s": p.wall_s,
               "threads_via": "-T" if self.features["cli_threads"] else "OMP_NUM_THREADS"}
        if p.timed_out:
            return {**out, "status": f"error: timed out after {self.timeout:g} s"}
        if p.rc != 0:
            usage = "Usage:" in p.stderr or "bad option" in p.stderr
            return {**out, "status": "n/a (not built): ./run rejected the flags" if usage
                    else f"error: exit {p.rc}: {_stderr_tail(p.stderr)}"}
        if row.group == "startup":
            return {**out, "status": "ok", "value": p.wall_s * 1e3, "timing": "spawn to exit of ./run -n 1"}
        if row.group == "prefill":
            value = _last_float(r"prompt tok/s:", p.stderr)
            if value is None:
                return {**out, "status": "n/a (not built): ./run prints no 'prompt tok/s'",
                        "tokens": len(self.prefill_ids)}
            return {**out, "status": "ok", "value": value, "tokens": len(self.prefill_ids)}
        value = _last_float(r"achieved tok/s:", p.stderr)
        if value is None:
            return {**out, "status": f"error: no 'achieved tok/s' in stderr: {_stderr_tail(p.stderr)}"}
        return {**out, "status": "ok", "value": value}

    def run_worker(self, row: Row, kind: str, **extra: Any) -> dict:
        spec = {"kind": kind, "model": str(self.model_path), "tokenizer": str(self.tokenizer_path),
                "threads": row.threads, "dtype": row.dtype, **extra}
        if kind.startswith("python"):
            f = self.features
            if row.dtype == "int8" and not f.get("py_int8"):
                return {"status": "n/a (not built): no quantize= in arianna_c.Model"}
            if kind == "python_batch" and not f.get("py_batch"):
                return {"status": "n/a (not built): no Model.generate_batch"}
        if kind.startswith("torch") and not self.features.get("torch"):
            return {"status": "n/a (torch not installed)"}
        spec["spawn_wall"] = time.time()
        p = spawn([sys.executable, "-m", "bench.worker", json.dumps(spec)], self.env(row.threads), self.timeout)
        lines = [line for line in p.stdout.splitlines() if line.startswith(RESULT_TAG)]
        if not lines:
            why = "timed out" if p.timed_out else f"exit {p.rc}: {_stderr_tail(p.stderr)}"
            return {"status": f"error: worker gave no result ({why})", "rss_mb": p.maxrss_mb}
        result = json.loads(lines[-1][len(RESULT_TAG):])
        result["rss_mb"] = p.maxrss_mb
        result["wall_s"] = p.wall_s
        return result

    def run_roofline(self, row: Row) -> dict:
        if self.roofline_bin is None:
            return {"status": "n/a (roofline.c did not compile)"}
        ms = self.option("roofline_ms")
        sizes = [int(self.shape.weight_bytes("f32")), int(self.shape.weight_bytes("int8"))]
        cmd = rl.roofline_command(self.roofline_bin, sizes, [1, 2], ms)
        p = spawn(cmd, self.env(2), self.timeout)
        if p.rc != 0:
            return {"status": f"error: exit {p.rc}: {_stderr_tail(p.stderr)}"}
        data = rl.parse_roofline(p.stdout)
        data["status"] = "ok"
        data["rss_mb"] = p.maxrss_mb
        return data

    # ------------------------------------------------------------------ the rows
    def rows(self) -> list[Row]:
        rows: list[Row] = [Row("machine/roofline", "machine", "roofline", metric="GB/s, GFLOP/s",
                               runner=lambda b, r: b.run_roofline(r))]
        cli = lambda b, r: b.run_cli(r)  # noqa: E731

        def worker(kind: str, **extra: Any):
            return lambda b, r: b.run_worker(r, kind, **extra)

        dec = dict(prompt=self.decode_prompt, prompt_ids=self.decode_ids, tokens=self.decode_new)
        pre = dict(prompt=self.prefill_prompt, prompt_ids=self.prefill_ids)
        for t in (1, 2):
            for dt in ("f32", "int8"):
                rows.append(Row(f"decode/cli/{dt}/T{t}", "decode", "cli", dt, t, runner=cli))
                rows.append(Row(f"decode/python/{dt}/T{t}", "decode", "python", dt, t,
                                runner=worker("python_decode", **dec)))
            rows.append(Row(f"decode/numpy/f32/T{t}", "decode", "numpy", "f32", t, runner=worker("numpy_decode", **dec)))
            for dt in ("f32", "int8"):
                rows.append(Row(f"decode/torch/{dt}/T{t}", "decode", "torch", dt, t, runner=worker("torch_decode", **dec),
                                note="torch.ao quantize_dynamic (qint8 Linear)" if dt == "int8" else ""))
        for t in (1, 2):
            for dt in ("f32", "int8"):
                rows.append(Row(f"prefill/cli/{dt}/T{t}", "prefill", "cli", dt, t, runner=cli))
            rows.append(Row(f"prefill/python/f32/T{t}", "prefill", "python", "f32", t,
                            note="the prompt call timed in generate()", runner=worker("python_prefill", **pre)))
            rows.append(Row(f"prefill/numpy/f32/T{t}", "prefill", "numpy", "f32", t, note="all-position logits",
                            runner=worker("numpy_prefill", **pre)))
            rows.append(Row(f"prefill/torch/f32/T{t}", "prefill", "torch", "f32", t, note="all-position logits",
                            runner=worker("torch_prefill", **pre)))
        batch = batch_group(self.batch)
        for t in (1, 2):
            for dt in ("f32", "int8"):
                rows.append(Row(f"{batch}/cli/{dt}/T{t}", batch, "cli", dt, t, runner=cli))
        rows.append(Row(f"{batch}/python/f32/T2", batch, "python", "f32", 2,
                        runner=worker("python_batch", prompt=self.decode_prompt, tokens=self.decode_new,
                                      batch=self.batch)))
        rows.append(Row("startup/python/f32/T1", "startup", "python", "f32", 1, metric="ms",
                        note="import arianna_c + load + first token, in-process",
                        runner=worker("python_startup", prompt=self.decode_prompt)))
        rows.append(Row("startup/cli/f32/T1", "startup", "cli", "f32", 1, metric="ms",
                        note="./run -n 1, spawn to exit", runner=cli))
        if self.peers:
            rows += pr.peer_rows(self.peers, self.notes, self.batch)
        if self.args.only:
            pattern = re.compile(self.args.only)
            rows = [r for r in rows if pattern.search(r.id)]
        return rows

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        started = time.time()
        self.compile_bytecode()
        self.setup_model()
        self.setup_prompts()
        self.detect_features()
        rows = self.rows()
        self.build_tools(any(r.impl == "roofline" for r in rows))
        background = _background_load()
        if background.get("training_running") or (background.get("loadavg_1m") or 0) > 0.5:
            self.notes.append(f"the machine was busy when the run started (load {background.get('loadavg_1m')}, "
                              f"training job running: {background.get('training_running')}): timings are noisy")
        self._warm_up()
        total = self.runs * len(rows)
        done = 0
        for r in range(self.runs):
            for row in rows:  # round-robin: every row once per round, the rounds repeated
                t0 = time.perf_counter()
                try:
                    sample = row.runner(self, row)
                except Exception as exc:  # noqa: BLE001 - one broken row must not end the run
                    sample = {"status": f"error: {type(exc).__name__}: {exc}"}
                sample["round"] = r
                row.samples.append(sample)
                done += 1
                if not self.args.quiet:
                    shown = sample.get("value")
                    shown = f"{shown:,.1f}" if isinstance(shown, (int, float)) else sample.get("status")
                    print(f"[{done}/{total}] round {r + 1}/{self.runs} {row.id}: {shown} "
                          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        result = self.aggregate(rows)
        result["background_at_start"] = background
        result["background_at_end"] = _background_load()
        result["elapsed_s"] = time.time() - started
        return result

    def _warm_up(self) -> None:
        """One short untimed CLI run: the model file into the page cache, the binary paged in."""
        if self.features.get("cli_built"):
            cmd = [str(CLI), str(self.model_path), "-z", str(self.tokenizer_path), "-t", "0", "-n", "4",
                   "-i", self.decode_prompt]
            spawn(cmd, self.env(1), self.timeout)

    # ------------------------------------------------------------------ aggregation
    def aggregate(self, rows: list[Row]) -> dict:
        machine_row = next((r for r in rows if r.impl == "roofline"), None)
        roof = self._roofline_summary(machine_row)
        self._roofline_note(roof)
        out_rows = []
        for row in rows:
            if row.impl == "roofline":
                continue
            out_rows.append(self._row_summary(row, roof))
        self._add_ratios(out_rows)
        pr.add_peer_ratios(out_rows)
        apply_targets(out_rows, roof)
        return {
            "schema": SCHEMA,
            "tool": "python -m bench",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": {
                "runs": self.runs, "quick": self.quick, "only": self.args.only,
                "decode_prompt": self.decode_prompt, "decode_prompt_tokens": len(self.decode_ids),
                "decode_new_tokens": self.decode_new, "prefill_prompt_tokens": len(self.prefill_ids),
                "batch": self.batch, "sampling": "greedy (temperature 0, repeat penalty 1)",
                "order": "round-robin over rows, each measurement in its own subprocess",
            },
            "machine": _machine_info(),
            "model": {"path": str(self.model_path), "tokenizer": str(self.tokenizer_path),
                      "random_weights": self.random_model, "file_bytes": self.model_path.stat().st_size,
                      "config": {k: getattr(self.config, k) for k in
                                 ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                  "seq_len", "shared_classifier", "version")}},
            "features": self.features,
            "roofline": roof,
            "rows": out_rows,
            "notes": self.notes,
        }

    def _roofline_summary(self, row: Optional[Row]) -> dict:
        shape = self.shape
        avg_decode_pos = len(self.decode_ids) + self.decode_new / 2.0
        avg_prefill_pos = (len(self.prefill_ids) - 1) / 2.0
        summary: dict[str, Any] = {
            "build": self.roofline_build,
            "int8_group_assumed": rl.INT8_GROUP,
            "bytes_per_token": {dt: shape.bytes_per_token(dt, avg_decode_pos) for dt in ("f32", "int8")},
            "weight_bytes": {dt: shape.weight_bytes(dt) for dt in ("f32", "int8")},
            "flops_per_token": {"decode": shape.flops_per_token(avg_decode_pos),
                                "prefill": shape.flops_per_token(avg_prefill_pos)},
            "bandwidth_gbs": {}, "cold_bandwidth_gbs": {}, "fma_gflops": {}, "samples": [],
        }
        if row is None:
            return summary
        bw: dict[tuple[str, int], list[float]] = {}
        cold: dict[tuple[str, int], list[float]] = {}
        fma: dict[int, list[float]] = {}
        sizes = {int(shape.weight_bytes("f32")): "f32", int(shape.weight_bytes("int8")): "int8"}
        for s in row.samples:
            if s.get("status") != "ok":
                continue
            summary["samples"].append(s)
            for b in s.get("bandwidth_gbs", []):
                key = (sizes.get(b["bytes"], str(b["bytes"])), b["threads"])
                bw.setdefault(key, []).append(b["gbs"])
                if "cold_gbs" in b:
                    cold.setdefault(key, []).append(b["cold_gbs"])
            for f in s.get("fma_gflops", []):
                fma.setdefault(f["threads"], []).append(f["gflops"])
            summary["avx2_fma"] = s.get("avx2_fma")
            summary["isa"] = s.get("isa")
            summary["l3_bytes"] = s.get("l3_bytes")
        # the median over rounds: the same statistic as the rows it is compared with
        for name, measured in (("bandwidth_gbs", bw), ("cold_bandwidth_gbs", cold)):
            for (dt, t), values in measured.items():
                summary[name].setdefault(dt, {})[f"T{t}"] = statistics.median(values)
        for t, values in fma.items():
            summary["fma_gflops"][f"T{t}"] = statistics.median(values)
        summary["buffer_bytes"] = {dt: size for size, dt in sizes.items()}
        l3 = summary.get("l3_bytes")
        if l3:
            summary["weights_fit_l3"] = {dt: summary["weight_bytes"][dt] < l3 for dt in ("f32", "int8")}
        return summary

    def _roofline_note(self, roof: dict) -> None:
        """Which decode roofline applies here: weights that fit in the L3 stay there between
        tokens (the back-to-back bandwidth), larger ones come from memory."""
        fits = roof.get("weights_fit_l3")
        if not fits:
            return
        l3 = roof["l3_bytes"] / 2**20
        for dt, fit in fits.items():
            size = roof["weight_bytes"][dt] / 1e6
            if fit:
                self.notes.append(f"{dt} weights ({size:.1f} MB) fit in the {l3:.0f} MiB L3: decode reads them from "
                                  f"the L3 from one token to the next, so 'of roof' (back-to-back reads) is the bound "
                                  f"that applies; 'of cold roof' (from memory) is a floor")
            else:
                self.notes.append(f"{dt} weights ({size:.1f} MB) exceed the {l3:.0f} MiB L3: decode reads them from "
                                  f"memory, so 'of cold roof' is the bound that applies")

    def _roofline_for(self, row: Row, roof: dict, bandwidth: str = "bandwidth_gbs") -> Optional[float]:
        """The row's roofline with the read bandwidth roof[bandwidth] (warm, or cold: from memory)."""
        t = f"T{row.threads}"
        bw = roof.get(bandwidth, {}).get(row.dtype, {}).get(t)
        # int8 products run on int8 dot-product instructions (VNNI, AMX, llama.cpp's Q8_0 likewise),
        # whose peak roofline.c does not measure: the float32 FMA peak bounds only float32 rows
        peak = roof["fma_gflops"].get(t) if row.dtype == "f32" else None
        shape = self.shape
        if row.group == "decode":
            return rl.decode_roofline(shape, row.dtype, len(self.decode_ids) + self.decode_new / 2.0, bw)
        if row.group == "prefill":
            return rl.prefill_roofline(shape, (len(self.prefill_ids) - 1) / 2.0, peak)
        if row.group == batch_group(self.batch):
            return rl.batch_roofline(shape, row.dtype, self.batch, len(self.decode_ids) + self.decode_new / 2.0,
                                     bw, peak)
        return None

    def _row_summary(self, row: Row, roof: dict) -> dict:
        ok = [s for s in row.samples if s.get("status") == "ok" and isinstance(s.get("value"), (int, float))]
        values = [s["value"] for s in ok]
        statuses = [s.get("status") for s in row.samples]
        status = "ok" if ok else (next((st for st in statuses if st != "ok"), "no samples") or "no samples")
        entry: dict[str, Any] = {
            "id": row.id, "group": row.group, "impl": row.impl, "dtype": row.dtype, "threads": row.threads,
            "metric": row.metric, "status": status, "note": row.note,
            "samples": row.samples, "values": values,
            "median": statistics.median(values) if values else None,
            "min": min(values) if values else None, "max": max(values) if values else None,
            "errors": sum(1 for st in statuses if st != "ok"),
        }
        rss = [s["rss_mb"] for s in row.samples if isinstance(s.get("rss_mb"), (int, float))]
        entry["peak_rss_mb"] = {"median": statistics.median(rss), "max": max(rss)} if rss else None
        tokens = [s["tokens"] for s in ok if isinstance(s.get("tokens"), int)]
        entry["tokens"] = statistics.median(tokens) if tokens else None
        entry["tokens_exact"] = not any(s.get("tokens_exact") is False for s in ok)
        roofline = self._roofline_for(row, roof)
        entry["roofline"] = roofline
        entry["roofline_fraction"] = (entry["median"] / roofline) if (roofline and entry["median"]) else None
        # decode and batched decode read the weights each step: their roofline with the
        # bandwidth of reads from memory too (prefill is compute bound: none)
        cold = (self._roofline_for(row, roof, "cold_bandwidth_gbs")
                if row.group in ("decode", batch_group(self.batch)) else None)
        entry["cold_roofline"] = cold
        entry["cold_roofline_fraction"] = (entry["median"] / cold) if (cold and entry["median"]) else None
        return entry

    def _add_ratios(self, rows: list[dict]) -> None:
        """Python generate vs the CLI: the ratio of medians, and the median of the per-round
        ratios (the two ran next to each other in every round)."""
        by_id = {r["id"]: r for r in rows}
        for r in rows:
            if r["group"] != "decode" or r["impl"] != "python":
                continue
            cli = by_id.get(r["id"].replace("/python/", "/cli/"))
            if not cli or not r["median"] or not cli["median"]:
                continue
            per_round = []
            cli_rounds = {s["round"]: s["value"] for s in cli["samples"] if s.get("status") == "ok" and s.get("value")}
            for s in r["samples"]:
                if s.get("status") == "ok" and s.get("round") in cli_rounds:
                    per_round.append(s["value"] / cli_rounds[s["round"]])
            ratio = r["median"] / cli["median"]
            r["vs_cli"] = {"ratio_of_medians": ratio,
                           "median_paired_ratio": statistics.median(per_round) if per_round else None}


def _background_load() -> dict:
    info: dict[str, Any] = {}
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        info["loadavg_1m"] = None
    try:
        r = subprocess.run(["pgrep", "-f", "arianna_c.train train"], capture_output=True, text=True, timeout=10)
        info["training_running"] = bool(r.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        info["training_running"] = None
    return info


# The CPU flags that decide the kernels (and the peers' builds), in the order they are printed.
SIMD_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "amx_int8", "amx_bf16", "asimd", "sve")


def _machine_info() -> dict:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
        flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
        info["cpu"] = model.group(1).strip() if model else platform.processor()
        fl = set(flags.group(1).split()) if flags else set()
        info["avx2"], info["fma"], info["avx512f"] = "avx2" in fl, "fma" in fl, "avx512f" in fl
        info["simd_flags"] = [f for f in SIMD_FLAGS if f in fl]
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["l3"] = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        pass
    try:
        import arianna_c

        info["kernels"] = arianna_c.kernel_name()
    except Exception as exc:  # noqa: BLE001 - the library may not be built
        info["kernels"] = f"unknown ({type(exc).__name__})"
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc:
        try:
            info["cc"] = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                        timeout=10).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            pass
    return info


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="arianna_c benchmark: CLI, "
                                "Python binding, NumPy reference and PyTorch side by side, with the roofline.")
    full, quick = ({name: values[i] for name, values in DEFAULTS.items()} for i in (0, 1))
    p.add_argument("--quick", action="store_true", help=f"R={quick['runs']}, {quick['tokens']} decode tokens, "
                   f"{quick['prefill_tokens']}-token prefill, {quick['roofline_ms']} ms roofline")
    p.add_argument("--runs", type=int, help=f"rounds R (default {full['runs']}, --quick {quick['runs']})")
    p.add_argument("--only", metavar="REGEX", help="rows whose id matches (re.search), e.g. 'decode/cli|roofline'")
    p.add_argument("--model", help="model .bin (default persona/arianna_v1_base.bin, else a random same-shape model)")
    p.add_argument("--tokenizer", help="tokenizer .bin (default: tok4096.bin or tokenizer.bin beside the model, "
                   "else persona/tok4096.bin, else one built from persona/tok4096.model)")
    p.add_argument("--json", default=str(REPO / "bench" / "results.json"),
                   help="where to write the results (default %(default)s)")
    p.add_argument("--tokens", type=int, help=f"decode tokens (default {full['tokens']}, --quick {quick['tokens']}; "
                   "capped at seq_len minus the prompt's tokens)")
    p.add_argument("--prefill-tokens", type=int, help=f"prefill prompt tokens incl. BOS (default "
                   f"{full['prefill_tokens']}, --quick {quick['prefill_tokens']}; at most seq_len-2)")
    p.add_argument("--batch", type=int, default=16, help="sequences in the batched-decode rows, whose ids start "
                   "with batchB (default %(default)s: the batch16 targets apply only then)")
    p.add_argument("--roofline-ms", type=float, help=f"ms per roofline measurement (default "
                   f"{full['roofline_ms']}, --quick {quick['roofline_ms']})")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds before a measurement is killed (default %(default)g)")
    p.add_argument("--peers", metavar="DIR", help="add peer rows (llama2.c, llama.cpp, CTranslate2) from a folder "
                   "built by the peers build.sh, and each CLI row's ratio to the best peer")
    p.add_argument("--ct2-run", metavar="PATH", help="the CTranslate2 rows' ct2_run.py (default DIR/ct2_run.py, "
                   "which the build script does not write: else pass the build script's own, beside build.sh)")
    p.add_argument("--list", action="store_true", help="list the row ids and exit")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    try:
        if args.list:
            bench.setup_model()
            bench.setup_prompts()
            for row in bench.rows():
                print(row.id)
            return 0
        result = bench.run()
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(format_table(result))
    print(f"\nresults: {path}")
    return 0
