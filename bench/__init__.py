"""arianna_c's benchmark: ``python -m bench`` or ``make bench``.

Runs the CLI, the Python binding, the NumPy reference and PyTorch eager (KV cache) side by
side, round-robin, each measurement in its own subprocess, next to this machine's roofline
(bench/roofline.c), and writes bench/results.json.  See bench/README.md.

Kept free of imports: ``python -m bench.worker`` times ``import arianna_c`` from a fresh
interpreter, and this file is imported first.
"""
