"""GGUF files (llama.cpp's format) in and out, through the ``gguf`` package (llama.cpp's own).

In: architecture "llama" with F32, F16 or Q8_0 tensors and a SentencePiece vocabulary
(``tokenizer.ggml.model`` "llama"); quantized tensors are dequantized to float32.
Out: F32, F16 or Q8_0 for every matrix (norms stay F32, as llama.cpp's own converter does).

q and k rows: a "llama" GGUF keeps them in the order the runtime uses (interleaved pairs, the
original Llama layout): llama.cpp's Hugging Face converter reorders HF's rotate-half rows back to
it, and its llama2.c converter copies llama2.c's rows unchanged. So nothing is permuted here.

Metadata the runtime cannot honour is refused, naming the key and its value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from . import interop
from . import vocab as vocab_io
from .formats import ModelConfig
from .interop import ConvertError
from .vocab import Vocab

PathLike = Union[str, os.PathLike]
ARCH = "llama"
RMS_NORM_EPS = np.float32(1e-5)  # GGUF stores it as float32
ROPE_THETA = 10000.0
READ_TYPES = ("F32", "F16", "Q8_0")
OUT_TYPES = ("f32", "f16", "q8_0")
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}  # gguf.LlamaFileType

# GGUF name of each formats weight ("{}" = layer index)
LAYER_TENSORS = {
    "rms_att": "blk.{}.attn_norm.weight",
    "wq": "blk.{}.attn_q.weight",
    "wk": "blk.{}.attn_k.weight",
    "wv": "blk.{}.attn_v.weight",
    "wo": "blk.{}.attn_output.weight",
    "rms_ffn": "blk.{}.ffn_norm.weight",
    "w1": "blk.{}.ffn_gate.weight",
    "w2": "blk.{}.ffn_down.weight",
    "w3": "blk.{}.ffn_up.weight",
}
GLOBAL_TENSORS = {"token_embedding": "token_embd.weight", "rms_final": "output_norm.weight",
                  "wcls": "output.weight"}


@dataclass(frozen=True)
class GGUFModel:
    cfg: ModelConfig
    weights: dict[str, np.ndarray]  # float32, formats layout
    vocab: Vocab
    tensor_types: dict[str, str]  # tensor name -> GGML type name (F32, F16, Q8_0)
    metadata: dict[str, Any]  # every key-value field but the token arrays


# ============================================================================ reading


def _open(path: PathLike):
    import gguf

    name = os.fspath(path)
    with open(path, "rb") as f:  # the open errors (missing, directory) as they are
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConvertError(f"{name}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(name)
    except Exception as exc:  # the reader raises assorted errors on damaged files
        raise ConvertError(f"{name}: not a readable GGUF file ({type(exc).__name__}: {exc}); "
                           f"is it truncated?") from exc
    size = os.path.getsize(name)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != t.n_bytes:
            raise ConvertError(f"{name}: tensor {t.name} ends at byte {end}, past the end of the "
                               f"file ({size} bytes); the file is truncated")
    return reader


def _metadata(reader) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                              "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
            continue
        out[key] = field.contents()
    return out


def _field(reader, key: str, default: Any = None, required: bool = False) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ConvertError(f"{reader.data.filename}: missing metadata key {key}")
        return default
    try:
        return field.contents()
    except UnicodeDecodeError as exc:
        raise ConvertError(f"{reader.data.filename}: metadata key {key} is not UTF-8 ({exc})") from exc


# formats field -> the GGUF key holding it (vocab_size: the rows of token_embd.weight)
CONFIG_KEYS = {"dim": "llama.embedding_length", "hidden_dim": "llama.feed_forward_length",
               "n_layers": "llama.block_count", "n_heads": "llama.attention.head_count",
               "n_kv_heads": "llama.attention.head_count_kv", "vocab_size": "token_embd.weight rows",
               "seq_len": "llama.context_length"}


def _config(reader, name: str, vocab_rows: int) -> ModelConfig:
    get = lambda key, default=None: _field(reader, key, default, required=default is None)  # noqa: E731
    heads = get(CONFIG_KEYS["n_heads"])
    values = {field: get(key) for field, key in CONFIG_KEYS.items()
              if field not in ("n_kv_heads", "vocab_size")}
    cfg = ModelConfig(**values, n_kv_heads=get(CONFIG_KEYS["n_kv_heads"], heads),
                      vocab_size=vocab_rows)
    interop.check_config(cfg, name, CONFIG_KEYS)
    head = cfg.head_size
    # (key, value when absent, value the runtime needs): anything else is refused
    wanted = [("llama.attention.layer_norm_rms_epsilon", None, RMS_NORM_EPS),
              ("llama.rope.freq_base", ROPE_THETA, ROPE_THETA),
              ("llama.rope.scaling.type", "none", "none"),
              ("llama.rope.scaling.factor", 1.0, 1.0),
              ("llama.rope.dimension_count", head, head),
              ("llama.attention.key_length", head, head),
              ("llama.attention.value_length", head, head),
              ("llama.expert_count", 0, 0)]
    for key, absent, want in wanted:
        value = get(key, absent)
        same = np.float32(value) == want if isinstance(want, np.floating) else value == want
        if not same:
            raise ConvertError(f"{name}: {key} is {value!r}; the runtime supports {want!r} only")
    return cfg


def _vocab(reader, name: str) -> Vocab:
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        raise ConvertError(f"{name}: no tokenizer.ggml.model: the file carries no vocabulary")
    if model != "llama":
        raise ConvertError(f"{name}: unsupported tokenizer type: tokenizer.ggml.model {model!r} "
                           f"(the runtime encodes SentencePiece BPE, 'llama')")
    ids = {"tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1,
           "tokenizer.ggml.eos_token_id": 2}
    for field, want in ids.items():
        value = _field(reader, field, want)
        if value != want:
            raise ConvertError(f"{name}: {field} is {value}; the runtime needs {want}")
    for field, want in (("tokenizer.ggml.add_space_prefix", True),
                        ("tokenizer.ggml.remove_extra_whitespaces", False)):
        value = _field(reader, field, want)
        if value != want:
            raise ConvertError(f"{name}: {field} is {value}; the runtime's tokenizer needs {want}")
    if "tokenizer.ggml.precompiled_charsmap" in reader.fields:
        raise ConvertError(f"{name}: tokenizer.ggml.precompiled_charsmap is set; the runtime "
                           f"encodes with the identity normalization only")
    texts = _field(reader, "tokenizer.ggml.tokens", required=True)
    scores = _field(reader, "tokenizer.ggml.scores", [0.0] * len(texts))
    kinds = _field(reader, "tokenizer.ggml.token_type", None)
    if kinds is None:
        kinds = [vocab_io.piece_kind(i, t.encode("utf-8")) for i, t in enumerate(texts)]
    if not len(texts) == len(scores) == len(kinds):
        raise ConvertError(f"{name}: {len(texts)} tokens, {len(scores)} scores and {len(kinds)} "
                           f"token types; they must be equal")
    vocab_io.check_kinds(kinds, texts, name, "tokenizer.ggml.token_type")
    return vocab_io.from_texts(texts, scores, name)


def _check_type(tensor, name: str) -> None:
    import gguf

    kind = gguf.GGMLQuantizationType(tensor.tensor_type)
    if kind.name not in READ_TYPES:
        raise ConvertError(f"{name}: tensor {tensor.name} has type {kind.name}; supported: "
                           f"{', '.join(READ_TYPES)}")


def _dequantized(tensor) -> np.ndarray:
    import gguf

    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the innermost size first
    kind = gguf.GGMLQuantizationType(tensor.tensor_type)
    return np.asarray(gguf.quants.dequantize(tensor.data, kind), dtype=np.float32).reshape(shape)


def read_gguf(path: PathLike) -> GGUFModel:
    """Config, float32 weights (formats layout), vocabulary and metadata of a llama GGUF."""
    name = os.fspath(path)
    reader = _open(path)
    arch = _field(reader, "general.architecture", required=True)
    if arch != ARCH:
        raise ConvertError(f"{name}: general.architecture is {arch!r}; only 'llama' converts")
    tensors = {t.name: t for t in reader.tensors}
    embedding, classifier = GLOBAL_TENSORS["token_embedding"], GLOBAL_TENSORS["wcls"]
    if embedding not in tensors:
        raise ConvertError(f"{name}: missing tensor {embedding}")
    vocab_rows = int(tensors[embedding].shape[-1])
    vocab = _vocab(reader, name)
    declared = _field(reader, f"{ARCH}.vocab_size", len(vocab))
    if not len(vocab) == vocab_rows == declared:
        raise ConvertError(f"{name}: {len(vocab)} tokens, {vocab_rows} {embedding} rows and "
                           f"{ARCH}.vocab_size {declared}; they must be equal")
    cfg = replace(_config(reader, name, vocab_rows), shared_classifier=classifier not in tensors)
    for t in reader.tensors:  # the type first: a shape is only known for types we read
        _check_type(t, name)
    found = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    expected = interop.tensor_shapes(cfg, LAYER_TENSORS, GLOBAL_TENSORS)
    interop.check_tensors(found, expected, name, "the metadata")
    arrays = {tname: _dequantized(t) for tname, t in tensors.items()}
    cfg = replace(cfg, shared_classifier=interop.classifier_is_shared(arrays, embedding, classifier))
    weights = interop.to_weights(cfg, arrays, LAYER_TENSORS, GLOBAL_TENSORS)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return GGUFModel(cfg, weights, vocab, types, _metadata(reader))


# ============================================================================ writing


def write_gguf(path: PathLike, cfg: ModelConfig, weights: dict[str, np.ndarray], vocab: Vocab,
               out_type: str = "f32", name: Optional[str] = None) -> None:
    """Writes a llama GGUF: the metadata llama.cpp reads, the vocabulary, and the matrices in
    out_type (norms always F32)."""
    import gguf

    if out_type not in OUT_TYPES:
        raise ConvertError(f"GGUF type {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[out_type.upper()]][0]
    for field in ("dim", "hidden_dim"):
        if getattr(cfg, field) % block:
            raise ConvertError(f"{out_type} stores rows in blocks of {block} values, but the "
                               f"model's {field} is {getattr(cfg, field)}; use another --type")
    writer = gguf.GGUFWriter(os.fspath(path), ARCH)
    add_metadata(writer, cfg, vocab, name or Path(path).stem, out_type)
    tensors = interop.from_weights(cfg, weights, LAYER_TENSORS, GLOBAL_TENSORS)
    add_tensors(writer, tensors, gguf.GGMLQuantizationType[out_type.upper()])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_metadata(writer, cfg: ModelConfig, vocab: Vocab, name: str, out_type: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(cfg.seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_size)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(float(RMS_NORM_EPS))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[out_type]])
    if out_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab.texts())
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.kinds())
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)


def add_tensors(writer, tensors: dict[str, np.ndarray], matrix_type) -> None:
    """Matrices in matrix_type (a gguf.GGMLQuantizationType), vectors (the norms) in F32."""
    import gguf

    for tname, array in tensors.items():
        kind = matrix_type if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(tname, gguf.quants.quantize(array, kind), raw_dtype=kind)


def q8_0_error_bound(weights: np.ndarray) -> np.ndarray:
    """Per element, the most a Q8_0 round trip may move it: half a step of its 32-block
    (step = block max / 127), plus the step's own rounding to float16 times 127."""
    rows = np.asarray(weights, dtype=np.float32).reshape(-1, 32)
    step = np.abs(rows).max(axis=1, keepdims=True) / 127.0
    f16_error = np.abs(step - step.astype(np.float16).astype(np.float32))
    return np.broadcast_to(0.5 * step + 127.0 * f16_error, rows.shape).reshape(np.shape(weights))
