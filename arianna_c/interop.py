"""What the converters share: their error, and the mapping between another format's tensor names
and formats' weight dict (stacked per-layer arrays, matrices (out, in)).

A naming scheme is two dicts: per-layer names with "{}" for the layer index, keyed by formats'
weight names (rms_att, wq, ...), and the global names (token_embedding, rms_final, wcls).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from . import formats
from .formats import ModelConfig


class ConvertError(ValueError):
    """An input the converter refuses, or an output that does not reproduce its source."""


def check_config(cfg: ModelConfig, source: str, keys: Mapping[str, str]) -> None:
    """The sizes every layout needs (positive; heads dividing dim, kv heads dividing heads, an
    even head size for RoPE's pairs); keys names each field as the source spells it."""
    for field, key in keys.items():
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConvertError(f"{source}: {key} is {value!r}; it must be a positive integer")
    if cfg.dim % cfg.n_heads:
        raise ConvertError(f"{source}: {keys['n_heads']} {cfg.n_heads} does not divide "
                           f"{keys['dim']} {cfg.dim}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ConvertError(f"{source}: {keys['n_kv_heads']} {cfg.n_kv_heads} does not divide "
                           f"{keys['n_heads']} {cfg.n_heads}")
    if cfg.head_size % 2:
        raise ConvertError(f"{source}: the head size {cfg.head_size} ({keys['dim']} / "
                           f"{keys['n_heads']}) is odd; RoPE rotates pairs")


def tensor_shapes(cfg: ModelConfig, layer_names: Mapping[str, str],
                  global_names: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape under a naming scheme (wcls only when not shared)."""
    shapes = formats.weight_shapes(cfg)
    out = {global_names[k]: shapes[k] for k in global_names if k in shapes}
    for layer in range(cfg.n_layers):
        for key, pattern in layer_names.items():
            out[pattern.format(layer)] = shapes[key][1:]
    return out


def check_tensors(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                  source: str, implied_by: str, ignored: tuple[str, ...] = ()) -> None:
    """Every expected tensor present with its shape, nothing else but names ending in ignored."""
    for name in sorted(found):
        if name not in expected and not name.endswith(ignored):
            raise ConvertError(f"{source}: unexpected tensor {name} (the runtime's Llama has no "
                               f"biases or other extra weights)")
    for name, shape in expected.items():
        if name not in found:
            raise ConvertError(f"{source}: missing tensor {name}")
        if tuple(found[name]) != tuple(shape):
            raise ConvertError(f"{source}: tensor {name} has shape {tuple(found[name])}, but "
                               f"{implied_by} implies {tuple(shape)}")


def to_weights(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], layer_names: Mapping[str, str],
               global_names: Mapping[str, str]) -> dict[str, np.ndarray]:
    """formats' weight dict from named float32 tensors (already checked by check_tensors)."""
    weights = {key: np.stack([tensors[pattern.format(l)] for l in range(cfg.n_layers)])
               for key, pattern in layer_names.items()}
    for key, name in global_names.items():
        if name in tensors and (key != "wcls" or not cfg.shared_classifier):
            weights[key] = tensors[name]
    return weights


def from_weights(cfg: ModelConfig, weights: Mapping[str, np.ndarray], layer_names: Mapping[str, str],
                 global_names: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Named contiguous float32 tensors from formats' weight dict: the globals, then layer by layer."""
    out = {global_names[k]: weights[k] for k in ("token_embedding", "rms_final")}
    if not cfg.shared_classifier:
        out[global_names["wcls"]] = weights["wcls"]
    for layer in range(cfg.n_layers):
        for key, pattern in layer_names.items():
            out[pattern.format(layer)] = weights[key][layer]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def classifier_is_shared(tensors: Mapping[str, np.ndarray], embedding: str, classifier: str) -> bool:
    """A classifier that is absent or equals the embedding is stored as shared (same logits)."""
    return classifier not in tensors or np.array_equal(tensors[classifier], tensors[embedding])
