"""Chat templates (data), their rendering and tokens, Model.chat, and the Chat loop that keeps
its session (prefix reuse, context shift) and the `arianna-c chat` command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from arianna_c import AriannaError, Model, chat
from arianna_c.chat import BOS, EOS, TEMPLATES, Special
from arianna_c.session import Chat, Session, chat_completion, chat_prompt, chat_template

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


def test_prompt_tokens_encode_text_between_special_tokens():
    calls = []

    def encode(text):
        calls.append(text)
        return [100 + len(calls)]

    tokens = chat.prompt_tokens([BOS, "a", EOS, BOS, "b"], encode)
    assert tokens == [1, 101, 2, 1, 102] and calls == ["a", "b"]
    assert Special(2) == EOS


@pytest.fixture
def model(make_model):
    with Model(make_model(seed=5, seq_len=128).model) as m:
        yield m


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
