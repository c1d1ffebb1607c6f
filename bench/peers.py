"""Peer runtimes as benchmark rows: llama2.c (``run``/``runq``), llama.cpp (``llama-bench``,
``llama-batched-bench``) and CTranslate2, from a folder built by the peers build script
(``build.sh LLAMA2C_GIT LLAMACPP_GIT DIR PROJECT``; ``WITH_CT2=1`` adds CTranslate2).

``python -m bench --peers DIR`` adds a row for every peer binary and converted model found in DIR
(the rest are listed in the notes), with our row ids' layout ``group/peer/dtype/Tthreads``, and
gives each of our CLI rows its ratio to the best peer row of the same group, dtype and thread
count.  The peers run the persona whatever ``--model`` is: llama.cpp and CTranslate2 the build
script's conversions of it (gguf, CTranslate2), llama2.c the persona's own files, which it reads
as they are (``persona/arianna_v1_base.bin`` and ``persona/tok4096.bin``; int8: the script's
``persona_q8.bin`` with the same tokenizer).

What each peer row times (tok/s; the same work as our row of that group; batchB: ``--batch B``,
default 16):
- decode/llama2c: ``run_noeos`` / ``runq_noeos`` (llama2.c without its stop at BOS) for the
  decode prompt plus N new tokens, ``-t 0``, ``OMP_NUM_THREADS=t``: its ``achieved tok/s``.
- decode/llamacpp, prefill/llamacpp: ``llama-bench -n N -p 0`` (tg) and ``-p P -n 0`` (pp), one
  repetition, ``-t t``: ``avg_ts`` (F32 and Q8_0 gguf; its KV cache in f16, its default).
- batchB/llamacpp: ``llama-batched-bench -npp <prompt> -ntg N -npl B``: ``speed_tg``, the
  generated tokens of all sequences over the generation time, as our batch rows count them.
- decode/ct2, batchB/ct2: the build script's ``ct2_run.py`` (one call after a warm-up call of
  the same shape, greedy, ``intra_threads=t``): its ``achieved tok/s``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from .targets import batch_group

if TYPE_CHECKING:
    from .harness import Bench, Row

PEER_IMPLS = ("llama2c", "llamacpp", "ct2")


@dataclass(frozen=True)
class PeerDir:
    root: Path
    ct2_run: Path  # ct2_run.py: --ct2-run, else DIR/ct2_run.py (its rows are left out when missing)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def llamacpp_bin(self) -> Path:
        return self.path("llama.cpp", "build", "bin")

    def gguf(self, dtype: str) -> Path:
        return self.path("gguf", "persona-f32.gguf" if dtype == "f32" else "persona-q8_0.gguf")

    def llama2c(self, dtype: str) -> tuple[Path, Path, Path]:
        """(binary, model file, tokenizer) of llama2.c for dtype: the persona as it is, or the build
        script's int8 conversion of it."""
        from .harness import PERSONA_MODEL, PERSONA_TOKENIZER

        if dtype == "f32":
            return self.path("llama2.c", "run_noeos"), PERSONA_MODEL, PERSONA_TOKENIZER
        return self.path("llama2.c", "runq_noeos"), self.path("persona_q8.bin"), PERSONA_TOKENIZER

    def ct2_model(self, dtype: str) -> Path:
        return self.path("ct2-float32" if dtype == "f32" else "ct2-int8")

    @property
    def ct2_python(self) -> Path:
        return self.path("ct2venv", "bin", "python")


def find_ct2_run(root: Path, given: Optional[str]) -> Path:
    """ct2_run.py: --ct2-run, which must be a file, else DIR/ct2_run.py (which the build script
    does not write: there only if put there)."""
    if not given:
        return root / "ct2_run.py"
    path = Path(given)
    if not path.is_file():
        raise SystemExit(f"--ct2-run {path}: not a file (the build script's ct2_run.py, beside build.sh)")
    return path


def _missing(*paths: Path) -> list[str]:
    return [str(p) for p in paths if not p.exists()]


def _tok_s(text: str) -> Optional[float]:
    from .harness import _last_float

    return _last_float(r"achieved tok/s:", text)


def _jsonl_field(text: str, key: str) -> Optional[float]:
    """key of the last JSON object line of text that has it."""
    value = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and key in line:
            try:
                value = float(json.loads(line)[key])
            except (ValueError, KeyError, TypeError):
                continue
    return value


def _run(bench: "Bench", row: "Row", cmd: list[str], parse: Callable[[str, str], Optional[float]]) -> dict:
    from .harness import _stderr_tail, spawn

    p = spawn(cmd, bench.env(row.threads), bench.timeout)
    out: dict[str, Any] = {"rss_mb": p.maxrss_mb, "wall_s": p.wall_s, "command": " ".join(cmd)}
    if p.timed_out:
        return {**out, "status": f"error: timed out after {bench.timeout:g} s"}
    if p.rc != 0:
        return {**out, "status": f"error: exit {p.rc}: {_stderr_tail(p.stderr)}"}
    value = parse(p.stdout, p.stderr)
    if value is None:
        return {**out, "status": f"error: no rate in the output: {_stderr_tail(p.stdout + p.stderr)}"}
    return {**out, "status": "ok", "value": value}


# ---------------------------------------------------------------------------- runners


