"""The ./run command line: output, exit codes, messages, -z resolution, chat mode, and what
it does when stdout fails, memory is short or a value is out of range."""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from capi import error_lines, header_constant, last_error, load_tokenizer, mappings_of, read_stdout_until, run_cli
from conftest import byte_id, piece_id, write_synthetic_tokenizer


def run_into(binary: Path, args: list, stdout, stdin: str = "", **kwargs) -> tuple[int, str]:
    """Runs ./run with stdout going to the given file object or descriptor; returns
    (exit status, stderr)."""
    r = subprocess.run([str(binary), *map(str, args)], input=stdin.encode(), stdout=stdout,
                       stderr=subprocess.PIPE, timeout=60, **kwargs)
    return r.returncode, r.stderr.decode("utf-8", "replace")


def test_generate_prints_prompt_then_continuation(run_binary, make_model):
    from arianna_c import Model

    files = make_model(seed=1)
    r = run_cli(run_binary, files.model, "-n", "30", "-i", "the cat", "-s", "3", "-t", "1", "-p", "0.9")
    assert r.returncode == 0, r.stderr
    with Model(files.model, files.tokenizer) as m:
        want = m.generate("the cat", max_new_tokens=30, temperature=1.0, top_p=0.9, seed=3)
    assert len(want) > 0
    assert r.stdout == "the cat" + want + "\n"


def test_same_seed_same_text_and_greedy_matches_python(run_binary, make_model):
    from arianna_c import Model

    files = make_model(seed=4)
    a = run_cli(run_binary, files.model, "-n", "40", "-i", "it is", "-s", "99", "-t", "0.9")
    b = run_cli(run_binary, files.model, "-n", "40", "-i", "it is", "-s", "99", "-t", "0.9")
    c = run_cli(run_binary, files.model, "-n", "40", "-i", "it is", "-s", "100", "-t", "0.9")
    assert a.returncode == b.returncode == c.returncode == 0
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout
    greedy = run_cli(run_binary, files.model, "-n", "25", "-i", "it is", "-t", "0")
    with Model(files.model, files.tokenizer) as m:
        want = m.generate("it is", max_new_tokens=25, temperature=0.0)
    assert greedy.stdout == "it is" + want + "\n"


