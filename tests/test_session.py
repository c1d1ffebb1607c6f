"""Sessions that keep their KV cache (feed / generate / rewind / sync / shift), stop strings,
log-probabilities, and the C sampler's min-p, penalties and logit bias (ac_sample directly)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from arianna_c import AriannaError, ErrorCode, Model, chat
from arianna_c.session import Chat
import capi
import helpers_parity as hp
from conftest import byte_id, piece_id

SEEDS = (1, 7, 123456789)


@pytest.fixture
def model(make_model):
    with Model(make_model(seed=3, seq_len=96).model) as m:
        yield m


# ---------------------------------------------------------------------------- sessions


@pytest.mark.parametrize("seed", SEEDS)
def test_session_generates_what_model_generate_does(model, seed):
    settings = dict(max_new_tokens=40, temperature=0.9, top_p=0.9, top_k=0, seed=seed)
    with model.session() as s:
        s.feed("the river and the stone")
        result = s.generate(**settings)
    assert result.text == model.generate("the river and the stone", **settings)
    assert result.prompt_tokens == len(model.encode("the river and the stone"))


def test_greedy_and_ignore_eos_match_model_generate(model):
    with model.session() as s:
        s.feed("once")
        result = s.generate(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    assert result.completion_tokens == 30 and result.finish_reason == "length"
    assert result.text == model.generate("once", max_new_tokens=30, temperature=0.0, ignore_eos=True)


def test_context_kept_between_calls_equals_one_prompt(model):
    """feed, generate, feed more, generate: the second reply equals a fresh session given the
    whole context at once (the cache kept in between holds exactly what a prefill makes)."""
    with model.session() as s:
        s.feed("the river")
        first = s.generate(max_new_tokens=8, seed=5, ignore_eos=True)
        s.feed(" and the stone", bos=False)
        second = s.generate(max_new_tokens=12, seed=6, ignore_eos=True)
        context = s.tokens[: len(s.tokens) - len(second.tokens)]
    assert s.tokens[: first.prompt_tokens] == model.encode("the river")
    with model.session() as fresh:
        fresh.feed_tokens(context)
        again = fresh.generate(max_new_tokens=12, seed=6, ignore_eos=True)
    assert again.tokens == second.tokens and again.text == second.text


def test_rewind_then_generate_repeats_the_reply(model):
    with model.session() as s:
        s.feed("a quiet")
        start = s.position
        first = s.generate(max_new_tokens=20, seed=9, ignore_eos=True)
        assert s.position == start + 20
        s.rewind(len(first.tokens))
        assert s.position == start
        second = s.generate(max_new_tokens=20, seed=9, ignore_eos=True)
    assert second.tokens == first.tokens


def test_rewind_to_any_point_equals_a_fresh_session(model):
    with model.session() as s:
        s.feed("the stone remembers")
        s.generate(max_new_tokens=15, seed=2, ignore_eos=True)
        s.rewind(9)
        kept = list(s.tokens)
        after = s.generate(max_new_tokens=10, seed=4, ignore_eos=True)
    with model.session() as fresh:
        fresh.feed_tokens(kept)
        assert fresh.generate(max_new_tokens=10, seed=4, ignore_eos=True).tokens == after.tokens


def test_rewind_and_feed_bounds(model):
    seq_len = model.config.seq_len
    with model.session() as s:
        s.feed("abc")
        with pytest.raises(AriannaError, match="rewind"):
            s.rewind(s.position + 1)
        with pytest.raises(AriannaError, match="rewind"):
            s.rewind(-1)
        with pytest.raises(AriannaError) as e:
            s.feed_tokens([5] * seq_len)
        assert e.value.name == "AC_ERR_RANGE" and "do not fit" in str(e.value)
        with pytest.raises(AriannaError) as e:
            s.feed_tokens([model.config.vocab_size])
        assert e.value.name == "AC_ERR_RANGE"
        with pytest.raises(TypeError):
            s.feed_tokens([1.5])


def test_generation_stops_when_the_context_is_full(model):
    seq_len = model.config.seq_len
    with model.session() as s:
        s.feed("the")
        result = s.generate(max_new_tokens=10**6, ignore_eos=True, seed=1)
        assert result.finish_reason == "length"
        assert s.position == seq_len
        assert result.completion_tokens == seq_len - result.prompt_tokens
        assert s.generate(max_new_tokens=5).completion_tokens == 0  # nothing fits any more
    # the same clamp as Model.generate
    assert result.text == model.generate("the", max_new_tokens=10**6, ignore_eos=True, seed=1)


def test_sync_keeps_the_shared_prefix(model):
    with model.session() as s:
        s.feed("the river and the stone")
        s.generate(max_new_tokens=5, seed=1, ignore_eos=True)
        old = list(s.tokens)
        new = old[:6] + model.encode(" moon", bos=False)
        assert s.sync(new) == 6
        assert s.tokens == new
        result = s.generate(max_new_tokens=8, seed=3, ignore_eos=True)
    with model.session() as fresh:
        fresh.feed_tokens(new)
        assert fresh.generate(max_new_tokens=8, seed=3, ignore_eos=True).tokens == result.tokens


def test_shift_drops_the_middle_and_refeeds(model):
    with model.session() as s:
        s.feed("the river and the stone remember")
        s.generate(max_new_tokens=20, seed=1, ignore_eos=True)
        before = list(s.tokens)
        s.shift(keep=3, drop=10)
        assert s.tokens == before[:3] + before[13:]
        result = s.generate(max_new_tokens=6, seed=8, ignore_eos=True)
    with model.session() as fresh:
        fresh.feed_tokens(before[:3] + before[13:])
        assert fresh.generate(max_new_tokens=6, seed=8, ignore_eos=True).tokens == result.tokens
    with model.session() as s, pytest.raises(AriannaError, match="shift"):
        s.shift(keep=1, drop=5)


def test_empty_session_starts_from_bos(model):
    with model.session() as s:
        result = s.generate(max_new_tokens=12, seed=4)
    assert result.text == model.generate("", max_new_tokens=12, seed=4)


def test_closed_session_returns_its_sequence_and_model_closes(make_model):
    m = Model(make_model(seed=1).model)
    s = m.session()
    s.feed("abc")
    s.close()
    s.close()  # idempotent
    m.close()
    with pytest.raises(ValueError, match="closed"):
        m.session()


def test_stream_yields_the_text_of_generate(model):
    with model.session() as s:
        s.feed("the")
        pieces = list(s.stream(max_new_tokens=25, seed=11))
        streamed = s.last
    assert "".join(pieces) == streamed.text
    assert streamed.text == model.generate("the", max_new_tokens=25, seed=11)


def test_a_stream_left_early_keeps_its_tokens(model):
    with model.session() as s:
        s.feed("the")
        it = s.stream(max_new_tokens=40, seed=11, ignore_eos=True)
        next(it)
        it.close()
        assert s.last.finish_reason == "cancelled"
        assert s.position == s.last.prompt_tokens + s.last.completion_tokens


def test_bad_settings_raise_before_generating(model):
    with model.session() as s:
        with pytest.raises(AriannaError, match="min_p"):
            s.generate(min_p=1.5)
        with pytest.raises(AriannaError, match="repeat_last_n"):
            s.generate(repeat_last_n=-1)
        with pytest.raises(TypeError, match="temperature"):
            s.generate(temperature="0.5")
        with pytest.raises(TypeError, match="stop"):
            s.generate(stop=[1])
        with pytest.raises(TypeError, match="unknown setting"):
            s.generate(nucleus=0.5)
        with pytest.raises(AriannaError, match="outside the vocabulary"):
            s.generate(logit_bias={10**6: 1.0})
        assert s.position == 0


def test_every_method_of_a_closed_session_or_chat_raises(model):
    s = model.session()
    s.feed("abc")
    s.close()
    calls = {
        "feed": lambda: s.feed("d"), "feed_tokens": lambda: s.feed_tokens([5]), "rewind": lambda: s.rewind(0),
        "reset": s.reset, "sync": lambda: s.sync([1]), "shift": lambda: s.shift(0, 0),
        "piece": lambda: s.piece(1, 5), "text": lambda: s.text, "position": lambda: s.position,
        "start": s.start, "first_logits": s.first_logits, "advance": lambda: s.advance(5),
        "generate": lambda: s.generate(max_new_tokens=2), "stream": lambda: list(s.stream(max_new_tokens=2)),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match="the session is closed"):
            call()
    assert s.closed and s.tokens == model.encode("abc")  # nothing was appended
    c = Chat(model)
    c.say("hi", max_new_tokens=2, seed=1)
    c.close()
    c.close()  # idempotent
    for call in (lambda: c.messages, lambda: c.say("hi"), lambda: list(c.stream("hi"))):
        with pytest.raises(ValueError, match="the chat is closed"):
            call()
    assert c.closed and c.session.closed


def test_session_arguments_are_checked_like_the_models(model):
    """NumPy ints are token ids and counts, as in Model.logits/decode; anything else that is
    not an int is a TypeError naming the argument."""
    ids = model.encode("the river")
    with model.session() as s:
        assert s.feed_tokens(np.array(ids)) == len(ids) and s.tokens == ids
        assert s.sync(np.array(ids[:3], dtype=np.int16)) == 3
        s.shift(np.int64(1), np.int32(1))
        s.rewind(np.int8(1))
        assert s.tokens == ids[:1]
        bad = [
            (lambda: s.feed_tokens(5), "tokens must be a sequence of ints, not int"),
            (lambda: s.feed_tokens("abc"), "tokens must be a sequence of ints, not str"),
            (lambda: s.feed_tokens([1, None]), r"tokens\[1\] must be an int, not NoneType"),
            (lambda: s.feed_tokens([True]), r"tokens\[0\] must be an int, not bool"),
            (lambda: s.sync(None), "tokens must be a sequence of ints, not NoneType"),
            (lambda: s.sync([1.0]), r"tokens\[0\] must be an int, not float"),
            (lambda: s.shift("a", 1), "keep must be an int, not str"),
            (lambda: s.shift(1.0, 1.0), "keep must be an int, not float"),
            (lambda: s.shift(0, None), "drop must be an int, not NoneType"),
            (lambda: s.rewind("x"), "n must be an int, not str"),
            (lambda: s.rewind(True), "n must be an int, not bool"),
        ]
        for call, needle in bad:
            with pytest.raises(TypeError, match=needle):
                call()
        assert s.tokens == ids[:1]
        with pytest.raises(AriannaError, match=r"token 320 \(at index 1\) is outside the vocabulary") as e:
            s.feed_tokens(np.array([5, 320]))
        assert e.value.code is ErrorCode.RANGE


def test_logprobs_range_is_checked_before_the_prefill(model):
    vocab = model.config.vocab_size
    counter = hp.CallCounter(model._lib, ["ac_batch_prefill"])
    model._lib = counter  # the sessions made from here on count their prefills
    for n in (-1, vocab + 1, 10**6, 2**40):
        needle = f"logprobs {n} is invalid: it must be in 0..{vocab} "
        with model.session() as s:
            s.feed("the river")
            with pytest.raises(AriannaError, match=re.escape(needle)) as e:
                s.generate(max_new_tokens=2, logprobs=n)
            assert e.value.code is ErrorCode.ARG
            assert s.tokens == model.encode("the river")
        with pytest.raises(AriannaError, match=re.escape(needle)):
            model.generate("the river", 2, logprobs=n)
        with pytest.raises(AriannaError, match=re.escape(needle)):
            model.chat([{"role": "user", "content": "hi"}], max_new_tokens=2, logprobs=n)
    assert counter.calls["ac_batch_prefill"] == 0
    with model.session() as s:  # every alternative is allowed
        s.feed("the river")
        result = s.generate(max_new_tokens=1, seed=1, logprobs=vocab)
    assert sorted(alt[0] for alt in result.logprobs[0].top) == list(range(vocab))


def test_chat_text_with_lone_surrogates_is_encoded_as_prompts_are(model):
    """A str with lone surrogates is its 3-byte forms (byte tokens) in a chat, as in
    Model.generate; the conversation gives the same str back."""
    surrogate = [byte_id(b) for b in "\ud800".encode("utf-8", "surrogatepass")]
    reply = model.chat([{"role": "system", "content": "\udc80"}, {"role": "user", "content": "\ud800"}],
                       max_new_tokens=4, seed=1)
    with Chat(model, system="\udc80") as c:
        assert c.say("\ud800", max_new_tokens=4, seed=1).text == reply.text
        assert c.messages[:2] == [{"role": "system", "content": "\udc80"}, {"role": "user", "content": "\ud800"}]
        context = c.session.tokens
    assert any(context[i:i + 3] == surrogate for i in range(len(context)))
    rendered = chat.render(chat.TEMPLATES["qa"], [{"role": "user", "content": "\ud800"}])
    assert rendered == [chat.BOS, "Q: \ud800\nA:"]


def test_chat_stop_strings_leave_room_for_the_templates(model):
    """The library holds AC_MAX_STOPS stop strings, the template's among them: the caller's
    limit says so."""
    template_stops = len(chat.TEMPLATES["qa"].stop)
    room = 64 - template_stops
    messages = [{"role": "user", "content": "hi"}]
    model.chat(messages, max_new_tokens=2, stop=[f"s{i}" for i in range(room)])
    too_many = [f"s{i}" for i in range(room + 1)]
    needle = (f"stop has {room + 1} strings; at most {room} (the library's AC_MAX_STOPS, 64 per generation, "
              f"less the chat template's {template_stops})")
    with pytest.raises(AriannaError, match=re.escape(needle)) as e:
        model.chat(messages, max_new_tokens=2, stop=too_many)
    assert e.value.code is ErrorCode.ARG
    with Chat(model) as c:
        with pytest.raises(AriannaError, match=re.escape(needle)):
            c.say("hi", max_new_tokens=2, stop=too_many)
        assert c.messages == []
    # the template's own among the caller's adds nothing
    model.chat(messages, max_new_tokens=2, stop=too_many[:room] + list(chat.TEMPLATES["qa"].stop))


# ---------------------------------------------------------------------------- stop strings


@pytest.fixture
def c_generation(lib, ffi, make_model):
    """c_generation(stops, **session settings) -> run(pieces): a C ac_generation on a tiny model
    after BOS, handed one-hot logits so that it samples exactly the given pieces (greedy);
    run returns [(token, final bytes, stop reason)] per ac_generation_next call until the
    generation ends (pieces b"</s>" is EOS)."""
    files = make_model(seed=1)
    rc, model = capi.load_model(lib, ffi, files.model)
    assert rc == 0
    rc, tok = capi.load_tokenizer(lib, ffi, files.tokenizer, files.cfg.vocab_size)
    assert rc == 0
    made = []

    def make(stops, **settings):
        params = ffi.new("ac_session_params *", lib.ac_session_default_params())
        params.sampler.temperature = 0.0
        for k, v in settings.items():
            setattr(params, k, v)
        out = ffi.new("ac_generation **")
        assert lib.ac_generation_create(model, tok, params, out) == 0
        gen = out[0]
        made.append(gen)
        data = [ffi.new("char[]", x) for x in stops]
        assert lib.ac_generation_set_stops(gen, ffi.new("const char *[]", data),
                                           ffi.new("size_t[]", [len(x) for x in stops]), len(stops)) == 0
        assert lib.ac_generation_begin(gen, ffi.new("int[]", [lib.AC_TOKEN_BOS]), 1) == 0

        def run(pieces):
            token, piece, size = ffi.new("int *"), ffi.new("const char **"), ffi.new("size_t *")
            calls = []
            for p in pieces:
                logits = ffi.new("float[]", files.cfg.vocab_size)
                logits[piece_id(p) if len(p) > 1 or p.isalpha() or p == b" " else byte_id(p[0])] = 10.0
                assert lib.ac_generation_next(gen, logits, token, piece, size) == 0
                calls.append((token[0], ffi.unpack(piece[0], size[0]), lib.ac_generation_stop_reason(gen)))
                if calls[-1][2] != lib.AC_STOP_NONE:
                    break
            return calls

        return run

    yield make
    for gen in made:
        lib.ac_generation_free(gen)
    lib.ac_tokenizer_free(tok)
    lib.ac_model_free(model)


def test_c_stop_string_split_across_tokens_is_held_then_dropped(lib, c_generation):
    run = c_generation([b"iver"])
    calls = run([b" the", b" ", b"r", b"i", b"v", b"er", b" a"])
    assert [c[1] for c in calls] == [b"the", b" ", b"r", b"", b"", b""]  # "i", "iv" held back
    assert calls[-1][2] == lib.AC_STOP_STRING and calls[-1][0] == piece_id(b"er")  # the token is reported


def test_c_stop_string_that_is_a_prefix_of_another(lib, c_generation):
    run = c_generation([b"abc", b"ab"])
    calls = run([b"x", b"a", b"b", b"c"])
    assert [c[1] for c in calls] == [b"x", b"", b""] and calls[-1][2] == lib.AC_STOP_STRING
    # a stop string inside the tail held for a longer one that starts earlier: it ends the text
    run = c_generation([b"abc", b"b"])
    calls = run([b"a", b"b", b"c"])
    assert [c[1] for c in calls] == [b"", b"a"] and calls[-1][2] == lib.AC_STOP_STRING


def test_c_stop_string_never_matched_releases_what_it_held(lib, c_generation):
    run = c_generation([b"xyz"])
    calls = run([b"a", b"x", b"y", b"</s>"])  # EOS: the held "xy" comes with the end
    assert calls == [(piece_id(b"a"), b"a", 0), (piece_id(b"x"), b"", 0), (piece_id(b"y"), b"", 0),
                     (-1, b"xy", lib.AC_STOP_END)]
    run = c_generation([b"xyz"], max_new_tokens=3)  # the last token brings the held bytes
    calls = run([b"a", b"x", b"y"])
    assert [c[1] for c in calls] == [b"a", b"", b"xy"] and calls[-1][2] == lib.AC_STOP_LENGTH


def test_c_stop_strings_on_utf8_bytes(lib, c_generation):
    e_acute = "\u00e9".encode()  # two byte pieces, C3 A9
    run = c_generation(["\u00e9".encode()])
    calls = run([b"a", e_acute[:1], e_acute[1:], b"b"])
    assert [c[1] for c in calls] == [b"a", b"", b""] and calls[-1][2] == lib.AC_STOP_STRING
    run = c_generation(["\u00e8".encode()])  # C3 A8: shares the first byte only
    calls = run([b"a", e_acute[:1], e_acute[1:], b"</s>"])
    assert [c[1] for c in calls] == [b"a", b"", e_acute, b""] and calls[-1][2] == lib.AC_STOP_END


def test_c_stop_string_arguments_are_checked(lib, ffi, make_model):
    files = make_model(seed=1)
    with Model(files.model) as m, m._h.use() as h:
        out = ffi.new("ac_generation **")
        assert lib.ac_generation_create(h.model, h.tokenizer, ffi.NULL, out) == 0
        gen = ffi.gc(out[0], lib.ac_generation_free)
        one = [ffi.new("char[]", b"")]
        assert lib.ac_generation_set_stops(gen, ffi.new("const char *[]", one), ffi.new("size_t[]", [0]), 1) \
            == lib.AC_ERR_ARG
        assert "stop string 0 is invalid" in capi.last_error(lib, ffi)
        many = lib.AC_MAX_STOPS + 1
        strings = [ffi.new("char[]", b"x")] * many
        assert lib.ac_generation_set_stops(gen, ffi.new("const char *[]", strings), ffi.new("size_t[]", [1] * many),
                                           many) == lib.AC_ERR_ARG
        token, piece, size = ffi.new("int *"), ffi.new("const char **"), ffi.new("size_t *")
        assert lib.ac_generation_next(gen, ffi.new("float[]", 320), token, piece, size) == lib.AC_ERR_ARG
        assert "ac_generation_begin" in capi.last_error(lib, ffi)  # no context yet


@pytest.fixture
def scripted(scripted_model):
    """A model that greedily spells " the river is a sea" (each piece once, in turn)."""
    words = [b" the", b" ", b"r", b"i", b"v", b"er", b" i", b"s", b" a", b" s", b"e", b"a"]
    script = [1] + [piece_id(w) for w in words]
    with Model(scripted_model(script).model) as m:
        yield m


def test_stop_string_ends_the_text_and_is_never_shown(scripted):
    with scripted.session() as s:
        full = s.generate(max_new_tokens=12, temperature=0.0)
    assert full.text == "the river is a sea"
    with scripted.session() as s:
        pieces = list(s.stream(max_new_tokens=12, temperature=0.0, stop=["is a", "zzz"]))
        result = s.last
    assert result.text == "the river " and result.finish_reason == "stop"
    assert "".join(pieces) == "the river "
    assert "is" not in "".join(pieces)  # not even the part of the stop string seen first
    # the tokens of the stop string were sampled (and count), the text stops before it
    assert result.completion_tokens == 9


def test_stop_string_split_over_pieces_and_no_match(scripted):
    with scripted.session() as s:
        result = s.generate(max_new_tokens=12, temperature=0.0, stop=["iver"])  # "i" + "v" + "er"
    assert result.text == "the r" and result.finish_reason == "stop" and result.completion_tokens == 6
    with scripted.session() as s:
        result = s.generate(max_new_tokens=12, temperature=0.0, stop=["river iz"])
    assert result.text == "the river is a sea" and result.finish_reason == "length"


def test_stop_strings_reach_every_front_end(scripted):
    """Model.generate, Model.stream, Model.generate_batch and a Session stop alike (the
    library's rule), including a stop string never matched and one split over pieces."""
    for stop in (["iver"], ["is a", "zzz"], ["river iz"], ["a sea", "a s"]):
        with scripted.session() as s:
            expected = s.generate(max_new_tokens=12, temperature=0.0, stop=stop).text
        assert scripted.generate(max_new_tokens=12, temperature=0.0, stop=stop) == expected
        assert "".join(scripted.stream(max_new_tokens=12, temperature=0.0, stop=stop)) == expected
        assert scripted.generate_batch(["", ""], max_new_tokens=12, temperature=0.0, stop=stop) == [expected] * 2
    assert expected == "the river is "


def test_stop_string_with_a_multibyte_character(scripted_model):
    words = [b" the", b" ", b"r"]
    e_acute = "\u00e9".encode()
    script = [1] + [piece_id(w) for w in words] + [byte_id(e_acute[0]), byte_id(e_acute[1]), piece_id(b"s"), 2]
    with Model(scripted_model(script).model) as m:
        assert m.generate(temperature=0.0) == "the r\u00e9s"
        assert m.generate(temperature=0.0, stop="\u00e9") == "the r"
        assert m.generate(temperature=0.0, stop="\u00e8") == "the r\u00e9s"  # shares a first byte only
        assert list(m.stream(temperature=0.0)) == ["the", " ", "r", "\u00e9", "s"]
        # "r" and then "r" + the first byte of the character may start "r\u00e8": held back together
        assert list(m.stream(temperature=0.0, stop=["r\u00e8"])) == ["the", " ", "r\u00e9", "s"]
        with m.session() as s:
            assert s.generate(temperature=0.0, stop="\u00e9s").text == "the r"


def test_model_generate_takes_every_setting_of_a_session(model):
    settings = dict(max_new_tokens=20, temperature=0.8, seed=4, min_p=0.05, repeat_penalty=1.3,
                    repeat_last_n=8, presence_penalty=0.2, frequency_penalty=0.1, logit_bias={5: 2.0, 9: -1.0})
    with model.session() as s:
        s.feed("the river")
        result = s.generate(logprobs=2, **settings)
    assert model.generate("the river", **settings) == result.text
    again = model.generate("the river", logprobs=2, **settings)
    assert again.text == result.text and again.tokens == result.tokens
    assert [t.logprob for t in again.logprobs] == [t.logprob for t in result.logprobs]
    assert model.generate_batch(["the river"], **settings) == [result.text]
    with pytest.raises(TypeError, match="logprobs"):
        model.stream("the river", logprobs=2)
    with pytest.raises(TypeError, match="logprobs"):
        model.generate_batch(["the river"], logprobs=2)
    with pytest.raises(AriannaError, match="outside the vocabulary"):
        model.generate("x", logit_bias={10**6: 1.0})


# ---------------------------------------------------------------------------- log-probabilities


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def test_logprobs_are_the_models_log_softmax(model):
    with model.session() as s:
        s.feed("the river")
        result = s.generate(max_new_tokens=12, seed=3, temperature=1.0, logprobs=4, ignore_eos=True)
        context = list(s.tokens)
    logits = model.logits(context[:-1])
    assert len(result.logprobs) == 12
    for i, entry in enumerate(result.logprobs):
        pos = result.prompt_tokens - 1 + i
        expected = _log_softmax(logits[pos])
        assert entry.token == context[pos + 1]
        assert math.isclose(entry.logprob, expected[entry.token], abs_tol=1e-4)
        order = sorted(range(len(expected)), key=lambda t: (-expected[t], t))[:4]
        assert [a[0] for a in entry.top] == order
        for alt in entry.top:
            assert math.isclose(alt[3], expected[alt[0]], abs_tol=1e-4)
        assert entry.top[0][3] >= entry.logprob - 1e-6


def test_no_logprobs_unless_asked(model):
    """None: no log-probabilities; 0: each sampled token's own, without alternatives.  Asking
    changes nothing that is sampled."""
    results = []
    for logprobs in (None, 0):
        with model.session() as s:
            s.feed("the river")
            results.append(s.generate(max_new_tokens=8, seed=1, ignore_eos=True, logprobs=logprobs))
    plain, asked = results
    assert plain.logprobs is None
    assert (asked.text, asked.tokens) == (plain.text, plain.tokens) and len(asked.tokens) == 8
    assert [entry.token for entry in asked.logprobs] == asked.tokens
    for entry in asked.logprobs:
        assert entry.top == [] and math.isfinite(entry.logprob) and entry.logprob <= 0


# ---------------------------------------------------------------------------- the C sampler


@pytest.fixture
def sampler(lib, ffi):
    """sampler(vocab, **params) -> a C sampler from the library's defaults with params set."""
    made = []

    def make(vocab: int, **params):
        p = ffi.new("ac_sampler_params *", lib.ac_sampler_default_params())
        for k, v in params.items():
            setattr(p, k, v)
        rc, sampler = capi.create_sampler(lib, ffi, p, vocab)
        assert rc == 0, capi.last_error(lib, ffi)
        made.append(sampler)
        return sampler

    yield make
    for s in made:
        lib.ac_sampler_free(s)


def _draw(lib, ffi, s, logits, n=1):
    buf = ffi.new("float[]", [float(x) for x in logits])
    out = ffi.new("int *")
    tokens = []
    for _ in range(n):
        assert lib.ac_sample(s, buf, out) == 0
        tokens.append(out[0])
    return tokens


def test_defaults_and_a_zeroed_struct_sample_alike(lib, ffi):
    """A struct with only llama2.c's four fields set (the rest zero) samples as the defaults
    with min-p and the penalties off: zero is off for each of them.  Same draws."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(300) * 3).astype(np.float32)
    off = lib.ac_sampler_default_params()
    off.temperature, off.top_p, off.top_k = 1.0, 0.9, 0
    off.min_p, off.repeat_penalty, off.presence_penalty, off.frequency_penalty = 0.0, 1.0, 0.0, 0.0
    draws = []
    for params in (off, {"temperature": 1.0, "top_p": 0.9, "top_k": 0, "seed": 0}):
        p = ffi.new("ac_sampler_params *", params)
        p.seed = 42
        rc, s = capi.create_sampler(lib, ffi, p, 300)
        assert rc == 0, capi.last_error(lib, ffi)
        for t in rng.integers(0, 300, 20):  # recorded history: no effect while neutral
            lib.ac_sampler_accept(s, int(t))
        draws.append(_draw(lib, ffi, s, logits, 200))
        lib.ac_sampler_free(s)
    assert draws[0] == draws[1]


def test_min_p_keeps_tokens_near_the_best(lib, ffi, sampler):
    logits = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05]))
    s = sampler(5, temperature=1.0, top_p=1.0, min_p=0.3, seed=3)
    seen = set(_draw(lib, ffi, s, logits, 500))
    assert seen == {0, 1, 2}  # p >= 0.3 * 0.4 = 0.12
    s = sampler(5, temperature=1.0, top_p=1.0, min_p=0.0, seed=3)
    assert set(_draw(lib, ffi, s, logits, 500)) == {0, 1, 2, 3, 4}


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits(lib, ffi, sampler):
    s = sampler(4, temperature=0.0, repeat_penalty=2.0, repeat_last_n=8)
    assert _draw(lib, ffi, s, [3.0, 2.0, -1.0, -1.5]) == [0]
    lib.ac_sampler_accept(s, 0)
    assert _draw(lib, ffi, s, [3.0, 2.0, -1.0, -1.5]) == [1]  # 3 / 2 = 1.5 < 2
    # a negative logit is multiplied: -1 * 2 = -2 < -1.5
    t = sampler(4, temperature=0.0, repeat_penalty=2.0, repeat_last_n=8)
    lib.ac_sampler_accept(t, 2)
    assert _draw(lib, ffi, t, [-5.0, -5.0, -1.0, -1.5]) == [3]


def test_presence_and_frequency_penalties(lib, ffi, sampler):
    logits = [5.0, 4.5, 0.0]
    for kind, value, expected in (("frequency_penalty", 0.3, 1), ("frequency_penalty", 0.2, 0),
                                  ("presence_penalty", 0.6, 1), ("presence_penalty", 0.4, 0)):
        s = sampler(3, temperature=0.0, repeat_penalty=1.0, repeat_last_n=4, **{kind: value})
        lib.ac_sampler_accept(s, 0)
        lib.ac_sampler_accept(s, 0)
        assert _draw(lib, ffi, s, logits) == [expected], (kind, value)


def test_penalty_window_forgets_old_tokens(lib, ffi, sampler):
    s = sampler(4, temperature=0.0, repeat_penalty=10.0, repeat_last_n=3)
    lib.ac_sampler_accept(s, 0)
    assert _draw(lib, ffi, s, [3.0, 2.0, 0.0, 0.0]) == [1]
    for t in (2, 3, 2):  # 0 leaves the window of 3
        lib.ac_sampler_accept(s, t)
    assert _draw(lib, ffi, s, [3.0, 2.0, 0.0, 0.0]) == [0]
    lib.ac_sampler_accept(s, 0)
    lib.ac_sampler_reset_history(s)
    assert _draw(lib, ffi, s, [3.0, 2.0, 0.0, 0.0]) == [0]


def test_logit_bias_bans_and_boosts(lib, ffi, sampler):
    s = sampler(4, temperature=1.0, top_p=1.0, seed=5)
    ids, biases = ffi.new("int[]", [0, 3]), ffi.new("float[]", [-math.inf, 2.0])
    assert lib.ac_sampler_set_logit_bias(s, ids, biases, 2) == 0
    draws = _draw(lib, ffi, s, [4.0, 1.0, 1.0, 1.0], 400)
    assert 0 not in draws and draws.count(3) > draws.count(1) + draws.count(2)
    g = sampler(4, temperature=0.0)
    assert lib.ac_sampler_set_logit_bias(g, ids, biases, 2) == 0
    assert _draw(lib, ffi, g, [4.0, 1.0, 1.0, 2.5]) == [3]
    assert lib.ac_sampler_set_logit_bias(g, ids, biases, 0) == 0  # cleared
    assert _draw(lib, ffi, g, [4.0, 1.0, 1.0, 2.5]) == [0]


def test_logit_bias_and_param_errors(lib, ffi, sampler):
    s = sampler(4)
    bad = [([7], [1.0], "AC_ERR_RANGE"), ([1], [math.nan], "AC_ERR_ARG"), ([1], [math.inf], "AC_ERR_ARG")]
    for ids, biases, name in bad:
        rc = lib.ac_sampler_set_logit_bias(s, ffi.new("int[]", ids), ffi.new("float[]", biases), 1)
        assert ffi.string(lib.ac_strerror(rc)).decode() == name
    for field, value, word in (("min_p", -0.1, "min_p"), ("min_p", math.nan, "min_p"),
                               ("repeat_penalty", -1.0, "repeat_penalty"), ("repeat_penalty", math.inf, "repeat_penalty"),
                               ("repeat_last_n", -2, "repeat_last_n"), ("presence_penalty", math.nan, "presence_penalty"),
                               ("frequency_penalty", math.inf, "frequency_penalty")):
        p = ffi.new("ac_sampler_params *", lib.ac_sampler_default_params())
        setattr(p, field, value)
        assert lib.ac_sampler_check_params(p) == lib.AC_ERR_ARG
        assert word in capi.last_error(lib, ffi)
        rc, refused = capi.create_sampler(lib, ffi, p, 4)
        assert rc == lib.AC_ERR_ARG and refused == ffi.NULL
    assert lib.ac_sampler_accept(s, 4) == lib.AC_ERR_RANGE


def test_ac_logprobs_matches_numpy_with_ties(lib, ffi):
    logits = np.array([1.0, 3.0, 3.0, -2.0, 0.5, 3.0, -np.inf], dtype=np.float32)
    lp, ids, lps = ffi.new("float *"), ffi.new("int[]", 7), ffi.new("float[]", 7)
    buf = ffi.new("float[]", logits.tolist())
    assert lib.ac_logprobs(buf, 7, 4, 7, lp, ids, lps) == 0
    expected = _log_softmax(logits[:6])
    assert math.isclose(lp[0], expected[4], abs_tol=1e-6)
    assert list(ids) == [1, 2, 5, 0, 4, 3, 6]  # ties in increasing id order, -inf last
    assert lps[6] == -math.inf
    buf[2] = math.nan
    assert lib.ac_logprobs(buf, 7, 0, 2, lp, ids, lps) == lib.AC_ERR_RANGE
    assert lib.ac_logprobs(buf, 7, 0, 8, lp, ids, lps) == lib.AC_ERR_ARG


def test_penalties_reach_generation(model):
    """Greedy with a heavy repetition penalty over a window never repeats a token inside it;
    the same seed and settings give the same text twice."""
    settings = dict(max_new_tokens=40, temperature=0.0, repeat_penalty=1e6, repeat_last_n=6, ignore_eos=True)
    with model.session() as s:
        s.feed("the")
        result = s.generate(**settings)
        context = s.tokens
    for i in range(result.prompt_tokens, len(context)):
        window = context[max(0, i - 6):i]
        assert context[i] not in window
    with model.session() as s:
        s.feed("the")
        assert s.generate(**settings).tokens == result.tokens
    with model.session() as s:
        s.feed("the")
        plain = s.generate(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    assert plain.tokens != result.tokens


def test_penalties_and_min_p_agree_between_model_generate_and_sessions(model):
    """The C session behind Model.generate and generate_batch records its context for the
    penalties as a Session does: the same settings give the same text."""
    settings = dict(max_new_tokens=30, temperature=0.9, seed=21, repeat_penalty=1.5, repeat_last_n=10,
                    presence_penalty=0.3, frequency_penalty=0.2, min_p=0.05, ignore_eos=True)
    with model.session() as s:
        s.feed("the river")
        text = s.generate(**settings).text
    assert model.generate("the river", **settings) == text
    assert model.generate_batch(["the river", "a stone"], **settings)[0] == text
    assert model.generate("the river", **dict(settings, repeat_penalty=1.0, presence_penalty=0.0,
                                              frequency_penalty=0.0, min_p=0.0)) != text


def test_sampler_fuzz_regressions_replay_cleanly(built):
    """fuzz/fuzz_sampler.c (min-p, penalties, logit bias, logprobs against their rules) over
    the saved inputs in tests/fuzz_regressions/fuzz_sampler/, built as a plain program."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run(["make", "-s", "build-fuzz/replay_fuzz_sampler"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(str(p) for p in (repo / "tests" / "fuzz_regressions" / "fuzz_sampler").iterdir())
    assert files
    r = subprocess.run([str(repo / "build-fuzz" / "replay_fuzz_sampler"), *files], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == len(files)
