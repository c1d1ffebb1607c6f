"""The loop behind ``python -m arianna_c.train module``: LoRA adapters trained on a frozen base.

Each targeted nn.Linear of the base is wrapped in a LoRALinear (``W x + (alpha / rank) B A x``,
W frozen, B starting at zero, so step 0 is the base exactly).  ModuleTrainer is pretraining's
Trainer (``arianna_c.trainer``) with another model, checkpoint state and best-keeping; the
loop, progress line, evaluation, guard, schedule and resume are the Trainer's.  Settings and
the command line: ``arianna_c.lora``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, modules
from .data import (SHARD_BYTES, SHARDS_RECORD, DataError, corpus_files, load_sentencepiece, load_split,
                   paragraphs, pretokenize, read_shard, read_text, recorded_tokenizer)
from .export import torch_from_bin, torch_from_weights
from .formats import read_model
from .lora import CHECKPOINT, ModuleConfig, check_module_config, parse_targets
from .train import ConfigError
from .trainer import Trainer, World, evaluate, pick_device

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
        module.adapters[key] = (a.A.detach().float().cpu().numpy().copy(), a.B.detach().float().cpu().numpy().copy())
    return module


def merged_transformer(base: str, specs: Sequence[tuple[str, float]]):
    """The PyTorch model of base with modules merged at their scales (as the C library merges
    them); FormatError for a module trained on another base, or an int8 base."""
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
    out = tokenized_folder(work, path, what)
    texts = corpus_files(path)
    if not holds_shards_of(out, texts, tokenizer):
        for stale in out.glob("*.bin"):  # of a text file since removed, or another tokenizer
            stale.unlink()
        pretokenize(path, tokenizer, out)
    return out


def tokenized_folder(work: Path, folder: Path, what: str) -> Path:
    """Where an option's folder of text is tokenized: work/<option>-<folder name>-<hash of its
    resolved path>, so two sources never share one (--data a/texts, --guard-data b/texts)."""
    resolved = folder.resolve()
    digest = hashlib.sha256(os.fsencode(resolved)).hexdigest()[:12]
    return work / f"{what.lstrip('-')}-{resolved.name}-{digest}"


def holds_shards_of(out: Path, texts: Sequence[Path], tokenizer: str) -> bool:
    """Whether out holds the shards pretokenize made of exactly texts with tokenizer (as its
    SHARDS_RECORD says, with the sizes it records), after both last changed."""
    record_path = out / SHARDS_RECORD
    try:
        record = json.loads(record_path.read_text())
        shards = dict(record["shards"])
        made_with = record["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if made_with != recorded_tokenizer(tokenizer) or set(shards) != {f"{t.stem}.bin" for t in texts}:
        return False
    if not all((out / name).is_file() and (out / name).stat().st_size == SHARD_BYTES * count
               for name, count in shards.items()):
        return False
    newest = max(f.stat().st_mtime for f in [*texts, Path(tokenizer)])
    return record_path.stat().st_mtime >= newest


def default_tokenizer(base: str) -> Optional[str]:
    """The SentencePiece model beside the base (tok4096.model, then tokenizer.model)."""
    for name in ("tok4096.model", "tokenizer.model"):
        candidate = Path(base).parent / name
        if candidate.is_file():
            return str(candidate)
    return None


# ---------------------------------------------------------------------------- training


def one_process(device: str) -> World:
    """Module training's world: this process alone (stop_now acts on this process' own request,
    which under torchrun would leave the other processes waiting in the next all-reduce)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train module runs in one process: start it without torchrun")
    return World(0, 1, torch.device(pick_device(device)))


class ModuleTrainer(Trainer):
    """Pretraining's loop on the frozen base with adapters, in one process: the checkpoint
    (``--ckpt``/last) holds the adapters only, and the best module so far is written to OUT as
    a module file."""

    CHECKPOINT = CHECKPOINT

    def __init__(self, cfg: ModuleConfig, resume: bool = False, log: Callable[[str], None] = print,
                 world: Optional[World] = None):
        check_module_config(cfg)
        base_cfg = read_model(cfg.base)[0]
        modules.check_float32(base_cfg, f"--base {cfg.base}")
        if cfg.seq_len > base_cfg.seq_len:
            raise DataError(f"--seq-len {cfg.seq_len} exceeds the base's seq_len {base_cfg.seq_len}")
        self.targets = parse_targets(cfg.targets, cfg.layers, base_cfg.n_layers)
        self.shape = modules.base_shape(base_cfg)
        self.base_fp = modules.fingerprint(cfg.base)
        self.tokenizer = cfg.tokenizer or default_tokenizer(cfg.base)
        self.adapters: dict = {}
        cfg.ckpt_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(replace(cfg, resume=True) if resume else cfg, log, world or one_process(cfg.device))

    # ------------------------------------------------------------------ what is trained
    def run_folder(self) -> Path:
        return self.cfg.ckpt_dir

    def shard_folder(self, folder: str, what: str) -> Path:
        return shard_folder(folder, self.tokenizer, self.cfg.ckpt_dir, what)

    def build_model(self, saved: Optional[checkpoint.Checkpoint]):
        model = torch_from_bin(self.cfg.base)
        self.adapters = attach(model, self.targets, self.cfg.rank, self.cfg.alpha)
        if saved is not None:
            load_adapter_state(self.adapters, saved.model_state)
        return model.train()

    def trained_state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.adapters)

    def check_saved(self, saved: checkpoint.Checkpoint, where: Path) -> None:
        if saved.meta.get("kind") != KIND:
            raise DataError(f"{where}: not a module training checkpoint")
        if saved.meta["base_fingerprint"] != self.base_fp.hex():
            raise DataError(f"{where}: the checkpoint was trained on another base than {self.cfg.base}")

    def meta(self) -> dict:
        return {**super().meta(), "kind": KIND, "base_fingerprint": self.base_fp.hex()}

    def save_best(self) -> None:
        if self.world.main:
            modules.write_module(self.cfg.out, self.module())

    def best_kept(self) -> str:
        return f"the best module within the limit is in {self.cfg.out}"

    def resume_hint(self) -> str:
        return "the same command and --resume"

    def restart_hint(self, where: Path) -> str:
        return "train a new module with another --ckpt"

    def describe(self) -> str:
        n_params = sum(p.numel() for a in self.adapters.values() for p in (a.A, a.B))
        return (f"module: rank {self.cfg.rank}, alpha {self.cfg.alpha:g}, {len(self.adapters)} matrices, "
                f"{n_params:,} trainable parameters")

    def stop_now(self, requests: float) -> bool:
        # one process: a request made while this step was logged or evaluated needs no agreement
        return requests > 0 or self.stop_requested

    def module(self) -> modules.Module:
        return to_module(self.adapters, self.cfg.rank, self.cfg.alpha, self.shape, self.base_fp)


# ---------------------------------------------------------------------------- evaluation


def qa_pairs(folder: str) -> list[tuple[str, str]]:
    """(prompt "Q: ...\\nA:", answer " ...") of every "Q: ...\\nA: ..." paragraph in folder's .txt files."""
    pairs = []
    for path in corpus_files(folder):
        for para in paragraphs(read_text(path)):
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
    return np.concatenate([read_shard(s) for s in shards])


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
