"""The OpenAI-compatible server on 127.0.0.1, through the official openai client and raw HTTP:
completions, chat, streaming, logprobs, n, errors, API keys, 64 concurrent clients with every
text equal to the same request alone, a full queue, a client leaving mid-stream, instances of
one base with different knowledge modules (each answering as that Model would, chosen by the
request's model), `arianna-c serve` with -L and --instance, and the chat page in headless
Chromium."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from arianna_c import Model  # noqa: E402
from arianna_c.server import Instance, create_app  # noqa: E402
from arianna_c.session import Session, chat_completion, chat_template  # noqa: E402

TIMEOUT = 30  # seconds any one request may take
REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def running(model: Model, **options) -> Iterator[str]:
    """The server on a free port of 127.0.0.1 in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options.setdefault("model_name", "tiny")
    server = uvicorn.Server(uvicorn.Config(create_app(model, **options), log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def client(url: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


def post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data)


def get(url: str, path: str) -> dict:
    return get_status(url, path)[1]


def get_status(url: str, path: str) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    conn.request("GET", path)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data)


def alone(model: Model, prompt: str, **settings):
    """The same request run by itself on a Session of its own."""
    with Session(model) as s:
        s.feed(prompt)
        return s.generate(**settings)


@pytest.fixture(scope="module")
def served_folder(tmp_path_factory):
    """model.bin + tokenizer.bin, and dialogue.bin: a module (random adapters of every matrix)
    trained, as its header says, on model.bin."""
    from conftest import formats, tiny_config, write_synthetic_tokenizer
    from test_modules import random_module

    from arianna_c import modules

    folder = tmp_path_factory.mktemp("served")
    cfg = tiny_config(seq_len=128)
    formats.write_model(folder / "model.bin", cfg, formats.random_weights(cfg, 11))
    write_synthetic_tokenizer(folder / "tokenizer.bin", cfg.vocab_size)
    modules.write_module(folder / "dialogue.bin", random_module(folder / "model.bin", seed=5))
    return folder


@pytest.fixture(scope="module")
def tiny(served_folder):
    with Model(served_folder / "model.bin") as m:
        yield m


@pytest.fixture(scope="module")
def url(tiny, built):
    with running(tiny, parallel=16, queue_size=1024) as u:
        yield u


# ---------------------------------------------------------------------------- the API


def test_models_and_health(url):
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = get(url, "/health")
    assert health["status"] == "ok" and health["parallel"] == 16


def test_completion_equals_the_request_alone(url, tiny):
    r = client(url).completions.create(model="tiny", prompt="the river", max_tokens=20, seed=3, temperature=0.9)
    expected = alone(tiny, "the river", max_new_tokens=20, seed=3, temperature=0.9)
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(tiny.encode("the river"))
    assert r.usage.completion_tokens == expected.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_defaults_to_16_tokens_and_finish_reasons(url, tiny):
    c = client(url)
    r = c.completions.create(model="tiny", prompt="a", seed=1, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    text = alone(tiny, "a", max_new_tokens=16, seed=1, ignore_eos=True).text
    # three characters from inside the text that are its own bytes (U+FFFD stands for bytes
    # that are not UTF-8, which a stop string cannot name)
    stop = next(text[i:i + 3] for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 3])
    r = c.completions.create(model="tiny", prompt="a", seed=1, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.index(stop)]


def test_chat_equals_the_request_alone(url, tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the river?"}]
    r = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=24, seed=5)
    expected = chat_completion(tiny, messages, seed=5, max_new_tokens=24)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.completion_tokens == expected.completion_tokens


def test_streams_carry_the_same_text(url, tiny):
    c = client(url)
    chunks = list(c.completions.create(model="tiny", prompt="the sea", max_tokens=30, seed=9, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == alone(tiny, "the sea", max_new_tokens=30, seed=9).text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    messages = [{"role": "user", "content": "hello"}]
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=30, seed=9, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    expected = chat_completion(tiny, messages, seed=9, max_new_tokens=30)
    assert text == expected.text
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens


def test_raw_stream_ends_with_done(url):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "max_tokens": 5, "stream": True}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = [e for e in r.read().decode().split("\n\n") if e]
    conn.close()
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_logprobs(url, tiny):
    c = client(url)
    r = c.completions.create(model="tiny", prompt="the", max_tokens=6, seed=2, logprobs=3,
                             extra_body={"ignore_eos": True})
    expected = alone(tiny, "the", max_new_tokens=6, seed=2, logprobs=3, ignore_eos=True)
    lp = r.choices[0].logprobs
    assert lp.tokens == [t.text for t in expected.logprobs]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in expected.logprobs], abs=1e-6)
    assert [len(t) for t in lp.top_logprobs] == [3] * 6 or all(len(t) <= 3 for t in lp.top_logprobs)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, seed=2,
                                  logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    assert bytes(content[0].bytes).decode("utf-8", "replace") == content[0].token