def test_scripted_output_and_tok_per_second(run_binary, scripted_model):
    script = [1, 3 + 0xC3, 3 + 0xA9, 3 + ord("!"), 2]  # "é!" then EOS
    files = scripted_model(script)
    r = run_cli(run_binary, files.model, "-t", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "é!\n"
    assert "achieved tok/s: " in r.stderr
    rate = float(r.stderr.split("achieved tok/s: ")[1].split()[0])
    assert rate > 0


def test_ignore_eos_goes_on_past_the_end_of_the_text(run_binary, scripted_model):
    from arianna_c import Model

    script = [1, 3 + ord("a"), 3 + ord("b"), 2, 3 + ord("c"), 3 + ord("d"), 3 + ord("e")]  # "ab" EOS "cde"
    files = scripted_model(script)
    stops = run_cli(run_binary, files.model, "-t", "0", "-n", "5")
    goes_on = run_cli(run_binary, files.model, "-t", "0", "-n", "5", "-e", "1")
    batch = run_cli(run_binary, files.model, "-t", "0", "-n", "5", "-e", "1", "-b", "2")
    assert stops.returncode == goes_on.returncode == batch.returncode == 0, stops.stderr + goes_on.stderr
    assert stops.stdout == "ab\n"
    assert goes_on.stdout == "abcd\n"  # a b EOS c d: exactly -n 5 tokens, EOS printed as nothing
    assert batch.stdout.count("abcd\n") == 2
    with Model(files.model, files.tokenizer) as m:
        assert m.generate("", 5, temperature=0.0) == "ab"
        assert m.generate("", 5, temperature=0.0, ignore_eos=True) == "abcd"
        assert m.generate_batch(["", ""], 5, temperature=0.0, ignore_eos=True) == ["abcd", "abcd"]
        assert m.generate_batch([""], 5, temperature=0.0) == ["ab"]


def test_steps_are_clamped_to_seq_len(run_binary, scripted_model):
    """-n 0, and any -n past the context, give what fits: BOS + generated tokens = seq_len."""
    # greedily BOS -> a -> b -> ... -> z: longer than the context, so it never ends the text
    files = scripted_model([1] + [byte_id(c) for c in b"abcdefghijklmnopqrstuvwxyz"], seq_len=12)
    for steps, text in (("1000", "abcdefghijk"), ("0", "abcdefghijk"), ("11", "abcdefghijk"), ("5", "abcde")):
        r = run_cli(run_binary, files.model, "-n", steps, "-t", "0")
        assert (r.returncode, r.stdout) == (0, text + "\n"), r.stderr
    r = run_cli(run_binary, files.model, "-n", "0", "-t", "0", "-b", "2", "-s", "7")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ("=== sequence 0 (seed 7) ===\nabcdefghijk\n"
                        "=== sequence 1 (seed 8) ===\nabcdefghijk\n")


def test_prompt_longer_than_context_prints_only_the_error(run_binary, make_model):
    files = make_model(seq_len=8)
    for extra in ([], ["-b", "2"]):
        r = run_cli(run_binary, files.model, "-i", "x y z w v u t s r q", *extra)
        assert r.returncode == 1
        assert r.stdout == ""
        (line,) = error_lines(r.stderr)
        assert line.endswith("is 18 tokens (BOS included) but the model's seq_len is 8")
        assert "tok/s" not in r.stderr
    # a prompt that fits exactly is printed, then the continuation (nothing: the context is full)
    r = run_cli(run_binary, files.model, "-i", "x y z w")  # BOS x ▁ y ▁ z ▁ w: 8 tokens
    assert r.returncode == 0, r.stderr
    assert r.stdout == "x y z w\n"


# (arguments, the error line): each names the flag, the value as typed and why it is refused
BAD_ARGUMENTS = [
    (["-t", "inf"], "error: -t inf: not a finite number"),
    (["-t", "-inf"], "error: -t -inf: not a finite number"),
    (["-t", "1e39"], "error: -t 1e39: too large for a float (the largest is 3.4e+38)"),
    (["-t", "1e-45"], "error: -t 1e-45: too close to 0 for a float (the smallest is 1.2e-38)"),
    (["-t", "nan"], "error: -t nan: not a number"),
    (["-t", "0.5x"], "error: -t 0.5x: not a number"),
    (["-t", " 0.5"], "error: -t  0.5: not a number"),
    (["-t", ""], "error: -t : not a number"),
    (["-t", "hot"], "error: -t hot: not a number"),
    # the ranges are the library's (ac_sampler_check_params): its reason, after the flag as typed
    (["-t", "-1"], "error: -t -1: it must be >= 0 (0 = greedy)"),
    (["--temp", "-1"], "error: --temp -1: it must be >= 0 (0 = greedy)"),
    (["-p", "1.0000001"], "error: -p 1.0000001: it must be in (0, 1] (1 = off)"),  # not rounded to 1 first
    (["-p", "0"], "error: -p 0: it must be in (0, 1] (1 = off)"),
    (["-p", "1.5"], "error: -p 1.5: it must be in (0, 1] (1 = off)"),
    (["-p", "-0.5"], "error: -p -0.5: it must be in (0, 1] (1 = off)"),
    (["--top-p", "0"], "error: --top-p 0: it must be in (0, 1] (1 = off)"),
    (["-k", "-1"], "error: -k -1: it must be >= 0 (0 = off)"),
    (["--top-k", "-3"], "error: --top-k -3: it must be >= 0 (0 = off)"),
    (["--min-p", "1.5"], "error: --min-p 1.5: it must be in [0, 1] (0 = off)"),
    (["--min-p", "1.0000001"], "error: --min-p 1.0000001: it must be in [0, 1] (0 = off)"),
    (["--min-p", "-0.1"], "error: --min-p -0.1: it must be in [0, 1] (0 = off)"),
    (["--min-p", "nan"], "error: --min-p nan: not a number"),
    (["--repeat-penalty", "-0.5"], "error: --repeat-penalty -0.5: it must be finite and >= 0 (1 or 0 = off)"),
    (["--repeat-penalty", "inf"], "error: --repeat-penalty inf: not a finite number"),
    (["--repeat-penalty", "x"], "error: --repeat-penalty x: not a number"),
    (["--repeat-last-n", "-1"], "error: --repeat-last-n -1: it must be in 0..1048576 (0 = no penalties)"),
    (["--repeat-last-n", "1048577"], "error: --repeat-last-n 1048577: it must be in 0..1048576 (0 = no penalties)"),
    (["--repeat-last-n", "1.5"], "error: --repeat-last-n 1.5: not a whole number"),
    (["--presence-penalty", "1e39"], "error: --presence-penalty 1e39: too large for a float (the largest is 3.4e+38)"),
    (["--presence-penalty", "-inf"], "error: --presence-penalty -inf: not a finite number"),
    (["--frequency-penalty", "nan"], "error: --frequency-penalty nan: not a number"),
    (["--frequency-penalty", ""], "error: --frequency-penalty : not a number"),
    (["--seed", "-1"], "error: --seed -1: the seed must be >= 0"),
    (["-m", "chat", "--chat-template", "zephyr"],
     "error: --chat-template zephyr: unknown chat template 'zephyr'; known: qa, llama-2, chatml"),
    (["--chat-template", "qa"], "error: --chat-template applies to chat mode only"),
    (["--stop"], "error: --stop needs a value"),
    (["--stop", "a"] * 65, "error: --stop a: too many stop strings (the most is 64)"),
    (["-k", "2.5"], "error: -k 2.5: not a whole number"),
    (["-k", "99999999999"], "error: -k 99999999999: too large (the largest is 2147483647)"),
    (["-n", "-5"], "error: -n -5: the number of tokens must be >= 0 (0 = up to seq_len)"),
    (["-n", "-99999999999"], "error: -n -99999999999: too small (the smallest is -2147483648)"),
    (["-T", "0"], "error: -T 0: threads must be in 1..256"),
    (["-T", "-1"], "error: -T -1: threads must be in 1..256"),
    (["-T", "100000"], "error: -T 100000: threads must be in 1..256"),
    (["-b", "0"], "error: -b 0: the batch must be in 1..1024 sequences"),
    (["-b", "1025"], "error: -b 1025: the batch must be in 1..1024 sequences"),
    (["-e", "2"], "error: -e 2: must be 0 or 1"),
    (["-s", "abc"], "error: -s abc: not a whole number"),
    (["-s", "-1"], "error: -s -1: the seed must be >= 0"),
    (["-s", "18446744073709551616"], "error: -s 18446744073709551616: too large (the largest is 18446744073709551614)"),
    (["-s", "18446744073709551615"], "error: -s 18446744073709551615: too large (the largest is 18446744073709551614)"),
    (["-m", "poem"], "error: -m poem: the mode must be generate or chat"),
    (["-q", "1"], "error: -q 1: the only quantization is int8"),
    (["-t"], "error: -t needs a value"),
    (["-x", "1"], "error: unknown option -x"),
    (["--temperature", "1"], "error: unknown option --temperature"),
    (["extra"], "error: unexpected argument 'extra': options come as -x VALUE"),
    (["-m", "chat", "-b", "2"], "error: -b applies to generate mode only"),
    (["--mmap=1"], "error: unknown option --mmap=1"),
    (["--mmap", "1"], "error: unexpected argument '1': options come as -x VALUE"),
]


@pytest.mark.parametrize("args, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_name_the_flag_and_value_then_print_usage(run_binary, make_model, args, message):
    files = make_model()
    r = run_cli(run_binary, files.model, *args)
    assert r.returncode == 1
    assert r.stdout == ""
    first, rest = r.stderr.split("\n", 1)
    assert first == message
    assert rest.startswith("Usage:")


@pytest.mark.parametrize("args", [["-t", "0"], ["-t", "-0"], ["-t", "1e-30"], ["-t", "3.4e38"],
                                  ["-p", "1"], ["-p", "1e-30"], ["-k", "0"], ["-n", "0"],
                                  ["-T", "1"], ["-T", "256"], ["-s", "18446744073709551614"],
                                  ["-s", "0"], ["-e", "0"], ["--min-p", "0"], ["--min-p", "1"],
                                  ["--repeat-penalty", "0"], ["--repeat-last-n", "0"],
                                  ["--repeat-last-n", "1048576"], ["--presence-penalty", "-3.4e38"],
                                  ["--frequency-penalty", "3.4e38"], ["--stop", "x"],
                                  ["-m", "chat", "--chat-template", "chatml"]])
def test_values_at_the_edges_are_accepted(run_binary, make_model, args):
    files = make_model()
    r = run_cli(run_binary, files.model, "-n", "4", *args)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("error") == 0


def test_missing_model_names_the_problem(run_binary):
    r = run_cli(run_binary)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: no model file given\nUsage:")
    r = run_cli(run_binary, "-n", "5")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: the model file comes first, before -n\nUsage:")
    r = run_cli(run_binary, "--mmap", "model.bin")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: the model file comes first, before --mmap\nUsage:")


def test_help_goes_to_stdout_with_units_and_defaults(run_binary, make_model, lib, ffi):
    files = make_model()
    for args in (["-h"], ["--help"], [files.model, "-h"], [files.model, "-n", "5", "--help"]):
        r = run_cli(run_binary, *args)
        assert r.returncode == 0 and r.stderr == ""
        assert r.stdout.startswith("Usage:")
    usage = r.stdout
    defaults = lib.ac_sampler_default_params()
    assert f"temperature (also --temp), >= 0 (0 = greedy); default {defaults.temperature:g}" in usage
    assert f"top-p (nucleus, also --top-p) in (0, 1] (1 = off); default {defaults.top_p:g}" in usage
    assert f"(0 = off); default {defaults.top_k}\n" in usage
    assert f"the likeliest, in [0, 1] (0 = off); default {defaults.min_p:g}\n" in usage
    assert f"negative), >= 0 (1 = off); default {defaults.repeat_penalty:g}\n" in usage
    assert f"penalties look at, 0..{2**20} (0 = none); default {defaults.repeat_last_n}\n" in usage
    assert f"the window (0 = off); default {defaults.presence_penalty:g}\n" in usage
    assert f"the window (0 = off); default {defaults.frequency_penalty:g}\n" in usage
    assert ("part of it; repeatable (up to 64, in chat with the\n"
            "                              template's own); default: none") in usage
    assert "chat: the template of the turns: qa, llama-2, chatml;" in usage
    assert "default: chatml if the vocabulary has <|im_start|>,\n" in usage
    assert "default 256" in usage
    assert "(0 = up to seq_len)" in usage
    assert f"threads, 1..256; default: all available cores ({lib.ac_default_threads()} here)" in usage
    assert "tok/s (tokens per second)" in usage
    assert "  --mmap      (no value) map the model file instead of reading it into memory\n" \
           "              (default: read); the file must then not be changed or truncated\n" in usage
    for flag in "tpksnizymTqobeL":
        assert f"  -{flag} <" in usage
    for flag in ("min-p", "repeat-penalty", "repeat-last-n", "presence-penalty", "frequency-penalty", "stop",
                 "chat-template"):
        assert f"  --{flag} <" in usage
    # the usage printed after an error is the same text, on stderr
    bad = run_cli(run_binary, files.model, "-x", "1")
    assert bad.stderr.split("\n", 1)[1] == usage


def test_version_comes_from_the_library(run_binary, lib, ffi):
    r = run_cli(run_binary, "--version")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == f"arianna_c {ffi.string(lib.ac_version()).decode()}\n"


def test_load_errors_exit_1_with_message(run_binary, make_model, tmp_path):
    r = run_cli(run_binary, tmp_path / "missing.bin")
    assert r.returncode == 1 and "missing.bin: cannot open model file" in r.stderr
    files = make_model()
    short = tmp_path / "short.bin"
    short.write_bytes(files.model.read_bytes()[:1000])
    shutil.copy(files.tokenizer, tmp_path / "tokenizer.bin")
    r = run_cli(run_binary, short)
    assert r.returncode == 1
    assert "short.bin: file is 1000 bytes, header implies" in r.stderr
    wrong = write_synthetic_tokenizer(tmp_path / "wrong.bin", 400)
    r = run_cli(run_binary, files.model, "-z", wrong)
    assert r.returncode == 1
    assert "wrong.bin: tokenizer has 400 pieces but the model's vocab_size is 320" in r.stderr


def test_tokenizer_resolution(run_binary, make_model, tmp_path):
    files = make_model(tokenizer_name="tok4096.bin")
    folder = files.model.parent
    # default: tokenizer.bin (absent) then tok4096.bin in the model's folder
    assert run_cli(run_binary, files.model, "-n", "3").returncode == 0
    # -z NAME inside the model's folder, with and without .bin, from another cwd
    assert run_cli(run_binary, files.model, "-z", "tok4096", "-n", "3", cwd=tmp_path).returncode == 0
    assert run_cli(run_binary, files.model, "-z", "tok4096.bin", "-n", "3", cwd=tmp_path).returncode == 0
    # -z NAME relative to the working directory first
    other = tmp_path / "elsewhere"
    other.mkdir()
    write_synthetic_tokenizer(other / "mytok.bin", files.cfg.vocab_size)
    assert run_cli(run_binary, files.model, "-z", "mytok", "-n", "3", cwd=other).returncode == 0
    assert run_cli(run_binary, files.model, "-z", str(other / "mytok"), "-n", "3").returncode == 0
    # not found: every path tried is listed
    r = run_cli(run_binary, files.model, "-z", "nothere", cwd=tmp_path)
    assert r.returncode == 1
    for tried in ("nothere", "nothere.bin", f"{folder}/nothere", f"{folder}/nothere.bin"):
        assert tried in r.stderr
    (folder / "tok4096.bin").unlink()
    r = run_cli(run_binary, files.model)
    assert r.returncode == 1
    assert f"{folder}/tokenizer.bin" in r.stderr and f"{folder}/tok4096.bin" in r.stderr


def test_relative_model_path_finds_its_tokenizer(run_binary, make_model):
    files = make_model()
    r = run_cli(run_binary, "model.bin", "-n", "3", cwd=files.model.parent)
    assert r.returncode == 0, r.stderr


def test_chat_mode_answers_every_turn(run_binary, scripted_model):
    """Each line of stdin is a turn, answered until the model ends the text; the end of stdin
    ends the chat.  The space the template leaves before an answer is not printed."""
    # after the ":" of the qa template's "A:" the model says " ok", then ends the text
    files = scripted_model([byte_id(ord(":")), piece_id(b" "), piece_id(b"o"), piece_id(b"k"), 2], seq_len=128)
    r = run_cli(run_binary, files.model, "-m", "chat", "-y", "be brief", "-n", "5", "-t", "0",
                stdin="hello\nand again\n")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == "User: Assistant: ok\nUser: Assistant: ok\nUser: "
    # without -y the system prompt is asked first; no stdin at all ends the chat cleanly
    r = run_cli(run_binary, files.model, "-m", "chat", "-n", "5")
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "Enter system prompt (optional): User: ")


def python_chat(model, template, system, turns, **settings) -> str:
    """The transcript ./run -m chat prints for turns, written from arianna_c's Chat."""
    from arianna_c.session import Chat

    with Chat(model, template=template, system=system) as conversation:
        answers = [conversation.say(turn, **settings).text for turn in turns]
    return "".join(f"User: Assistant: {a}\n" for a in answers) + "User: "


TURNS = ["hello", "and the river?", "why"]
CHAT_SETTINGS = [([], {}),
                 (["--repeat-penalty", "1.5", "--presence-penalty", "0.5", "--min-p", "0.05", "-t", "0.8"],
                  dict(repeat_penalty=1.5, presence_penalty=0.5, min_p=0.05, temperature=0.8))]


@pytest.mark.parametrize("template", ["qa", "llama-2", "chatml"])
@pytest.mark.parametrize("flags, settings", CHAT_SETTINGS, ids=["defaults", "penalties"])
def test_chat_transcript_equals_arianna_c_chat(run_binary, make_model, template, flags, settings):
    """Every answer of a conversation, turns and answers rendered by the library's template, is
    the one arianna_c's Chat gives with the same seed and settings (each answer starting again
    from the seed); the first is Model.chat's for those messages."""
    from arianna_c import Model

    files = make_model(seed=5, seq_len=256)
    r = run_cli(run_binary, files.model, "-m", "chat", "--chat-template", template, "-y", "Be brief.", "-n", "8",
                "-s", "3", *flags, stdin="\n".join(TURNS) + "\n")
    assert (r.returncode, r.stderr) == (0, "")
    with Model(files.model, files.tokenizer) as m:
        want = python_chat(m, template, "Be brief.", TURNS, seed=3, max_new_tokens=8, **settings)
        first = m.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": TURNS[0]}],
                       template, seed=3, max_new_tokens=8, **settings).text
    assert r.stdout.count("Assistant: ") == 3 and r.stdout == want
    assert r.stdout.startswith(f"User: Assistant: {first}\nUser: ")


