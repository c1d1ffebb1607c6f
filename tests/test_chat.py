"""Chat templates (data), their rendering and tokens, Model.chat, and the Chat loop that keeps
its session (prefix reuse, context shift) and the `arianna-c chat` command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from arianna_c import AriannaError, Model, SamplingParams, chat
from arianna_c.chat import BOS, EOS, TEMPLATES, Special
from arianna_c.session import Chat, Session, chat_completion, chat_prompt, chat_template
from capi import last_error, load_model, load_tokenizer, read_stdout_until, run_cli

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is resonance?"},
    {"role": "assistant", "content": "Agreement."},
    {"role": "user", "content": "And the river?"},
]


def test_qa_template():
    parts = chat.render(TEMPLATES["qa"], CONVERSATION)
    assert parts == [BOS, "Be brief.\nQ: What is resonance?\nA: Agreement.\nQ: And the river?\nA:"]
    assert chat.render(TEMPLATES["qa"], CONVERSATION[1:2]) == [BOS, "Q: What is resonance?\nA:"]


def test_llama2_template_puts_the_system_prompt_in_the_first_turn():
    parts = chat.render(TEMPLATES["llama-2"], CONVERSATION)
    assert parts == [BOS, "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is resonance? [/INST] Agreement. ", EOS,
                     BOS, "[INST] And the river? [/INST]"]
    assert chat.render(TEMPLATES["llama-2"], CONVERSATION[1:2]) == [BOS, "[INST] What is resonance? [/INST]"]


def test_chatml_template():
    parts = chat.render(TEMPLATES["chatml"], CONVERSATION[:2])
    assert parts == [BOS, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is resonance?<|im_end|>\n"
                          "<|im_start|>assistant\n"]


def test_markers_in_messages_are_text():
    parts = chat.render(TEMPLATES["llama-2"], [{"role": "user", "content": "say </s> and <s>"}])
    assert parts == [BOS, "[INST] say </s> and <s> [/INST]"]


def test_template_choice():
    assert chat.choose_template("chatml").name == "chatml"
    assert chat.choose_template(None, ["<unk>", "<|im_start|>", "a"]).name == "chatml"
    assert chat.choose_template(None, ["<unk>", " the"]).name == "qa"
    with pytest.raises(ValueError, match="unknown chat template 'zephyr'; known: qa, llama-2, chatml"):
        chat.choose_template("zephyr")


@pytest.mark.parametrize("messages, error, word", [
    ([], ValueError, "empty"),
    ("hello", TypeError, "list"),
    ([{"role": "robot", "content": "x"}], ValueError, "messages[0].role"),
    ([{"role": "user", "content": 3}], TypeError, "messages[0].content"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], ValueError, "messages[1]"),
    (["hi"], TypeError, "messages[0]"),
])
def test_bad_messages(messages, error, word):
    with pytest.raises(error) as e:
        chat.render(TEMPLATES["qa"], messages)
    assert word in str(e.value)


@pytest.fixture
def model(make_model):
    with Model(make_model(seed=5, seq_len=128).model) as m:
        yield m


def test_prompt_tokens_encode_text_between_special_tokens(model):
    """Each text part of a rendered prompt is encoded on its own, so the text after a special
    token gets SentencePiece's dummy prefix (as llama.cpp tokenizes such prompts)."""
    first, second = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is resonance? [/INST] Agreement. ", \
        "[INST] And the river? [/INST]"
    assert chat.render(TEMPLATES["llama-2"], CONVERSATION) == [BOS, first, EOS, BOS, second]
    want = [1] + model.encode(first, bos=False) + [2, 1] + model.encode(second, bos=False)
    assert chat_prompt(model, CONVERSATION, TEMPLATES["llama-2"]) == want
    assert Special(2) == EOS


def test_model_vocabulary_picks_qa(model):
    assert chat_template(model).name == "qa"


def test_chat_completion_is_a_session_on_the_rendered_prompt(model):
    messages = CONVERSATION[1:2]
    reply = chat_completion(model, messages, seed=3, max_new_tokens=20)
    tokens = chat_prompt(model, messages, TEMPLATES["qa"])
    assert tokens == [1] + model.encode("Q: What is resonance?\nA:", bos=False)
    with Session(model) as s:
        s.feed_tokens(tokens)
        alone = s.generate(seed=3, max_new_tokens=20, stop=["\nQ:"])
    assert reply.text == alone.text.lstrip() and reply.tokens == alone.tokens
    assert model.chat(messages, seed=3, max_new_tokens=20).text == reply.text


