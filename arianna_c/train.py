"""The persona training pipeline: ``python -m arianna_c.train {tokenizer,pretokenize,train}``.

``train`` pretrains (or, with ``--init-from``, fine-tunes) LLiSA on every shard of a data
folder. The learning-rate schedule (linear warmup, cosine decay) runs on *progress*, the larger
of steps done / --max-steps and time spent / --time-budget, so a run given a wall-clock budget
still finishes its decay on a busy machine. Checkpoints (``ckpt.pt``) can be resumed.

Fine-tuning on a small set can wreck what the base model knew. With ``--guard-data BASE_DIR``
the base corpus' validation loss is measured before the first step and at every evaluation; the
run stops once it is worse than at the start by more than ``--guard-margin`` (relative), and
the checkpoint kept is the best one that stayed within the margin.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data import (DataError, check_fits, eval_batches, load_split, pretokenize, random_batch,
                   shard_summary, train_tokenizer)
from .model import ModelArgs, Transformer


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
    val_fraction: float = 0.05
    eval_interval: int = 200
    eval_batches: int = 20
    log_interval: int = 10
    seed: int = 1337
    dtype: str = "auto"
    compile: bool = False
    threads: int = 0
    init_from: Optional[str] = None
    resume: bool = False
    guard_data: Optional[str] = None
    guard_margin: float = 0.05


def bf16_is_fast() -> bool:
    """bf16 autocast only pays on CPUs with native bf16 matrix support (AMX / AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_context(dtype: str):
    use_bf16 = dtype == "bf16" or (dtype == "auto" and bf16_is_fast())
    return torch.autocast("cpu", dtype=torch.bfloat16) if use_bf16 else nullcontext()


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr + cosine * (cfg.lr - cfg.min_lr)


def progress_of(cfg: TrainConfig, step: int, elapsed: float) -> float:
    by_steps = step / cfg.max_steps
    by_time = elapsed / (60.0 * cfg.time_budget) if cfg.time_budget > 0 else 0.0
    return max(by_steps, by_time)


@torch.no_grad()
def evaluate(model: Transformer, tokens: np.ndarray, cfg: TrainConfig) -> float:
    """Mean loss over the same fixed validation windows every time."""
    model.eval()
    losses = []
    with autocast_context(cfg.dtype):
        for x, y in eval_batches(tokens, cfg.batch_size, cfg.seq_len, cfg.eval_batches):
            _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
            losses.append(float(loss))
    model.train()
    return float(np.mean(losses))


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


def build_model(cfg: TrainConfig) -> Transformer:
    """A fresh model, or the weights of --init-from (whose architecture then wins).

    --init-from takes a training checkpoint (.pt) or a model file the runtime reads (.bin).
    """
    if cfg.init_from and Path(cfg.init_from).suffix != ".pt":
        from .export import torch_from_bin

        return torch_from_bin(cfg.init_from).train()
    if cfg.init_from:
        ckpt = torch.load(cfg.init_from, map_location="cpu", weights_only=False)
        model = Transformer(ModelArgs(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        return model
    args = ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                     vocab_size=cfg.vocab_size, max_seq_len=cfg.seq_len)
    return Transformer(args)


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.model = build_model(cfg)
        if self.model.args.max_seq_len < cfg.seq_len:
            raise DataError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {self.model.args.max_seq_len}")
        self.split = load_split(cfg.data, cfg.val_fraction)
        check_fits(self.split, cfg.data, cfg.batch_size, cfg.seq_len)
        self.guard_val = None
        if cfg.guard_data:
            guard_split = load_split(cfg.guard_data, cfg.val_fraction)
            check_fits(guard_split, cfg.guard_data, 1, cfg.seq_len)
            self.guard_val = guard_split.val
        self.optimizer = make_optimizer(self.model, cfg)
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.best_val = float("inf")
        self.history: dict[str, list] = {"train": [], "val": [], "guard": []}
        self.guard_baseline: Optional[float] = None
        if cfg.resume:
            self._resume()
        self.forward = torch.compile(self.model) if cfg.compile else self.model

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        path = self.out / "ckpt.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.tokens_seen, self.elapsed = ckpt["step"], ckpt["tokens_seen"], ckpt["elapsed"]
        self.best_val, self.history = ckpt["best_val"], ckpt["history"]
        self.guard_baseline = ckpt.get("guard_baseline")
        self.rng = np.random.default_rng([self.cfg.seed, self.step])
        self.log(f"resumed from {path} at step {self.step} ({self.tokens_seen:,} tokens)")

    def save(self, name: str = "ckpt.pt") -> Path:
        path = self.out / name
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "model_args": self.model.args.to_dict(),
            "config": asdict(self.cfg),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed,
            "best_val": self.best_val,
            "history": self.history,
            "guard_baseline": self.guard_baseline,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        (self.out / "history.json").write_text(json.dumps(self.history, indent=1))
        return path

    # ------------------------------------------------------------------ loop
    def train_step(self) -> float:
        cfg = self.cfg
        total = 0.0
        with autocast_context(cfg.dtype):
            for _ in range(cfg.grad_accum):
                x, y = random_batch(self.split.train, cfg.batch_size, cfg.seq_len, self.rng)
                _, loss = self.forward(torch.from_numpy(x), torch.from_numpy(y))
                (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def run_eval(self) -> bool:
        """Record validation (and guard) loss, keep the best checkpoint; False = stop training."""
        val = evaluate(self.model, self.split.val, self.cfg)
        self.history["val"].append([self.step, self.tokens_seen, val])
        line = f"eval step {self.step} tokens {self.tokens_seen:,} val loss {val:.4f}"
        guard_ok = True
        if self.guard_val is not None:
            guard = evaluate(self.model, self.guard_val, self.cfg)
            self.history["guard"].append([self.step, self.tokens_seen, guard])
            if self.guard_baseline is None:
                self.guard_baseline = guard
            limit = self.guard_baseline * (1.0 + self.cfg.guard_margin)
            guard_ok = guard <= limit
            line += f" base-corpus val {guard:.4f} (start {self.guard_baseline:.4f}, limit {limit:.4f})"
        self.log(line)
        if guard_ok and val < self.best_val:
            self.best_val = val
            self.save("best.pt")
        if not guard_ok:
            self.log(f"stopping: base-corpus validation loss worsened by more than "
                     f"{100 * self.cfg.guard_margin:.1f}%; best checkpoint kept in {self.out / 'best.pt'}")
        return guard_ok

    def train(self) -> dict:
        cfg = self.cfg
        self.log(f"data {cfg.data}: {len(self.split.shards)} shard(s), {len(self.split.train):,} train / "
                 f"{len(self.split.val):,} val tokens; model {self.model.num_parameters():,} parameters")
        if self.step == 0 and not self.run_eval():
            return self.summary()
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        window_start, window_tokens = time.time(), 0
        last_save = time.time()
        while True:
            progress = progress_of(cfg, self.step, self.elapsed)
            if progress >= 1.0:
                break
            lr = learning_rate(cfg, self.step, progress)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            loss = self.train_step()
            self.elapsed += time.time() - t0
            self.step += 1
            self.tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}; lower --lr")
            if self.step % cfg.log_interval == 0:
                tok_s = window_tokens / max(time.time() - window_start, 1e-9)
                self.history["train"].append([self.step, self.tokens_seen, loss])
                self.log(progress_line(self.step, loss, lr, tok_s, progress_of(cfg, self.step, self.elapsed),
                                       self.elapsed))
                window_start, window_tokens = time.time(), 0
            if self.step % cfg.eval_interval == 0 and not self.run_eval():
                return self.summary()
            if time.time() - last_save > 600:
                self.save()
                last_save = time.time()
        if not self.history["val"] or self.history["val"][-1][0] != self.step:
            self.run_eval()
        self.save()
        return self.summary()

    def summary(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": round(self.elapsed, 1),
                "best_val": self.best_val, "out": str(self.out)}


# ---------------------------------------------------------------------- command line


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig(data="", out="")
    parser.add_argument("--data", required=True, help="folder of .bin shards (every shard is used)")
    parser.add_argument("--out", required=True, help="folder for ckpt.pt, best.pt and history.json")
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len", "batch_size",
                 "grad_accum", "warmup_steps", "max_steps", "eval_interval", "eval_batches",
                 "log_interval", "seed", "threads"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "min_lr", "time_budget", "weight_decay", "grad_clip", "val_fraction", "guard_margin"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="bf16 autocast; auto uses it only where the CPU has native bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--init-from", help="checkpoint to start from (fine-tuning)")
    parser.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt")
    parser.add_argument("--guard-data", help="base-corpus shards whose validation loss must not worsen")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arianna_c.train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="train the SentencePiece BPE tokenizer")
    tok.add_argument("--corpus", required=True)
    tok.add_argument("--out", required=True, help="model prefix, e.g. persona/tok4096")
    tok.add_argument("--vocab-size", type=int, default=4096)
    pre = sub.add_parser("pretokenize", help="one uint16 shard per corpus file")
    pre.add_argument("--corpus", required=True)
    pre.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    pre.add_argument("--out", required=True, help="data folder for the shards")
    add_train_arguments(sub.add_parser("train", help="pretrain or fine-tune"))
    args = parser.parse_args(argv)
    try:
        if args.command == "tokenizer":
            print(train_tokenizer(args.corpus, args.out, args.vocab_size))
        elif args.command == "pretokenize":
            print(shard_summary(pretokenize(args.corpus, args.tokenizer, args.out)))
        else:
            fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
            cfg = TrainConfig(**fields)
            if cfg.threads > 0:
                torch.set_num_threads(cfg.threads)
            print(json.dumps(Trainer(cfg, log=lambda s: print(s, flush=True)).train()))
    except (DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