def test_chat_answers_differ_by_template(run_binary, make_model):
    files = make_model(seed=5, seq_len=256)
    outputs = {t: run_cli(run_binary, files.model, "-m", "chat", "--chat-template", t, "-y", "", "-n", "8", "-s", "3",
                          stdin="hello\n").stdout for t in ("qa", "llama-2", "chatml")}
    assert len(set(outputs.values())) == 3, outputs


def test_chat_template_default_comes_from_the_vocabulary(run_binary, make_model, tmp_path):
    """The library's rule, as for arianna_c: ChatML when the vocabulary has <|im_start|>, else qa."""
    from arianna_c import Model, formats
    from arianna_c.session import chat_template

    from conftest import synthetic_tokenizer

    files = make_model(seed=5, seq_len=256)
    args = [files.model, "-m", "chat", "-y", "", "-n", "8", "-s", "3"]
    plain = run_cli(run_binary, *args, stdin="hello\n")
    assert plain.stdout == run_cli(run_binary, *args, "--chat-template", "qa", stdin="hello\n").stdout
    pieces, scores = synthetic_tokenizer(files.cfg.vocab_size)
    pieces[-1] = b"<|im_start|>"
    formats.write_tokenizer(files.tokenizer, pieces, scores)
    with Model(files.model, files.tokenizer) as m:
        assert chat_template(m).name == "chatml"
    chatml = run_cli(run_binary, *args, stdin="hello\n")
    assert chatml.returncode == 0, chatml.stderr
    assert chatml.stdout == run_cli(run_binary, *args, "--chat-template", "chatml", stdin="hello\n").stdout
    assert chatml.stdout != run_cli(run_binary, *args, "--chat-template", "qa", stdin="hello\n").stdout


