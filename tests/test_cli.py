"""The ./run command line: output, exit codes, messages, -z resolution, chat mode."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import write_synthetic_tokenizer


def run(binary: Path, *args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], input=stdin, capture_output=True,
                          text=True, errors="replace", cwd=cwd, timeout=60)


def test_generate_prints_prompt_then_continuation(run_binary, make_model):
    files = make_model(seed=1)
    r = run(run_binary, files.model, "-n", "30", "-i", "the cat", "-s", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the cat")
    assert r.stdout.endswith("\n")


def test_same_seed_same_text_and_greedy_matches_python(run_binary, make_model):
    from arianna_c import Model

    files = make_model(seed=4)
    a = run(run_binary, files.model, "-n", "40", "-i", "it is", "-s", "99", "-t", "0.9")
    b = run(run_binary, files.model, "-n", "40", "-i", "it is", "-s", "99", "-t", "0.9")
    c = run(run_binary, files.model, "-n", "40", "-i", "it is", "-s", "100", "-t", "0.9")
    assert a.returncode == b.returncode == c.returncode == 0
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout
    greedy = run(run_binary, files.model, "-n", "25", "-i", "it is", "-t", "0")
    with Model(files.model, files.tokenizer) as m:
        want = m.generate("it is", max_new_tokens=25, temperature=0.0)
    assert greedy.stdout == "it is" + want + "\n"


def test_scripted_output_and_tok_per_second(run_binary, scripted_model):
    script = [1, 3 + 0xC3, 3 + 0xA9, 3 + ord("!"), 2]  # "é!" then EOS
    files = scripted_model(script)
    r = run(run_binary, files.model, "-t", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "é!\n"
    assert "achieved tok/s: " in r.stderr
    rate = float(r.stderr.split("achieved tok/s: ")[1].split()[0])
    assert rate > 0


def test_ignore_eos_goes_on_past_the_end_of_the_text(run_binary, scripted_model):
    from arianna_c import Model

    script = [1, 3 + ord("a"), 3 + ord("b"), 2, 3 + ord("c"), 3 + ord("d"), 3 + ord("e")]  # "ab" EOS "cde"
    files = scripted_model(script)
    stops = run(run_binary, files.model, "-t", "0", "-n", "5")
    goes_on = run(run_binary, files.model, "-t", "0", "-n", "5", "-e", "1")
    batch = run(run_binary, files.model, "-t", "0", "-n", "5", "-e", "1", "-b", "2")
    assert stops.returncode == goes_on.returncode == batch.returncode == 0, stops.stderr + goes_on.stderr
    assert stops.stdout == "ab\n"
    assert goes_on.stdout == "abcd\n"  # a b EOS c d: exactly -n 5 tokens, EOS printed as nothing
    assert batch.stdout.count("abcd\n") == 2
    with Model(files.model, files.tokenizer) as m:
        assert m.generate("", 5, temperature=0.0) == "ab"
        assert m.generate("", 5, temperature=0.0, ignore_eos=True) == "abcd"
        assert m.generate_batch(["", ""], 5, temperature=0.0, ignore_eos=True) == ["abcd", "abcd"]
        assert m.generate_batch([""], 5, temperature=0.0) == ["ab"]


def test_steps_are_clamped_to_seq_len(run_binary, make_model):
    files = make_model(seed=2, seq_len=16)
    r = run(run_binary, files.model, "-n", "1000", "-t", "1", "-s", "1")
    assert r.returncode == 0, r.stderr
    r = run(run_binary, files.model, "-n", "0", "-s", "1")
    assert r.returncode == 0, r.stderr


def test_prompt_longer_than_context_fails(run_binary, make_model):
    files = make_model(seq_len=8)
    r = run(run_binary, files.model, "-i", "x y z w v u t s r q")
    assert r.returncode == 1
    assert "seq_len is 8" in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["-q", "1"],             # unknown flag
        ["-t"],                  # missing value
        ["-t", "hot"],           # not a number
        ["-n", "-5"],            # negative steps
        ["-k", "2.5"],           # not an int
        ["-s", "-1"],            # negative seed
        ["-m", "poem"],          # unknown mode
        ["--temperature", "1"],  # long flags are not flags
        ["extra"],               # stray argument
    ],
)
def test_bad_arguments_print_usage(run_binary, make_model, args):
    files = make_model()
    r = run(run_binary, files.model, *args)
    assert r.returncode == 1
    assert "Usage:" in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("args, needle", [(["-t", "-1"], "temperature -1 is invalid"),
                                          (["-p", "0"], "top_p 0 is invalid"),
                                          (["-p", "1.5"], "top_p 1.5 is invalid"),
                                          (["-k", "-2"], "top_k -2 is invalid")])
def test_bad_sampler_values(run_binary, make_model, args, needle):
    files = make_model()
    r = run(run_binary, files.model, *args)
    assert r.returncode == 1
    assert needle in r.stderr and "Usage:" in r.stderr


def test_no_arguments_and_help(run_binary):
    r = run(run_binary)
    assert r.returncode == 1 and "Usage:" in r.stderr
    r = run(run_binary, "-h")
    assert r.returncode == 0 and "Usage:" in r.stderr


def test_load_errors_exit_1_with_message(run_binary, make_model, tmp_path):
    r = run(run_binary, tmp_path / "missing.bin")
    assert r.returncode == 1 and "missing.bin: cannot open model file" in r.stderr
    files = make_model()
    short = tmp_path / "short.bin"
    short.write_bytes(files.model.read_bytes()[:1000])
    shutil.copy(files.tokenizer, tmp_path / "tokenizer.bin")
    r = run(run_binary, short)
    assert r.returncode == 1
    assert "short.bin: file is 1000 bytes, header implies" in r.stderr
    wrong = write_synthetic_tokenizer(tmp_path / "wrong.bin", 400)
    r = run(run_binary, files.model, "-z", wrong)
    assert r.returncode == 1
    assert "wrong.bin: tokenizer has 400 pieces but the model's vocab_size is 320" in r.stderr


def test_tokenizer_resolution(run_binary, make_model, tmp_path):
    files = make_model(tokenizer_name="tok4096.bin")
    folder = files.model.parent
    # default: tokenizer.bin (absent) then tok4096.bin in the model's folder
    assert run(run_binary, files.model, "-n", "3").returncode == 0
    # -z NAME inside the model's folder, with and without .bin, from another cwd
    assert run(run_binary, files.model, "-z", "tok4096", "-n", "3", cwd=tmp_path).returncode == 0
    assert run(run_binary, files.model, "-z", "tok4096.bin", "-n", "3", cwd=tmp_path).returncode == 0
    # -z NAME relative to the working directory first
    other = tmp_path / "elsewhere"
    other.mkdir()
    write_synthetic_tokenizer(other / "mytok.bin", files.cfg.vocab_size)
    assert run(run_binary, files.model, "-z", "mytok", "-n", "3", cwd=other).returncode == 0
    assert run(run_binary, files.model, "-z", str(other / "mytok"), "-n", "3").returncode == 0
    # not found: every path tried is listed
    r = run(run_binary, files.model, "-z", "nothere", cwd=tmp_path)
    assert r.returncode == 1
    for tried in ("nothere", "nothere.bin", f"{folder}/nothere", f"{folder}/nothere.bin"):
        assert tried in r.stderr
    (folder / "tok4096.bin").unlink()
    r = run(run_binary, files.model)
    assert r.returncode == 1
    assert f"{folder}/tokenizer.bin" in r.stderr and f"{folder}/tok4096.bin" in r.stderr


def test_relative_model_path_finds_its_tokenizer(run_binary, make_model):
    files = make_model()
    r = run(run_binary, "model.bin", "-n", "3", cwd=files.model.parent)
    assert r.returncode == 0, r.stderr


def test_chat_mode(run_binary, make_model):
    files = make_model(seed=6, seq_len=64)
    r = run(run_binary, files.model, "-m", "chat", "-y", "be brief", "-n", "5", "-s", "1",
            stdin="hello\nand again\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Assistant: ") >= 1
    # no stdin at all: reads EOF at once and exits cleanly
    r = run(run_binary, files.model, "-m", "chat", "-n", "5")
    assert r.returncode == 0, r.stderr


def test_chat_mode_stops_when_context_is_full(run_binary, make_model):
    files = make_model(seed=6, seq_len=32)
    r = run(run_binary, files.model, "-m", "chat", "-y", "", "-n", "100", "-s", "1",
            stdin="a\nb\nc\nd\ne\nf\ng\n")
    assert r.returncode == 0, r.stderr
    assert "context is full" in r.stdout
