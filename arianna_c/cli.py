"""The ``arianna-c`` command: one entry point for generating, chatting, serving, evaluating and
converting models.  ``arianna-c COMMAND --help`` lists each command's options with units and
defaults.  (``./run``, built by ``make``, stays the llama2.c-compatible CLI.)

    arianna-c generate [MODEL] -i "Once upon a time" -n 64
    arianna-c chat [MODEL] --chat-template qa
    arianna-c serve [MODEL] --host 127.0.0.1 --port 8080 [-L MODULE[:SCALE]] [--instance NAME=MODULE]
    arianna-c perplexity MODEL FILE -c 256
    arianna-c convert from-gguf MODEL.gguf OUT.bin
    arianna-c quantize MODEL OUT.bin
    arianna-c bench --quick
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Optional, Sequence

from . import chat as chat_templates
from .errors import AriannaError
from .paths import tokenizer_lookup_text
from .sampling import AC_SEED_RANDOM, _seed as check_seed

PROG = "arianna-c"
# The defaults of `arianna-c serve`, which arianna_c.server's create_app and serve share.
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080
DEFAULT_PARALLEL, DEFAULT_QUEUE = 16, 64
MAX_PORT = 65535


# ---------------------------------------------------------------------------- shared options


def _library_defaults() -> dict[str, Any]:
    """The C sampler's defaults, shown by --help (the library is their one home)."""
    try:
        from ._lib import load

        p = load().ac_sampler_default_params()
        return {name: getattr(p, name) for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                                                       "repeat_last_n", "presence_penalty", "frequency_penalty")}
    except ImportError:  # no library built: --help still works
        return {}


def _default(defaults: dict, name: str) -> str:
    value = defaults.get(name)
    return "the library's" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _add_model(p: argparse.ArgumentParser, optional: bool = True) -> None:
    if optional:
        p.add_argument("model", nargs="?", help="model file (.bin, v0/v1/v2 layouts); default: the bundled persona")
    else:
        p.add_argument("model", help="model file (.bin, v0/v1/v2 layouts)")
    p.add_argument("-z", "--tokenizer", help=f"tokenizer file; default: {tokenizer_lookup_text()}")
    p.add_argument("-T", "--threads", type=int, help="threads per forward pass; default: all available cores")
    p.add_argument("-q", "--quantize", choices=["int8"], help="quantize a float32 model at load (Q8_0); default: off")
    p.add_argument("-L", "--module", dest="modules", action="append", default=[], type=_module_spec,
                   metavar="MODULE[:SCALE]", help="knowledge module merged into the weights at load, before -q "
                   "(repeatable; SCALE default 1, as ./run -L); default: none")


def _module_spec(text: str) -> tuple[str, float]:
    """-L MODULE[:SCALE] as ./run reads it: the scale follows the last ':' when that is a number."""
    from .lora import split_spec

    path, scale = split_spec(text)
    if not path:
        raise argparse.ArgumentTypeError(f"{text!r}: the module path is empty")
    return path, scale


