"""The training loop behind ``python -m arianna_c.train train`` and ``train module``, in one
process or in each of several under ``torchrun`` (DistributedDataParallel: gloo on CPU, nccl on
CUDA).

One optimizer step trains on ``batch_size x grad_accum`` rows, whatever the number of processes.
Every process draws the step's rows from the same seeded generator and takes its own slice, so
N processes see exactly the batch one process would, and the data position is that generator's
state: a checkpoint resumes with any number of processes. A process splits its slice into
micro-batches of at most ``batch_size`` rows; gradients are averaged across processes only on
the last one (``no_sync`` on the others). Only rank 0 logs, evaluates and writes checkpoints;
what every process must agree on (the step's loss, the clock, a stop request) is summed in one
small all-reduce per step.

A knowledge module trains in the same loop (``arianna_c.lora_trainer.ModuleTrainer``): a
subclass that builds the frozen base with adapters, checkpoints only the adapters and keeps
its best as a module file.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint
from .data import DataError, Split, batch_starts, check_fits, check_vocab, eval_batches, load_split, windows_at
from .model import ModelArgs, Transformer
from .train import (ConfigError, TrainConfig, check_resume, check_shape, learning_rate, progress_line,
                    progress_of)


# ---------------------------------------------------------------------- processes


@dataclass
class World:
    """This process' place among the training processes (the only one outside torchrun)."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """values summed over every process."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def wait_for_all(self) -> None:
        """Returns once every process has called it."""
        if self.size > 1:
            dist.barrier()

    def from_main(self, flag: bool) -> bool:
        """Rank 0's flag, on every process."""
        return self.sum([float(flag) if self.main else 0.0])[0] > 0


def pick_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu")
    return choice


def join_world(device_choice: str) -> World:
    """torchrun's process group (from its environment variables), or a world of one."""
    kind = pick_device(device_choice)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, torch.device(kind))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(kind, local_rank) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return World(rank, size, device)


def leave_world() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rows_per_process(cfg: TrainConfig, world_size: int) -> int:
    rows = cfg.batch_size * cfg.grad_accum
    if rows % world_size:
        raise ConfigError(f"a step's {cfg.batch_size} x {cfg.grad_accum} = {rows} rows do not split over "
                          f"{world_size} processes; make --batch-size x --grad-accum a multiple of {world_size}")
    return rows // world_size


# ---------------------------------------------------------------------- model and numerics


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 autocast pays only where the hardware has native bf16 matrix support."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_context(dtype: str, device: torch.device = torch.device("cpu")):
    use_bf16 = dtype == "bf16" or (dtype == "auto" and bf16_is_fast(device))
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def build_model(cfg: TrainConfig, saved: Optional[checkpoint.Checkpoint] = None) -> Transformer:
    """The checkpoint's model (resume), --init-from's weights (whose shape wins), or a fresh one."""
    if saved is not None:
        model = checkpoint.build_transformer(saved.meta["model_args"], saved.model_state)
    elif cfg.init_from:
        from .export import load_torch_model

        model = load_torch_model(cfg.init_from)
        check_shape(cfg, model.args, f"--init-from {cfg.init_from}")
    else:
        model = Transformer(ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                      n_kv_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
                                      max_seq_len=cfg.seq_len))
    model.set_dropout(cfg.dropout)
    return model.train()


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: the matrices decay, the norms do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(model: Transformer, tokens: np.ndarray, cfg: TrainConfig,
             device: torch.device = torch.device("cpu")) -> float:
    """Mean loss over the same fixed validation windows every time."""
    model.eval()
    losses = []
    with autocast_context(cfg.dtype, device):
        for x, y in eval_batches(tokens, cfg.batch_size, cfg.seq_len, cfg.eval_batches):
            _, loss = model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
            losses.append(float(loss))
    model.train()
    return float(np.mean(losses))


# ---------------------------------------------------------------------- the loop