def test_n_choices_use_consecutive_seeds(url, tiny):
    r = client(url).completions.create(model="tiny", prompt="the stone", max_tokens=12, seed=40, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, choice in enumerate(r.choices):
        assert choice.text == alone(tiny, "the stone", max_new_tokens=12, seed=40 + i).text
    assert r.usage.prompt_tokens == len(tiny.encode("the stone"))


def test_sampling_settings_reach_the_sampler(url, tiny):
    settings = dict(temperature=0.0, extra_body={"repeat_penalty": 1e6, "repeat_last_n": 6, "min_p": 0.05,
                                                 "top_k": 40, "ignore_eos": True})
    r = client(url).completions.create(model="tiny", prompt="the", max_tokens=20, presence_penalty=0.5,
                                       frequency_penalty=0.25, logit_bias={"5": -100}, **settings)
    expected = alone(tiny, "the", max_new_tokens=20, temperature=0.0, repeat_penalty=1e6, repeat_last_n=6,
                     min_p=0.05, top_k=40, ignore_eos=True, presence_penalty=0.5, frequency_penalty=0.25,
                     logit_bias={5: -100.0})
    assert r.choices[0].text == expected.text


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"prompt": "x", "temperature": "0.5"}).encode(), "temperature"),
    (json.dumps({"prompt": "x", "max_tokens": -1}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": True}).encode(), "max_tokens"),
    (json.dumps({"prompt": 5}).encode(), "prompt"),
    (json.dumps({"prompt": "x", "n": 0}).encode(), "n"),
    (json.dumps({"prompt": "x", "n": 17}).encode(), "n"),
    (json.dumps({"prompt": "x", "seed": -3}).encode(), "seed"),
    (json.dumps({"prompt": "x", "stop": [1]}).encode(), "stop"),
    (json.dumps({"prompt": "x", "logprobs": 6}).encode(), "logprobs"),
    (json.dumps({"prompt": "x", "logit_bias": {"abc": 1}}).encode(), "logit_bias"),
    (json.dumps({"prompt": "x", "logit_bias": {"999999": 1}}).encode(), "logit_bias"),
    (json.dumps({"prompt": "x", "logit_bias": {str(2**40): 1}}).encode(), "logit_bias"),
    (json.dumps({"prompt": "x", "top_p": 0}).encode(), "top_p"),
    (json.dumps({"prompt": "x", "top_p": 2}).encode(), "top_p"),
    (json.dumps({"prompt": "x", "top_k": -1}).encode(), "top_k"),
    (json.dumps({"prompt": "x", "min_p": 2}).encode(), "min_p"),
    (json.dumps({"prompt": "x", "repeat_penalty": -1.0}).encode(), "repeat_penalty"),
    (json.dumps({"prompt": "x", "repeat_last_n": 2**80}).encode(), "repeat_last_n"),
    (json.dumps({"prompt": "x", "presence_penalty": float("inf")}).encode(), "presence_penalty"),
    (json.dumps({"prompt": "x", "frequency_penalty": float("nan")}).encode(), "frequency_penalty"),
    (json.dumps({"prompt": "the " * 200}).encode(), "prompt"),
    (json.dumps({"prompt": [1, 2, 99999]}).encode(), "prompt"),
])
def test_bad_completion_requests_are_400_with_an_openai_error(url, body, param):
    status, data = post(url, "/v1/completions", body)
    assert status == 400, data
    assert set(data["error"]) >= {"message", "type", "param", "code"} and data["error"]["message"]
    assert data["error"]["type"] == "invalid_request_error"
    if param is not None:
        assert data["error"]["param"] is not None and data["error"]["param"].startswith(param), data


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": [{"role": "robot", "content": "x"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": "hello"},
    {"messages": [{"role": "user", "content": "x"}], "chat_template": "zephyr"},
    {"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]},
    {"messages": [{"role": "user", "content": "the " * 200}]},
    {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21, "logprobs": True},
])
def test_bad_chat_requests_are_400(url, body):
    status, data = post(url, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and data["error"]["message"], data


def test_a_bad_chat_template_is_named(url):
    body = {"messages": [{"role": "user", "content": "x"}], "chat_template": "zephyr"}
    status, data = post(url, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and data["error"]["param"] == "chat_template", data
    assert "zephyr" in data["error"]["message"] and "chatml" in data["error"]["message"]


def test_the_openai_client_sees_errors(url):
    c = client(url)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="the " * 200)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=-1)