def _instance_spec(text: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """--instance NAME=MODULE[:SCALE][,MODULE[:SCALE]...] (nothing after '=': the bare base)."""
    name, sep, modules = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=MODULE[:SCALE][,MODULE[:SCALE]...] "
                                         "(NAME= alone: the base without modules)")
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r}: the instance name before '=' is empty")
    specs = modules.split(",") if modules else []
    if any(not spec for spec in specs):
        raise argparse.ArgumentTypeError(f"{text!r}: an empty module between commas")
    try:
        return name, tuple(_module_spec(spec) for spec in specs)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def _add_sampling(p: argparse.ArgumentParser, defaults: dict, max_tokens_default: str) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--n-predict", "--max-tokens", dest="max_new_tokens", type=int,
                   help=f"tokens to generate at most; default: {max_tokens_default}")
    g.add_argument("-t", "--temp", dest="temperature", type=float,
                   help=f"temperature, 0 = greedy; default: {_default(defaults, 'temperature')}")
    g.add_argument("-p", "--top-p", dest="top_p", type=float,
                   help=f"nucleus threshold in (0, 1], 1 = off; default: {_default(defaults, 'top_p')}")
    g.add_argument("-k", "--top-k", dest="top_k", type=int,
                   help=f"keep the k most likely tokens, 0 = off; default: {_default(defaults, 'top_k')}")
    g.add_argument("--min-p", dest="min_p", type=float,
                   help=f"drop tokens below min_p x the best one's probability, 0 = off; default: {_default(defaults, 'min_p')}")
    g.add_argument("--repeat-penalty", dest="repeat_penalty", type=float,
                   help=f"penalty for tokens of the last --repeat-last-n, 1 = off; default: {_default(defaults, 'repeat_penalty')}")
    g.add_argument("--repeat-last-n", dest="repeat_last_n", type=int,
                   help=f"recent tokens the penalties look at, 0 = none; default: {_default(defaults, 'repeat_last_n')}")
    g.add_argument("--presence-penalty", dest="presence_penalty", type=float,
                   help=f"subtracted from the logit of a token seen in the window; default: {_default(defaults, 'presence_penalty')}")
    g.add_argument("--frequency-penalty", dest="frequency_penalty", type=float,
                   help=f"subtracted per occurrence in the window; default: {_default(defaults, 'frequency_penalty')}")
    g.add_argument("-s", "--seed", type=_seed, help=f"sampler seed, 0..{AC_SEED_RANDOM - 1}; default: random")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the text contains TEXT (not printed; repeatable); default: none")
    g.add_argument("--ignore-eos", action="store_true", help="go on past the model's end of text; default: off")


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _seed(text: str) -> int:
    """-s SEED: arianna_c.sampling's seed rule, less AC_SEED_RANDOM, which the library reads as
    "a random seed" (leaving -s out asks for one)."""
    try:
        seed = check_seed("seed", _whole(text))
    except AriannaError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seed == AC_SEED_RANDOM:
        raise argparse.ArgumentTypeError(f"seed {seed} is the library's AC_SEED_RANDOM (a random seed); the fixed "
                                         f"seeds are 0..{AC_SEED_RANDOM - 1}, and leaving -s out picks a random one")
    return seed


def _port(text: str) -> int:
    port = _whole(text)
    if not 0 <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"port {port} is invalid: it must be in 0..{MAX_PORT}")
    return port


_SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
             "presence_penalty", "frequency_penalty", "seed")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    out = {name: getattr(args, name) for name in _SAMPLING if getattr(args, name) is not None}
    out["stop"] = tuple(args.stop)
    out["ignore_eos"] = args.ignore_eos
    return out


def _load(args: argparse.Namespace, modules: Optional[Sequence[tuple[str, float]]] = None) -> Any:
    """The model the arguments name, with -L's modules merged (or those given)."""
    from . import Model

    return Model(args.model, tokenizer=args.tokenizer, threads=args.threads, quantize=args.quantize,
                 modules=list(args.modules if modules is None else modules))


# ---------------------------------------------------------------------------- commands


