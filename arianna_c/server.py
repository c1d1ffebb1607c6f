"""An OpenAI-compatible HTTP server: ``arianna-c serve MODEL --host 127.0.0.1 --port 8080``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` sends
server-sent events ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and a
chat page at ``/``.  Needs the ``server`` extra (``pip install 'arianna_c[server]'``).

Continuous batching: one worker thread (:class:`Batcher`) owns a batch of ``parallel`` KV
caches.  A request takes one cache per choice (``n``), its prompt is prefilled, and from then
on every running choice advances by one token per step, all in one batched forward pass; a
request that arrives joins at the next step, one that ends leaves.  The generation rules are
:mod:`arianna_c.session`'s, so a request's text is the same as the same request alone.
Requests wait in a bounded queue for free caches; when it is full the answer is 503.  A
client that disconnects is cancelled before the next step.

Instances: one server may answer for several models (:class:`Instance`: an API id and a
Model, e.g. the same base with different knowledge modules merged), each with its own
weights, batcher and KV caches; a request's ``model`` picks one, the first answers requests
that name none.
"""

from __future__ import annotations

import asyncio
import collections
import json
import queue
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Literal, Optional, Sequence, Union

from . import chat as chat_templates
from .cli import DEFAULT_HOST, DEFAULT_PARALLEL, DEFAULT_PORT, DEFAULT_QUEUE
from .errors import AriannaError
from .runtime import _c_generation
from .sampling import AC_SEED_RANDOM, NAMES as SAMPLING_NAMES, SamplingParams
from .session import Completion, Generation, Session, Slots, TokenLogprob, chat_prompt, with_stops
from .session import chat_template as session_chat_template

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("the server needs the 'server' extra: pip install 'arianna_c[server]'") from e

# OpenAI's limits on alternatives per token (completions / chat)
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20
# Far more than any prompt that fits a context needs.
MAX_BODY_BYTES = 8 << 20
# How often a waiting non-streaming request looks for its client having gone.
DISCONNECT_POLL_S = 0.05


# ---------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _validation_error(e: ValidationError) -> APIError:
    """The first problem pydantic found, named by its field (union alternatives that pydantic
    adds to the location, such as "list[str]", are left out)."""
    first = e.errors()[0]
    known = set(CompletionBody.model_fields) | set(ChatBody.model_fields) | set(Message.model_fields)
    param = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or p in known) or None
    return APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)


# ---------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    """Fields common to both endpoints; strict types (a number given as a string is an
    error, not a guess), unknown fields ignored as OpenAI's optional extras."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**64)
    stop: Optional[Union[str, list[str]]] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repeat_penalty: Optional[float] = None
    repeat_last_n: Optional[int] = None
    logit_bias: Optional[dict[str, float]] = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    ignore_eos: bool = False


class CompletionBody(_Body):
    prompt: Union[str, list[str], list[int]] = ""
    max_tokens: Optional[int] = Field(16, ge=0)  # OpenAI's default for completions
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    chat_template: Optional[str] = None


# ---------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One request on its way through the batcher: prompt tokens, one SamplingParams per
    choice, and how results travel back to the event loop (an asyncio queue of events for a
    stream, a future for the whole answer)."""

    prompt: list[int]
    choices: list[tuple[SamplingParams, Optional[int]]]
    loop: asyncio.AbstractEventLoop
    stream: bool
    events: "asyncio.Queue[tuple]" = field(default_factory=asyncio.Queue)
    done: "asyncio.Future[list[Completion]]" = None  # type: ignore[assignment]
    cancelled: threading.Event = field(default_factory=threading.Event)
    results: list[Optional[Completion]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.done = self.loop.create_future()
        self.results = [None] * len(self.choices)

    # Called from the batcher thread; what they post reaches the event loop with the rest of
    # the step's news (Outbox), so a step wakes the loop once, not once per stream.
    def emit(self, outbox: "Outbox", index: int, text: str, logprobs: list[TokenLogprob]) -> None:
        if self.stream and (text or logprobs):
            outbox.post(self, ("text", index, text, logprobs))

    def finish(self, outbox: "Outbox", index: int, completion: Completion) -> None:
        self.results[index] = completion
        if self.stream:
            outbox.post(self, ("end", index, completion))
        if all(r is not None for r in self.results):
            outbox.post(self, ("done", self.results))

    def fail(self, outbox: "Outbox", error: BaseException) -> None:
        if self.stream:
            outbox.post(self, ("error", error))
        outbox.post(self, ("failed", error))

    def deliver(self, event: tuple) -> None:
        """On the event loop: a stream's event to its queue, the end of the job to its future."""
        if event[0] in ("done", "failed"):
            if not self.done.done():
                if event[0] == "done":
                    self.done.set_result(event[1])
                else:
                    self.done.set_exception(event[1])
        else:
            self.events.put_nowait(event)