def test_huge_max_tokens_stops_at_the_context(url, tiny):
    r = client(url).completions.create(model="tiny", prompt="the", max_tokens=10**12, seed=1,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == tiny.config.seq_len


def test_server_still_answers_after_bad_requests(url, tiny):
    for body in (b"\xff\xfe", b"null", b'{"prompt": {"a": 1}}', b'{"prompt": "x", "stream": "yes"}'):
        assert post(url, "/v1/completions", body)[0] == 400
    test_completion_equals_the_request_alone(url, tiny)


def test_api_key(tiny, built):
    with running(tiny, api_key="s3cret", parallel=2) as u:
        with pytest.raises(openai.AuthenticationError):
            client(u, "wrong").models.list()
        status, data = post(u, "/v1/completions", b'{"prompt": "x"}')
        assert status == 401 and data["error"]["code"] == "invalid_api_key"
        assert client(u, "s3cret").completions.create(model="tiny", prompt="x", max_tokens=2).choices
        assert get(u, "/health")["status"] == "ok"  # health needs no key


# ---------------------------------------------------------------------------- load


def test_64_concurrent_clients_none_lost_each_text_as_alone(url, tiny):
    """64 clients x 10 requests at once (a mix of completions and chat, streaming and not,
    different seeds and lengths): every answer arrives and equals the request run alone."""
    def request(c: "openai.OpenAI", i: int, j: int) -> tuple:
        seed, n = 1000 * i + j, 4 + (i + j) % 13
        prompt = ["the river", "a stone", "the sea and the sky", "once"][(i + j) % 4]
        kind = (i + j) % 3
        if kind == 0:
            r = c.completions.create(model="tiny", prompt=prompt, max_tokens=n, seed=seed)
            return kind, prompt, seed, n, r.choices[0].text
        if kind == 1:
            chunks = c.completions.create(model="tiny", prompt=prompt, max_tokens=n, seed=seed, stream=True)
            return kind, prompt, seed, n, "".join(ch.choices[0].text for ch in chunks if ch.choices)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=n, seed=seed)
        return kind, prompt, seed, n, r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        def one_client(i: int) -> list:
            c = client(url)
            return [request(c, i, j) for j in range(10)]

        futures = [pool.submit(one_client, i) for i in range(64)]
        results = [r for f in futures for r in f.result(timeout=300)]
    assert len(results) == 640
    for kind, prompt, seed, n, text in results:
        if kind == 2:
            expected = chat_completion(tiny, [{"role": "user", "content": prompt}], seed=seed, max_new_tokens=n).text
        else:
            expected = alone(tiny, prompt, max_new_tokens=n, seed=seed).text
        assert text == expected, (kind, prompt, seed, n)
    assert get(url, "/health")["widest_step"] > 1  # requests did share decode steps


def test_a_full_queue_answers_503(tmp_path, built):
    from conftest import formats, tiny_config, write_synthetic_tokenizer

    cfg = tiny_config(seq_len=2048)
    formats.write_model(tmp_path / "model.bin", cfg, formats.random_weights(cfg, 2))
    write_synthetic_tokenizer(tmp_path / "tokenizer.bin", cfg.vocab_size)
    with Model(tmp_path / "model.bin") as m, running(m, parallel=1, queue_size=1) as u:
        body = json.dumps({"prompt": "x", "max_tokens": 2000, "ignore_eos": True}).encode()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: post(u, "/v1/completions", body), range(6)))
        statuses = sorted(s for s, _ in answers)
        assert 503 in statuses and 200 in statuses, statuses
        for status, data in answers:
            if status == 503:
                assert data["error"]["code"] == "queue_full"
            else:
                assert status == 200 and data["usage"]["completion_tokens"] == 2000
        assert get(u, "/health")["busy"] == 0