def _write_bytes(out: Any, data: bytes) -> None:
    """data to the text stream out as they are (./run echoes a prompt's bytes so), whatever
    out's encoding errors; a stream without bytes underneath gets them decoded."""
    buffer = getattr(out, "buffer", None)
    if buffer is None:
        out.write(data.decode("utf-8", "replace"))
        return
    out.flush()
    buffer.write(data)
    buffer.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    model = _load(args)
    with model.session() as session:
        prompt = os.fsencode(args.prompt)  # the bytes typed, valid UTF-8 or not, as ./run reads them
        session.feed(prompt)
        out = sys.stdout
        _write_bytes(out, prompt)
        start = time.perf_counter()
        for text in session.stream(**_settings(args)):
            out.write(text)
            out.flush()
        seconds = time.perf_counter() - start
        out.write("\n")
        result = session.last
    print(f"[{result.completion_tokens} tokens in {seconds:.2f} s, finish_reason {result.finish_reason}]",
          file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .session import Chat

    model = _load(args)
    interactive = sys.stdin.isatty()
    with Chat(model, template=args.chat_template, system=args.system) as conversation:
        if interactive:
            print(f"chat template {conversation.template.name}; an empty line or Ctrl-D ends", file=sys.stderr)
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line or not line.strip():
                return 0
            try:
                for text in conversation.stream(line.rstrip("\n"), **_settings(args)):
                    sys.stdout.write(text)
                    sys.stdout.flush()
            except AriannaError as e:  # e.g. a turn too long for the context: say so, go on
                print(f"error: {e}", file=sys.stderr)
            sys.stdout.write("\n")
            sys.stdout.flush()


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import Instance, check_names, serve

    name = args.model_name or _model_name(args.model)
    wanted = [(name, tuple(args.modules), None)] + [(n, m, f"--instance {n}") for n, m in args.instances]
    try:
        check_names([n for n, _, _ in wanted])
    except ValueError as e:
        raise ValueError(f"--instance: {e} (MODEL is served as {name!r}: --model-name, default its file name)") from None
    instances = []
    try:
        for n, modules, flag in wanted:
            try:
                model = _load(args, modules)
            except (AriannaError, OSError, ValueError) as e:
                if flag is None:
                    raise
                print(f"error: {flag}: {_message(e)}", file=sys.stderr)
                return 1
            instances.append(Instance(n, model, tuple((_file_name(path), scale) for path, scale in modules)))
        serve(instances, host=args.host, port=args.port, api_key=args.api_key, parallel=args.parallel,
              queue_size=args.queue, chat_template=args.chat_template)
    finally:
        for instance in instances:
            instance.model.close()
    return 0


def _model_name(path: Optional[str]) -> str:
    """A model's default id in the API: its file name without the suffix."""
    from pathlib import Path

    from .paths import DEFAULT_MODEL

    return Path(path or DEFAULT_MODEL).stem


def _file_name(path: str) -> str:
    from pathlib import Path

    return Path(path).name


def cmd_perplexity(args: argparse.Namespace) -> int:
    from . import perplexity

    model = _load(args)
    with open(args.file, "rb") as f:  # the file's bytes, as ./run's tokenizer would read them
        text = f.read()
    bar = _progress_bar()
    result = perplexity.evaluate(model, text, context=args.ctx_size, stride=args.stride, progress=bar)
    bar.close()
    print(result)
    print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f}")
    print(f"bits per byte: {result.bits_per_byte:.4f}")
    return 0


