"""The persona training pipeline: ``python -m arianna_c.train {tokenizer,pretokenize,train,module}``.

``train`` pretrains (or, with ``--init-from``, fine-tunes) LLiSA on every shard of a data
folder, in one process or in several under ``torchrun`` (DistributedDataParallel). The
learning-rate schedule (linear warmup, cosine decay) runs on *progress*, the larger of steps
done / --max-steps and time spent / --time-budget, so a run given a wall-clock budget still
finishes its decay on a busy machine. ``--resume`` continues a run exactly where its last
checkpoint left it; Ctrl-C (SIGINT) or SIGTERM stops after the current step and saves one.

Fine-tuning on a small set can wreck what the base model knew. With ``--guard-data BASE_DIR``
the base corpus' validation loss is measured before the first step and at every evaluation; the
run stops once it is worse than at the start by more than ``--guard-margin`` (relative), and
the checkpoint kept is the best one that stayed within the margin.

This module holds the command line and the settings; it needs no PyTorch, so ``--help`` and
the tokenizer steps work without it. The loop itself is ``arianna_c.trainer``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

from .data import pretokenize, shard_summary, train_tokenizer

TORCH_HINT = "pip install torch==2.13.0 (or pip install 'arianna_c[train]')"


class ConfigError(ValueError):
    """Settings that cannot make a run: the message names the option and what to do."""


@dataclass
class TrainConfig:
    data: str
    out: str
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: Optional[int] = None
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 200
    max_steps: int = 2000
    time_budget: float = 0.0  # minutes; 0 = steps only
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float = 0.0
    val_fraction: float = 0.05
    eval_interval: int = 200
    eval_batches: int = 20
    log_interval: int = 10
    save_interval: float = 10.0  # minutes
    seed: int = 1337
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    threads: int = 0
    init_from: Optional[str] = None
    resume: bool = False
    guard_data: Optional[str] = None
    guard_margin: float = 0.05


# What each option means, with its unit; the default comes from TrainConfig.
OPTION_HELP = {
    "data": "folder of .bin token shards from `pretokenize` (every shard is used); "
            "with --resume, the checkpoint's folder unless given",
    "out": "run folder: ckpt/ (the last state), best/ (lowest validation loss), history.json; "
           "a folder that holds a run is continued with --resume, never overwritten",
    "dim": "model width (embedding size); must divide by --n-heads",
    "n_layers": "transformer blocks",
    "n_heads": "attention heads",
    "n_kv_heads": "key/value heads (grouped-query attention); must divide --n-heads; unset = --n-heads",
    "vocab_size": "tokenizer pieces; must be the shards' tokenizer's",
    "seq_len": "tokens per batch row (the model's context length)",
    "batch_size": "rows per micro-batch, in each process",
    "grad_accum": "micro-batches per optimizer step: a step trains on batch_size x grad_accum rows "
                  "in all, split over the torchrun processes",
    "lr": "peak learning rate, reached after the warmup",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "optimizer steps of linear warmup (at most --max-steps)",
    "max_steps": "optimizer steps of the whole run",
    "time_budget": "minutes of training steps; 0 = no time limit (the schedule ends with whichever "
                   "of steps and time runs out first)",
    "weight_decay": "AdamW weight decay of the matrices (not of the norms)",
    "grad_clip": "largest gradient norm; 0 = no clipping",
    "dropout": "probability of dropping an activation of a block's attention or feed-forward "
               "output while training (a regulariser for many passes over a small corpus); 0 = none",
    "val_fraction": "fraction of each shard's tail held out for validation",
    "eval_interval": "optimizer steps between validation runs",
    "eval_batches": "batches of --batch-size rows per validation run",
    "log_interval": "optimizer steps between progress lines",
    "save_interval": "minutes between checkpoints (one is also written at the end and on Ctrl-C)",
    "seed": "seed of the initial weights and of the batch draw",
    "dtype": "compute type: bf16 autocast, or fp32; auto = bf16 where the hardware has native bf16 "
             "(AMX or AVX512-BF16 CPUs, bf16 GPUs)",
    "device": "auto = cuda when a GPU is visible, else cpu",
    "compile": "torch.compile the model (pays on long runs)",
    "threads": "PyTorch CPU threads per process; 0 = PyTorch's default",
    "init_from": "start from these weights (fine-tuning): a checkpoint folder, a .pt of an older "
                 "version, or a model .bin; their shape wins",
    "resume": "continue OUT/ckpt as saved: settings, weights, optimizer, schedule, data position, RNG",
    "guard_data": "base-corpus shards whose validation loss must not worsen (fine-tuning guard)",
    "guard_margin": "stop once the base-corpus validation loss is this fraction above its start",
}
CHOICES = {"dtype": ("auto", "fp32", "bf16"), "device": ("auto", "cpu", "cuda")}
OPTION_TYPES = {"int": int, "Optional[int]": int, "float": float}  # TrainConfig's annotations

# The model's shape: from --init-from's weights (or the checkpoint) unless given.
SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")
# Settings a resumed run may change: how long it runs, how it reports, where it computes.
# Every other setting is the checkpoint's; giving a different value is an error.
RESUME_MAY_CHANGE = ("data", "out", "resume", "max_steps", "time_budget", "eval_interval",
                     "log_interval", "save_interval", "dtype", "device", "compile", "threads")

# The range of each numeric setting; a ModuleConfig shares most of these names (check_values).
POSITIVE = ("dim", "n_layers", "n_heads", "vocab_size", "seq_len", "batch_size", "grad_accum",
            "max_steps", "eval_interval", "eval_batches", "log_interval", "lr", "val_fraction")
NOT_NEGATIVE = ("warmup_steps", "time_budget", "weight_decay", "grad_clip", "dropout", "save_interval",
                "threads", "min_lr", "guard_margin")
BELOW_ONE = ("dropout", "val_fraction")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# -------------------------------------------------------------- the schedule and progress lines


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr + cosine * (cfg.lr - cfg.min_lr)


def progress_of(cfg: TrainConfig, step: int, elapsed: float) -> float:
    by_steps = step / cfg.max_steps
    by_time = elapsed / (60.0 * cfg.time_budget) if cfg.time_budget > 0 else 0.0
    return max(by_steps, by_time)


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, loss: float, lr: float, tok_s: float, progress: float, elapsed: float) -> str:
    eta = elapsed / progress - elapsed if progress > 0 else float("inf")
    width = 24
    filled = int(width * min(progress, 1.0))
    bar = "#" * filled + "-" * (width - filled)
    eta_text = format_eta(eta) if math.isfinite(eta) else "?"
    return (f"[{bar}] {100 * progress:5.1f}% step {step} loss {loss:.4f} lr {lr:.2e} "
            f"{tok_s:,.0f} tok/s elapsed {format_eta(elapsed)} eta {eta_text}")


# ---------------------------------------------------------------------- settings


def resolve_config(options: dict, warn: Callable[[str], None] = lambda s: None) -> TrainConfig:
    """The settings of a run from the options given (only those given, by field name).

    On --resume the checkpoint's settings are the base; with --init-from the model's shape is.
    Whether a given option contradicts either is checked by the Trainer when it loads them
    (check_resume / check_shape), so the rule holds however a TrainConfig was made.
    """
    unknown = set(options) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown training options: {', '.join(sorted(unknown))}")
    if not options.get("out"):
        raise ConfigError("--out is required: the folder for the run's checkpoints")
    base: dict = {}
    if options.get("resume"):
        base = saved_settings(Path(options["out"]))
    elif options.get("init_from"):
        base = shape_of(options["init_from"])
    settings = {**base, **options}
    if not settings.get("data"):
        raise ConfigError("--data is required: a folder of .bin shards (see `pretokenize`)")
    cfg = TrainConfig(**settings)
    check_ranges(cfg)
    if cfg.warmup_steps > cfg.max_steps and not cfg.resume:  # a resumed run keeps its schedule
        warn(f"warning: --warmup-steps {cfg.warmup_steps} is longer than the run (--max-steps "
             f"{cfg.max_steps}); warming up over {cfg.max_steps} steps")
        cfg.warmup_steps = cfg.max_steps
    return cfg


def saved_settings(out: Path) -> dict:
    """The settings stored in OUT/ckpt (JSON only), as TrainConfig fields."""
    from .checkpoint import RESUME_KEYS, CheckpointError, read_meta

    try:
        settings = read_meta(out / "ckpt", RESUME_KEYS)["settings"]
    except CheckpointError as exc:
        if (out / "ckpt.pt").is_file():
            raise ConfigError(f"--resume: {out / 'ckpt.pt'} is a checkpoint of an earlier version, which "
                              f"cannot be resumed; continue from its weights with --init-from") from None
        raise ConfigError(f"--resume: {exc}; train without --resume to start this run") from None
    known = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in settings.items() if k in known}


def shape_of(init_from: str) -> dict:
    """The shape settings (and seq_len) of --init-from's model."""
    from .export import load_torch_model

    args = load_torch_model(init_from).args
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
            "n_kv_heads": args.resolved_kv_heads(), "vocab_size": args.vocab_size,
            "seq_len": args.max_seq_len}