def test_a_client_leaving_mid_stream_is_cancelled(tmp_path, built):
    from conftest import formats, tiny_config, write_synthetic_tokenizer

    cfg = tiny_config(seq_len=4096)
    formats.write_model(tmp_path / "model.bin", cfg, formats.random_weights(cfg, 2))
    write_synthetic_tokenizer(tmp_path / "tokenizer.bin", cfg.vocab_size)
    with Model(tmp_path / "model.bin") as m, running(m, parallel=2) as u:
        host, port = u.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        body = json.dumps({"prompt": "x", "max_tokens": 4000, "stream": True, "ignore_eos": True})
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(4096)
        assert get(u, "/health")["busy"] == 1
        sock.close()
        deadline = time.monotonic() + 5
        while get(u, "/health")["busy"] != 0:
            assert time.monotonic() < deadline, "the generation went on after the client left"
            time.sleep(0.02)
        steps = get(u, "/health")["steps"]
        assert steps < 4000
        time.sleep(0.2)
        assert get(u, "/health")["steps"] == steps  # nothing runs any more
        assert client(u).completions.create(model="tiny", prompt="x", max_tokens=3).choices

        # the same for a request that is not streamed: the server notices the closed socket
        sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        body = json.dumps({"prompt": "x", "max_tokens": 4000, "ignore_eos": True})
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        deadline = time.monotonic() + 5
        while get(u, "/health")["busy"] != 1:
            assert time.monotonic() < deadline, "the request did not start"
            time.sleep(0.01)
        before = get(u, "/health")["steps"]
        sock.close()
        deadline = time.monotonic() + 5
        while get(u, "/health")["busy"] != 0:
            assert time.monotonic() < deadline, "the generation went on after the client left"
            time.sleep(0.02)
        assert get(u, "/health")["steps"] - before < 4000


# ---------------------------------------------------------------------------- instances


@pytest.fixture(scope="module")
def dialogue(served_folder):
    """The base with the dialogue module merged, loaded as a Python user would."""
    with Model(served_folder / "model.bin", modules=[(served_folder / "dialogue.bin", 1.0)]) as m:
        yield m


@pytest.fixture(scope="module")
def multi_url(served_folder, tiny, dialogue, built):
    """Three instances of model.bin: bare (the default), with the dialogue module, with it at
    scale 0.5; each its own Model, as `arianna-c serve --instance` loads them."""
    with Model(served_folder / "model.bin", modules=[(served_folder / "dialogue.bin", 0.5)]) as half:
        instances = [Instance("tiny", tiny), Instance("dialogue", dialogue, (("dialogue.bin", 1.0),)),
                     Instance("half", half, (("dialogue.bin", 0.5),))]
        with running(instances, parallel=4) as u:
            yield u