def test_chat_keeps_its_session_and_matches_a_stateless_call(model):
    with Chat(model, system="Be brief.") as conversation:
        first = conversation.say("What is resonance?", seed=1, max_new_tokens=12)
        kept_before = conversation.session.position
        second = conversation.say("And the river?", seed=2, max_new_tokens=12)
        messages = list(conversation.messages)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == first.text and messages[4]["content"] == second.text
    assert kept_before > 0
    again = chat_completion(model, messages[:4], seed=2, max_new_tokens=12)
    assert again.text == second.text


def test_chat_reuses_the_cached_prefix(model, monkeypatch):
    with Chat(model) as conversation:
        conversation.say("What is resonance?", seed=1, max_new_tokens=6)
        run = []
        original = conversation.session.slots.prefill

        def spy(seq, tokens, pos):
            run.append((pos, len(tokens)))
            return original(seq, tokens, pos)

        monkeypatch.setattr(conversation.session.slots, "prefill", spy)
        conversation.say("And the river?", seed=2, max_new_tokens=6)
    # one prefill, of the part after what the context already held
    assert len(run) == 1 and run[0][0] > 0


def test_context_shift_drops_the_oldest_turns_and_keeps_the_system_prompt(make_model):
    with Model(make_model(seed=5, seq_len=64).model) as m, Chat(m, system="sys") as conversation:
        for i in range(12):
            reply = conversation.say(f"turn {i} of the talk", seed=i, max_new_tokens=8)
            assert conversation.session.position <= 64
        assert conversation.messages[0] == {"role": "system", "content": "sys"}
        assert conversation.messages[-2] == {"role": "user", "content": "turn 11 of the talk"}
        assert len(conversation.messages) < 1 + 2 * 12
        assert reply.finish_reason in ("stop", "length")


def test_a_turn_too_long_is_an_error_and_the_talk_goes_on(make_model):
    with Model(make_model(seed=5, seq_len=64).model) as m, Chat(m) as conversation:
        conversation.say("hello", seed=1, max_new_tokens=4)
        before = list(conversation.messages)
        with pytest.raises(AriannaError) as e:
            conversation.say("the river " * 40, max_new_tokens=4)
        assert e.value.name == "AC_ERR_RANGE" and "the turn is" in str(e.value)
        assert conversation.messages == before
        conversation.say("again", seed=2, max_new_tokens=4)


def test_cli_chat_reads_turns_from_stdin(make_model, built):
    files = make_model(seed=5, seq_len=128)
    run = subprocess.run([sys.executable, "-m", "arianna_c.cli", "chat", str(files.model), "-s", "4", "-n", "10"],
                         input="What is resonance?\n\n", capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    with Model(files.model) as m:
        expected = chat_completion(m, [{"role": "user", "content": "What is resonance?"}], seed=4, max_new_tokens=10)
    assert run.stdout == expected.text + "\n"


# ---------------------------------------------------------------------------- the library's conversation

def c_push(lib, ffi, reply, data: bytes, final: bool) -> bytes:
    """ac_chat_reply_push: the text it says is final now."""
    text, size = ffi.new("const char **"), ffi.new("size_t *")
    assert lib.ac_chat_reply_push(reply, data, len(data), int(final), text, size) == 0
    return ffi.unpack(text[0], size[0])


def test_reply_text_is_pythons_decode_without_the_leading_whitespace(lib, ffi):
    """Streamed in pieces cut anywhere, a reply's text is what Python's decode with
    errors="replace" then lstrip() gives for the whole of its bytes."""
    import random

    rng = random.Random(7)
    alphabet = [b" ", b"\n", b"\t", b"a", b"\xc2\xa0", b"\xe2\x80\x83", b"\xe3\x80\x80", b"\xc3\xa9",
                b"\xf0\x9f\x98\x80", b"\xe2\x82", b"\xf0\x9f", b"\x80", b"\xff", b"\xed\xa0\x80", b"\xc0\xaf",
                b"\xf4\x90\x80\x80", b"\xe0\x80"]  # whitespace, characters, cut and ill-formed sequences
    reply = ffi.new("ac_chat_reply **")
    for _ in range(400):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 4))))
        assert lib.ac_chat_reply_create(reply) == 0
        pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        got = b"".join(c_push(lib, ffi, reply[0], p, False) for p in pieces) + c_push(lib, ffi, reply[0], b"", True)
        lib.ac_chat_reply_free(reply[0])
        assert got.decode("utf-8") == data.decode("utf-8", "replace").lstrip(), data