class _progress_bar:
    """tqdm's bar on stderr with the running PPL, or one line per window without tqdm."""

    def __init__(self) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self._tqdm, self._bar = tqdm, None

    def __call__(self, done: int, total: int, ppl: float) -> None:
        if self._tqdm is None:
            print(f"[{done}/{total}] PPL {ppl:.4f}", file=sys.stderr, flush=True)
            return
        if self._bar is None:
            self._bar = self._tqdm(total=total, unit="window", file=sys.stderr)
        self._bar.set_postfix_str(f"PPL {ppl:.4f}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def cmd_quantize(args: argparse.Namespace) -> int:
    from . import Model

    model = Model(args.model, tokenizer=args.tokenizer, quantize="int8")
    model.save(args.out)
    print(f"wrote {args.out} (int8, v2 layout)", file=sys.stderr)
    return 0


def cmd_bench(argv: list[str]) -> int:
    """python -m bench of the source checkout this package runs from (or the current folder)."""
    from pathlib import Path

    roots = [Path(__file__).resolve().parent.parent, Path.cwd()]
    root = next((r for r in roots if (r / "bench" / "harness.py").is_file()), None)
    if root is None:
        print("error: bench needs a source checkout (its bench/ folder); tried: "
              + ", ".join(str(r / "bench") for r in roots), file=sys.stderr)
        return 1
    sys.path.insert(0, str(root))
    from bench.harness import main as bench_main  # type: ignore[import-not-found]

    return int(bench_main(argv) or 0)


def cmd_convert(argv: list[str]) -> int:
    from .convert import main as convert_main

    return int(convert_main(argv, prog=f"{PROG} convert") or 0)


# Commands whose arguments all go to another tool's own parser (its --help included).
PASS_THROUGH = {"convert": cmd_convert, "bench": cmd_bench}


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    defaults = _library_defaults()
    parser = argparse.ArgumentParser(prog=PROG, description="Run, serve and evaluate tiny Llama-architecture models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = command("generate", cmd_generate, "continue a prompt, streaming the text to stdout")
    _add_model(p)
    p.add_argument("-i", "--prompt", default="", help="the prompt; default: empty (start from BOS)")
    _add_sampling(p, defaults, "256")

    p = command("chat", cmd_chat, "chat on stdin/stdout, keeping the context between turns")
    _add_model(p)
    p.add_argument("-y", "--system", help="system prompt; default: none")
    p.add_argument("--chat-template", choices=list(chat_templates.TEMPLATES),
                   help="chat template; default: chosen from the vocabulary (ChatML if it has <|im_start|>, else qa)")
    _add_sampling(p, defaults, "256")

    p = command("serve", cmd_serve, "serve the OpenAI API (completions, chat) and a chat page over HTTP")
    _add_model(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on; default: {DEFAULT_HOST}")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT,
                   help=f"TCP port, 0..{MAX_PORT}; default: {DEFAULT_PORT}")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ requests; default: none")
    p.add_argument("--model-name", help="the model's id in the API (MODEL with -L's modules; it answers requests "
                                        "that name no model); default: the model file's name without suffix")
    p.add_argument("--instance", dest="instances", action="append", default=[], type=_instance_spec,
                   metavar="NAME=[MODULE[:SCALE][,MODULE[:SCALE]...]]",
                   help="also serve MODEL with these modules merged (none: the bare base) under the id NAME, "
                        "chosen by a request's model field (repeatable). Each instance holds its own copy of the "
                        "weights (the persona: 28.7 MB float32) and its own --parallel KV caches; "
                        "-z, -T and -q apply to every instance; default: none")
    p.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL,
                   help="sequences each instance generates at once (KV caches of seq_len positions each; the "
                        f"persona: 3.5 MB each); default: {DEFAULT_PARALLEL}")
    p.add_argument("--queue", type=int, default=DEFAULT_QUEUE,
                   help=f"requests that may wait for a free sequence of an instance; more get 503; default: {DEFAULT_QUEUE}")
    p.add_argument("--chat-template", choices=list(chat_templates.TEMPLATES),
                   help="chat template; default: chosen from the vocabulary")

    p = command("perplexity", cmd_perplexity, "perplexity of a model on a text file (llama-perplexity's method)")
    _add_model(p, optional=False)
    p.add_argument("file", help="UTF-8 text file")
    p.add_argument("-c", "--ctx-size", type=int, help="tokens per chunk/window; default: the model's seq_len")
    p.add_argument("--stride", type=int,
                   help="sliding window: step in tokens (every token scored once); default: off "
                        "(non-overlapping chunks, second half of each scored)")

    p = command("quantize", cmd_quantize, "write an int8 (Q8_0, v2 layout) copy of a float32 model")
    p.add_argument("model", help="float32 model file")
    p.add_argument("out", help="output model file")
    p.add_argument("-z", "--tokenizer", help="tokenizer file (only checked); default: next to the model")

    sub.add_parser("convert", help="convert models from/to Hugging Face and GGUF (arianna-c convert --help)")
    sub.add_parser("bench", help="the speed benchmark of a source checkout (arianna-c bench --help)")
    return parser


def _message(e: BaseException) -> str:
    """An error as one line: an OSError's reason with its file named once, not Python's
    "[Errno 2] reason: 'file'"."""
    if isinstance(e, OSError) and e.strerror:
        if e.filename is None or str(e.filename) in e.strerror:
            return e.strerror
        return f"{e.filename}: {e.strerror}"
    return str(e)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:
        return PASS_THROUGH[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (AriannaError, OSError, ValueError, ImportError) as e:  # ImportError: an extra not installed
        print(f"error: {_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
