"""The speed targets, keyed like the row ids (group/impl/dtype/Tthreads); a row may have several.

Each target compares one number of the run with its value:
  "min" / "max"  the row's median, >= value / < value (absolute; set on an AVX-512 machine, so on
                 another machine they say as much about the machine as about the code);
  "vs_cli"       the row's median over the same row of the CLI, >= value (the Python binding);
  "vs_peer"      the row's median over the best peer's (llama2.c, llama.cpp, CTranslate2) of the
                 same group, dtype and thread count, >= value (needs --peers);
  "scaling"      the row's median over the same row's on one thread, >= value;
  "roofline"     the fraction of the roofline that applies here, >= value: the back-to-back one
                 when the dtype's weights fit in the L3, the one from memory when they do not.
All but min/max compare numbers measured side by side in one run, so they mean the same on any
machine.  A target whose number the run lacks (no peer rows, no roofline, a row left out or
not built: status "n/a (...)") is neither met nor missed: its verdict is None.  A row whose
measurement crashed or timed out (status "error: ...") has no number either, but it is the row's
own failure: every target of it is missed.
"""

from __future__ import annotations

from typing import Optional

# The batch the batched-decode targets are set for: with --batch B != 16 the rows are
# batchB/..., which no target names.
TARGET_BATCH = 16


def batch_group(batch: int) -> str:
    """The group of the batched-decode rows of batch sequences: their row ids start with it."""
    return f"batch{batch}"


def crashed(row: dict) -> bool:
    """No round of the row gave a number because its measurement crashed or timed out (status
    "error: ...", as opposed to a row left out or not built, "n/a (...)"): it misses its targets."""
    return row["status"].startswith("error")


def _t(kind: str, value: float, text: str) -> dict:
    return {"kind": kind, "value": value, "text": text}


def _targets() -> dict[str, list[dict]]:
    t: dict[str, list[dict]] = {}

    def add(row_id: str, *targets: dict) -> None:
        t.setdefault(row_id, []).extend(targets)

    add("decode/cli/f32/T1", _t("min", 880, ">= 880 tok/s"))
    add("decode/cli/f32/T2", _t("min", 1800, ">= 1,800 tok/s"))
    add("decode/cli/int8/T1", _t("min", 2500, ">= 2,500 tok/s"))
    add("decode/cli/int8/T2", _t("min", 4500, ">= 4,500 tok/s"))
    add("prefill/cli/f32/T1", _t("min", 10000, ">= 10,000 tok/s"))
    batch = batch_group(TARGET_BATCH)
    add(f"{batch}/cli/f32/T2", _t("min", 10000, ">= 10,000 tok/s total"))
    add("decode/numpy/f32/T1", _t("min", 340, ">= 340 tok/s"))
    add("decode/numpy/f32/T2", _t("min", 340, ">= 340 tok/s"))
    for impl in ("python", "cli"):
        add(f"startup/{impl}/f32/T1", _t("max", 60, "< 60 ms"))
    decode_roofline = {("f32", 1): 0.85, ("f32", 2): 0.70, ("int8", 1): 0.60, ("int8", 2): 0.60}
    for dt in ("f32", "int8"):
        for threads in (1, 2):
            row = f"{dt}/T{threads}"
            add(f"decode/python/{row}", _t("vs_cli", 0.95, "within 5% of CLI"))
            add(f"decode/cli/{row}", _t("vs_peer", 1.5, ">= 1.5x best peer"),
                _t("roofline", decode_roofline[dt, threads], f">= {decode_roofline[dt, threads]:.0%} of roof"))
            add(f"prefill/cli/{row}", _t("vs_peer", 1.3, ">= 1.3x best peer"))
            add(f"{batch}/cli/{row}", _t("vs_peer", 1.5, ">= 1.5x best peer"))
        add(f"decode/cli/{dt}/T2", _t("scaling", 1.8, ">= 1.8x of 1 thread"))
    return t


TARGETS: dict[str, list[dict]] = _targets()


def measured(target: dict, row: dict, rows: dict[str, dict], roof: dict) -> Optional[float]:
    """The number of the run that target compares, or None when the run lacks it.  rows: every
    row of the run by id; roof: the run's roofline summary."""
    kind = target["kind"]
    if kind in ("min", "max"):
        return row["median"]
    if kind == "vs_cli":
        return (row.get("vs_cli") or {}).get("ratio_of_medians")
    if kind == "vs_peer":
        return (row.get("vs_best_peer") or {}).get("ratio")
    if kind == "scaling":
        one = rows.get(f"{row['group']}/{row['impl']}/{row['dtype']}/T1")
        return row["median"] / one["median"] if one and one["median"] and row["median"] else None
    if kind == "roofline":
        fits = (roof.get("weights_fit_l3") or {}).get(row["dtype"])
        if fits is None:
            return None
        return row.get("roofline_fraction" if fits else "cold_roofline_fraction")
    raise ValueError(f"unknown target kind {kind!r}")


def _verdict(target: dict, value: Optional[float]) -> Optional[bool]:
    if value is None:
        return None
    return value < target["value"] if target["kind"] == "max" else value >= target["value"]


def apply_targets(rows: list[dict], roof: dict) -> None:
    """Sets each row's "targets" (its targets, each with "measured" and "pass") and "pass": False
    when one target is missed, True when every one is met, None otherwise (or without targets).
    A crashed row's targets are missed, with nothing measured."""
    by_id = {r["id"]: r for r in rows}
    for row in rows:
        checked = []
        for target in TARGETS.get(row["id"], []):
            value = measured(target, row, by_id, roof)  # None for a crashed row: it has no median
            met = False if crashed(row) else _verdict(target, value)
            checked.append(dict(target, measured=value, **{"pass": met}))
        verdicts = [c["pass"] for c in checked]
        row["targets"] = checked
        row["pass"] = False if False in verdicts else (True if verdicts and all(verdicts) else None)
