"""The text table ``python -m bench`` prints from its results dict (also usable on a saved
JSON: ``python -m bench.report bench/results.json``)."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

from .targets import apply_targets, batch_group, crashed

# The layout of results.json (bench/README.md): 1 gave each row one "target", set when the file
# was written; 2 gives each row a "targets" list, each with its verdict.
SCHEMA = 2


def _num(x: Optional[float], unit: str = "") -> str:
    if x is None:
        return "-"
    if unit == "ms" or abs(x) < 100:
        return f"{x:,.1f}"
    return f"{x:,.0f}"


def _mb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 1e6:.1f} MB"


def _predates_targets(result: dict) -> bool:
    return result.get("schema", 1) < 2


def _judged(result: dict) -> dict:
    """result, its rows judged by the current targets when the file predates them (schema 1),
    from the file's own numbers (medians, vs_cli, vs_best_peer, the roofline's weights_fit_l3)."""
    if not _predates_targets(result):
        return result
    rows = [dict(r) for r in result["rows"]]
    apply_targets(rows, result["roofline"])
    return {**result, "rows": rows}


def header(result: dict) -> list[str]:
    m, model, s, roof = result["machine"], result["model"], result["settings"], result["roofline"]
    if "simd_flags" in m:
        isa = "flags " + (" ".join(m["simd_flags"]) or "none of the SIMD ones")
    else:
        isa = "AVX2+FMA" if m.get("avx2") and m.get("fma") else "no AVX2"
        isa += ", AVX-512" if m.get("avx512f") else " (no AVX-512)"
    kernels = f", kernels {m['kernels']}" if m.get("kernels") else ""
    cfg = model["config"]
    lines = [
        f"arianna_c benchmark  {result['timestamp']}",
        f"machine: {m.get('cpu')}, {m.get('cpus')} CPUs, {isa}, L3 {m.get('l3', '?')}{kernels}",
        f"model:   {model['path']}{' (random weights, same shape)' if model['random_weights'] else ''}: "
        f"dim {cfg['dim']}, hidden {cfg['hidden_dim']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, "
        f"vocab {cfg['vocab_size']}, seq_len {cfg['seq_len']}, {model['file_bytes'] / 1e6:.1f} MB",
        f"runs:    R={s['runs']} rounds, round-robin, one subprocess per measurement; greedy, no repetition penalty; decode: "
        f"{s['decode_new_tokens']} new tokens after a {s['decode_prompt_tokens']}-token prompt; "
        f"prefill: a {s['prefill_prompt_tokens']}-token prompt (seq_len {cfg['seq_len']}); batch {s['batch']}",
    ]
    bw, fma = roof.get("bandwidth_gbs", {}), roof.get("fma_gflops", {})
    cold = roof.get("cold_bandwidth_gbs", {})
    if bw or fma:
        parts = []
        for dt in ("f32", "int8"):
            if dt in bw:
                size = roof.get("buffer_bytes", {}).get(dt)
                per = ", ".join(f"{t} {v:.1f}" for t, v in sorted(bw[dt].items()))
                if dt in cold:
                    per += " (from memory: " + ", ".join(f"{t} {v:.1f}" for t, v in sorted(cold[dt].items())) + ")"
                parts.append(f"read {_mb(size)} ({dt} weights): {per} GB/s")
        if fma:
            isa_used = f" ({roof['isa']})" if roof.get("isa") else ""
            parts.append(f"FMA peak{isa_used}: " + ", ".join(f"{t} {v:.1f}" for t, v in sorted(fma.items())) + " GFLOP/s")
        lines.append("roofline: " + "; ".join(parts))
    lines.append(
        f"          bytes/token f32 {_mb(roof['bytes_per_token']['f32'])}, int8 {_mb(roof['bytes_per_token']['int8'])} "
        f"(int8: 1 B/weight + f32 scale per {roof['int8_group_assumed']}; KV cache included); "
        f"prefill {roof['flops_per_token']['prefill'] / 1e6:.1f} MFLOP/token")
    if _predates_targets(result):
        lines.append(f"targets: judged by the current bench/targets.py; the file predates them "
                     f"(schema {result.get('schema', 1)}: one target per row)")
    return lines


def _percent(fraction: Optional[float], missing: str) -> str:
    return f"{100 * fraction:.0f}%" if fraction else missing


def _vs_peer(row: dict, missing: str = "-") -> str:
    """Our row's ratio to the best peer of its group, dtype and threads, e.g. "1.39x llamacpp"."""
    v = row.get("vs_best_peer")
    return f"{v['ratio']:.2f}x {v['peer'].split('/')[1]}" if v else missing


