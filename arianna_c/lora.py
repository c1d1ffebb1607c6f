"""Training knowledge modules: low-rank adapters (LoRA) on a frozen base model.

    python -m arianna_c.train module --base persona/arianna_v1_base.bin --data DIR --out MODULE.bin \\
        --guard-data BASE_SHARDS [--rank 8] [--alpha 16] [--targets wq,wk,wv,wo,w1,w2,w3] [--layers 0-5]

Each targeted matrix W of the base becomes ``W + (alpha / rank) * B @ A`` with A (rank, in) and
B (out, rank) trained and W frozen; B starts at zero, so training starts from the base exactly.
The base file is only read.  ``--data`` is a folder of shards, or of ``.txt`` files (tokenized
first with the base's SentencePiece model, ``--tokenizer``).

The run is pretraining's loop (``arianna_c.trainer.Trainer``) with the base frozen and only the
adapters trainable: the same progress line, schedule, evaluation of the data's validation split
every ``--eval-interval`` steps, guard, checkpoint and resume.  The guard is always on (unless
``--no-guard``): the base corpus' validation loss with the module applied (``--guard-data``) is
measured before the first step and at every evaluation.  The module kept in OUT is the one
with the lowest validation loss whose base-corpus loss stayed within ``--guard-margin`` of the
base's own; the run stops once the base-corpus loss passes that limit.  A checkpoint folder
(``--ckpt``, default OUT without its suffix + ``.ckpt``) holds the adapters, optimizer, data
position and history; Ctrl-C (SIGINT) or SIGTERM stops after the current step and saves it,
and ``--resume`` continues it exactly.

    python -m arianna_c.lora eval --base BASE.bin [--module M.bin[:SCALE] ...] [--data SHARDS]
        [--heldout SHARDS] [--qa DIR] [--tokenizer TOK.model]

prints, with and without modules, as JSON: the validation loss of shard folders (--data), the
loss of every token of held-out shard folders (--heldout), and the loss of the answer tokens of
``Q: ...\\nA: ...`` paragraphs (--qa).

This module holds the settings and the command lines; it needs no PyTorch, so
``python -m arianna_c.train --help`` works without it.  The trainer is ``arianna_c.lora_trainer``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import modules
from .train import (TORCH_HINT, ConfigError, check_values, is_main_process, require,
                    require_training_packages, train_to_the_end)


def parse_targets(matrices: str, layers: str, n_layers: int) -> list[tuple[int, str]]:
    """--targets "wq,wv" and --layers "all" / "0-2,5" -> [(layer, matrix)] in file order."""
    names = [m.strip() for m in matrices.split(",") if m.strip()]
    unknown = [m for m in names if m not in modules.MATRICES]
    if unknown or not names:
        raise ConfigError(f"--targets {matrices!r}: unknown matrix {unknown[0] if unknown else '(none)'}; "
                        f"choose from {','.join(modules.MATRICES)}")
    chosen: set[int] = set()
    if layers.strip() == "all":
        chosen = set(range(n_layers))
    else:
        for part in layers.split(","):
            try:
                lo, _, hi = part.strip().partition("-")
                span = range(int(lo), int(hi or lo) + 1)
            except ValueError:
                raise ConfigError(f"--layers {layers!r}: {part!r} is not a layer or a range like 0-3") from None
            if not span or span[0] < 0 or span[-1] >= n_layers:
                raise ConfigError(f"--layers {layers!r}: {part!r} is outside the base's layers 0-{n_layers - 1}")
            chosen.update(span)
    order = {m: i for i, m in enumerate(modules.MATRICES)}
    return sorted(((l, m) for l in chosen for m in set(names)), key=lambda t: (t[0], order[t[1]]))


def split_spec(spec: str) -> tuple[str, float]:
    """"m.bin" -> ("m.bin", 1.0); "m.bin:0.5" -> ("m.bin", 0.5): the library's rule
    (ac_module_spec, as ./run -L reads it); the scale as the float32 the library uses."""
    from ._lib import _error_check, ffi, load

    raw = os.fsencode(spec)
    if b"\0" in raw:
        raise ValueError(f"module {spec!r} contains a NUL byte")
    path_len, scale = ffi.new("size_t *"), ffi.new("float *")
    _error_check(load().ac_module_spec(raw, path_len, scale))
    return os.fsdecode(raw[: path_len[0]]), float(scale[0])



# ---------------------------------------------------------------------------- settings


@dataclass
class ModuleConfig:
    base: str
    data: str
    out: str
    guard_data: Optional[str] = None
    no_guard: bool = False
    ckpt: Optional[str] = None
    tokenizer: Optional[str] = None
    rank: int = 8
    alpha: float = 16.0
    targets: str = ",".join(modules.MATRICES)
    layers: str = "all"
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    max_steps: int = 500
    time_budget: float = 0.0  # minutes of training steps; 0 = steps only
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    val_fraction: float = 0.05
    guard_margin: float = 0.02
    eval_interval: int = 50
    eval_batches: int = 8
    log_interval: int = 10
    seed: int = 1337
    save_interval: float = 10.0  # minutes
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    threads: int = 0
    resume: bool = False

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.ckpt) if self.ckpt else Path(self.out).with_suffix(".ckpt")


CHECKPOINT = "last"  # the checkpoint folder in ckpt_dir: what --resume reads


# ---------------------------------------------------------------------------- command line


def add_module_arguments(parser: argparse.ArgumentParser) -> None:
    """The `train module` options; every default is None here, so a resumed run can tell a
    setting given on its command line from one left out (see module_config)."""
    d = ModuleConfig(base="", data="", out="")
    add = parser.add_argument
    add("--base", required=True, help="the base model file (.bin); it is only read")
    add("--data", required=True, help="folder of .bin shards, or of .txt files to tokenize")
    add("--out", required=True, help="the module file to write (.bin): the best module so far")
    add("--guard-data", help="the base corpus (shards or .txt folder) whose validation loss must not worsen")
    add("--no-guard", action="store_true", default=None, help="train without --guard-data")
    add("--ckpt", help="checkpoint folder (default: OUT without its suffix + .ckpt)")
    add("--tokenizer", help="SentencePiece .model for .txt data (default: tok4096.model, else "
                            "tokenizer.model, beside the base)")
    add("--resume", action="store_true", help="continue the checkpoint in --ckpt exactly")
    helps = {
        "rank": f"rank of A and B (default {d.rank})",
        "alpha": f"update scale numerator: the update is alpha/rank * B A (default {d.alpha:g})",
        "targets": f"comma-separated matrices to adapt (default {d.targets})",
        "layers": f"layers to adapt: all, or e.g. 0-2,5 (default {d.layers})",
        "seq_len": f"tokens per batch row (default {d.seq_len})",
        "batch_size": f"rows per micro-batch (default {d.batch_size})",
        "grad_accum": f"micro-batches per optimizer step (default {d.grad_accum})",
        "lr": f"peak learning rate (default {d.lr:g})",
        "min_lr": f"learning rate at the end of the cosine decay (default {d.min_lr:g})",
        "warmup_steps": f"steps of linear warmup (default {d.warmup_steps})",
        "max_steps": f"optimizer steps of the schedule (default {d.max_steps})",
        "time_budget": "minutes of training steps; 0 = no time limit (default 0)",
        "weight_decay": f"AdamW weight decay of A and B (default {d.weight_decay:g})",
        "grad_clip": f"gradient-norm clip; 0 = off (default {d.grad_clip:g})",
        "val_fraction": f"validation tail of every shard (default {d.val_fraction:g})",
        "guard_margin": f"largest allowed relative rise of the base corpus' loss (default {d.guard_margin:g})",
        "eval_interval": f"steps between evaluations (default {d.eval_interval})",
        "eval_batches": f"batches per evaluation (default {d.eval_batches})",
        "log_interval": f"steps between progress lines (default {d.log_interval})",
        "save_interval": f"minutes between checkpoints; one is also written at the end and on Ctrl-C "
                         f"(default {d.save_interval:g})",
        "seed": f"seed of A's initialization and the batch draws (default {d.seed})",
        "threads": "torch threads; 0 = torch's default (default 0)",
    }
    for name, text in helps.items():
        add("--" + name.replace("_", "-"), type=type(getattr(d, name)), default=None, help=text)
    add("--dtype", choices=("auto", "fp32", "bf16"), default=None,
        help="bf16 autocast; auto uses it where the CPU has native bf16 (default auto)")
    add("--device", choices=("auto", "cpu", "cuda"), default=None,
        help="auto = cuda when a GPU is visible, else cpu (default auto)")
    add("--compile", action="store_true", default=None, help="torch.compile the model (pays on long runs)")


def module_config(args: argparse.Namespace) -> ModuleConfig:
    """The settings of a run: the command line over the defaults, or on --resume over the
    checkpoint's.  Whether a setting given again may differ from the checkpoint's is
    pretraining's rule (train.check_resume, applied when the trainer loads the checkpoint)."""
    given = {k: v for k, v in vars(args).items() if k in ModuleConfig.__dataclass_fields__ and v is not None}
    cfg = ModuleConfig(**given)
    if cfg.resume:
        from .checkpoint import RESUME_KEYS, read_meta

        saved = read_meta(cfg.ckpt_dir / CHECKPOINT, RESUME_KEYS)["settings"]
        known = {k: v for k, v in saved.items() if k in ModuleConfig.__dataclass_fields__}
        cfg = ModuleConfig(**{**known, **given})
    check_module_config(cfg)
    return cfg