def check_values(settings) -> None:
    """Every field of settings (a TrainConfig or a ModuleConfig) named in POSITIVE, NOT_NEGATIVE
    and BELOW_ONE is in its range."""
    names = {f.name for f in fields(settings)}
    rules = ((POSITIVE, lambda v: v > 0, "above 0"), (NOT_NEGATIVE, lambda v: v >= 0, "0 or more"),
             (BELOW_ONE, lambda v: v < 1, "below 1"))
    for group, holds, wanted in rules:
        for name in (n for n in group if n in names):
            value = getattr(settings, name)
            if not holds(value):
                raise ConfigError(f"{flag(name)} {value} is invalid: it must be {wanted}")


def check_ranges(cfg: TrainConfig) -> None:
    check_values(cfg)
    if cfg.dim % cfg.n_heads:
        raise ConfigError(f"--dim {cfg.dim} does not divide by --n-heads {cfg.n_heads}")
    if cfg.n_kv_heads is not None and (cfg.n_kv_heads <= 0 or cfg.n_heads % cfg.n_kv_heads):
        raise ConfigError(f"--n-kv-heads {cfg.n_kv_heads} must be above 0 and divide --n-heads {cfg.n_heads}")


def check_resume(cfg: TrainConfig, saved: dict, where: Path) -> None:
    """Every setting a resumed run may not change equals the checkpoint's."""
    for name, value in saved.items():
        if name in RESUME_MAY_CHANGE or not hasattr(cfg, name):
            continue
        if getattr(cfg, name) != value:
            raise ConfigError(f"{flag(name)} {getattr(cfg, name)} contradicts the checkpoint in {where} "
                              f"({name} {value} there); leave it out to resume as saved, or train "
                              f"into another --out")