def test_models_lists_every_instance_with_its_modules(multi_url):
    assert [m.id for m in client(multi_url).models.list().data] == ["tiny", "dialogue", "half"]
    data = get(multi_url, "/v1/models")["data"]
    assert [m["modules"] for m in data] == [[], [{"file": "dialogue.bin", "scale": 1.0}],
                                            [{"file": "dialogue.bin", "scale": 0.5}]]
    assert client(multi_url).models.retrieve("half").id == "half"
    status, body = get_status(multi_url, "/v1/models/nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert set(get(multi_url, "/health")["models"]) == {"tiny", "dialogue", "half"}


def test_each_instance_answers_as_its_model(multi_url, served_folder, tiny, dialogue):
    c = client(multi_url)
    settings = dict(max_tokens=24, seed=8, temperature=0.9, extra_body={"ignore_eos": True})
    texts = {name: c.completions.create(model=name, prompt="the river", **settings).choices[0].text
             for name in ("tiny", "dialogue", "half")}
    want = dict(max_new_tokens=24, seed=8, temperature=0.9, ignore_eos=True)
    assert texts["dialogue"] == dialogue.generate("the river", **want)
    assert texts["tiny"] == tiny.generate("the river", **want)
    with Model(served_folder / "model.bin", modules=[(served_folder / "dialogue.bin", 0.5)]) as half:
        assert texts["half"] == half.generate("the river", **want)
    assert len(set(texts.values())) == 3  # the module changes what the model says
    messages = [{"role": "user", "content": "What is the river?"}]
    chunks = c.chat.completions.create(model="dialogue", messages=messages, max_tokens=20, seed=3, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        chat_completion(dialogue, messages, seed=3, max_new_tokens=20).text
    r = c.chat.completions.create(model="dialogue", messages=messages, max_tokens=20, seed=3)
    assert r.model == "dialogue" and r.choices[0].message.content == \
        chat_completion(dialogue, messages, seed=3, max_new_tokens=20).text


def test_a_request_without_model_goes_to_the_first_instance(multi_url, tiny):
    status, data = post(multi_url, "/v1/completions", json.dumps({"prompt": "a stone", "max_tokens": 12,
                                                                  "seed": 2}).encode())
    assert status == 200 and data["model"] == "tiny"
    assert data["choices"][0]["text"] == tiny.generate("a stone", max_new_tokens=12, seed=2)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "gpt-4o", "prompt": "x"}),
    ("/v1/chat/completions", {"model": "Dialogue", "messages": [{"role": "user", "content": "x"}]}),
    ("/v1/completions", {"model": "", "prompt": "x"}),
])
def test_an_unknown_model_is_404_naming_the_models_there_are(multi_url, path, body):
    status, data = post(multi_url, path, json.dumps(body).encode())
    assert status == 404, data
    error = data["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["type"] == "invalid_request_error"
    assert repr(body["model"]) in error["message"] and "tiny, dialogue, half" in error["message"]


def test_the_openai_client_sees_an_unknown_model(multi_url):
    with pytest.raises(openai.NotFoundError) as e:
        client(multi_url).completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_instances_need_distinct_names(tiny):
    with pytest.raises(ValueError, match="'a' is given 2 times"):
        create_app([Instance("a", tiny), Instance("a", tiny)])


# ---------------------------------------------------------------------------- the library's limits


def test_stop_strings_up_to_the_librarys_limit(url, tiny, lib):
    limit = lib.AC_MAX_STOPS
    stops = [f"#{i}#" for i in range(limit + 1)]
    status, data = post(url, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 3, "seed": 1,
                                                            "stop": stops[:limit]}).encode())
    assert status == 200, data
    status, data = post(url, "/v1/completions", json.dumps({"prompt": "x", "stop": stops}).encode())
    assert status == 400 and data["error"]["param"] == "stop"
    assert f"stop has {limit + 1} strings; at most {limit}" in data["error"]["message"]
    # a chat template's stop strings count towards the same limit
    added = len(chat_template(tiny).stop)
    assert added >= 1
    messages = [{"role": "user", "content": "x"}]
    status, data = post(url, "/v1/chat/completions", json.dumps({"messages": messages, "max_tokens": 3,
                                                                 "stop": stops[:limit - added]}).encode())
    assert status == 200, data
    status, data = post(url, "/v1/chat/completions", json.dumps({"messages": messages,
                                                                 "stop": stops[:limit - added + 1]}).encode())
    assert status == 400 and data["error"]["param"] == "stop"
    assert f"at most {limit - added}" in data["error"]["message"] and "chat template" in data["error"]["message"]


def test_a_stop_string_longer_than_the_library_holds_is_400(url, lib):
    body = {"prompt": "x", "stop": ["a" * (lib.AC_MAX_STOP_BYTES + 1)]}
    status, data = post(url, "/v1/completions", json.dumps(body).encode())
    assert status == 400 and data["error"]["param"] == "stop" and str(lib.AC_MAX_STOP_BYTES) in data["error"]["message"]


