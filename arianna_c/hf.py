"""Hugging Face Llama directories in and out (config.json + safetensors + tokenizer).

In: a ``LlamaForCausalLM`` directory (config.json; model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model.bin [+ index]; tokenizer.model or tokenizer.json).
Out: config.json, model.safetensors, tokenizer.model, tokenizer.json, tokenizer_config.json and
special_tokens_map.json, which ``LlamaForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load offline.

q and k: the runtime rotates interleaved pairs (x[2i], x[2i+1]) of each head; Hugging Face's Llama
rotates halves (x[i], x[i + head_dim/2]), so its q_proj/k_proj rows are the runtime's rows
reordered per head: first the even rows, then the odd ones. ``rows_to_interleaved`` and
``rows_to_halves`` are the two directions (k with num_key_value_heads heads).

Config values the runtime cannot honour are refused, naming the key and value: another
activation than silu, rms_norm_eps other than 1e-5, rope_theta other than 10000, any RoPE
scaling, biases, a head_dim that is not hidden_size / num_attention_heads, BOS/EOS ids other
than 1/2.

Needs the ``convert`` extra (transformers, safetensors, tokenizers, protobuf) and torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import numpy as np

from . import interop
from . import vocab as vocab_io
from .formats import ModelConfig
from .interop import ConvertError
from .vocab import Vocab

PathLike = Union[str, os.PathLike]
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0

# Hugging Face name of each formats weight, per layer ("{}" = layer index)
LAYER_TENSORS = {
    "rms_att": "model.layers.{}.input_layernorm.weight",
    "wq": "model.layers.{}.self_attn.q_proj.weight",
    "wk": "model.layers.{}.self_attn.k_proj.weight",
    "wv": "model.layers.{}.self_attn.v_proj.weight",
    "wo": "model.layers.{}.self_attn.o_proj.weight",
    "rms_ffn": "model.layers.{}.post_attention_layernorm.weight",
    "w1": "model.layers.{}.mlp.gate_proj.weight",
    "w2": "model.layers.{}.mlp.down_proj.weight",
    "w3": "model.layers.{}.mlp.up_proj.weight",
}
GLOBAL_TENSORS = {"token_embedding": "model.embed_tokens.weight", "rms_final": "model.norm.weight",
                  "wcls": "lm_head.weight"}
# formats field -> config.json key
CONFIG_KEYS = {"dim": "hidden_size", "hidden_dim": "intermediate_size", "n_layers": "num_hidden_layers",
               "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
               "vocab_size": "vocab_size", "seq_len": "max_position_embeddings"}
# Buffers some older checkpoints saved; they are recomputed from the config.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# ============================================================================ q/k row order


def rows_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face (rotate-half) q/k rows -> the runtime's interleaved-pair rows."""
    out_dim, in_dim = w.shape
    half = out_dim // n_heads // 2
    return w.reshape(n_heads, 2, half, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def rows_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The runtime's interleaved-pair q/k rows -> Hugging Face (rotate-half) rows."""
    out_dim, in_dim = w.shape
    half = out_dim // n_heads // 2
    return w.reshape(n_heads, half, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


# ============================================================================ config


def _raw_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise ConvertError(f"{folder}: not a directory (a Hugging Face model is a folder with config.json)")
    if not path.is_file():
        raise ConvertError(f"{path}: missing; a Hugging Face model folder needs config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConvertError(f"{path}: not a JSON object")
    return raw


def _check_arch(raw: dict, path: Path) -> None:
    arch = raw.get("architectures") or []
    if raw.get("model_type") != "llama" or (arch and "LlamaForCausalLM" not in arch):
        raise ConvertError(f"{path}: model_type is {raw.get('model_type')!r}, architectures "
                           f"{arch}; only Llama (model_type 'llama', LlamaForCausalLM) converts")


def read_config(folder: PathLike) -> ModelConfig:
    """The runtime config of a Hugging Face Llama folder (shared_classifier = tied embeddings),
    after refusing every value the runtime cannot honour."""
    from transformers import LlamaConfig

    folder = Path(folder)
    raw = _raw_config(folder)
    path = folder / "config.json"
    _check_arch(raw, path)
    try:
        hf = LlamaConfig.from_dict(raw)
    except Exception as exc:  # transformers validates the values itself
        raise ConvertError(f"{path}: transformers refuses it: {' '.join(str(exc).split())}") from exc
    cfg = ModelConfig(**{field: getattr(hf, key) for field, key in CONFIG_KEYS.items()},
                      shared_classifier=bool(hf.tie_word_embeddings))
    interop.check_config(cfg, os.fspath(path), CONFIG_KEYS)
    rope = dict(hf.rope_parameters or {})
    theta_key = "rope_theta" if "rope_theta" in raw else "rope_parameters.rope_theta"
    scaling_key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters.rope_type"
    eos = hf.eos_token_id if isinstance(hf.eos_token_id, list) else [hf.eos_token_id]
    # (key, its value, the value the runtime needs)
    wanted = [("hidden_act", hf.hidden_act, "silu"),
              ("rms_norm_eps", hf.rms_norm_eps, RMS_NORM_EPS),
              ("attention_bias", hf.attention_bias, False),
              ("mlp_bias", hf.mlp_bias, False),
              ("head_dim", hf.head_dim, cfg.head_size),
              ("bos_token_id", hf.bos_token_id, 1),
              ("eos_token_id", eos, [2]),
              (theta_key, rope.get("rope_theta", ROPE_THETA), ROPE_THETA),
              (scaling_key, rope.get("rope_type", "default"), "default")]
    for key, value, want in wanted:
        if value != want:
            raise ConvertError(f"{path}: {key} is {value!r}; the runtime supports {want!r} only")
    return cfg


# ============================================================================ tensors


def _shard_files(folder: Path) -> list[Path]:
    """The weight files of a folder, from its index when it has one; missing shards are errors."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConvertError(f"{folder / index}: no readable weight_map ({exc})") from exc
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (folder / shard).is_file():
                    raise ConvertError(f"{folder / shard}: missing shard (listed in {index})")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise ConvertError(f"{folder}: no model.safetensors, model.safetensors.index.json, "
                       f"pytorch_model.bin or pytorch_model.bin.index.json")


def load_tensors(folder: PathLike) -> dict[str, np.ndarray]:
    """Every tensor of the folder's weight files as float32 NumPy (bf16/f16 widened)."""
    import torch

    tensors: dict[str, np.ndarray] = {}
    for path in _shard_files(Path(folder)):
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(os.fspath(path), framework="pt") as f:
                    part = {k: f.get_tensor(k) for k in f.keys()}
            else:
                part = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # safetensors / torch errors on damaged files
            raise ConvertError(f"{path}: cannot read tensors ({type(exc).__name__}: {exc})") from exc
        for key, value in part.items():
            if not isinstance(value, torch.Tensor):
                raise ConvertError(f"{path}: entry {key} is a {type(value).__name__}, not a tensor")
            tensors[key] = value.detach().to(torch.float32).numpy()
    return tensors


def weights_from_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray],
                         source: str) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """formats-style weights (q/k rows interleaved) after checking every tensor against cfg.
    With tied embeddings (cfg.shared_classifier) an lm_head.weight in the files is ignored, as
    transformers ignores it; an untied one equal to the embedding is stored as shared."""
    tied = cfg.shared_classifier
    expected = interop.tensor_shapes(cfg, LAYER_TENSORS, GLOBAL_TENSORS)
    found = {k: v.shape for k, v in tensors.items() if not (tied and k == GLOBAL_TENSORS["wcls"])}
    implied = (f"config.json (hidden_size {cfg.dim}, intermediate_size {cfg.hidden_dim}, "
               f"num_attention_heads {cfg.n_heads}, num_key_value_heads {cfg.n_kv_heads}, "
               f"vocab_size {cfg.vocab_size})")
    interop.check_tensors(found, expected, source, implied, ignored=IGNORED_SUFFIXES)
    shared = tied or interop.classifier_is_shared(tensors, GLOBAL_TENSORS["token_embedding"],
                                                  GLOBAL_TENSORS["wcls"])
    cfg = replace(cfg, shared_classifier=shared)
    weights = interop.to_weights(cfg, tensors, LAYER_TENSORS, GLOBAL_TENSORS)
    weights["wq"] = np.stack([rows_to_interleaved(w, cfg.n_heads) for w in weights["wq"]])
    weights["wk"] = np.stack([rows_to_interleaved(w, cfg.n_kv_heads) for w in weights["wk"]])
    return cfg, weights


def read_tokenizer(folder: Path) -> tuple[Vocab, Optional[str]]:
    """The folder's tokenizer: tokenizer.model (SentencePiece) first, else tokenizer.json."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if (folder / name).is_file():
            return vocab_io.read_tokenizer_file(folder / name)
    raise ConvertError(f"{folder}: no tokenizer.model or tokenizer.json")


def read_hf(folder: PathLike) -> tuple[ModelConfig, dict[str, np.ndarray], Vocab, Optional[str]]:
    """Config, weights, vocabulary and a tokenizer note (or None) of a Hugging Face Llama folder."""
    folder = Path(folder)
    cfg = read_config(folder)
    vocab, note = read_tokenizer(folder)
    if len(vocab) != cfg.vocab_size:
        raise ConvertError(f"{folder}: the tokenizer has {len(vocab)} pieces but config.json's "
                           f"vocab_size is {cfg.vocab_size}; the runtime needs them equal")
    cfg, weights = weights_from_tensors(cfg, load_tensors(folder), os.fspath(folder))
    return cfg, weights, vocab, note


def reference_logits(folder: PathLike, tokens: list[int]) -> np.ndarray:
    """transformers' own float32 logits for tokens (one sequence from position 0)."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # a tiny model loads in a blink; keep stderr for results
    model = LlamaForCausalLM.from_pretrained(os.fspath(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens], dtype=torch.long)).logits[0].float().numpy()


