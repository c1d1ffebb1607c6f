"""Training checkpoints: a folder of safetensors files and one JSON file for everything else.

    ckpt/model.safetensors       the weights, float32 (a tied classifier is stored once)
    ckpt/optimizer.safetensors   the optimizer's tensors (AdamW moments and step counts)
    ckpt/checkpoint.json         settings, model shape, step, tokens seen, schedule and data
                                 position, RNG states, history, the optimizer's other fields

Nothing is unpickled: safetensors files hold only tensors, the JSON only data.  A folder is
written beside its final place and then swapped in, so an interrupted save leaves the previous
checkpoint whole.  Checkpoints of earlier versions (one ``.pt`` file of plain dicts and
tensors) are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

PathLike = Union[str, os.PathLike]
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "checkpoint.json"
FORMAT = "arianna_c training checkpoint"
FORMAT_VERSION = 1
ZIP_MAGIC = b"PK\x03\x04"  # torch.save files are zip archives
# Every checkpoint.json holds model_args; one a run resumes from, all of the Trainer's meta.
WEIGHTS_KEYS = ("model_args",)
RESUME_KEYS = ("settings", "model_args", "step", "tokens_seen", "elapsed_s", "data", "rng", "best_val",
               "guard_baseline", "history")


class CheckpointError(ValueError):
    """A path that does not hold a usable checkpoint; the message says what it holds instead."""


@dataclass
class Checkpoint:
    meta: dict  # model_args, settings, step, ... (see Trainer.meta)
    model_state: dict[str, torch.Tensor]
    optimizer_state: Optional[dict] = None  # a torch optimizer state_dict, when saved


def is_checkpoint_folder(path: PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


# ---------------------------------------------------------------------------- writing


def save(folder: PathLike, model_state: dict[str, torch.Tensor], meta: dict,
         optimizer_state: Optional[dict] = None) -> Path:
    """Writes the checkpoint folder (replacing an older one); returns its path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_unshared(model_state), tmp / MODEL_FILE, metadata={"format": "pt"})
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION)
    if optimizer_state is not None:
        tensors, rest = _flatten_optimizer(optimizer_state)
        save_file(tensors, tmp / OPTIMIZER_FILE, metadata={"format": "pt"})
        meta["optimizer"] = rest
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors, each storage once: safetensors refuses shared tensors, so a
    classifier tied to the embedding (which comes first in a Transformer's state dict) is
    dropped; the model's args say it is tied."""
    out, seen = {}, set()
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach().cpu().contiguous()
    return out


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors keyed "<param index>.<name>", and the JSON rest (param_groups, other fields)."""
    tensors: dict[str, torch.Tensor] = {}
    others: dict[str, dict] = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                others.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": others}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, entries in rest.get("state", {}).items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}


# ---------------------------------------------------------------------------- reading


def read_meta(folder: PathLike, needs: Sequence[str] = WEIGHTS_KEYS) -> dict:
    """checkpoint.json of a checkpoint folder (no tensors are read); CheckpointError unless it
    holds every entry needs names."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no checkpoint here ({META_FILE} is missing)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an arianna_c training checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('format_version')}, "
                              f"this version reads {FORMAT_VERSION}")
    missing = [key for key in needs if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: no {missing[0]!r} entry (training writes one into every "
                              f"checkpoint: the file is damaged)")
    return meta


def load(folder: PathLike, with_optimizer: bool = True, needs: Sequence[str] = WEIGHTS_KEYS) -> Checkpoint:
    """A checkpoint folder whose checkpoint.json holds the entries needs names, tensors on the
    CPU; the optimizer's state too (when saved) if with_optimizer."""
    folder = Path(folder)
    meta = read_meta(folder, needs)
    model_state = _read_tensors(folder / MODEL_FILE)
    optimizer_state = None
    if with_optimizer and "optimizer" in meta and (folder / OPTIMIZER_FILE).is_file():
        optimizer_state = _unflatten_optimizer(_read_tensors(folder / OPTIMIZER_FILE), meta["optimizer"])
    return Checkpoint(meta, model_state, optimizer_state)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def load_legacy(path: PathLike) -> Checkpoint:
    """A one-file ``.pt`` checkpoint of earlier versions: model and optimizer state dicts,
    model_args, config, step, tokens_seen, elapsed, best_val, history, guard_baseline."""
    try:
        ckpt = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends: the file is not a plain-data .pt
        raise CheckpointError(f"{path}: not a training checkpoint that loads without running "
                              f"pickled code ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a training checkpoint (needs 'model_args' and 'model')")
    meta = {"model_args": ckpt["model_args"], "settings": ckpt.get("config", {}),
            "step": ckpt.get("step", 0), "tokens_seen": ckpt.get("tokens_seen", 0),
            "elapsed_s": ckpt.get("elapsed", 0.0), "best_val": ckpt.get("best_val"),
            "history": ckpt.get("history", {}), "guard_baseline": ckpt.get("guard_baseline")}
    return Checkpoint(meta, ckpt["model"], ckpt.get("optimizer") or None)


def load_any(path: PathLike) -> Checkpoint:
    """The weights of a checkpoint folder (its optimizer's state is left unread) or a legacy
    ``.pt`` file; CheckpointError for anything else."""
    path = Path(path)
    if path.is_dir():
        if not is_checkpoint_folder(path):
            inside = [p.name for p in (path / "best", path / "ckpt") if is_checkpoint_folder(p)]
            hint = f"; it holds {' and '.join(inside)}: name one of them" if inside else ""
            raise CheckpointError(f"{path}: not a checkpoint folder (no {META_FILE}){hint}")
        return load(path, with_optimizer=False)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    with open(path, "rb") as f:
        if f.read(4) == ZIP_MAGIC:
            return load_legacy(path)
    from .export import describe_file

    kind = describe_file(path)
    hint = ": `export tokenizer` converts it" if kind == "a SentencePiece .model" else ""
    raise CheckpointError(f"{path}: not a training checkpoint (it is {kind}{hint}); give a checkpoint "
                          f"folder (RUN/best, RUN/ckpt) or a .pt of an older version")


# ---------------------------------------------------------------------------- the model


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Drops torch.compile's ``_orig_mod.`` and DistributedDataParallel's ``module.`` prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def build_transformer(model_args: dict, state: dict[str, torch.Tensor]):
    """A Transformer holding state (train mode); a classifier stored once stays tied."""
    from .model import ModelArgs, Transformer

    state = strip_prefixes(state)
    args = ModelArgs(**model_args)
    if args.tied and "output.weight" in state and not torch.equal(state["output.weight"],
                                                                   state["tok_embeddings.weight"]):
        args.tied = False  # a classifier that was untied after all
    model = Transformer(args)
    _check_shapes(model.state_dict(), state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (args.tied and k == "output.weight")]
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint's weights do not fit its model_args: missing {missing}, "
                              f"unexpected {unexpected}")
    return model


def _check_shapes(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """CheckpointError naming the first tensor whose shape is not the one model_args give it."""
    for name, want in expected.items():
        if name in state and state[name].shape != want.shape:
            raise CheckpointError(f"the checkpoint's {name} has shape {tuple(state[name].shape)}, but its "
                                  f"model_args make it {tuple(want.shape)}")
