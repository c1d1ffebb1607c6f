"""Perplexity: llama-perplexity's chunks, the sliding window, bits per byte, the command line,
and agreement with llama.cpp's llama-perplexity on the persona (when it is built)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arianna_c import AriannaError, Model
from arianna_c.perplexity import evaluate, windows
from conftest import TRAINING_TEXT

REPO = Path(__file__).resolve().parent.parent
TEXT = TRAINING_TEXT * 3


@pytest.fixture
def model(make_model):
    with Model(make_model(seed=2, seq_len=64).model) as m:
        yield m


def _nll(logits: np.ndarray, target: int) -> float:
    x = logits.astype(np.float64)
    return float(x.max() + np.log(np.exp(x - x.max()).sum()) - x[target])


def test_chunks_follow_llama_perplexity():
    tokens = [1] + list(range(10, 10 + 99))  # 100 tokens: 3 chunks of 32, 4 left out
    plan = windows(tokens, 32)
    assert len(plan) == 3
    for i, w in enumerate(plan):
        assert w.tokens == [1] + tokens[32 * i + 1:32 * i + 32]  # first token replaced by BOS
        assert (w.first, w.last) == (16, 31)  # positions 16..30 predict 17..31
    with pytest.raises(AriannaError, match="needs at least 64"):
        windows(tokens[:63], 32)


def test_sliding_window_scores_every_token_once():
    tokens = [1] + list(range(10, 10 + 99))
    for stride in (1, 8, 16, 31):
        scored = []
        for i, w in enumerate(windows(tokens, 32, stride)):
            assert w.tokens[0] == 1 and len(w.tokens) <= 32
            for p in range(w.first, w.last):  # logits at p (after p text tokens) predict w.tokens[p + 1]
                scored.append(w.tokens[p + 1])
                assert i == 0 or p >= 31 - stride  # at least context - 1 - stride tokens before it
        assert scored == tokens[1:], stride
    with pytest.raises(AriannaError, match="stride"):
        windows(tokens, 32, 32)


def test_chunk_perplexity_equals_a_direct_computation(model):
    r = evaluate(model, TEXT, context=32)
    tokens = model.encode(TEXT, bos=True)
    nlls = []
    for start in range(0, len(tokens) - 32 + 1, 32):
        chunk = [1] + tokens[start + 1:start + 32]
        logits = model.logits(chunk)
        nlls += [_nll(logits[p], chunk[p + 1]) for p in range(16, 31)]
    mean = float(np.mean(nlls))
    assert r.tokens_scored == len(nlls) and r.windows == len(tokens) // 32
    assert math.isclose(r.nll, mean, rel_tol=1e-9)
    assert math.isclose(r.ppl, math.exp(mean), rel_tol=1e-9)
    std = math.sqrt((np.mean(np.square(nlls)) - mean * mean) / (len(nlls) - 1))
    assert math.isclose(r.ppl_error, r.ppl * std, rel_tol=1e-6)


def test_sliding_window_perplexity_and_bits_per_byte(model):
    r = evaluate(model, TEXT, context=32, stride=16)
    tokens = model.encode(TEXT, bos=True)
    assert r.tokens_scored == len(tokens) - 1
    assert r.bytes_scored == len(TEXT.encode())  # every byte of the text, once
    assert math.isclose(r.bits_per_byte, r.nll * r.tokens_scored / math.log(2) / r.bytes_scored, rel_tol=1e-9)
    # a smaller stride gives every token more context
    wide = evaluate(model, TEXT, context=64, stride=8)
    assert wide.tokens_scored == r.tokens_scored


def test_bad_arguments(model):
    with pytest.raises(AriannaError, match="context 65 is invalid"):
        evaluate(model, TEXT, context=65)
    with pytest.raises(AriannaError, match="needs at least"):
        evaluate(model, "too short", context=32)


@pytest.mark.parametrize("stride", [1.5, True, "8"])
def test_stride_must_be_an_int(model, stride):
    with pytest.raises(TypeError, match=f"stride must be an int, not {type(stride).__name__}"):
        evaluate(model, TEXT, context=32, stride=stride)
    with pytest.raises(TypeError, match="stride must be an int"):
        windows(list(range(100)), 32, stride)


def test_cli_scores_the_files_bytes(make_model, tmp_path, built):
    """Bytes that are not UTF-8 are scored as the byte pieces ./run's tokenizer makes of them."""
    files = make_model(seed=2, seq_len=64)
    data = TEXT.encode() + b"\x80\xff bytes \xc3( " * 8
    text_file = tmp_path / "bytes.txt"
    text_file.write_bytes(data)
    run = subprocess.run([sys.executable, "-m", "arianna_c.cli", "perplexity", str(files.model), str(text_file),
                          "-c", "32"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    with Model(files.model) as m:
        assert str(evaluate(m, data, context=32)) in run.stdout


def test_cli_prints_the_running_and_final_estimate(model, make_model, tmp_path, built):
    files = make_model(seed=2, seq_len=64)
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "arianna_c.cli", "perplexity", str(files.model), str(text_file),
                          "-c", "32"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    with Model(files.model) as m:
        r = evaluate(m, TEXT, context=32)
    assert f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_error:.5f}" in run.stdout
    assert f"bits per byte: {r.bits_per_byte:.4f}" in run.stdout
    assert "PPL" in run.stderr  # the progress (bar or lines) shows the running value
    bad = subprocess.run([sys.executable, "-m", "arianna_c.cli", "perplexity", str(files.model),
                          str(tmp_path / "missing.txt")], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 1 and "missing.txt" in bad.stderr and "Traceback" not in bad.stderr


LLAMA_PERPLEXITY = os.environ.get("LLAMA_PERPLEXITY") or shutil.which("llama-perplexity")
PERSONA_GGUF = os.environ.get("PERSONA_GGUF")


@pytest.mark.persona
@pytest.mark.skipif(not (LLAMA_PERPLEXITY and PERSONA_GGUF),
                    reason="set LLAMA_PERPLEXITY (llama.cpp's binary) and PERSONA_GGUF (the persona as F32 GGUF)")
def test_persona_agrees_with_llama_perplexity(tmp_path):
    text = (REPO / "persona" / "README.md").read_text(encoding="utf-8") * 3
    text_file = tmp_path / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    run = subprocess.run([LLAMA_PERPLEXITY, "-m", PERSONA_GGUF, "-f", str(text_file), "-c", "256", "-t", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", run.stdout + run.stderr)
    assert found, (run.stdout + run.stderr)[-2000:]
    with Model(REPO / "persona" / "arianna_v1_base.bin") as m:
        ours = evaluate(m, text, context=256)
    theirs = float(found.group(1))
    assert abs(ours.ppl - theirs) / theirs < 0.005, (ours.ppl, theirs)