VERDICT = {True: "PASS", False: "FAIL", None: "n/a"}


def _target(t: dict, error: bool) -> str:
    """A target with its verdict and, where no other column shows it, the number it compared:
    ">= 1.5x best peer: PASS", ">= 1.8x of 1 thread: FAIL (1.73x)"; error: the row crashed,
    ">= 880 tok/s: FAIL (error)"."""
    text = f"{t['text']}: {VERDICT[t['pass']]}"
    if error:
        return text + " (error)"
    m = t.get("measured")
    if m is not None and t["kind"] == "scaling":
        text += f" ({m:.2f}x)"
    elif m is not None and t["kind"] == "roofline":  # of roof or of cold roof, whichever applies
        text += f" ({m:.0%})"
    return text


def _targets(row: dict) -> str:
    """Each of the row's targets with its own verdict."""
    return "; ".join(_target(t, crashed(row)) for t in row.get("targets", []))


def _passed(row: dict) -> str:
    """All of the row's targets: PASS, FAIL, or n/a (some not judged, none missed)."""
    return VERDICT[row.get("pass")] if row.get("targets") else ""


def _target_count(rows: list[dict]) -> str:
    verdicts = [t["pass"] for r in rows for t in r.get("targets", [])]
    return (f"targets: {verdicts.count(True)} met, {verdicts.count(False)} missed, "
            f"{verdicts.count(None)} n/a (of {len(verdicts)})")


def format_table(result: dict) -> str:
    result = _judged(result)
    batch = batch_group(result["settings"]["batch"])
    cols = ["row", "median", "min-max", "unit", "peak RSS", "roofline", "of roof", "of cold roof", "vs best peer",
            "targets", "pass", "notes"]
    table: list[list[str]] = []
    for r in result["rows"]:
        unit = "ms" if r["metric"] == "ms" else ("tok/s total" if r["group"] == batch else "tok/s")
        notes = []
        if r["status"] != "ok":
            notes.append(r["status"])
        elif r["errors"]:
            notes.append(f"{r['errors']} failed runs")
        if r.get("vs_cli"):
            notes.append(f"{r['vs_cli']['ratio_of_medians']:.3f}x CLI")
        if r.get("tokens") and r["group"] == "decode":
            notes.append(f"{r['tokens']:.0f} tok")
        if r.get("tokens_exact") is False:
            notes.append("token count re-encoded from text (approx.)")
        if r.get("note"):
            notes.append(r["note"])
        rss = r.get("peak_rss_mb")
        table.append([
            r["id"],
            _num(r["median"], r["metric"]),
            f"{_num(r['min'], r['metric'])}-{_num(r['max'], r['metric'])}" if r["median"] is not None else "-",
            unit,
            f"{rss['max']:.1f} MB" if rss else "-",
            _num(r.get("roofline")),
            _percent(r.get("roofline_fraction"), "-"),
            _percent(r.get("cold_roofline_fraction"), "-"),
            _vs_peer(r),
            _targets(r),
            _passed(r),
            "; ".join(notes),
        ])
    widths = [max(len(c), *(len(row[i]) for row in table)) if table else len(c) for i, c in enumerate(cols)]
    right = {1, 2, 4, 5, 6, 7, 8}

    def fmt(row: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    lines = header(result) + ["", fmt(cols), fmt(["-" * w for w in widths])] + [fmt(row) for row in table]
    lines.append(_target_count(result["rows"]))
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """The same rows as a Markdown table (for README.md)."""
    result = _judged(result)
    out = ["| row | median | min–max | peak RSS | roofline | of roof | of cold roof | vs best peer | targets | pass |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in result["rows"]:
        rss = r.get("peak_rss_mb")
        status = "" if r["status"] == "ok" else f" ({r['status']})"
        unit = " ms" if r["metric"] == "ms" else ""
        ratio = f" ({r['vs_cli']['ratio_of_medians']:.3f}× CLI)" if r.get("vs_cli") else ""
        out.append("| {} | {}{}{} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["id"], _num(r["median"], r["metric"]), unit, ratio + status,
            f"{_num(r['min'], r['metric'])}–{_num(r['max'], r['metric'])}" if r["median"] is not None else "–",
            f"{rss['max']:.1f} MB" if rss else "–", _num(r.get("roofline")),
            _percent(r.get("roofline_fraction"), "–"),
            _percent(r.get("cold_roofline_fraction"), "–"), _vs_peer(r, "–"),
            _targets(r), _passed(r)))
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m bench.report RESULTS.json [--markdown]", file=sys.stderr)
        return 1
    result: dict[str, Any] = json.loads(open(argv[0]).read())
    print(markdown_table(result) if "--markdown" in argv else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