def test_seeds_stop_below_the_librarys_random_seed(url, tiny, lib):
    top = lib.AC_SEED_RANDOM - 1  # the largest fixed seed
    status, data = post(url, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 6, "seed": top}).encode())
    assert status == 200 and data["choices"][0]["text"] == tiny.generate("x", max_new_tokens=6, seed=top)
    status, data = post(url, "/v1/completions", json.dumps({"prompt": "x", "seed": top, "n": 2}).encode())
    assert status == 400 and data["error"]["param"] == "seed" and "AC_SEED_RANDOM" in data["error"]["message"]


def test_parallel_and_queue_are_checked_when_the_app_is_made(tiny):
    with pytest.raises(ValueError, match="parallel 0: batch size 0 is invalid"):
        create_app(tiny, parallel=0)
    with pytest.raises(ValueError, match="queue size 0 is invalid"):
        create_app(tiny, queue_size=0)


# ---------------------------------------------------------------------------- arianna-c serve


@pytest.mark.parametrize("args, rc, words", [
    (["--instance", "chat"], 2, ["--instance", "'chat'", "NAME=MODULE"]),
    (["--instance", "={dir}/dialogue.bin"], 2, ["--instance", "name before '='"]),
    (["--instance", "d={dir}/dialogue.bin,,x.bin"], 2, ["--instance", "empty module"]),
    (["-L", ""], 2, ["-L", "module path is empty"]),
    (["-L", "missing.bin"], 1, ["module file not found: missing.bin"]),
    (["--instance", "d=missing.bin"], 1, ["--instance d:", "missing.bin"]),
    (["--instance", "d={dir}/tokenizer.bin"], 1, ["--instance d:", "tokenizer.bin", "not a module file"]),
    (["--instance", "model="], 1, ["--instance:", "'model' is given 2 times", "MODEL is served as 'model'"]),
    (["--instance", "a=", "--instance", "a={dir}/dialogue.bin"], 1, ["--instance:", "'a' is given 2 times"]),
    (["--parallel", "0"], 1, ["parallel 0"]),
    (["--queue", "0"], 1, ["queue size 0"]),
    (["--port", "99999"], 2, ["--port", "port 99999 is invalid", "0..65535"]),
    (["--port", "-1"], 2, ["--port", "port -1 is invalid", "0..65535"]),
])
def test_bad_serve_arguments_are_named(served_folder, built, capsys, args, rc, words):
    """Each is refused before the server listens (so main returns, or argparse exits)."""
    from arianna_c.cli import main

    argv = ["serve", str(served_folder / "model.bin"), "--port", str(free_port()),
            *(a.format(dir=served_folder) for a in args)]
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's usage error
        status = e.code
    stderr = capsys.readouterr().err
    assert status == rc, stderr
    for word in words:
        assert word in stderr, stderr