def check_module_config(cfg: ModuleConfig) -> None:
    """ConfigError for settings that cannot make a module: pretraining's ranges of the settings
    both share, the rank and alpha, and the guard options."""
    check_values(cfg)
    if not 1 <= cfg.rank <= modules.MAX_RANK:
        raise ConfigError(f"--rank {cfg.rank} is invalid: it must be in 1..{modules.MAX_RANK}")
    if not (math.isfinite(cfg.alpha) and cfg.alpha > 0):
        raise ConfigError(f"--alpha {cfg.alpha} is invalid: it must be a finite number above 0")
    if cfg.guard_data and cfg.no_guard:
        raise ConfigError(f"--no-guard and --guard-data {cfg.guard_data} exclude each other: give "
                          f"--guard-data to guard the base corpus, or --no-guard alone to train without it")
    if not cfg.guard_data and not cfg.no_guard:
        raise ConfigError("--guard-data is needed: the base corpus' shards (or text), whose validation "
                          "loss the module must not worsen; --no-guard trains without that check")


def main_train(args: argparse.Namespace) -> int:
    """The `python -m arianna_c.train module` command."""
    try:
        require_training_packages()
        cfg = module_config(args)

        def make_trainer():
            from .lora_trainer import ModuleTrainer

            return ModuleTrainer(cfg, log=lambda s: print(s, flush=True))

        summary = train_to_the_end(make_trainer, cfg.threads)
        if is_main_process():
            print(json.dumps(summary))
    except (ValueError, OSError, ArithmeticError) as exc:  # DataError, ConfigError, FormatError, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main_eval(argv: Optional[list[str]] = None) -> int:
    """The `python -m arianna_c.lora eval` command."""
    parser = argparse.ArgumentParser(prog="python -m arianna_c.lora eval",
                                     description="Losses of a base model with and without modules (JSON).")
    parser.add_argument("--base", required=True, help="base model file (.bin)")
    parser.add_argument("--module", action="append", default=[], metavar="M.bin[:SCALE]",
                        help="module to merge (repeatable; scale default 1)")
    parser.add_argument("--data", action="append", default=[], metavar="SHARDS",
                        help="shard folder: the loss of its validation split (repeatable)")
    parser.add_argument("--heldout", action="append", default=[], metavar="SHARDS",
                        help="shard folder held out from training: the loss of all its tokens (repeatable)")
    parser.add_argument("--qa", help="folder of .txt files of 'Q: ...\\nA: ...' paragraphs: the loss "
                                     "of the answer tokens")
    parser.add_argument("--tokenizer", help="SentencePiece .model for --qa (default: beside the base)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per batch (default 16)")
    parser.add_argument("--eval-batches", type=int, default=8, help="batches per folder (default 8)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="validation tail of each shard (default 0.05)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="fp32",
                        help="compute type (default fp32)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = parser.parse_args(argv)
    try:
        require("torch", TORCH_HINT)
        import torch

        from .lora_trainer import losses

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        specs = [split_spec(s) for s in args.module]
        print(json.dumps(losses(args.base, specs, args.data, args.heldout, args.qa, args.tokenizer, args), indent=1))
    except (ValueError, OSError) as exc:  # DataError, FormatError, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


USAGE = ("usage: python -m arianna_c.lora eval ... (its options: python -m arianna_c.lora eval --help; "
         "training a module: python -m arianna_c.train module ...)")


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m arianna_c.lora`: the eval command; --help (or -h) prints the usage."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        return main_eval(argv[1:])
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    print(USAGE, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