def check_shape(cfg: TrainConfig, model_args, where: str) -> None:
    """The shape settings equal the model's (whose shape wins), and seq_len fits its context."""
    actual = {"dim": model_args.dim, "n_layers": model_args.n_layers, "n_heads": model_args.n_heads,
              "n_kv_heads": model_args.resolved_kv_heads(), "vocab_size": model_args.vocab_size}
    for name in SHAPE_KEYS:
        value = getattr(cfg, name)
        if name == "n_kv_heads" and value is None:
            value = cfg.n_heads
        if value != actual[name]:
            raise ConfigError(f"{flag(name)} {getattr(cfg, name)} contradicts {where} ({name} "
                              f"{actual[name]} there); leave it out to use the model's")
    if cfg.seq_len > model_args.max_seq_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the context of {where} "
                          f"({model_args.max_seq_len} tokens)")


# ---------------------------------------------------------------------- command line


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as an option; an option left out is absent from the namespace,
    so resolve_config can tell what was given."""
    defaults = TrainConfig(data="", out="")
    for field in fields(TrainConfig):
        name, default = field.name, getattr(defaults, field.name)
        text = OPTION_HELP[name]
        kwargs: dict = {"default": argparse.SUPPRESS}
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = OPTION_TYPES.get(str(field.type), str)
            if name in CHOICES:
                kwargs["choices"] = CHOICES[name]
            if default not in (None, ""):
                text += f" (default: {default})"
        parser.add_argument(flag(name), help=text, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m arianna_c.train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="train the SentencePiece BPE tokenizer")
    tok.add_argument("--corpus", required=True, help="folder of .txt files (UTF-8)")
    tok.add_argument("--out", required=True, help="model prefix in an existing folder, e.g. persona/tok4096 "
                                                  "(writes PREFIX.model and PREFIX.vocab)")
    tok.add_argument("--vocab-size", type=int, default=4096, help="pieces (default: 4096)")
    pre = sub.add_parser("pretokenize", help="one uint16 shard per corpus file")
    pre.add_argument("--corpus", required=True, help="folder of .txt files (UTF-8)")
    pre.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    pre.add_argument("--out", required=True, help="data folder for the shards (created if missing)")
    train = sub.add_parser("train", help="pretrain or fine-tune (torchrun for several processes)",
                           description="Train LLiSA on a folder of shards. Under torchrun every "
                                       "process draws its share of each step's batch.")
    add_train_arguments(train)
    from .lora import add_module_arguments  # knowledge modules; needs no torch for --help

    add_module_arguments(sub.add_parser("module", help="train a knowledge module (LoRA adapter) on a frozen base"))
    return parser


def require(module: str, hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"training needs {module}: {hint}")


def is_main_process() -> bool:
    """Rank 0 under torchrun (or the only process): the one that logs."""
    return os.environ.get("RANK", "0") == "0"


def require_training_packages() -> None:
    require("torch", TORCH_HINT)
    require("safetensors", "pip install safetensors (or pip install 'arianna_c[train]')")


def run_training(options: dict) -> dict:
    require_training_packages()
    main_process = is_main_process()
    cfg = resolve_config(options, warn=lambda s: print(s, file=sys.stderr) if main_process else None)

    def make_trainer():
        from .trainer import Trainer

        return Trainer(cfg, log=lambda s: print(s, flush=True))

    return train_to_the_end(make_trainer, cfg.threads)


def train_to_the_end(make_trainer: Callable, threads: int) -> dict:
    """Builds a trainer (Trainer or ModuleTrainer) and trains; SIGINT / SIGTERM stop it after
    the current step with a checkpoint saved; the caller's signal handlers come back and
    torchrun's process group is left however the run ends."""
    import gc

    import torch

    from .trainer import leave_world

    if threads > 0:
        torch.set_num_threads(threads)
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    callers_handlers = [signal.getsignal(sig) for sig in stop_signals]
    trainer = None
    try:
        trainer = make_trainer()

        def stop_after_this_step(signum, frame):
            trainer.request_stop()
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once

        for sig in stop_signals:
            signal.signal(sig, stop_after_this_step)
        summary = trainer.train()
        # Rank 0 is still writing the checkpoint when the others return; a process that
        # tears its process group down meanwhile can abort in gloo's threads ("terminate
        # called without an active exception").  Not on an exception: a rank that failed
        # mid-step would meet the others' pending collective instead.
        trainer.world.wait_for_all()
        return summary
    finally:
        for sig, handler in zip(stop_signals, callers_handlers):
            signal.signal(sig, handler)
        # The trainer's DistributedDataParallel wrapper holds the process group: dropped
        # first (with any reference cycle through it), the group is torn down here rather
        # than by the interpreter at exit, where gloo's threads can abort the process the
        # same way.
        trainer = None
        gc.collect()
        leave_world()


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tokenizer":
            print(train_tokenizer(args.corpus, args.out, args.vocab_size))
        elif args.command == "pretokenize":
            print(shard_summary(pretokenize(args.corpus, args.tokenizer, args.out)))
        elif args.command == "module":
            from .lora import main_train

            return main_train(args)
        else:
            options = {k: v for k, v in vars(args).items() if k != "command"}
            summary = run_training(options)
            if is_main_process():
                print(json.dumps(summary))
    except (ValueError, OSError, ArithmeticError) as exc:  # DataError, ConfigError, CheckpointError...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def __getattr__(name: str):
    """The loop's pieces also import from here; they need torch, so they load on first use."""
    if name in ("Trainer", "build_model", "evaluate", "autocast_context", "make_optimizer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