def test_reply_whitespace_is_pythons_isspace():
    points = [cp for cp in range(0x3100) if not 0xD800 <= cp < 0xE000] + [0xFEFF, 0xFFFD, 0x10000, 0x1F600, 0x10FFFF]
    for cp in points:
        text = chr(cp) + "x"
        assert chat.reply_text(text) == text.lstrip(), hex(cp)
    reply = chat.Reply()
    assert [reply.push(t) for t in (" ", "\u3000", "A", " b")] == ["", "", "A", " b"]


class CConversation:
    """A library ac_conversation driven through the C API (ac_conversation_say / _next)."""

    def __init__(self, lib, ffi, model, tok, template: str, system: str = ""):
        self.lib, self.ffi = lib, ffi
        out = ffi.new("ac_conversation **")
        assert lib.ac_conversation_create(model, tok, lib.ac_chat_template_get(template.encode()), out) == 0
        self.c = out[0]
        if system:
            assert lib.ac_conversation_add(self.c, b"system", system.encode(), len(system.encode())) == 0

    def say(self, text: str, **settings):
        """(result code, the turn's ac_conversation_turn, the reply's text, its tokens)."""
        from arianna_c.runtime import _c_params

        lib, ffi = self.lib, self.ffi
        turn, data = ffi.new("ac_conversation_turn *"), text.encode()
        rc = lib.ac_conversation_say(self.c, _c_params(lib, SamplingParams(**settings), 1), data, len(data), turn)
        if rc:
            return rc, turn, None, None
        token, piece, size = ffi.new("int *"), ffi.new("const char **"), ffi.new("size_t *")
        out, tokens = b"", []
        while True:
            assert lib.ac_conversation_next(self.c, token, piece, size) == 0, last_error(lib, ffi)
            out += ffi.unpack(piece[0], size[0])
            if token[0] < 0:
                return 0, turn, out.decode(), tokens
            tokens.append(token[0])

    def messages(self) -> list[dict]:
        out = []
        for i in range(self.lib.ac_conversation_n_messages(self.c)):
            m = self.lib.ac_conversation_message(self.c, i)
            out.append({"role": self.ffi.string(m.role).decode(), "content": self.ffi.string(m.content).decode()})
        return out

    def free(self):
        self.lib.ac_conversation_free(self.c)


def common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


SYSTEM, TURN_1, TURN_2 = "Zebra quartz.", "What is resonance?", "And the river?"


def poison_target(model, files, reply_1: str, reply_2_tokens: list[int]) -> tuple[int, list[int]]:
    """A token the second turn's prompt shares with the first's (in the cache since turn 1)
    that nothing the second turn runs holds, and the second prompt: (token, prompt)."""
    qa = TEMPLATES["qa"]
    base = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURN_1}]
    first = chat_prompt(model, base, qa)
    second = chat_prompt(model, base + [{"role": "assistant", "content": reply_1},
                                        {"role": "user", "content": TURN_2}], qa)
    kept = common_prefix(first[:-1], second)  # run in turn 1, and the same in turn 2
    later = set(second[kept:]) | set(reply_2_tokens)
    victims = [t for t in second[1:kept] if t not in later]
    assert victims, (first, second)
    return victims[0], second


def nan_row(data: bytearray, files, token: int) -> None:
    """Writes NaN over token's row of the token embedding in the model file's bytes."""
    import numpy as np

    row = files.weights["token_embedding"][token].astype("<f4").tobytes()
    at = data.find(row)
    assert at > 0 and data.find(row, at + 1) < 0
    data[at:at + len(row)] = np.full(files.cfg.dim, np.nan, dtype="<f4").tobytes()