def test_chat_mode_stops_when_context_is_full(run_binary, make_model):
    files = make_model(seed=6, seq_len=32)
    r = run_cli(run_binary, files.model, "-m", "chat", "-y", "", "-n", "100", "-s", "1",
                stdin="a\nb\nc\nd\ne\nf\ng\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n(the context is full)\n") and r.stdout.count("context is full") == 1


def test_chat_turn_too_long_says_so_and_the_conversation_goes_on(run_binary, make_model):
    from arianna_c import Model
    from arianna_c.chat import TEMPLATES
    from arianna_c.session import chat_prompt

    files = make_model(seed=6, seq_len=64)
    long_turn = " ".join(["word"] * 30)
    r = run_cli(run_binary, files.model, "-m", "chat", "-y", "", "-n", "2", "-s", "1", "-t", "0",
                stdin=f"hi\n{long_turn}\nok\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    notes = re.findall(r"\(this turn is too long: with it the conversation is (\d+) tokens, and the context "
                       r"holds 63 \(one left for the answer\); the conversation goes on\)\n", r.stdout)
    assert len(notes) == 1, r.stdout
    first_answer = r.stdout.split("Assistant: ")[1].split("\n")[0]
    with Model(files.model, files.tokenizer) as m:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first_answer},
                    {"role": "user", "content": long_turn}]
        assert int(notes[0]) == len(chat_prompt(m, messages, TEMPLATES["qa"])) > 63
    # the turns before and after are answered
    assert r.stdout.count("Assistant: ") == 2
    assert r.stdout.index("Assistant: ") < r.stdout.index("too long") < r.stdout.rindex("Assistant: ")
    assert "context is full" not in r.stdout


