"""One measurement, run in its own subprocess by the harness:

    python -m bench.worker '<json spec>'

prints one line ``BENCH_RESULT {json}`` on stdout.  The spec's ``kind`` picks the measurement
(python_decode, python_prefill, python_batch, python_startup, numpy_decode, numpy_prefill,
torch_decode, torch_prefill).  The harness sets OMP_NUM_THREADS / OPENBLAS_NUM_THREADS to the
row's thread count in this process's environment before Python starts.

Rates follow the CLI's definition wherever tokens come one at a time: (tokens - 1) divided by
the time from the first generated token to the last one, so prompt processing and start-up
are left out the same way for every implementation.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()  # before anything heavy is imported (the startup row)

import inspect  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

RESULT_TAG = "BENCH_RESULT "
BOS, EOS = 1, 2


class NotBuilt(Exception):
    """The runtime lacks the feature this row measures."""


def _rate(times: list[float]) -> float:
    if len(times) < 2 or times[-1] <= times[0]:
        raise RuntimeError(f"only {len(times)} tokens were generated: no rate")
    return (len(times) - 1) / (times[-1] - times[0])


# ---------------------------------------------------------------------------- python binding


def _model_kwargs(spec: dict) -> tuple[dict, str]:
    """Constructor keywords for the row (threads=, quantize=) when the binding has them."""
    import arianna_c

    params = inspect.signature(arianna_c.Model.__init__).parameters
    kwargs: dict = {}
    threads_via = "OMP_NUM_THREADS"
    if "threads" in params:
        kwargs["threads"] = spec["threads"]
        threads_via = "threads="
    if spec.get("dtype", "f32") == "int8":
        if "quantize" not in params:
            raise NotBuilt("Model(quantize=) is not in the binding")
        kwargs["quantize"] = "int8"
    return kwargs, threads_via


class _Timed:
    """Stands in for the binding's cffi library object: every attribute passes through, and
    the named C functions are timed (start and end time, and the token an ac_session_next
    produced or the token count of an ac_session_next_text)."""

    def __init__(self, lib, names: tuple[str, ...]) -> None:
        self._lib = lib
        self.log: dict[str, list] = {name: [] for name in names}

    def __getattr__(self, name: str):
        attr = getattr(self._lib, name)
        if name not in self.log:
            return attr
        log, clock = self.log[name], time.perf_counter

        def timed(*args):
            t0 = clock()
            rc = attr(*args)
            t1 = clock()
            token = int(args[1][0]) if name == "ac_session_next" else None
            if name == "ac_session_next_text":
                token = int(args[4][0])  # tokens in the call
            log.append((t0, t1, token))
            return rc

        return timed


def _ignores_eos(method) -> bool:
    """Whether the binding can go on past the model's end of text (every row then times the
    same number of tokens, whatever the weights emit): a keyword of the method, or a field of
    the SamplingParams its **settings take."""
    if "ignore_eos" in inspect.signature(method).parameters:
        return True
    import dataclasses

    import arianna_c

    params = getattr(arianna_c, "SamplingParams", None)
    return dataclasses.is_dataclass(params) and "ignore_eos" in {f.name for f in dataclasses.fields(params)}


def _open_model(spec: dict):
    import arianna_c

    kwargs, threads_via = _model_kwargs(spec)
    model = arianna_c.Model(spec["model"], spec["tokenizer"], **kwargs)
    return model, threads_via


def python_decode(spec: dict) -> dict:
    model, threads_via = _open_model(spec)
    timed = None
    if hasattr(model, "_lib"):
        timed = _Timed(model._lib, ("ac_session_next", "ac_session_next_text"))
        model._lib = timed
    extra = {"ignore_eos": True} if _ignores_eos(model.generate) else {}
    t0 = time.perf_counter()
    text = model.generate(spec["prompt"], max_new_tokens=spec["tokens"], temperature=0.0, repeat_penalty=1.0, **extra)
    total = time.perf_counter() - t0
    chunks = timed.log["ac_session_next_text"] if timed else []
    produced = sum(n for (_, _, n) in chunks)
    if produced >= 2:
        # from the first call's start (the first token is sampled from the prompt's logits) to
        # the last one's end, the Python between the calls included: produced - 1 forward
        # passes, as in the CLI's first-to-last-token rate
        span = chunks[-1][1] - chunks[0][0]
        return {"value": (produced - 1) / span, "tokens": produced, "total_s": total,
                "timing": "first ac_session_next_text call to the last (a chunk of tokens each), timed "
                          "through the binding",
                "threads_via": threads_via}
    calls = timed.log["ac_session_next"] if timed else []
    ends_text = () if extra else (BOS, EOS)  # with ignore_eos those are tokens like any other
    produced = [t1 for (_, t1, tok) in calls if tok is not None and tok >= 0 and tok not in ends_text]
    if len(produced) >= 2:
        return {"value": _rate(produced), "tokens": len(produced), "total_s": total,
                "timing": "first to last token (ac_session_next timed through the binding)",
                "threads_via": threads_via}
    # the binding no longer goes through ac_session_next: fall back to the whole call
    n = len(model.encode(text, bos=False))
    return {"value": n / total, "tokens": n, "total_s": total, "tokens_exact": False,
            "timing": "whole generate() call; tokens re-encoded from the text", "threads_via": threads_via}


# The calls that run a prompt, one of which generate() makes: text (encoded inside the call,
# a few microseconds of the time) or token ids.
FEEDS = ("ac_session_feed", "ac_session_feed_tokens")


def python_prefill(spec: dict) -> dict:
    model, threads_via = _open_model(spec)
    if not hasattr(model, "_lib"):
        raise NotBuilt("the binding has no _lib to time its prompt call through")
    timed = _Timed(model._lib, FEEDS)
    model._lib = timed
    model.generate(spec["prompt"], max_new_tokens=1, temperature=0.0, repeat_penalty=1.0)
    fed = [(name, calls[0]) for name, calls in timed.log.items() if calls]
    if not fed:
        raise NotBuilt("generate() calls neither " + " nor ".join(FEEDS))
    name, (t0, t1, _) = fed[0]
    n = len(model.encode(spec["prompt"], bos=True))
    return {"value": n / (t1 - t0), "tokens": n, "timing": f"{name} through the binding", "threads_via": threads_via}


def python_batch(spec: dict) -> dict:
    model, threads_via = _open_model(spec)
    if not hasattr(model, "generate_batch"):
        raise NotBuilt("Model.generate_batch is not in the binding")
    prompts = [spec["prompt"]] * spec["batch"]
    ignore_eos = _ignores_eos(model.generate_batch)
    extra = {"ignore_eos": True} if ignore_eos else {}
    t0 = time.perf_counter()
    outs = model.generate_batch(prompts, max_new_tokens=spec["tokens"], temperature=0.0, repeat_penalty=1.0, **extra)
    total = time.perf_counter() - t0
    n, exact = 0, True
    if ignore_eos:  # every sequence ran to max_new_tokens, or to seq_len if that came first
        room = model.config.seq_len - len(model.encode(spec["prompt"], bos=True))
        n = len(prompts) * min(spec["tokens"], room)
    else:
        for out in outs:
            if isinstance(out, str):
                n += len(model.encode(out, bos=False))
                exact = False
            else:
                n += len(out)
    return {"value": n / total, "tokens": n, "total_s": total, "tokens_exact": exact,
            "timing": "whole generate_batch() call (prompts included)", "threads_via": threads_via}


def python_startup(spec: dict) -> dict:
    """import arianna_c + Model load + the first generated token, in this fresh process."""
    wall_spawn = spec.get("spawn_wall")
    t0 = _T_START
    import arianna_c

    t_import = time.perf_counter()
    model, threads_via = _open_model(spec)
    t_load = time.perf_counter()
    model.generate(spec["prompt"], max_new_tokens=1, temperature=0.0, repeat_penalty=1.0)
    t_first = time.perf_counter()
    since_spawn = (time.time() - wall_spawn) * 1e3 if wall_spawn else None
    return {"value": (t_first - t0) * 1e3, "import_ms": (t_import - t0) * 1e3,
            "load_ms": (t_load - t_import) * 1e3, "first_token_ms": (t_first - t_load) * 1e3,
            "since_spawn_ms": since_spawn, "threads_via": threads_via, "version": arianna_c.__version__}


# ---------------------------------------------------------------------------- NumPy reference


def _reference(spec: dict):
    from arianna_c.reference import Reference

    return Reference(spec["model"])


def numpy_decode(spec: dict) -> dict:
    import numpy as np

    ref = _reference(spec)
    ids, seq_len = spec["prompt_ids"], ref.config.seq_len
    logits = None
    for pos, tok in enumerate(ids):
        logits = ref.step(int(tok), pos)
    pos, times = len(ids), []
    while len(times) < spec["tokens"] and pos < seq_len:
        token = int(np.argmax(logits))  # BOS/EOS do not stop it: the same token count as the CLI rows
        times.append(time.perf_counter())
        if pos + 1 >= seq_len:
            break
        logits = ref.step(token, pos)
        pos += 1
    return {"value": _rate(times), "tokens": len(times), "timing": "first to last token (Reference.step)"}


def numpy_prefill(spec: dict) -> dict:
    ref = _reference(spec)
    ids = spec["prompt_ids"]
    ref.logits(ids[:8])  # warm-up: first-call allocations
    t0 = time.perf_counter()
    ref.logits(ids)
    dt = time.perf_counter() - t0
    return {"value": len(ids) / dt, "tokens": len(ids), "timing": "Reference.logits over the prompt (all positions)"}


# ---------------------------------------------------------------------------- PyTorch eager


def _torch(spec: dict):
    """torch, bench.torch_kv and the model; for int8 rows its Linear layers dynamically
    quantized (int8 weights, activations quantized per call), PyTorch's own int8 path."""
    import warnings

    import torch

    torch.set_num_threads(spec["threads"])
    from bench import torch_kv

    model = torch_kv.load_model(spec["model"])
    if spec["dtype"] == "int8":
        with warnings.catch_warnings():  # the API is deprecated in favour of torchao, not installed here
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return torch, torch_kv, model