def test_a_turn_runs_only_the_tokens_the_cache_lacks(lib, ffi, make_model):
    """Turn 2 keeps the KV cache of the prefix its prompt shares with the context: a token of
    that prefix whose embedding turns to NaN after turn 1 is never run again (running it would
    make every logit NaN), and the reply is Python Chat's, bit for bit."""
    files = make_model(seed=5, seq_len=128, shared_classifier=False)  # the embedding is read per token run
    with Model(files.model, files.tokenizer) as m, Chat(m, template="qa", system=SYSTEM) as talk:
        want_1 = talk.say(TURN_1, seed=1, max_new_tokens=12)
        want_2 = talk.say(TURN_2, seed=2, max_new_tokens=12)
        victim, prompt_2 = poison_target(m, files, want_1.text, want_2.tokens)
    data = bytearray(files.model.read_bytes())
    buf, model = ffi.from_buffer("char[]", data), ffi.new("ac_model **")
    assert lib.ac_model_load_memory(buf, len(data), b"model.bin", model) == 0
    rc, tok = load_tokenizer(lib, ffi, files.tokenizer, files.cfg.vocab_size)
    talk = CConversation(lib, ffi, model[0], tok, "qa", SYSTEM)
    fresh = CConversation(lib, ffi, model[0], tok, "qa", SYSTEM)
    try:
        rc, turn_1, text_1, tokens_1 = talk.say(TURN_1, seed=1, max_new_tokens=12)
        assert (rc, text_1, tokens_1, turn_1.n_cached) == (0, want_1.text, want_1.tokens, 0)
        nan_row(data, files, victim)  # the library reads the weights from this buffer
        rc, turn_2, text_2, tokens_2 = talk.say(TURN_2, seed=2, max_new_tokens=12)
        assert rc == 0, last_error(lib, ffi)
        assert (text_2, tokens_2) == (want_2.text, want_2.tokens)
        assert turn_2.n_prompt == len(prompt_2) and 0 < turn_2.n_cached < turn_2.n_prompt
        assert prompt_2.index(victim) < turn_2.n_cached
        assert talk.messages()[-1] == {"role": "assistant", "content": want_2.text}
        # the poison is real: a conversation that runs the same prefix again cannot
        rc, _, _, _ = fresh.say(TURN_1, seed=1, max_new_tokens=12)
        assert rc == lib.AC_ERR_NUMERIC and "logit" in last_error(lib, ffi)
    finally:
        talk.free()
        fresh.free()
        lib.ac_tokenizer_free(tok)
        lib.ac_model_free(model[0])