def test_chat_first_turn_too_long_keeps_the_system_prompt_for_the_next(run_binary, make_model):
    """The system prompt rides with the first turn the model accepts: a refused first turn
    does not lose it (the answer equals a conversation that starts with the short turn)."""
    files = make_model(seed=6, seq_len=64)
    args = ["-m", "chat", "-y", "be", "-n", "4", "-t", "0"]
    refused_first = run_cli(run_binary, files.model, *args, stdin=" ".join(["word"] * 30) + "\nhi\n")
    direct = run_cli(run_binary, files.model, *args, stdin="hi\n")
    without_system = run_cli(run_binary, files.model, "-m", "chat", "-y", "", "-n", "4", "-t", "0", stdin="hi\n")
    assert refused_first.returncode == direct.returncode == 0
    assert "too long" in refused_first.stdout
    answer = lambda out: out.split("Assistant: ")[1].split("\n")[0]  # noqa: E731
    assert answer(refused_first.stdout) == answer(direct.stdout) != answer(without_system.stdout)


def test_chat_reads_lines_of_any_length(run_binary, make_model):
    """A line longer than any fixed buffer is one turn (refused as too long), not several."""
    files = make_model(seed=6, seq_len=64)
    r = run_cli(run_binary, files.model, "-m", "chat", "-y", "", "-n", "2", stdin="ab" * 5000 + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("too long") == 1
    assert "Assistant: " not in r.stdout


def c_chat_tokens(lib, ffi, template: str, tok, messages: list, cap: int) -> tuple[int, list]:
    """ac_chat_tokens: (result code, the ids written, or the count needed as one number)."""
    keep = [ffi.new("char[]", m[k].encode()) for m in messages for k in ("role", "content")]
    c = ffi.new("ac_chat_message[]", max(len(messages), 1))
    for i, m in enumerate(messages):
        c[i].role, c[i].content, c[i].content_len = keep[2 * i], keep[2 * i + 1], len(m["content"].encode())
    out, n = ffi.new("int[]", max(cap, 1)), ffi.new("int *")
    rc = lib.ac_chat_tokens(lib.ac_chat_template_get(template.encode()), tok, c, len(messages), 1, out, cap, n)
    return rc, (list(out[0:n[0]]) if rc == 0 else [n[0]])


def test_library_chat_tokens_are_what_arianna_c_feeds(lib, ffi, make_model):
    """The tokens ./run feeds for a conversation are the ones arianna_c's chat_prompt gives."""
    import random

    from arianna_c import Model
    from arianna_c.chat import TEMPLATES
    from arianna_c.session import chat_prompt

    files = make_model(seq_len=256)
    words = ["", "hi", "</s>", "<s>", "{content}", "\u00e9 \u00fc", "x\ny", " lead"]
    rng = random.Random(1)
    rc, tok = load_tokenizer(lib, ffi, files.tokenizer, files.cfg.vocab_size)
    assert rc == 0
    with Model(files.model, files.tokenizer) as m:
        for _ in range(60):
            messages = [{"role": "system", "content": rng.choice(words)}] if rng.random() < 0.5 else []
            messages += [{"role": rng.choice(["user", "assistant"]), "content": rng.choice(words)}
                         for _ in range(rng.randint(0 if messages else 1, 3))]
            for name in TEMPLATES:
                want = chat_prompt(m, messages, TEMPLATES[name])
                assert c_chat_tokens(lib, ffi, name, tok, messages, 256) == (0, want)
                if len(want) > 1:
                    assert c_chat_tokens(lib, ffi, name, tok, messages, len(want) - 1) == \
                        (lib.AC_ERR_RANGE, [len(want)])
        bad = [([], "messages is empty"), ([{"role": "robot", "content": "x"}], "messages[0].role 'robot' is invalid"),
               ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                "messages[1] is a system message: only the first message may be one")]
        for messages, message in bad:
            assert c_chat_tokens(lib, ffi, "qa", tok, messages, 16)[0] == lib.AC_ERR_ARG
            assert message in last_error(lib, ffi)
    lib.ac_tokenizer_free(tok)