class Trainer:
    """One run: OUT/ckpt (last state, with the optimizer), OUT/best (lowest validation loss
    within the guard), OUT/history.json.

    What is trained is chosen by a few methods a subclass may replace (ModuleTrainer does):
    run_folder, shard_folder, build_model, trained_state, check_saved, save_best, describe,
    stop_now."""

    CHECKPOINT = "ckpt"  # the folder in run_folder() that --resume reads

    def __init__(self, cfg: TrainConfig, log=print, world: Optional[World] = None):
        self.cfg = cfg
        self.world = world or join_world(cfg.device)
        self.log = log if self.world.main else (lambda line: None)
        self.folder = self.run_folder()
        if not cfg.resume and (self.folder / self.CHECKPOINT).exists():
            raise ConfigError(f"{self.folder / self.CHECKPOINT}: a run is saved there; continue it with "
                              f"{self.resume_hint()}, or start a new one in another folder")
        self.rows = rows_per_process(cfg, self.world.size)
        self.split = self._load_data(cfg.data, "--data", cfg.batch_size)
        saved = self._load_saved() if cfg.resume else None
        torch.manual_seed(cfg.seed)
        self.model = self.build_model(saved)
        check_vocab(self.split, cfg.data, self.model.args.vocab_size)
        self.guard_val = None
        if cfg.guard_data:
            guard_split = self._load_data(cfg.guard_data, "--guard-data", 1)
            check_vocab(guard_split, cfg.guard_data, self.model.args.vocab_size)
            self.guard_val = guard_split.val
        self.model.to(self.world.device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.rng = np.random.default_rng(cfg.seed)  # the batch draw: its state is the data position
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.best_val = float("inf")
        self.history: dict[str, list] = {"train": [], "val": [], "guard": []}
        self.guard_baseline: Optional[float] = None
        self.stop_requested = False
        if saved is not None:
            self._restore(saved)
        self.last_eval_step = self.history["val"][-1][0] if self.history["val"] else None
        self.ddp = None
        if self.world.size > 1:
            ids = [self.world.device.index] if self.world.device.type == "cuda" else None
            # the RoPE tables are the only buffers and never change: no need to sync them per step
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                                 forward_sync_buffers=False)
        network = self.ddp if self.ddp is not None else self.model
        self.forward = torch.compile(network) if cfg.compile else network

    def request_stop(self) -> None:
        """Stop after the current step and save a checkpoint (what SIGINT / SIGTERM do)."""
        self.stop_requested = True

    # ------------------------------------------------------------------ what is trained
    def run_folder(self) -> Path:
        """Where the checkpoint, best/ and history.json go."""
        return Path(self.cfg.out)

    def shard_folder(self, folder: str, what: str) -> Path:
        """The folder of shards an option (--data, --guard-data) names."""
        return Path(folder)

    def build_model(self, saved: Optional[checkpoint.Checkpoint]) -> Transformer:
        return build_model(self.cfg, saved)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint keeps."""
        return self.model.state_dict()

    def check_saved(self, saved: checkpoint.Checkpoint, where: Path) -> None:
        """Refuses a checkpoint this run cannot continue (beyond the settings and the data)."""

    def save_best(self) -> None:
        """Keeps the model just evaluated as the best so far (rank 0 only)."""
        self._write(self.folder / "best", with_optimizer=False)

    def best_kept(self) -> str:
        return f"best checkpoint kept in {self.folder / 'best'}"

    def resume_hint(self) -> str:
        return f"--resume --out {self.folder}"

    def restart_hint(self, where: Path) -> str:
        return f"fine-tune from it with --init-from {where}"

    def describe(self) -> str:
        return f"model {self.model.num_parameters():,} parameters"

    def stop_now(self, requests: float) -> bool:
        """Whether the run stops after this step: requests is the number of processes that asked
        before the step's all-reduce, the one point where they can agree without waiting on
        each other, so a request made later takes effect after the next step."""
        return requests > 0

    # ------------------------------------------------------------------ data and checkpoints
    def _load_data(self, folder: str, what: str, rows: int) -> Split:
        shards = self.shard_folder(folder, what)
        split = load_split(shards, self.cfg.val_fraction)
        check_fits(split, shards, rows, self.cfg.seq_len)
        return split

    def _load_saved(self) -> checkpoint.Checkpoint:
        where = self.folder / self.CHECKPOINT
        saved = checkpoint.load(where, needs=checkpoint.RESUME_KEYS)
        self.check_saved(saved, where)
        check_resume(self.cfg, saved.meta["settings"], where)
        trained_on = saved.meta["data"]["shards"]
        if trained_on != self.split.fingerprint():
            raise DataError(f"--data {self.cfg.data} is not the data the checkpoint in {where} was "
                            f"trained on (shards and sizes differ: {trained_on} there); resume with "
                            f"that data, or {self.restart_hint(where)}")
        if saved.optimizer_state is None:
            raise DataError(f"{where}: holds no optimizer state, so it cannot be resumed; "
                            f"{self.restart_hint(where)} instead")
        return saved

    def _restore(self, saved: checkpoint.Checkpoint) -> None:
        meta = saved.meta
        self.optimizer.load_state_dict(saved.optimizer_state)
        self.step, self.tokens_seen, self.elapsed = meta["step"], meta["tokens_seen"], meta["elapsed_s"]
        self.best_val = meta["best_val"] if meta["best_val"] is not None else float("inf")
        self.history, self.guard_baseline = meta["history"], meta["guard_baseline"]
        self.rng.bit_generator.state = meta["data"]["rng"]
        torch.set_rng_state(torch.tensor(bytearray.fromhex(meta["rng"]["torch"]), dtype=torch.uint8))
        if self.world.device.type == "cuda" and meta["rng"].get("cuda"):
            torch.cuda.set_rng_state(torch.tensor(bytearray.fromhex(meta["rng"]["cuda"]), dtype=torch.uint8))
        self.log(f"resumed from {self.folder / self.CHECKPOINT} at step {self.step} ({self.tokens_seen:,} tokens)")

    def meta(self) -> dict:
        """Everything but the tensors: what checkpoint.json holds."""
        rng = {"torch": torch.get_rng_state().numpy().tobytes().hex()}
        if self.world.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state().numpy().tobytes().hex()
        return {
            "settings": asdict(self.cfg),
            "model_args": self.model.args.to_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed,
            "progress": progress_of(self.cfg, self.step, self.elapsed),
            "processes": self.world.size,
            "data": {"shards": self.split.fingerprint(), "rng": self.rng.bit_generator.state},
            "rng": rng,
            "best_val": self.best_val if math.isfinite(self.best_val) else None,
            "guard_baseline": self.guard_baseline,
            "history": self.history,
        }

    def save(self) -> Path:
        """The checkpoint --resume reads, with the optimizer (rank 0 writes it)."""
        return self._write(self.folder / self.CHECKPOINT, with_optimizer=True)

    def _write(self, path: Path, with_optimizer: bool) -> Path:
        if self.world.main:
            optimizer = self.optimizer.state_dict() if with_optimizer else None
            checkpoint.save(path, self.trained_state(), self.meta(), optimizer)
            (self.folder / "history.json").write_text(json.dumps(self.history, indent=1))
        return path

    # ------------------------------------------------------------------ loop
    def train_step(self) -> float:
        """One optimizer step; returns the sum of this process' rows' mean losses."""
        cfg, world = self.cfg, self.world
        starts = batch_starts(self.rng, len(self.split.train), cfg.batch_size * cfg.grad_accum, cfg.seq_len)
        mine = starts[world.rank * self.rows : (world.rank + 1) * self.rows]
        micro = [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
        loss_sum = 0.0
        for i, rows in enumerate(micro):
            x, y = (torch.from_numpy(a).to(world.device) for a in windows_at(self.split.train, rows, cfg.seq_len))
            last = i == len(micro) - 1
            # gradients are averaged across processes once, in the backward of the last micro-batch
            no_sync = self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()
            with no_sync:
                with autocast_context(cfg.dtype, world.device):
                    _, loss = self.forward(x, y)
                # weighted so that the processes' averaged gradient is the mean over every row
                (loss * (len(rows) / self.rows)).backward()
            loss_sum += loss.item() * len(rows)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def run_eval(self) -> bool:
        """Record validation (and guard) loss, keep the best; False = stop training."""
        guard_ok = self._evaluate() if self.world.main else True
        self.last_eval_step = self.step  # on every process: only rank 0 keeps the history
        return self.world.from_main(guard_ok)

    def _evaluate(self) -> bool:
        val = evaluate(self.model, self.split.val, self.cfg, self.world.device)
        self.history["val"].append([self.step, self.tokens_seen, val])
        line = f"eval step {self.step} tokens {self.tokens_seen:,} val loss {val:.4f}"
        guard_ok = True
        if self.guard_val is not None:
            guard = evaluate(self.model, self.guard_val, self.cfg, self.world.device)
            self.history["guard"].append([self.step, self.tokens_seen, guard])
            if self.guard_baseline is None:
                self.guard_baseline = guard  # before the first step: the starting model's own loss
            limit = self.guard_baseline * (1.0 + self.cfg.guard_margin)
            guard_ok = guard <= limit
            line += f" base-corpus val {guard:.4f} (start {self.guard_baseline:.4f}, limit {limit:.4f})"
        self.log(line)
        if guard_ok and val < self.best_val:
            self.best_val = val
            self.save_best()
        if not guard_ok:
            self.log(f"stopping: base-corpus validation loss worsened by more than "
                     f"{100 * self.cfg.guard_margin:.1f}%; {self.best_kept()}")
        return guard_ok

    def train(self) -> dict:
        """Trains to the end of the schedule, a guard stop or a stop request; the checkpoint is
        saved whichever ends the run."""
        cfg = self.cfg
        self.log(f"data {cfg.data}: {len(self.split.shards)} shard(s), {len(self.split.train):,} train / "
                 f"{len(self.split.val):,} val tokens; {self.describe()}; "
                 f"{self.world.size} process(es) on {self.world.device.type}")
        if self.step == 0 and not self.run_eval():
            return self._finish()
        rows_per_step = cfg.batch_size * cfg.grad_accum
        tokens_per_step = rows_per_step * cfg.seq_len
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
            loss_sum = self.train_step()
            step_time = time.time() - t0
            # one all-reduce: the step's loss over every row, rank 0's clock, any stop request
            loss_sum, elapsed, stops = self.world.sum(
                [loss_sum, self.elapsed + step_time if self.world.main else 0.0, float(self.stop_requested)])
            loss = loss_sum / rows_per_step
            self.elapsed = elapsed
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
                return self._finish()
            if self.stop_now(stops):
                self.save()
                self.log(f"stopped at step {self.step} as asked; {self.folder / self.CHECKPOINT} saved: "
                         f"continue with {self.resume_hint()}")
                return self.summary()
            if time.time() - last_save > 60.0 * cfg.save_interval:
                self.save()
                last_save = time.time()
        if self.last_eval_step != self.step:
            self.run_eval()
        return self._finish()

    def _finish(self) -> dict:
        self.save()
        return self.summary()

    def summary(self) -> dict:
        val, guard = self.history["val"], self.history["guard"]
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": round(self.elapsed, 1),
                "best_val": self.best_val, "val_at_start": val[0][2] if val else None,
                "guard_baseline": self.guard_baseline, "guard_last": guard[-1][2] if guard else None,
                "out": str(self.cfg.out)}