def llama2c_decode(peers: PeerDir) -> Callable[["Bench", "Row"], dict]:
    def run(bench: "Bench", row: "Row") -> dict:
        binary, model, tokenizer = peers.llama2c(row.dtype)
        steps = len(bench.decode_ids) - 1 + bench.decode_new  # llama2.c counts BOS as position 0
        cmd = [str(binary), str(model), "-z", str(tokenizer), "-t", "0", "-n", str(steps),
               "-i", bench.decode_prompt]
        return _run(bench, row, cmd, lambda out, err: _tok_s(err))

    return run


def llamacpp_bench(peers: PeerDir) -> Callable[["Bench", "Row"], dict]:
    def run(bench: "Bench", row: "Row") -> dict:
        work = ["-p", "0", "-n", str(bench.decode_new)] if row.group == "decode" else \
            ["-p", str(len(bench.prefill_ids)), "-n", "0"]
        cmd = [str(peers.llamacpp_bin / "llama-bench"), "-m", str(peers.gguf(row.dtype)), *work,
               "-t", str(row.threads), "-r", "1", "-o", "json"]

        def parse(out: str, err: str) -> Optional[float]:
            try:
                return float(json.loads(out)[0]["avg_ts"])
            except (ValueError, KeyError, IndexError, TypeError):
                return None

        return _run(bench, row, cmd, parse)

    return run


def llamacpp_batched(peers: PeerDir) -> Callable[["Bench", "Row"], dict]:
    def run(bench: "Bench", row: "Row") -> dict:
        prompt = len(bench.decode_ids)
        ctx = bench.batch * (prompt + bench.decode_new)
        cmd = [str(peers.llamacpp_bin / "llama-batched-bench"), "-m", str(peers.gguf(row.dtype)), "-c", str(ctx),
               "-npp", str(prompt), "-ntg", str(bench.decode_new), "-npl", str(bench.batch), "-t", str(row.threads),
               "--output-format", "jsonl"]
        return _run(bench, row, cmd, lambda out, err: _jsonl_field(out + "\n" + err, "speed_tg"))

    return run


def ct2_generate(peers: PeerDir) -> Callable[["Bench", "Row"], dict]:
    def run(bench: "Bench", row: "Row") -> dict:
        from .harness import SP_MODEL

        batch = bench.batch if row.group == batch_group(bench.batch) else 1
        ctype = "float32" if row.dtype == "f32" else "int8"
        cmd = [str(peers.ct2_python), str(peers.ct2_run), str(peers.ct2_model(row.dtype)), str(SP_MODEL), ctype,
               str(row.threads), str(batch), str(bench.decode_new), bench.decode_prompt]
        return _run(bench, row, cmd, lambda out, err: _tok_s(out + "\n" + err))

    return run


# ---------------------------------------------------------------------------- rows


def peer_rows(peers: PeerDir, notes: list[str], batch: int) -> list["Row"]:
    """The rows of every peer found in the folder (batched decode of batch sequences); what is
    missing goes to notes."""
    from .harness import SP_MODEL, Row

    rows = []

    def add(group: str, impl: str, dtype: str, t: int, runner: Callable, needs: list[Path], note: str = "") -> None:
        rid = f"{group}/{impl}/{dtype}/T{t}"
        missing = _missing(*needs)
        if missing:
            if t == 1:  # one note per peer and dtype
                notes.append(f"peer rows {group}/{impl}/{dtype} left out: missing {', '.join(missing)}")
            return
        rows.append(Row(rid, group, impl, dtype, t, runner=runner, note=note))

    bin_dir = peers.llamacpp_bin
    group = batch_group(batch)
    for t in (1, 2):
        for dt in ("f32", "int8"):
            add("decode", "llama2c", dt, t, llama2c_decode(peers), list(peers.llama2c(dt)))
            add("decode", "llamacpp", dt, t, llamacpp_bench(peers), [bin_dir / "llama-bench", peers.gguf(dt)],
                note="Q8_0" if dt == "int8" else "")
            add("prefill", "llamacpp", dt, t, llamacpp_bench(peers), [bin_dir / "llama-bench", peers.gguf(dt)],
                note="Q8_0" if dt == "int8" else "")
            add(group, "llamacpp", dt, t, llamacpp_batched(peers),
                [bin_dir / "llama-batched-bench", peers.gguf(dt)], note="speed_tg")
            ct2_needs = [peers.ct2_python, peers.ct2_model(dt), SP_MODEL, peers.ct2_run]
            add("decode", "ct2", dt, t, ct2_generate(peers), ct2_needs)
            add(group, "ct2", dt, t, ct2_generate(peers), ct2_needs)
    return rows


def add_peer_ratios(rows: list[dict]) -> None:
    """Each of our CLI rows: its median over the best peer median of the same group, dtype and
    thread count (rows["vs_best_peer"])."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["impl"] in PEER_IMPLS and r["median"]:
            key = (r["group"], r["dtype"], r["threads"])
            if key not in best or r["median"] > best[key]["median"]:
                best[key] = r
    for r in rows:
        peer = best.get((r["group"], r["dtype"], r["threads"]))
        if r["impl"] == "cli" and peer and r["median"]:
            r["vs_best_peer"] = {"peer": peer["id"], "peer_median": peer["median"], "ratio": r["median"] / peer["median"]}