def test_cli_chat_runs_only_each_turns_new_tokens(run_binary, make_model):
    """./run -m chat keeps its KV cache between turns: with --mmap, NaN written after turn 1
    into the embedding of a token only the cached prefix holds never reaches turn 2, whose
    answer is Python Chat's."""
    files = make_model(seed=5, seq_len=128, shared_classifier=False)
    with Model(files.model, files.tokenizer) as m, Chat(m, template="qa", system=SYSTEM) as talk:
        want = [talk.say(turn, seed=3, max_new_tokens=8) for turn in (TURN_1, TURN_2)]
        victim, _ = poison_target(m, files, want[0].text, want[1].tokens)
    proc = subprocess.Popen([str(run_binary), str(files.model), "--mmap", "-m", "chat", "-y", SYSTEM, "-s", "3",
                             "-n", "8"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert read_stdout_until(proc, b"User: ") == b"User: "
        proc.stdin.write(f"{TURN_1}\n".encode())
        proc.stdin.flush()
        assert read_stdout_until(proc, b"\nUser: ") == f"Assistant: {want[0].text}\nUser: ".encode()
        data = bytearray(files.model.read_bytes())
        nan_row(data, files, victim)
        with open(files.model, "r+b") as f:  # in place: the mapping sees it
            f.write(data)
        out, err = proc.communicate(f"{TURN_2}\n".encode(), timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, err.decode()) == (0, "")
    assert out.decode() == f"Assistant: {want[1].text}\nUser: "
    # the bytes landed in the embedding: the file no longer loads
    r = run_cli(run_binary, files.model, "-n", "1")
    assert r.returncode == 1 and "token_embedding" in r.stderr


@pytest.mark.parametrize("template, seq_len", [("qa", 96), ("llama-2", 128), ("chatml", 192)])
def test_cli_chat_shifts_the_context_as_python_chat_does(run_binary, make_model, template, seq_len):
    """A conversation longer than the context: ./run -m chat and Python's Chat leave out the
    same oldest exchanges and give the same answers (the contexts hold the system prompt, a
    turn and its answer, and an exchange or two; chatml's markers are many byte tokens here)."""
    files = make_model(seed=5, seq_len=seq_len)
    turns = [f"turn {i} of the talk" for i in range(10)]
    r = run_cli(run_binary, files.model, "-m", "chat", "--chat-template", template, "-y", "Be brief.", "-n", "10",
                "-s", "3", stdin="".join(t + "\n" for t in turns))
    assert (r.returncode, r.stderr) == (0, "")
    with Model(files.model, files.tokenizer) as m, Chat(m, template=template, system="Be brief.") as talk:
        answers = [talk.say(t, seed=3, max_new_tokens=10).text for t in turns]
        kept = talk.messages
    assert len(kept) < 1 + 2 * len(turns) and kept[0] == {"role": "system", "content": "Be brief."}
    assert r.stdout == "".join(f"User: Assistant: {a}\n" for a in answers) + "User: "


def test_conversation_refusals_name_what_is_wrong(lib, ffi, make_model):
    files = make_model(seed=5, seq_len=64)
    rc, model = load_model(lib, ffi, files.model)
    rc, tok = load_tokenizer(lib, ffi, files.tokenizer, files.cfg.vocab_size)
    talk = CConversation(lib, ffi, model, tok, "qa")
    text, size = ffi.new("const char **"), ffi.new("size_t *")
    try:
        assert lib.ac_conversation_reply(talk.c, b"x", 1, 1, text, size) == lib.AC_ERR_ARG
        assert "no turn is waiting for its reply" in last_error(lib, ffi)
        assert lib.ac_conversation_add(talk.c, b"robot", b"x", 1) == lib.AC_ERR_ARG
        assert "messages[0].role 'robot' is invalid" in last_error(lib, ffi)
        assert lib.ac_conversation_add(talk.c, b"user", b"hi", 2) == 0
        assert lib.ac_conversation_add(talk.c, b"system", b"x", 1) == lib.AC_ERR_ARG
        assert "messages[1] is a system message" in last_error(lib, ffi)
        empty = ffi.new("char[]", b"")
        assert lib.ac_conversation_set_stops(talk.c, ffi.new("const char *[]", [empty]), ffi.new("size_t[]", [0]),
                                             1) == lib.AC_ERR_ARG
        assert "stop string 0 is invalid" in last_error(lib, ffi)
        rc, _, _, _ = talk.say("hello", max_new_tokens=-1)
        assert rc == lib.AC_ERR_ARG and "max_new_tokens" in last_error(lib, ffi)
        before = talk.messages()
        rc, turn, _, _ = talk.say("the river " * 40, max_new_tokens=4)
        assert rc == lib.AC_ERR_RANGE and turn.n_prompt == 0 and turn.n_conversation > 63
        assert f"({turn.n_conversation} with the conversation before it)" in last_error(lib, ffi)
        assert talk.messages() == before == [{"role": "user", "content": "hi"}]
    finally:
        talk.free()
        lib.ac_tokenizer_free(tok)
        lib.ac_model_free(model)


def test_fuzz_chat_regressions_replay_cleanly(built):
    """The conversation harness (fuzz/fuzz_chat.c) on its saved inputs: a shift on every turn,
    a turn too long, a reply handed over in cut UTF-8, refused settings."""
    r = subprocess.run(["make", "-s", "build-fuzz/replay_fuzz_chat"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(p for p in (REPO / "tests" / "fuzz_regressions" / "fuzz_chat").glob("*") if p.is_file())
    assert len(files) >= 5
    r = subprocess.run([str(REPO / "build-fuzz" / "replay_fuzz_chat"), *map(str, files)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count("ok ") == len(files), r.stdout + r.stderr