def torch_decode(spec: dict) -> dict:
    torch, torch_kv, model = _torch(spec)
    # like the CLI (-e 1) and binding (ignore_eos=True) rows: exactly spec["tokens"] tokens
    tokens, times = torch_kv.decode(model, spec["prompt_ids"], spec["tokens"], ignore_eos=True)
    return {"value": _rate(times), "tokens": len(tokens), "torch": torch.__version__,
            "timing": "first to last token (KV-cache decode loop, no_grad)"}


def torch_prefill(spec: dict) -> dict:
    torch, torch_kv, model = _torch(spec)
    ids = spec["prompt_ids"]
    torch_kv.prefill(model, ids[:8])  # warm-up
    dt = torch_kv.prefill(model, ids)
    return {"value": len(ids) / dt, "tokens": len(ids), "torch": torch.__version__,
            "timing": "one forward over the prompt (all positions), no_grad"}


KINDS = {f.__name__: f for f in (python_decode, python_prefill, python_batch, python_startup,
                                 numpy_decode, numpy_prefill, torch_decode, torch_prefill)}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        result = KINDS[spec["kind"]](spec)
        result.setdefault("status", "ok")
    except NotBuilt as exc:
        result = {"status": "n/a (not built)", "detail": str(exc)}
    except ImportError as exc:
        result = {"status": "n/a (not installed)", "detail": str(exc)}
    except Exception as exc:  # reported in the table, never a crash of the harness
        result = {"status": f"error: {type(exc).__name__}: {exc}"}
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