def test_library_chat_tokens_refuse_a_message_too_long_to_encode(lib, ffi, make_model):
    """A message above ac_encode's limit (INT_MAX / 4 bytes) is an error, not a prompt without it."""
    files = make_model(seq_len=64)
    rc, tok = load_tokenizer(lib, ffi, files.tokenizer, files.cfg.vocab_size)
    assert rc == 0
    size = (2**31 - 1) // 4 + 1
    role, content = ffi.new("char[]", b"user"), ffi.new("char[]", size)
    message = ffi.new("ac_chat_message[]", 1)
    message[0].role, message[0].content, message[0].content_len = role, content, size
    out, n = ffi.new("int[]", 64), ffi.new("int *")
    rc = lib.ac_chat_tokens(lib.ac_chat_template_get(b"qa"), tok, message, 1, 1, out, 64, n)
    assert rc == lib.AC_ERR_RANGE
    assert "bytes is too long" in last_error(lib, ffi)
    lib.ac_tokenizer_free(tok)


# ---------------------------------------------------------------------------- sampling settings and stop strings

# (flags, the same settings for arianna_c): each changes the text, as it does for Model.generate
SAMPLING = [
    (["--min-p", "0.2"], dict(min_p=0.2)),
    (["--repeat-penalty", "1.8"], dict(repeat_penalty=1.8)),
    (["--repeat-penalty", "1.8", "--repeat-last-n", "3"], dict(repeat_penalty=1.8, repeat_last_n=3)),
    (["--presence-penalty", "1.5"], dict(presence_penalty=1.5)),
    (["--frequency-penalty", "1.5"], dict(frequency_penalty=1.5)),
    (["--temp", "0.6", "--top-k", "8", "--top-p", "0.7"], dict(temperature=0.6, top_k=8, top_p=0.7)),
]


@pytest.mark.parametrize("flags, settings", SAMPLING, ids=[" ".join(f) for f, _ in SAMPLING])
def test_sampling_flags_generate_what_python_does(run_binary, make_model, flags, settings):
    from arianna_c import Model

    files = make_model(seed=1)
    base = [files.model, "-n", "40", "-i", "the cat", "-s", "3"]
    plain = run_cli(run_binary, *base)
    r = run_cli(run_binary, *base, *flags)
    batch = run_cli(run_binary, *base, *flags, "-b", "2")
    assert r.returncode == batch.returncode == 0, r.stderr + batch.stderr
    with Model(files.model, files.tokenizer) as m:
        want = m.generate("the cat", max_new_tokens=40, seed=3, **settings)
        want_batch = m.generate_batch(["the cat"] * 2, max_new_tokens=40, seed=3, **settings)
        assert want != m.generate("the cat", max_new_tokens=40, seed=3)  # the setting matters here
    assert r.stdout == "the cat" + want + "\n" != plain.stdout
    assert batch.stdout == "".join(f"=== sequence {i} (seed {3 + i}) ===\nthe cat{t}\n"
                                   for i, t in enumerate(want_batch))


def test_long_names_are_the_short_flags(run_binary, make_model):
    files = make_model(seed=1)
    short = run_cli(run_binary, files.model, "-n", "30", "-t", "0.7", "-k", "9", "-p", "0.8", "-s", "11")
    long = run_cli(run_binary, files.model, "-n", "30", "--temp", "0.7", "--top-k", "9", "--top-p", "0.8",
                   "--seed", "11")
    assert short.returncode == long.returncode == 0
    assert short.stdout == long.stdout


def ascii_stop(text: str, after: int = 6) -> str:
    """Two printable ASCII characters that first occur in text at or after index after (a stop
    string that cuts it there)."""
    for i in range(after, len(text) - 1):
        pair = text[i:i + 2]
        if pair.isascii() and pair.isprintable() and pair.strip() == pair and text.find(pair) == i:
            return pair
    raise AssertionError(f"no ASCII pair in {text!r}")