def test_generate_command_reads_modules_as_run_does(served_folder, built):
    base, module = served_folder / "model.bin", served_folder / "dialogue.bin"
    run = subprocess.run([sys.executable, "-m", "arianna_c.cli", "generate", str(base), "-L", f"{module}:0.5",
                          "-i", "the sea", "-n", "12", "-s", "6"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr
    with Model(base, modules=[(module, 0.5)]) as half:
        assert run.stdout == "the sea" + half.generate("the sea", max_new_tokens=12, seed=6) + "\n"
    with Model(base) as plain:
        assert run.stdout != "the sea" + plain.generate("the sea", max_new_tokens=12, seed=6) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_with_modules_and_instances(served_folder, tiny, dialogue, built, tmp_path):
    """MODEL with -L at scale 0.5 under its file name, plus --instance plain= (the bare base)
    and --instance chat=MODULE: each id answers as the Model with those modules."""
    base, module = served_folder / "model.bin", served_folder / "dialogue.bin"
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "arianna_c.cli", "serve", str(base), "-L", f"{module}:0.5",
                                 "--instance", "plain=", "--instance", f"chat={module}", "--port", str(port),
                                 "--parallel", "2"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 2 * TIMEOUT  # a new Python process that loads three models
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not start:\n" + log.read_text()
            try:
                get(url, "/health")
                break
            except OSError:
                time.sleep(0.1)
        data = get(url, "/v1/models")["data"]
        assert [(m["id"], m["modules"]) for m in data] == [
            ("model", [{"file": "dialogue.bin", "scale": 0.5}]), ("plain", []),
            ("chat", [{"file": "dialogue.bin", "scale": 1.0}])]
        c = client(url)
        want = dict(max_new_tokens=16, seed=4, ignore_eos=True)
        texts = {name: c.completions.create(model=name, prompt="the sea", max_tokens=16, seed=4,
                                            extra_body={"ignore_eos": True}).choices[0].text
                 for name in ("model", "plain", "chat")}
        with Model(base, modules=[(module, 0.5)]) as half:
            assert texts["model"] == half.generate("the sea", **want)
        assert texts["plain"] == tiny.generate("the sea", **want)
        assert texts["chat"] == dialogue.generate("the sea", **want)
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)


# ---------------------------------------------------------------------------- the chat page


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_chat_page_streams_a_reply_from_the_chosen_model(multi_url, dialogue, tiny):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(TIMEOUT)
        driver.get(multi_url + "/")
        choice = WebDriverWait(driver, TIMEOUT).until(
            lambda d: Select(d.find_element(By.ID, "model")) if len(Select(d.find_element(By.ID, "model")).options) == 3
            else None)
        assert [o.text for o in choice.options] == ["tiny", "dialogue (dialogue.bin)", "half (dialogue.bin x0.5)"]
        assert choice.first_selected_option.get_attribute("value") == "tiny"  # the server's default
        choice.select_by_value("dialogue")
        driver.find_element(By.TAG_NAME, "summary").click()  # open the settings
        driver.find_element(By.ID, "seed").send_keys("7")
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("40")
        box = driver.find_element(By.ID, "prompt")
        box.send_keys("What is the river?", Keys.ENTER)
        reply = WebDriverWait(driver, TIMEOUT).until(
            lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, ".assistant")
                            if e.get_attribute("data-done") == "true"), None))
        text = driver.execute_script("return arguments[0].textContent", reply)
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
    finally:
        driver.quit()
    settings = dict(seed=7, max_new_tokens=40, temperature=0.8, top_p=0.9)
    messages = [{"role": "user", "content": "What is the river?"}]
    assert text == chat_completion(dialogue, messages, **settings).text and text
    assert text != chat_completion(tiny, messages, **settings).text  # the choice reached the server


def stream_events(url: str, path: str, body: dict) -> list[dict]:
    """The JSON events of a streamed answer (without the closing [DONE])."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    conn.request("POST", path, body=json.dumps(dict(body, stream=True)), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    events = [e for e in r.read().decode().split("\n\n") if e]
    conn.close()
    assert r.status == 200 and events[-1] == "data: [DONE]", events
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


@pytest.mark.parametrize("echo", [True, False])
def test_streamed_logprobs_have_the_offsets_of_the_whole_answer(url, echo):
    body = {"prompt": "the river", "max_tokens": 8, "seed": 4, "logprobs": 1, "echo": echo, "n": 2}
    status, whole = post(url, "/v1/completions", json.dumps(body).encode())
    assert status == 200, whole
    for choice in whole["choices"]:
        offsets, tokens, text = [], [], ""
        for event in stream_events(url, "/v1/completions", body):
            for part in event["choices"]:
                if part["index"] == choice["index"]:
                    text += part["text"]
                    if part["logprobs"]:
                        offsets += part["logprobs"]["text_offset"]
                        tokens += part["logprobs"]["tokens"]
        assert text == choice["text"]
        assert tokens == choice["logprobs"]["tokens"]
        assert offsets == choice["logprobs"]["text_offset"]
        assert offsets[0] == (len("the river") if echo else 0)


def test_echo_empty_prompts_and_a_huge_body(url, tiny):
    c = client(url)
    r = c.completions.create(model="tiny", prompt="the river", max_tokens=5, seed=4, echo=True, logprobs=1)
    expected = alone(tiny, "the river", max_new_tokens=5, seed=4)
    assert r.choices[0].text == "the river" + expected.text
    assert r.choices[0].logprobs.text_offset[0] == len("the river")
    for prompt in ("", []):
        status, data = post(url, "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 4, "seed": 2}).encode())
        assert status == 200 and data["choices"][0]["text"] == alone(tiny, "", max_new_tokens=4, seed=2).text
    status, data = post(url, "/v1/completions", b'{"prompt": "' + b"a" * (9 << 20) + b'"}')
    assert status == 413 and "bytes" in data["error"]["message"]
