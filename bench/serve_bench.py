"""The server under load: aggregate tok/s and per-request latency at several numbers of
concurrent streams, next to ``./run -b N`` (the same batched decode without HTTP).

    python -m bench.serve_bench                      # the persona, 1 4 16 64 streams
    python -m bench.serve_bench --streams 1 16 --tokens 64 --requests 4 --threads 2

For each concurrency C the server (``arianna-c serve``, a separate process, ``--parallel``
the largest C) gets C client threads, each sending ``--requests`` streaming completions one
after another (``ignore_eos``, ``--tokens`` new tokens, its own seed).  Reported per C:
aggregate tok/s (completion tokens of all requests / wall time from the first request to the
last answer), p50 / p99 latency of a whole request and of its first token, and ``./run -b C
-n TOKENS -e 1``'s own total tok/s on the same prompt and thread count.  The clients are
plain HTTP (http.client) so they cost little next to the server; they share the machine
with it, as a real local client would.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Resonance is"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, parallel: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "arianna_c.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--parallel", str(parallel), "--queue", str(4 * parallel), "-T", str(threads)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start: " + proc.stderr.read().decode()[-2000:])


def stream_request(port: int, tokens: int, seed: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds to the end, completion tokens) of one request."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": tokens, "seed": seed, "stream": True, "ignore_eos": True,
                       "temperature": 0.8, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    first, count, buffer = None, 0, b""
    while True:
        chunk = response.read1(65536)
        if not chunk:
            break
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            data = event[6:]
            if data == b"[DONE]":
                continue
            obj = json.loads(data)
            if obj.get("usage"):
                count = obj["usage"]["completion_tokens"]
            elif first is None and obj["choices"] and obj["choices"][0]["text"]:
                first = time.perf_counter() - start
    end = time.perf_counter() - start
    conn.close()
    return (first if first is not None else end), end, count


def load(port: int, streams: int, requests: int, tokens: int) -> dict:
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(requests):
            r = stream_request(port, tokens, seed=1 + 1000 * i + j)
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    total = sum(r[2] for r in results)
    ends = sorted(r[1] for r in results)
    firsts = sorted(r[0] for r in results)
    return {"streams": streams, "requests": len(results), "tokens": total, "wall_s": wall, "tok_s": total / wall,
            "p50_s": statistics.median(ends), "p99_s": _percentile(ends, 0.99),
            "first_p50_s": statistics.median(firsts), "first_p99_s": _percentile(firsts, 0.99)}


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def cli_batch(model: str, streams: int, tokens: int, threads: int) -> float:
    """./run -b streams: its reported total tok/s."""
    run = subprocess.run([str(REPO / "run"), model, "-b", str(streams), "-n", str(tokens), "-e", "1", "-T", str(threads),
                          "-i", PROMPT, "-s", "1", "-t", "0.8"], cwd=REPO, capture_output=True, text=True, timeout=600)
    found = re.search(r"achieved tok/s: ([0-9.]+)", run.stderr)
    if run.returncode != 0 or not found:
        raise RuntimeError(f"./run -b {streams} failed: {run.stderr[-500:]}")
    return float(found.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "persona" / "arianna_v1_base.bin"),
                   help="model file; default: the persona")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="concurrent streams to measure; default: 1 4 16 64")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per request; default: 128")
    p.add_argument("--requests", type=int, default=3, help="requests per stream, one after another; default: 3")
    p.add_argument("--threads", type=int, default=2, help="threads of the server and of ./run; default: 2")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)

    port = free_port()
    server = start_server(args.model, port, max(args.streams), args.threads)
    rows = []
    try:
        stream_request(port, 4, seed=0)  # warm-up
        for c in args.streams:
            row = load(port, c, args.requests, args.tokens)
            row["cli_batch_tok_s"] = cli_batch(args.model, c, args.tokens, args.threads)
            rows.append(row)
            print(f"{c:>3} streams: {row['tok_s']:8.1f} tok/s aggregate (./run -b {c}: {row['cli_batch_tok_s']:8.1f}, "
                  f"{row['tok_s'] / row['cli_batch_tok_s']:.2f}x)  latency p50 {row['p50_s']:.2f} s p99 {row['p99_s']:.2f} s  "
                  f"first token p50 {row['first_p50_s'] * 1000:.0f} ms p99 {row['first_p99_s'] * 1000:.0f} ms  "
                  f"({row['requests']} requests, {row['tokens']} tokens)", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "tokens": args.tokens, "threads": args.threads,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