def test_stop_strings_end_the_text_as_in_python(run_binary, make_model):
    from arianna_c import Model

    files = make_model(seed=1)
    base = [files.model, "-n", "60", "-i", "the cat", "-s", "3", "-t", "1", "--repeat-penalty", "1"]
    plain = dict(temperature=1.0, repeat_penalty=1.0)  # plain sampling: a long text to cut
    with Model(files.model, files.tokenizer) as m:
        full = m.generate("the cat", max_new_tokens=60, seed=3, **plain)
        stop = ascii_stop(full)
        other = ascii_stop(full, full.index(stop) + 4)
        want = m.generate("the cat", max_new_tokens=60, seed=3, stop=[other, stop], **plain)
        want_batch = m.generate_batch(["the cat"] * 3, max_new_tokens=60, seed=3, stop=[stop], **plain)
    assert want == full[:full.index(stop)]  # the earlier one ends it, and it is not printed
    r = run_cli(run_binary, *base, "--stop", other, "--stop", stop)
    assert (r.returncode, r.stdout) == (0, "the cat" + want + "\n"), r.stderr
    batch = run_cli(run_binary, *base, "--stop", stop, "-b", "3")
    assert batch.returncode == 0, batch.stderr
    assert batch.stdout == "".join(f"=== sequence {i} (seed {3 + i}) ===\nthe cat{t}\n"
                                   for i, t in enumerate(want_batch))
    never = run_cli(run_binary, *base, "--stop", "\x01\x02 never")
    assert never.stdout == "the cat" + full + "\n"


def test_stop_strings_end_chat_answers_as_in_python(run_binary, make_model):
    from arianna_c import Model

    files = make_model(seed=5, seq_len=256)
    args = [files.model, "-m", "chat", "-y", "", "-n", "12", "-s", "3"]
    with Model(files.model, files.tokenizer) as m:
        free = python_chat(m, "qa", None, TURNS[:2], seed=3, max_new_tokens=12)
        stop = ascii_stop(free.split("Assistant: ")[1], 2)
        want = python_chat(m, "qa", None, TURNS[:2], seed=3, max_new_tokens=12, stop=[stop])
    assert want != free
    r = run_cli(run_binary, *args, "--stop", stop, stdin="\n".join(TURNS[:2]) + "\n")
    assert (r.returncode, r.stdout) == (0, want), r.stderr


def test_a_stop_string_the_library_refuses_is_named(run_binary, make_model):
    files = make_model()
    for extra in ([], ["-b", "2"], ["-m", "chat", "-y", ""]):
        r = run_cli(run_binary, files.model, "-n", "4", "--stop", "", *extra)
        assert (r.returncode, r.stdout) == (1, ""), r.stderr
        assert error_lines(r.stderr) == ["error: --stop: stop string 0 is invalid: it must be 1..4096 bytes"]


def test_chat_counts_the_templates_stop_strings_against_the_limit(run_binary, make_model):
    files = make_model()
    limit = header_constant("AC_MAX_STOPS")
    stops = [a for i in range(limit) for a in ("--stop", f"s{i}")]
    r = run_cli(run_binary, files.model, "-n", "4", *stops, stdin="hi\n")  # generate: all of them fit
    assert r.returncode == 0, r.stderr
    r = run_cli(run_binary, files.model, "-n", "4", "-m", "chat", "-y", "", "--chat-template", "qa", *stops,
                stdin="hi\n")
    assert (r.returncode, r.stdout) == (1, ""), r.stderr
    assert error_lines(r.stderr) == [f"error: --stop: {limit} stop strings and 1 more from the chat template "
                                     f"are {limit + 1}; at most {limit}"]


# ---------------------------------------------------------------------------- the model file: read or mapped