# ============================================================================ export


def hf_config(cfg: ModelConfig):
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.seq_len,
                     rms_norm_eps=RMS_NORM_EPS, rope_theta=ROPE_THETA, hidden_act="silu",
                     tie_word_embeddings=cfg.shared_classifier, bos_token_id=1, eos_token_id=2,
                     attention_bias=False, mlp_bias=False, head_dim=cfg.head_size)
    hf.architectures = ["LlamaForCausalLM"]
    return hf


def hf_tensors(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Hugging Face tensors of formats-style weights (q/k rows rotate-half)."""
    tensors = interop.from_weights(cfg, weights, LAYER_TENSORS, GLOBAL_TENSORS)
    for layer in range(cfg.n_layers):
        for key, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads)):
            name = LAYER_TENSORS[key].format(layer)
            tensors[name] = np.ascontiguousarray(rows_to_halves(tensors[name], heads))
    return tensors


def tokenizer_config(cfg: ModelConfig, vocab: Vocab) -> tuple[dict, dict]:
    """tokenizer_config.json and special_tokens_map.json. The fast tokenizer of tokenizer.json
    (not LlamaTokenizer, whose Metaspace step skips the prefix space of a text that starts with
    one) so that its ids are the runtime's."""
    unk, bos, eos = vocab.texts()[:3]
    special = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
    config = dict(special, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True,
                  add_eos_token=False, model_max_length=cfg.seq_len,
                  clean_up_tokenization_spaces=False, padding_side="left")
    return config, special


def write_hf(folder: PathLike, cfg: ModelConfig, weights: dict[str, np.ndarray], vocab: Vocab) -> None:
    """Writes a Hugging Face Llama folder (which must exist and be empty)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    hf_config(cfg).to_json_file(folder / "config.json")
    save_file(hf_tensors(cfg, weights), os.fspath(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer.model").write_bytes(vocab_io.sentencepiece_bytes(vocab))
    (folder / "tokenizer.json").write_text(vocab_io.tokenizer_json(vocab), encoding="utf-8")
    config, special = tokenizer_config(cfg, vocab)
    for name, doc in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (folder / name).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def reference_tokenizer_ids(folder: PathLike, texts: list[str]) -> list[list[int]]:
    """AutoTokenizer's ids (with <s>) for each text: what a transformers user gets."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.fspath(folder))
    return [tok(text)["input_ids"] for text in texts]
