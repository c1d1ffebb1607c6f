"""The speed targets, keyed like the row ids (group/impl/dtype/Tthreads).

kind "min": the median must be >= value; "max": the median must be < value; "ratio": the
row's median divided by the matching CLI row's median must be >= value.  The numbers were set
on an AVX-512 machine; on another machine the roofline fraction is the fair comparison.
"""

from __future__ import annotations


def _t(kind: str, value: float, unit: str, text: str) -> dict:
    return {"kind": kind, "value": value, "unit": unit, "text": text}


TARGETS: dict[str, dict] = {
    "decode/cli/f32/T1": _t("min", 880, "tok/s", ">= 880 tok/s"),
    "decode/cli/f32/T2": _t("min", 1800, "tok/s", ">= 1,800 tok/s"),
    "decode/cli/int8/T1": _t("min", 2500, "tok/s", ">= 2,500 tok/s"),
    "decode/cli/int8/T2": _t("min", 4500, "tok/s", ">= 4,500 tok/s"),
    "prefill/cli/f32/T1": _t("min", 10000, "tok/s", ">= 10,000 tok/s"),
    "batch16/cli/f32/T2": _t("min", 10000, "tok/s", ">= 10,000 tok/s total"),
    "decode/python/f32/T1": _t("ratio", 0.95, "x CLI", "within 5% of CLI"),
    "decode/python/f32/T2": _t("ratio", 0.95, "x CLI", "within 5% of CLI"),
    "decode/python/int8/T1": _t("ratio", 0.95, "x CLI", "within 5% of CLI"),
    "decode/python/int8/T2": _t("ratio", 0.95, "x CLI", "within 5% of CLI"),
    "startup/python/f32/T1": _t("max", 150, "ms", "< 150 ms"),
    "decode/numpy/f32/T1": _t("min", 340, "tok/s", ">= 340 tok/s"),
    "decode/numpy/f32/T2": _t("min", 340, "tok/s", ">= 340 tok/s"),
}
