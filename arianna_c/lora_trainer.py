"""The loop behind ``python -m arianna_c.train module``: LoRA adapters trained on a frozen base.

Each targeted nn.Linear of the base is wrapped in a LoRALinear (``W x + (alpha / rank) B A x``,
W frozen, B starting at zero, so step 0 is the base exactly).  The progress line, the
evaluation, the schedule and the checkpoint folders are pretraining's (``arianna_c.trainer``,
``arianna_c.checkpoint``).  Settings and the command line: ``arianna_c.lora``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, modules
from .data import (SHARD_DTYPE, DataError, batch_starts, check_fits, check_vocab, corpus_files, load_sentencepiece,
                   load_split, paragraphs, pretokenize, windows_at)
from .export import torch_from_bin, torch_from_weights
from .formats import read_model
from .lora import ModuleConfig, parse_targets
from .train import learning_rate, progress_of
from .trainer import autocast_context, evaluate, progress_line

# Where each matrix lives in a TransformerBlock.
PARENTS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
KIND = "knowledge module"  # what a module checkpoint's meta says it is


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the trainable low-rank update (alpha / rank) * B @ A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initializes its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * self.scaling


def attach(model: nn.Module, targets: Sequence[tuple[int, str]], rank: int, alpha: float) -> dict:
    """Freezes every parameter of model and wraps each target in a LoRALinear (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = {}
    for layer, matrix in targets:
        parent = getattr(model.layers[layer], PARENTS[matrix])
        adapter = LoRALinear(getattr(parent, matrix), rank, alpha)
        setattr(parent, matrix, adapter)
        adapters[(layer, matrix)] = adapter
    return adapters


def adapter_state(adapters: dict) -> dict[str, torch.Tensor]:
    return {f"layers.{l}.{m}.{part}": getattr(a, part).detach().clone()
            for (l, m), a in adapters.items() for part in ("A", "B")}


def load_adapter_state(adapters: dict, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for (l, m), a in adapters.items():
            a.A.copy_(state[f"layers.{l}.{m}.A"])
            a.B.copy_(state[f"layers.{l}.{m}.B"])


def to_module(adapters: dict, rank: int, alpha: float, shape: tuple, base_fp: bytes) -> modules.Module:
    module = modules.Module(rank, float(alpha), tuple(shape), base_fp)
    for key, a in adapters.items():
        module.adapters[key] = (a.A.detach().float().numpy().copy(), a.B.detach().float().numpy().copy())
    return module


def merged_transformer(base: str, specs: Sequence[tuple[str, float]]):
    """The PyTorch model of base with modules merged at their scales (as the C library merges
    them); FormatError for a module trained on another base."""
    cfg, weights = read_model(base)
    base_fp = modules.fingerprint(base)
    loaded = []
    for path, scale in specs:
        module = modules.read_module(path)
        modules.check_base(module, cfg, base_fp, str(path))
        loaded.append((module, scale))
    return torch_from_weights(cfg, modules.merge(weights, loaded))


# ---------------------------------------------------------------------------- data


def shard_folder(folder: str, tokenizer: Optional[str], work: Path, what: str) -> Path:
    """A folder of shards: folder itself, or (a folder of .txt files) its pretokenized copy."""
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"{what} {folder}: no such folder")
    if any(path.glob("*.bin")):
        return path
    if not any(path.glob("*.txt")):
        raise DataError(f"{what} {folder}: no .bin shards and no .txt files in it")
    if not tokenizer or not Path(tokenizer).is_file():
        where = tokenizer or "no tok4096.model or tokenizer.model beside the base"
        raise DataError(f"{what} {folder} holds text: give the base's SentencePiece model with "
                        f"--tokenizer to tokenize it ({where})")
    out = work / f"data-{path.resolve().name}"
    texts = corpus_files(path)
    newest = max(f.stat().st_mtime for f in texts)
    if not out.is_dir() or min((s.stat().st_mtime for s in out.glob("*.bin")), default=0) < newest:
        pretokenize(path, tokenizer, out)
    return out


def default_tokenizer(base: str) -> Optional[str]:
    """The SentencePiece model beside the base (tok4096.model, then tokenizer.model)."""
    for name in ("tok4096.model", "tokenizer.model"):
        candidate = Path(base).parent / name
        if candidate.is_file():
            return str(candidate)
    return None


# ---------------------------------------------------------------------------- training


class ModuleTrainer:
    def __init__(self, cfg: ModuleConfig, resume: bool = False, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        if not cfg.guard_data and not cfg.no_guard:
            raise DataError("--guard-data is needed: the base corpus' shards (or text), whose validation "
                            "loss the module must not worsen; --no-guard trains without that check")
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        base_cfg = read_model(cfg.base)[0]
        self.shape = modules.base_shape(base_cfg)
        self.base_fp = modules.fingerprint(cfg.base)
        self.model = torch_from_bin(cfg.base).train()
        if cfg.seq_len > base_cfg.seq_len:
            raise DataError(f"--seq-len {cfg.seq_len} exceeds the base's seq_len {base_cfg.seq_len}")
        targets = parse_targets(cfg.targets, cfg.layers, base_cfg.n_layers)
        if not 1 <= cfg.rank <= modules.MAX_RANK:
            raise DataError(f"--rank {cfg.rank} must be in 1..{modules.MAX_RANK}")
        if not (math.isfinite(cfg.alpha) and cfg.alpha > 0):
            raise DataError(f"--alpha {cfg.alpha} must be a finite number > 0")
        self.adapters = attach(self.model, targets, cfg.rank, cfg.alpha)
        work = cfg.ckpt_dir
        work.mkdir(parents=True, exist_ok=True)
        tokenizer = cfg.tokenizer or default_tokenizer(cfg.base)
        data_dir = shard_folder(cfg.data, tokenizer, work, "--data")
        self.split = load_split(data_dir, cfg.val_fraction)
        check_fits(self.split, data_dir, cfg.batch_size, cfg.seq_len)
        check_vocab(self.split, data_dir, base_cfg.vocab_size)
        self.guard_val = None
        if cfg.guard_data:
            guard_dir = shard_folder(cfg.guard_data, tokenizer, work, "--guard-data")
            guard_split = load_split(guard_dir, cfg.val_fraction)
            check_fits(guard_split, guard_dir, 1, cfg.seq_len)
            check_vocab(guard_split, guard_dir, base_cfg.vocab_size)
            self.guard_val = guard_split.val
        params = [p for a in self.adapters.values() for p in (a.A, a.B)]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.best_val = float("inf")
        self.guard_baseline: Optional[float] = None
        self.history: dict[str, list] = {"train": [], "val": [], "guard": []}
        self.stop_requested = False
        if resume:
            self._resume()

    def request_stop(self) -> None:
        """Stop after the current step and save a checkpoint (what SIGINT / SIGTERM do)."""
        self.stop_requested = True

    # ------------------------------------------------------------------ module and checkpoints
    def module(self) -> modules.Module:
        return to_module(self.adapters, self.cfg.rank, self.cfg.alpha, self.shape, self.base_fp)

    def save_checkpoint(self) -> Path:
        meta = {"kind": KIND, "settings": asdict(self.cfg), "step": self.step, "tokens_seen": self.tokens_seen,
                "elapsed_s": self.elapsed, "best_val": self.best_val, "guard_baseline": self.guard_baseline,
                "history": self.history, "rng": self.rng.bit_generator.state,
                "base_fingerprint": self.base_fp.hex()}
        path = checkpoint.save(self.cfg.ckpt_dir / "last", adapter_state(self.adapters), meta,
                               self.optimizer.state_dict())
        (self.cfg.ckpt_dir / "history.json").write_text(json.dumps(self.history, indent=1))
        return path

    def _resume(self) -> None:
        folder = self.cfg.ckpt_dir / "last"
        ckpt = checkpoint.load(folder)
        meta = ckpt.meta
        if meta.get("kind") != KIND:
            raise DataError(f"{folder}: not a module training checkpoint")
        if meta["base_fingerprint"] != self.base_fp.hex():
            raise DataError(f"{folder}: the checkpoint was trained on another base than {self.cfg.base}")
        load_adapter_state(self.adapters, ckpt.model_state)
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.step, self.tokens_seen, self.elapsed = meta["step"], meta["tokens_seen"], meta["elapsed_s"]
        self.best_val, self.guard_baseline, self.history = meta["best_val"], meta["guard_baseline"], meta["history"]
        self.rng.bit_generator.state = meta["rng"]
        self.log(f"resumed from {folder} at step {self.step} ({self.tokens_seen:,} tokens)")

    # ------------------------------------------------------------------ loop
    def train_step(self) -> float:
        cfg = self.cfg
        total = 0.0
        with autocast_context(cfg.dtype, torch.device("cpu")):
            for _ in range(cfg.grad_accum):
                starts = batch_starts(self.rng, len(self.split.train), cfg.batch_size, cfg.seq_len)
                x, y = windows_at(self.split.train, starts, cfg.seq_len)
                _, loss = self.model(torch.from_numpy(x), torch.from_numpy(y))
                (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def run_eval(self) -> bool:
        """Validation and base-corpus loss with the module; keeps the best module within the
        guard in OUT.  False = the base-corpus loss passed the limit: stop."""
        cfg = self.cfg
        val = evaluate(self.model, self.split.val, cfg)
        self.history["val"].append([self.step, self.tokens_seen, val])
        line = f"eval step {self.step} tokens {self.tokens_seen:,} val loss {val:.4f}"
        guard_ok = True
        if self.guard_val is not None:
            guard = evaluate(self.model, self.guard_val, cfg)
            self.history["guard"].append([self.step, self.tokens_seen, guard])
            if self.guard_baseline is None:
                self.guard_baseline = guard  # step 0: B = 0, so this is the base's own loss
            limit = self.guard_baseline * (1.0 + cfg.guard_margin)
            guard_ok = guard <= limit
            line += f" base-corpus val {guard:.4f} (base {self.guard_baseline:.4f}, limit {limit:.4f})"
        self.log(line)
        if guard_ok and val < self.best_val:
            self.best_val = val
            modules.write_module(cfg.out, self.module())
        if not guard_ok:
            self.log(f"stopping: the base corpus' validation loss rose by more than {100 * cfg.guard_margin:.1f}%; "
                     f"the best module within the limit is in {cfg.out}")
        return guard_ok

    def train(self) -> dict:
        cfg = self.cfg
        n_params = sum(p.numel() for a in self.adapters.values() for p in (a.A, a.B))
        self.log(f"module: rank {cfg.rank}, alpha {cfg.alpha:g}, {len(self.adapters)} matrices, {n_params:,} "
                 f"parameters; data {len(self.split.train):,} train / {len(self.split.val):,} val tokens")
        if self.step == 0 and not self.run_eval():
            return self.finish()
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        window_start, window_tokens, last_save = time.time(), 0, time.time()
        while progress_of(cfg, self.step, self.elapsed) < 1.0:
            lr = learning_rate(cfg, self.step, progress_of(cfg, self.step, self.elapsed))
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
                return self.finish()
            if self.stop_requested:
                self.save_checkpoint()
                self.log(f"stopped at step {self.step} as asked; {cfg.ckpt_dir / 'last'} saved: continue "
                         f"with the same command and --resume")
                return self.summary()
            if time.time() - last_save > 600:
                self.save_checkpoint()
                last_save = time.time()
        if not self.history["val"] or self.history["val"][-1][0] != self.step:
            self.run_eval()
        return self.finish()

    def finish(self) -> dict:
        self.save_checkpoint()
        return self.summary()

    def summary(self) -> dict:
        guard = [g for _, _, g in self.history["guard"]]
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": round(self.elapsed, 1),
                "best_val": self.best_val, "val_at_start": self.history["val"][0][2] if self.history["val"] else None,
                "guard_baseline": self.guard_baseline, "guard_last": guard[-1] if guard else None,
                "out": self.cfg.out}


# ---------------------------------------------------------------------------- evaluation


def qa_pairs(folder: str) -> list[tuple[str, str]]:
    """(prompt "Q: ...\\nA:", answer " ...") of every "Q: ...\\nA: ..." paragraph in folder's .txt files."""
    pairs = []
    for path in corpus_files(folder):
        for para in paragraphs(path.read_text(encoding="utf-8")):
            question, sep, answer = para.partition("\nA:")
            if sep and question.startswith("Q:"):
                pairs.append((question + sep, answer))
    return pairs


@torch.no_grad()
def answer_loss(model: nn.Module, sp, pairs: Sequence[tuple[str, str]], seq_len: int) -> float:
    """Mean loss of the answer tokens (and the closing BOS) given their "Q: ...\\nA:" prompt."""
    model.eval()
    total, count = 0.0, 0
    for prompt, answer in pairs:
        prefix = [1] + sp.encode(prompt)
        ids = ([1] + sp.encode(prompt + answer) + [1])[: seq_len + 1]
        if ids[: len(prefix)] != prefix or len(ids) <= len(prefix):
            continue  # the prompt's pieces run into the answer's, or no answer fits
        logits = model(torch.tensor([ids[:-1]]))
        targets = torch.tensor(ids[1:])
        losses = F.cross_entropy(logits[0].float(), targets, reduction="none")[len(prefix) - 1:]
        total += float(losses.sum())
        count += len(losses)
    return total / max(count, 1)



def every_token(folder: str) -> np.ndarray:
    """All tokens of a folder's shards, in file order (a held-out set has no training part)."""
    shards = sorted(Path(folder).glob("*.bin"))
    if not shards:
        raise DataError(f"{folder}: no .bin shards (run the pretokenize step first)")
    return np.concatenate([np.fromfile(s, dtype=SHARD_DTYPE) for s in shards])


def losses(base: str, specs: Sequence[tuple[str, float]], shard_dirs: Sequence[str], heldout_dirs: Sequence[str],
           qa: Optional[str], tokenizer: Optional[str], settings) -> dict:
    """For the base alone and with the modules merged: the loss of shard_dirs' validation split,
    of every token of heldout_dirs, and of the answers of qa's pairs.  settings gives
    batch_size, seq_len, eval_batches, val_fraction and dtype."""
    result: dict = {"model": base, "modules": [[p, s] for p, s in specs]}
    models = [("base", lambda: torch_from_bin(base))]
    if specs:
        models.append(("with_modules", lambda: merged_transformer(base, specs)))
    for label, make in models:
        model = make()
        row = {}
        for folder in shard_dirs:
            row[folder] = evaluate(model, load_split(folder, settings.val_fraction).val, settings)
        for folder in heldout_dirs:
            row[folder] = evaluate(model, every_token(folder), settings)
        if qa:
            sp = load_sentencepiece(tokenizer or default_tokenizer(base) or "")
            row[f"{qa} (answer tokens)"] = answer_loss(model, sp, qa_pairs(qa), settings.seq_len)
        result[label] = row
    return result