def chat_until_asked(run_binary: Path, model: Path, *flags: str) -> subprocess.Popen:
    """./run in chat mode (greedy, no system prompt), once it asks for the first turn: by then
    the model is loaded and nothing has run through it yet."""
    proc = subprocess.Popen([str(run_binary), str(model), "-m", "chat", "-y", "", "-t", "0", "-n", "12",
                             *flags],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert read_stdout_until(proc, b"User: ") == b"User: "
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def answer_and_end(proc: subprocess.Popen, turn: bytes = b"the thing\n") -> bytes:
    """Sends one turn, ends stdin and returns the rest of stdout (exit 0 checked)."""
    try:
        out, err = proc.communicate(turn, timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err.decode("utf-8", "replace")
    return out


def test_mmap_maps_the_model_file_and_answers_the_same(run_binary, make_model):
    files = make_model(seed=5)
    answers = {}
    for flags in ((), ("--mmap",)):
        proc = chat_until_asked(run_binary, files.model, *flags)
        mapped = mappings_of(files.model, proc.pid)
        answers[flags] = answer_and_end(proc)
        assert (mapped > 0) == bool(flags), f"{flags}: {mapped} mappings of the model file"
    assert b"Assistant: " in answers[()]
    assert answers[("--mmap",)] == answers[()]


def test_mmap_lets_a_rewritten_file_reach_the_running_model(run_binary, make_model):
    """What --help warns about: with --mmap, bytes rewritten in place are the weights the run
    uses from then on (without --mmap the run keeps what it read: tests/test_bad_inputs.py)."""
    files, other = make_model(seed=5), make_model(seed=6)
    own = answer_and_end(chat_until_asked(run_binary, files.model))
    theirs = answer_and_end(chat_until_asked(run_binary, other.model))
    assert own != theirs
    proc = chat_until_asked(run_binary, files.model, "--mmap")
    with open(files.model, "r+b") as f:  # the same inode, so the mapping sees the new bytes
        f.write(other.model.read_bytes())
    assert answer_and_end(proc) == theirs


@pytest.mark.parametrize("extra", [[], ["-q", "int8"], ["-b", "2"], ["-e", "1", "-T", "1"]],
                         ids=["float32", "int8", "batch", "ignore-eos"])
def test_mmap_generates_what_reading_does(run_binary, make_model, extra):
    files = make_model(seed=8, dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2)  # int8 groups of 32
    args = [files.model, "-n", "20", "-s", "4", "-i", "the", *extra]
    read = run_cli(run_binary, *args)
    assert read.returncode == 0, read.stderr
    for mapped_args in ([*args, "--mmap"], [files.model, "--mmap", *args[1:]]):  # last, or first
        mapped = run_cli(run_binary, *mapped_args)
        assert mapped.returncode == 0, mapped.stderr
        assert mapped.stdout == read.stdout


# ---------------------------------------------------------------------------- stdout failures

# (name, arguments after the model, stdin): every mode writes text to stdout
WRITERS = [
    ("generate", ["-n", "8", "-s", "1"], ""),
    ("generate-empty", ["-n", "1", "-t", "0"], ""),
    ("batch", ["-n", "8", "-b", "2", "-s", "1"], ""),
    ("chat", ["-m", "chat", "-y", "", "-n", "3", "-s", "1"], "hello\n"),
    ("help", ["-h"], ""),
    ("version", ["--version"], ""),
]


def writer_args(files, args: list) -> list:
    return args if args[0] in ("-h", "--version") else [files.model, *args]


def assert_write_failure(status: int, stderr: str, code: int) -> None:
    assert status == 1, stderr
    assert error_lines(stderr) == [f"error: write to stdout failed: {os.strerror(code)}"]
    assert "tok/s" not in stderr


@pytest.mark.parametrize("name, args, stdin", WRITERS, ids=[w[0] for w in WRITERS])
def test_full_disk_is_an_error(run_binary, make_model, name, args, stdin):
    files = make_model(seed=3)
    with open("/dev/full", "wb") as full:
        status, stderr = run_into(run_binary, writer_args(files, args), full, stdin)
    assert_write_failure(status, stderr, errno.ENOSPC)


@pytest.mark.parametrize("name, args, stdin", WRITERS, ids=[w[0] for w in WRITERS])
def test_closed_stdout_is_an_error(run_binary, make_model, name, args, stdin):
    files = make_model(seed=3)
    r = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", str(run_binary),
                        *map(str, writer_args(files, args))],
                       input=stdin.encode(), stderr=subprocess.PIPE, timeout=60)
    assert_write_failure(r.returncode, r.stderr.decode(), errno.EBADF)


@pytest.mark.parametrize("name, args, stdin", WRITERS, ids=[w[0] for w in WRITERS])
def test_reader_gone_with_sigpipe_ignored_is_an_error(run_binary, make_model, name, args, stdin):
    """A pipe whose reader has exited (EPIPE): the child inherits Python's ignored SIGPIPE
    (restore_signals=False), so the write fails instead of killing the process."""
    files = make_model(seed=3)
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader at all: the very first write fails, with no race
    try:
        status, stderr = run_into(run_binary, writer_args(files, args), write_end, stdin,
                                  restore_signals=False)
    finally:
        os.close(write_end)
    assert_write_failure(status, stderr, errno.EPIPE)



# ---------------------------------------------------------------------------- memory limits


def limited(address_space_mib: int, stack_mib: int = 8):
    """preexec_fn: an address-space limit (RLIMIT_AS), and the stack size every new thread
    reserves (glibc takes it from RLIMIT_STACK)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_STACK, (stack_mib << 20, resource.getrlimit(resource.RLIMIT_STACK)[1]))
        resource.setrlimit(resource.RLIMIT_AS, (address_space_mib << 20, address_space_mib << 20))

    return apply


needs_plain_binary = pytest.mark.skipif(
    bool(os.environ.get("ARIANNA_C_RUN")), reason="sanitizer builds reserve terabytes of address space")


@needs_plain_binary
def test_cli_allocation_failure_says_what_was_being_allocated(run_binary, make_model):
    files = make_model(seq_len=8192)
    r = run_cli(run_binary, files.model, "-b", "1024", "-n", "0", preexec_fn=limited(24))
    assert r.returncode == 1 and r.stdout == ""
    assert error_lines(r.stderr) == [
        "error: out of memory for the tokens of 1024 sequences of up to 8192 tokens (32.0 MiB)"]


@needs_plain_binary
def test_one_thread_starts_no_other_thread_under_a_low_memory_limit(run_binary, make_model, lib):
    if lib.ac_default_threads() < 2:
        pytest.skip("one CPU here: the default pool is a single thread, so nothing tells the two apart")
    files = make_model()
    # every thread reserves its 64 MiB stack: a second thread cannot start within 40 MiB
    limit = limited(40, stack_mib=64)
    default = run_cli(run_binary, files.model, "-n", "3", preexec_fn=limit)
    assert default.returncode == 1
    assert error_lines(default.stderr) == [
        f"error: cannot start {lib.ac_default_threads()} threads (out of memory or thread limit)"]
    for extra in ([], ["-b", "2"]):
        one = run_cli(run_binary, files.model, "-n", "3", "-T", "1", *extra, preexec_fn=limit)
        assert one.returncode == 0, one.stderr
