"""The `arianna-c` Python command line (arianna_c.cli) and `python -m arianna_c.lora`: prompts
read as the bytes typed (as ./run reads them), the seed's range, and --help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from arianna_c import Model
from arianna_c.cli import main
from capi import run_cli
from conftest import byte_id, piece_id

REPO = Path(__file__).resolve().parent.parent
AC_SEED_RANDOM = 2**64 - 1  # src/run.h


def run_module(*args) -> subprocess.CompletedProcess:
    """python -m args... from the checkout, stdout as bytes (undecodable argv bytes pass through)."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8:surrogateescape")
    return subprocess.run([sys.executable, "-m", *map(os.fsdecode, args)], capture_output=True, timeout=120,
                          cwd=REPO, env=env)


def test_generate_feeds_the_prompts_bytes_as_run_does(scripted_model, run_binary):
    """A prompt that is not valid UTF-8 ends in the byte piece <0xFF>, after which the scripted
    model says " the" "in" "er", as ./run does (after <0xBF>, the last byte of U+DCFF's
    3-byte form, it would say "or")."""
    script = [byte_id(0xBF), piece_id(b"or"), byte_id(0xFF), piece_id(b" the"), piece_id(b"in"), piece_id(b"er")]
    files = scripted_model(script)
    prompt = b"ab\xff"
    theirs = run_cli(run_binary, files.model, "-z", files.tokenizer, "-i", os.fsdecode(prompt), "-n", 3, "-t", 0,
                     text=False)
    assert theirs.returncode == 0, theirs.stderr
    ours = run_module("arianna_c.cli", "generate", files.model, "-z", files.tokenizer, "-i", prompt, "-n", "3",
                      "-t", "0")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout == prompt + b" theiner\n"


def test_seed_help_says_the_range_it_takes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"sampler seed, 0..{AC_SEED_RANDOM - 1}; default: random" in help_text


@pytest.mark.parametrize("seed, words", [
    (AC_SEED_RANDOM, ["-s/--seed", "AC_SEED_RANDOM", "a random seed", f"0..{AC_SEED_RANDOM - 1}"]),
    (2**64, ["-s/--seed", f"seed {2**64} is invalid"]),
    (-1, ["-s/--seed", "seed -1 is invalid"]),
    ("x", ["-s/--seed", "'x' is not a whole number"]),
])
def test_seeds_the_library_reads_otherwise_are_refused(make_model, built, capsys, seed, words):
    files = make_model(seed=3)
    with pytest.raises(SystemExit) as e:
        main(["generate", str(files.model), "-n", "4", "-s", str(seed)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err


def test_the_largest_fixed_seed_is_taken(make_model, built, capsys):
    files = make_model(seed=3)
    assert main(["generate", str(files.model), "-i", "the", "-n", "6", "-s", str(AC_SEED_RANDOM - 1)]) == 0
    with Model(files.model) as m:
        assert capsys.readouterr().out == "the" + m.generate("the", max_new_tokens=6, seed=AC_SEED_RANDOM - 1) + "\n"


def test_lora_help_prints_the_usage():
    shown = run_module("arianna_c.lora", "--help")
    assert shown.returncode == 0 and shown.stdout.startswith(b"usage: python -m arianna_c.lora eval")
    assert not shown.stderr
    wrong = run_module("arianna_c.lora")
    assert wrong.returncode == 1 and wrong.stderr.startswith(b"usage: python -m arianna_c.lora eval")