class Outbox:
    """Events of many jobs collected during a batcher step and handed to their event loops
    in one call each."""

    def __init__(self) -> None:
        self._items: list[tuple[Job, tuple]] = []

    def post(self, job: Job, event: tuple) -> None:
        self._items.append((job, event))

    def flush(self) -> None:
        items, self._items = self._items, []
        loops: dict[asyncio.AbstractEventLoop, list] = {}
        for job, event in items:
            loops.setdefault(job.loop, []).append((job, event))
        for loop, batch in loops.items():
            loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[Job, tuple]]) -> None:
    for job, event in batch:
        job.deliver(event)


@dataclass
class _Running:
    """One choice of a job that holds a cache."""

    job: Job
    index: int
    session: Session
    generation: Generation
    token: int  # sampled, to be run at the next step
    sent: int = 0  # logprob entries already emitted


class Batcher:
    """The worker thread: admits queued jobs while caches are free, then runs one decode step
    for every running choice at once, until the server stops."""

    def __init__(self, model: Any, parallel: int = DEFAULT_PARALLEL, queue_size: int = DEFAULT_QUEUE) -> None:
        self.model = model
        self.slots = Slots(model, parallel)
        self.parallel = parallel
        self.queue: "queue.Queue[Job]" = queue.Queue(maxsize=queue_size)
        self.running: list[_Running] = []
        self._waiting: Optional[Job] = None  # taken from the queue, waiting for enough caches
        self._stop = threading.Event()
        self.outbox = Outbox()
        self.steps = 0  # decode steps run
        self.widest = 0  # most choices one step has advanced together
        self._thread = threading.Thread(target=self._loop, name="arianna-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queues job; APIError 503 when the queue is full."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise APIError(503, "the server is busy: its request queue is full; retry later",
                           type="server_error", code="queue_full") from None

    @property
    def busy(self) -> int:
        return self.parallel - self.slots.n_free

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for r in self.running:
            r.session.close()
        self.running.clear()
        self.slots.close()

    # -------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                self._drop_cancelled()
                if self.running:
                    self._step()
            except Exception as e:  # a bug must not end the thread: fail what was running
                for r in self.running:
                    self._end(r, error=e)
                self.running.clear()
            self.outbox.flush()

    def _next_job(self) -> Optional[Job]:
        if self._waiting is None:
            try:
                # block only when there is nothing to step
                self._waiting = self.queue.get(timeout=0.05) if not self.running else self.queue.get_nowait()
            except queue.Empty:
                return None
        return self._waiting

    def _admit(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            if job.cancelled.is_set():
                self._waiting = None
                continue
            if self.slots.n_free < len(job.choices):
                return  # it waits for caches (first come, first served)
            self._waiting = None
            try:
                self._start(job)
            except Exception as e:
                self._cancel_job(job)
                job.fail(self.outbox, e)

    def _start(self, job: Job) -> None:
        for index, (params, logprobs) in enumerate(job.choices):
            session = Session(self.model, self.slots)
            try:
                session.feed_tokens(job.prompt)
                generation = session.start(params, logprobs=logprobs)
                if generation.done:
                    token = None
                else:
                    token = generation.step(session.first_logits())
            except BaseException:
                session.close()
                raise
            running = _Running(job, index, session, generation, token if token is not None else -1)
            self._publish(running)
            if token is None:
                self._end(running)
            else:
                self.running.append(running)

    def _step(self) -> None:
        rows = [r.session.advance(r.token) for r in self.running]
        logits = self.slots.decode(rows)
        self.steps += 1
        self.widest = max(self.widest, len(rows))
        still = []
        for r, row_logits in zip(self.running, logits):
            try:
                token = r.generation.step(row_logits)
            except Exception as e:
                self._end(r, error=e)
                continue
            self._publish(r)
            if token is None:
                self._end(r)
            else:
                r.token = token
                still.append(r)
        self.running = still

    def _publish(self, r: _Running) -> None:
        text = r.generation.take_text()
        logprobs = r.generation.logprobs or []
        new, r.sent = logprobs[r.sent:], len(logprobs)
        r.job.emit(self.outbox, r.index, text, new)

    def _end(self, r: _Running, error: Optional[BaseException] = None) -> None:
        r.session.close()
        if error is not None:
            self._cancel_job(r.job)
            r.job.fail(self.outbox, error)
        elif not r.job.cancelled.is_set():
            r.job.finish(self.outbox, r.index, r.generation.result())

    def _cancel_job(self, job: Job) -> None:
        job.cancelled.set()
        for r in self.running:
            if r.job is job:
                r.generation.cancel()

    def _drop_cancelled(self) -> None:
        keep = []
        for r in self.running:
            if r.job.cancelled.is_set():
                r.generation.cancel()
                r.session.close()
            else:
                keep.append(r)
        self.running = keep


# ---------------------------------------------------------------------------- the app


@dataclass(frozen=True)
class Instance:
    """One model the server answers for: its id in the API (a request's ``model``), the
    Model (with its knowledge modules merged at load, ``Model(path, modules=...)``) and those
    modules as (file name, scale), which /v1/models lists."""

    name: str
    model: Any
    modules: tuple[tuple[str, float], ...] = ()


class _Served:
    """An instance as the app runs it: its chat template and its batcher (own KV caches)."""

    def __init__(self, instance: Instance, chat_template: Optional[str], parallel: int, queue_size: int) -> None:
        self.name, self.model, self.modules = instance.name, instance.model, instance.modules
        self.template = session_chat_template(instance.model, chat_template)
        self.seq_len = instance.model.config.seq_len
        try:
            self.batcher = Batcher(instance.model, parallel, queue_size)
        except AriannaError as e:
            raise AriannaError(f"parallel {parallel}: {e}", e.code) from None

    def entry(self, created: int) -> dict:
        """The instance in /v1/models."""
        return {"id": self.name, "object": "model", "created": created, "owned_by": "arianna_c",
                "context_length": self.seq_len,
                "modules": [{"file": file, "scale": scale} for file, scale in self.modules]}


def _instances(model: Any, model_name: str) -> list[Instance]:
    """create_app's first argument as a list of Instances with distinct names."""
    if isinstance(model, Instance):
        return [model]
    if not isinstance(model, (list, tuple)):
        return [Instance(model_name, model)]
    instances = list(model)
    if not instances or not all(isinstance(i, Instance) for i in instances):
        raise TypeError("create_app needs a Model or a non-empty list of Instances")
    check_names([i.name for i in instances])
    return instances


def check_names(names: Sequence[str]) -> None:
    """ValueError unless every instance name is a non-empty str of its own."""
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"instance name {name!r} is invalid: it must be a non-empty str")
        if names.count(name) > 1:
            raise ValueError(f"instance name {name!r} is given {names.count(name)} times: each must be unique")


Choice = tuple[SamplingParams, Optional[int]]  # the settings, logprobs


def _choice(body: _Body, max_tokens: Optional[int], logprobs: Optional[int], index: int,
            template_stops: tuple[str, ...] = ()) -> Choice:
    """The settings of choice index (seed + index, as Model.generate_batch does), with
    template_stops (where a chat template's next turn starts) after the request's stops."""
    bias = None
    if body.logit_bias:
        try:
            bias = {int(k): v for k, v in body.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    seed = None if body.seed is None else body.seed + index
    if seed is not None and seed >= AC_SEED_RANDOM:
        raise APIError(400, f"seed {body.seed} is invalid: choice {index} samples with seed + {index} = {seed}, and "
                            f"seeds must be below {AC_SEED_RANDOM} (the library's AC_SEED_RANDOM, a random seed)",
                       param="seed")
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            seed=seed, ignore_eos=body.ignore_eos, min_p=body.min_p, repeat_penalty=body.repeat_penalty,
            repeat_last_n=body.repeat_last_n, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, stop=stop, logit_bias=bias)
    except (TypeError, AriannaError) as e:
        raise _settings_error(e) from None
    try:
        return with_stops(params, template_stops), logprobs
    except AriannaError as e:  # more stop strings than the library holds
        raise APIError(400, str(e), param="stop") from None


def _check_settings(model: Any, choice: Choice) -> None:
    """The library's range checks, before the request is queued (a 400, not a failed job)."""
    params, _ = choice
    try:
        _c_generation(model, params)
    except AriannaError as e:
        raise _settings_error(e) from None


# A refused setting's field in a request, by how the message that refuses it starts:
# SamplingParams' and the library's messages start with the setting's name, the library's
# in words for these two.
_SETTING_FIELDS = {**{name: name for name in SAMPLING_NAMES if name in _Body.model_fields},
                   "logit bias": "logit_bias", "stop string": "stop"}


def _settings_error(e: Exception) -> APIError:
    """A 400 for settings SamplingParams or the library refused, naming the field when the
    message does."""
    message = str(e)
    param = next((name for words, name in _SETTING_FIELDS.items() if message.startswith(words)), None)
    return APIError(400, message, param=param)


def _request_template(name: str) -> chat_templates.Template:
    """The chat template a request's chat_template names."""
    try:
        return chat_templates.get_template(name)
    except ValueError as e:
        raise APIError(400, str(e), param="chat_template") from None


def create_app(model: Union[Any, Instance, Sequence[Instance]], model_name: str = "arianna_c",
               api_key: Optional[str] = None, parallel: int = DEFAULT_PARALLEL, queue_size: int = DEFAULT_QUEUE,
               chat_template: Optional[str] = None) -> FastAPI:
    """The FastAPI app serving model (an arianna_c.Model) under the id model_name, or each
    of a list of Instances under its own id (model_name unused); a request's ``model`` picks
    one, the first answers requests that name none, an unknown id is a 404.

    ``parallel``: KV caches of each instance, i.e. choices it generates at once (created
    here, so a value the library refuses raises now); ``queue_size`` (>= 1): requests that
    may wait for a cache of an instance (more are answered 503); ``api_key``: when set, /v1/
    requests need ``Authorization: Bearer <api_key>``; ``chat_template``: the chat
    template's name (default: chosen from each instance's vocabulary, see arianna_c.chat)."""
    instances = _instances(model, model_name)
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError(f"queue size {queue_size!r} is invalid: it must be an int >= 1")
    served: dict[str, _Served] = {}
    try:
        for instance in instances:
            served[instance.name] = _Served(instance, chat_template, parallel, queue_size)
    except BaseException:
        for s in served.values():
            s.batcher.close()
        raise
    default = served[instances[0].name]
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for s in served.values():
            s.batcher.start()
        try:
            yield
        finally:
            for s in served.values():
                s.batcher.close()

    app = FastAPI(title="arianna_c", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    def check_key(request: Request) -> None:
        """Every /v1/ endpoint starts here.  (Not an HTTP middleware: Starlette's hides a
        client's disconnect from the endpoint, which must see it to cancel.)"""
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")

    async def read_body(request: Request, kind: type) -> Any:
        chunks, size = [], 0
        async for chunk in request.stream():  # read no further than the limit
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return kind.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None

    def find(name: str) -> _Served:
        if name not in served:
            raise APIError(404, f"the model {name!r} does not exist; this server has: {', '.join(served)}",
                           param="model", code="model_not_found")
        return served[name]

    def pick(body: _Body) -> _Served:
        """The instance a request names (none: the first)."""
        return default if body.model is None else find(body.model)

    def check_prompt(tokens: list[int], seq_len: int) -> None:
        if len(tokens) > seq_len:
            raise APIError(400, f"the prompt is {len(tokens)} tokens (BOS included) but the model's context "
                                f"is {seq_len} tokens", param="prompt", code="context_length_exceeded")

    def check_n(body: _Body) -> None:
        if body.n > parallel:
            raise APIError(400, f"n {body.n} exceeds the server's {parallel} parallel sequences", param="n")

    async def run_job(request: Request, batcher: Batcher, job: Job) -> list[Completion]:
        """Waits for a non-streaming job, cancelling it if the client goes away; a failure is
        the job's APIError."""
        try:
            batcher.submit(job)
            while True:
                done, _ = await asyncio.wait({job.done}, timeout=DISCONNECT_POLL_S)
                if done:
                    return job.done.result()
                if await request.is_disconnected():
                    job.cancelled.set()
                    raise asyncio.CancelledError
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        except Exception as e:
            raise job_error(e) from None

    def stream(batcher: Batcher, job: Job, body: _Body, chunk: Any, first: Any) -> StreamingResponse:
        """Submits a streaming job (a full queue is a 503 before the stream starts) and answers
        with its event stream."""
        include = bool((body.stream_options or {}).get("include_usage"))
        batcher.submit(job)
        return StreamingResponse(sse(job, chunk, first, include), media_type="text/event-stream")

    def header(rid: str, kind: str, name: str) -> dict:
        """The fields every response and chunk starts with (name: the instance's id)."""
        return {"id": rid, "object": kind, "created": int(time.time()), "model": name}

    def job_error(e: BaseException) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, AriannaError):
            return APIError(400, str(e))
        return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")

    def usage(job: Job, results: list[Completion]) -> dict:
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": len(job.prompt), "completion_tokens": completion,
                "total_tokens": len(job.prompt) + completion}

    async def sse(job: Job, chunk: Any, first: Any, include_usage: bool) -> AsyncIterator[bytes]:
        """The event stream of a submitted job: chunk(index, text, logprobs, finish_reason)
        per event, first(index) before a choice's first text."""
        try:
            for index in range(len(job.choices)):
                if first is not None:
                    yield _event(first(index))
            ended: list[Completion] = []
            failed = False
            waiting: collections.deque[tuple] = collections.deque()
            while len(ended) < len(job.choices):
                if not waiting:
                    waiting.append(await job.events.get())
                while not job.events.empty():
                    waiting.append(job.events.get_nowait())
                event = _merge_text(waiting)
                if event[0] == "text":
                    _, index, text, logprobs = event
                    yield _event(chunk(index, text, logprobs, None))
                elif event[0] == "end":
                    _, index, completion = event
                    ended.append(completion)
                    yield _event(chunk(index, "", [], completion.finish_reason))
                else:
                    err = job_error(event[1])
                    yield _event({"error": {"message": err.message, "type": err.type, "code": err.code}})
                    failed = True
                    break
            if include_usage and not failed:
                yield _event(chunk(None, None, None, None, usage(job, ended)))
            yield b"data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a client that left (the generator is closed): stop at once

    # -------------------------------------------------------------- endpoints

    @app.get("/health")
    async def health() -> dict:
        """Totals over the instances, then each instance's own numbers."""
        each = {name: {"busy": s.batcher.busy, "queued": s.batcher.queue.qsize(), "steps": s.batcher.steps,
                       "widest_step": s.batcher.widest} for name, s in served.items()}
        total = {key: sum(e[key] for e in each.values()) for key in ("busy", "queued", "steps")}
        return {"status": "ok", "model": default.name, "parallel": parallel, **total,
                "widest_step": max(e["widest_step"] for e in each.values()), "models": each}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [s.entry(created) for s in served.values()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(request: Request, name: str) -> dict:
        check_key(request)
        return find(name).entry(created)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("arianna_c").joinpath("static/index.html").read_text("utf-8"))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        check_key(request)
        body: CompletionBody = await read_body(request, CompletionBody)
        instance = pick(body)
        model, seq_len = instance.model, instance.seq_len
        check_n(body)
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            if len(body.prompt) != 1:
                raise APIError(400, "prompt: one prompt per request (a list of one string, a string or token ids)",
                               param="prompt")
            body.prompt = body.prompt[0]
        try:
            if isinstance(body.prompt, str):
                prompt_text = body.prompt
                tokens = model.encode(prompt_text, bos=True)
            else:
                tokens = list(body.prompt)
                if any(not 0 <= t < model.config.vocab_size for t in tokens):
                    raise APIError(400, f"prompt: token ids must be in [0, {model.config.vocab_size})", param="prompt")
                prompt_text = model.decode(tokens)
        except AriannaError as e:
            raise APIError(400, str(e), param="prompt") from None
        check_prompt(tokens, seq_len)
        choices = [_choice(body, body.max_tokens, body.logprobs, i) for i in range(body.n)]
        _check_settings(model, choices[0])
        job = Job(tokens, choices, asyncio.get_running_loop(), body.stream)
        rid, echo = f"cmpl-{secrets.token_hex(12)}", prompt_text if body.echo else ""

        def logprobs_of(items: list[TokenLogprob], offset: int) -> Optional[dict]:
            if body.logprobs is None:
                return None
            offsets, at = [], offset
            for t in items:
                offsets.append(at)
                at += len(t.text)
            return {"tokens": [t.text for t in items], "token_logprobs": [t.logprob for t in items],
                    "top_logprobs": [{a[1]: a[3] for a in t.top} for t in items], "text_offset": offsets}

        if body.stream:
            offsets = [len(echo)] * body.n  # where each choice's next token starts, as in the whole answer

            def chunk(index, text, items, finish, usage_=None):
                base = header(rid, "text_completion", instance.name)
                if index is None:
                    return dict(base, choices=[], usage=usage_)
                lp = logprobs_of(items, offsets[index])
                offsets[index] += sum(len(t.text) for t in items)
                return dict(base, choices=[{"text": text, "index": index, "logprobs": lp, "finish_reason": finish}])

            first = (lambda index: chunk(index, echo, [], None)) if echo else None
            return stream(instance.batcher, job, body, chunk, first)

        results = await run_job(request, instance.batcher, job)
        return {**header(rid, "text_completion", instance.name),
                "choices": [{"text": echo + r.text, "index": i, "logprobs": logprobs_of(r.logprobs or [], len(echo)),
                             "finish_reason": r.finish_reason} for i, r in enumerate(results)],
                "usage": usage(job, results)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request)
        body: ChatBody = await read_body(request, ChatBody)
        instance = pick(body)
        model, seq_len, template = instance.model, instance.seq_len, instance.template
        check_n(body)
        tmpl = _request_template(body.chat_template) if body.chat_template else template
        try:
            tokens = chat_prompt(model, [m.model_dump() for m in body.messages], tmpl)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="messages") from None
        check_prompt(tokens, seq_len)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = seq_len  # until the context is full
        n_top = (body.top_logprobs or 0) if body.logprobs else None
        choices = [_choice(body, max_tokens, n_top, i, tmpl.stop) for i in range(body.n)]
        _check_settings(model, choices[0])
        job = Job(tokens, choices, asyncio.get_running_loop(), body.stream)
        rid = f"chatcmpl-{secrets.token_hex(12)}"

        def logprobs_of(items: list[TokenLogprob]) -> Optional[dict]:
            if not body.logprobs:
                return None
            return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.bytes),
                                 "top_logprobs": [{"token": a[1], "logprob": a[3], "bytes": list(a[2])} for a in t.top]}
                                for t in items]}

        if body.stream:
            replies = [chat_templates.Reply() for _ in range(body.n)]

            def chunk(index, text, items, finish, usage_=None):
                base = header(rid, "chat.completion.chunk", instance.name)
                if index is None:
                    return dict(base, choices=[], usage=usage_)
                text = replies[index].push(text)
                delta = {"content": text} if text else {}
                return dict(base, choices=[{"index": index, "delta": delta, "logprobs": logprobs_of(items),
                                            "finish_reason": finish}])

            def first(index):
                return dict(header(rid, "chat.completion.chunk", instance.name),
                            choices=[{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}])

            return stream(instance.batcher, job, body, chunk, first)

        results = await run_job(request, instance.batcher, job)
        return {**header(rid, "chat.completion", instance.name),
                "choices": [{"index": i, "message": {"role": "assistant", "content": chat_templates.reply_text(r.text)},
                             "logprobs": logprobs_of(r.logprobs or []), "finish_reason": r.finish_reason}
                            for i, r in enumerate(results)],
                "usage": usage(job, results)}

    return app


def _merge_text(waiting: "collections.deque[tuple]") -> tuple:
    """The next event, joined with the text events of the same choice right behind it: when
    the client (or the event loop) falls behind, one chunk carries several tokens instead of
    one chunk each."""
    event = waiting.popleft()
    while event[0] == "text" and waiting and waiting[0][0] == "text" and waiting[0][1] == event[1]:
        after = waiting.popleft()
        event = ("text", event[1], event[2] + after[2], event[3] + after[3])
    return event


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def serve(model: Union[Any, Instance, Sequence[Instance]], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          **options: Any) -> None:
    """Runs the server (create_app's model and options) until interrupted (uvicorn)."""
    import uvicorn

    app = create_app(model, **options)
    uvicorn.run(app, host=host, port=port, log_level="info")
