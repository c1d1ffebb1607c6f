"""Exporters: PyTorch LLiSA -> model .bin (v0 / v1) or .npz; SentencePiece .model -> tokenizer .bin.

    python -m arianna_c.export model RUN/best OUT.bin [--version 1] [--no-verify]
    python -m arianna_c.export model RUN/best OUT.npz
    python -m arianna_c.export tokenizer persona/tok4096.model persona/tok4096.bin
    python -m arianna_c.export check MODEL.bin RUN/best      # C logits vs torch logits

The model source is a training checkpoint folder (``RUN/best``, ``RUN/ckpt``), a one-file
``.pt`` checkpoint of earlier versions, or a model file (.bin / .npz, e.g. to change layout).

Model files default to the legacy v0 layout, which stock llama2.c ``run`` reads too; ``--version 1``
writes the "ak42" v1 layout.  A classifier tied to the embedding (``output.weight`` is, or equals,
``tok_embeddings.weight``) is written as a shared classifier.

After writing a .bin (as OUT.tmp, renamed to OUT once checked) the exporter loads it back
through the C library (``arianna_c.Model``) and compares its logits on a short token sequence
with the PyTorch model's; if the largest difference exceeds ``tolerance`` (1e-4) it removes the
file, leaves OUT as it was, and raises :class:`ExportError`.  When the C library cannot be
loaded at all the export fails too (pass ``verify=False`` to skip the check).

torch is imported lazily: the tokenizer exporter and the NumPy helpers work without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from . import formats
from .formats import ModelConfig
from .reference import save_npz

PathLike = Union[str, os.PathLike]
TOLERANCE = 1e-4
SPACE_MARK = "\u2581"
# torch (out, in) parameter name of each formats weight, per layer ("{}" = layer index)
LAYER_PARAMS = {
    "rms_att": "layers.{}.attention_norm.weight",
    "wq": "layers.{}.attention.wq.weight",
    "wk": "layers.{}.attention.wk.weight",
    "wv": "layers.{}.attention.wv.weight",
    "wo": "layers.{}.attention.wo.weight",
    "rms_ffn": "layers.{}.ffn_norm.weight",
    "w1": "layers.{}.feed_forward.w1.weight",
    "w2": "layers.{}.feed_forward.w2.weight",
    "w3": "layers.{}.feed_forward.w3.weight",
}


class ExportError(RuntimeError):
    """An export that must not be used: the written file does not reproduce the model."""


# ============================================================================ torch -> weights


def describe_file(path: PathLike) -> str:
    """What a path most likely holds, for error messages ("a model .bin", ...)."""
    path = Path(path)
    if path.is_dir():
        return "a folder"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if head == b"PK\x03\x04":
        return "a PyTorch .pt file"
    try:
        formats.read_model(path)
        return "a model .bin"
    except Exception:
        pass
    try:
        import sentencepiece as spm

        spm.SentencePieceProcessor(model_file=str(path))
        return "a SentencePiece .model"
    except Exception:
        pass
    try:
        if len(formats.read_tokenizer(path)[0]) >= 3:
            return "a runtime tokenizer .bin"
    except Exception:
        pass
    return "no file this project writes"


def load_checkpoint(path: PathLike):
    """A ``Transformer`` (eval mode) from a checkpoint folder or a legacy ``.pt`` file."""
    from .checkpoint import build_transformer, load_any

    ckpt = load_any(path)
    return build_transformer(ckpt.meta["model_args"], ckpt.model_state).eval()


def load_torch_model(path: PathLike):
    """A ``Transformer`` (eval mode) from a checkpoint (folder or legacy .pt) or a model file
    the runtime reads (.bin, or the NumPy reference's .npz)."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".pt":
        return load_checkpoint(path)
    if path.suffix == ".npz" or describe_file(path) == "a model .bin":
        return torch_from_bin(path)
    return load_checkpoint(path)  # a checkpoint by content, or its error saying what the file is


def is_tied(state: dict) -> bool:
    """True when the classifier is the embedding: same tensor, missing, or equal data."""
    emb = state["tok_embeddings.weight"]
    out = state.get("output.weight")
    if out is None or out is emb:
        return True
    if out.data_ptr() == emb.data_ptr() and out.shape == emb.shape:
        return True
    return out.shape == emb.shape and bool((out == emb).all())


def weights_from_torch(model_or_state, version: int = 0) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and formats-style float32 weights of a ``Transformer`` (or its state dict + args)."""
    if isinstance(model_or_state, tuple):
        state, args = model_or_state
    else:
        state, args = model_or_state.state_dict(keep_vars=False), model_or_state.args
    from .checkpoint import strip_prefixes

    state = strip_prefixes(state)
    tied = is_tied(state)
    arr = lambda t: t.detach().to("cpu").float().numpy()  # noqa: E731
    emb = arr(state["tok_embeddings.weight"])
    vocab, dim = emb.shape
    n_layers = args.n_layers
    weights = {"token_embedding": emb, "rms_final": arr(state["norm.weight"])}
    for name, pattern in LAYER_PARAMS.items():
        weights[name] = np.stack([arr(state[pattern.format(l)]) for l in range(n_layers)])
    if not tied:
        weights["wcls"] = arr(state["output.weight"])
    cfg = ModelConfig(dim=dim, hidden_dim=weights["w1"].shape[1], n_layers=n_layers,
                      n_heads=args.n_heads, n_kv_heads=args.resolved_kv_heads(), vocab_size=vocab,
                      seq_len=args.max_seq_len, shared_classifier=tied, version=version)
    return cfg, weights


def _as_model(source):
    """A Transformer from a module or a path (see load_torch_model)."""
    if isinstance(source, (str, os.PathLike)):
        return load_torch_model(source)
    return source.eval()


# ============================================================================ exports


def export_bin(source, out_path: PathLike, version: int = 0, verify: bool = True,
               tolerance: float = TOLERANCE, check_tokens: Optional[Sequence[int]] = None) -> float:
    """Writes source (a Transformer or checkpoint path) as a model .bin; returns the checked
    max |C - torch| logit difference (nan when verify=False).  The file is written beside
    out_path and checked there, then renamed into place: a failed export leaves out_path as it
    was."""
    out_path = _output_file(out_path)
    model = _as_model(source)
    cfg, weights = weights_from_torch(model, version=version)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        formats.write_model(tmp, cfg, weights)
        diff = _verify_written(tmp, out_path, model, tolerance, check_tokens) if verify else float("nan")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


def _verify_written(tmp: Path, out_path: Path, model, tolerance: float, tokens: Optional[Sequence[int]]) -> float:
    """verify_bin on the file written as tmp, its failure naming out_path as not written."""
    try:
        return verify_bin(tmp, model, tolerance=tolerance, tokens=tokens)
    except ExportError as exc:
        raise ExportError(f"{out_path} was not written: {exc}") from exc


def _output_file(out_path: PathLike) -> Path:
    """out_path as a Path; ValueError when it is a folder (an export writes one file)."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ValueError(f"output {out_path} is a folder: name the file to write")
    return out_path


def export_npz(source, out_path: PathLike) -> None:
    """Writes source (a Transformer or checkpoint path) as an .npz the NumPy reference reads."""
    out_path = _output_file(out_path)
    cfg, weights = weights_from_torch(_as_model(source))
    save_npz(out_path, cfg, weights)


def check_sequence(vocab_size: int, seq_len: int, length: int = 16, seed: int = 0) -> list[int]:
    """The short token sequence exports are checked on: BOS then seeded random ids."""
    n = min(length, seq_len)
    rng = np.random.default_rng(seed)
    return [1 % vocab_size] + rng.integers(0, vocab_size, n - 1).tolist()


def torch_logits(model, tokens: Sequence[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(tokens)], dtype=torch.long))[0].float().numpy()


def placeholder_tokenizer(vocab_size: int) -> bytes:
    """Tokenizer bytes with vocab_size distinct pieces, for loading a model whose real tokenizer
    is not at hand (``arianna_c.Model`` always loads one; logits never use it)."""
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<p%d>" % i for i in range(3, vocab_size)]
    pieces = pieces[:vocab_size]
    return formats.tokenizer_bytes(pieces, [0.0] * len(pieces))


def c_logits(path: PathLike, tokens: Sequence[int]) -> np.ndarray:
    """Logits of the model file through the C library (KV-cache path from position 0)."""
    try:
        import arianna_c

        cfg = formats.read_model(path)[0]
        model = arianna_c.Model(os.fspath(path), tokenizer=placeholder_tokenizer(cfg.vocab_size))
    except Exception as exc:
        raise ExportError(f"cannot check {path}: the C library could not load it ({exc}); "
                          f"build it with `make`, or export with verify=False / --no-verify") from exc
    try:
        return np.asarray(model.logits(list(tokens)), dtype=np.float32)
    finally:
        model.close()


def verify_bin(path: PathLike, model, tolerance: float = TOLERANCE,
               tokens: Optional[Sequence[int]] = None) -> float:
    """max |C logits - torch logits| on a short sequence; ExportError above tolerance."""
    model = _as_model(model)
    cfg = formats.read_model(path)[0]
    if tokens is None:
        tokens = check_sequence(cfg.vocab_size, cfg.seq_len)
    diff = float(np.max(np.abs(c_logits(path, tokens) - torch_logits(model, tokens))))
    if not diff <= tolerance:  # also catches nan
        raise ExportError(f"{path}: C logits differ from the PyTorch model's by {diff:.3g} "
                          f"(tolerance {tolerance:g}); the file is not a faithful export")
    return diff


# ============================================================================ .bin -> torch


def torch_from_bin(path: PathLike):
    """A ``Transformer`` holding the weights of a model file (.bin v0/v1 or .npz), eval mode."""
    from .reference import load_weights

    cfg, weights = load_weights(path)
    return torch_from_weights(cfg, weights)


def torch_from_weights(cfg: ModelConfig, weights: dict[str, np.ndarray]):
    import torch

    from .model import ModelArgs, Transformer

    args = ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                     n_kv_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
                     hidden_dim=cfg.hidden_dim, max_seq_len=cfg.seq_len,
                     tied=cfg.shared_classifier)
    model = Transformer(args)
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731 (copies)
    state = {"tok_embeddings.weight": t(weights["token_embedding"]),
             "norm.weight": t(weights["rms_final"])}
    for name, pattern in LAYER_PARAMS.items():
        for l in range(cfg.n_layers):
            state[pattern.format(l)] = t(weights[name][l])
    state["output.weight"] = state["tok_embeddings.weight"] if cfg.shared_classifier else t(weights["wcls"])
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    if cfg.shared_classifier:
        model.output.weight = model.tok_embeddings.weight  # keep the tie after loading
    return model.eval()


# ============================================================================ tokenizer


def tokenizer_from_sentencepiece(model_path: PathLike, out_path: Optional[PathLike] = None):
    """A llama2.c-layout tokenizer from a SentencePiece .model.

    Pieces by id (U+2581 turned into a space, byte pieces kept as their "<0xNN>" text, ids 0..2
    as "<unk>", "<s>", "</s>"), scores as SentencePiece holds them.  Writes out_path and returns
    it; without out_path returns the file's bytes.
    """
    from .data import load_sentencepiece

    sp = load_sentencepiece(model_path)
    pieces, scores = [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if i < 3:
            piece = ("<unk>", "<s>", "</s>")[i]
        pieces.append(piece.replace(SPACE_MARK, " ").encode("utf-8"))
        scores.append(float(sp.get_score(i)))
    data = formats.tokenizer_bytes(pieces, scores)
    if out_path is None:
        return data
    Path(out_path).write_bytes(data)
    return out_path


# ============================================================================ command line


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arianna_c.export", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mod = sub.add_parser("model", help="PyTorch checkpoint -> model .bin (v0/v1) or .npz")
    mod.add_argument("checkpoint", help="checkpoint folder (RUN/best, RUN/ckpt), a .pt of an older "
                                        "version, or a model .bin / .npz")
    mod.add_argument("out", help="output .bin (or .npz)")
    mod.add_argument("--version", type=int, choices=(0, 1), default=0,
                     help=".bin layout: 0 = legacy llama2.c (default), 1 = ak42 v1")
    mod.add_argument("--no-verify", action="store_true", help="skip the C-library logit check")
    tok = sub.add_parser("tokenizer", help="SentencePiece .model -> tokenizer .bin")
    tok.add_argument("model", help="SentencePiece .model")
    tok.add_argument("out", help="output tokenizer .bin")
    chk = sub.add_parser("check", help="compare a model .bin's C logits with a checkpoint's")
    chk.add_argument("bin", help="model .bin to check (its logits through the C library)")
    chk.add_argument("checkpoint", help="what it must reproduce: a checkpoint folder (RUN/best, RUN/ckpt), a .pt "
                                        "of an older version, or a model .bin / .npz")
    args = parser.parse_args(argv)
    try:
        if args.command in ("model", "check") and importlib.util.find_spec("torch") is None:
            raise ExportError(f"`export {args.command}` needs PyTorch: pip install torch==2.13.0 "
                              f"(or pip install 'arianna_c[train]')")
        if args.command == "model":
            if str(args.out).endswith(".npz"):
                export_npz(args.checkpoint, args.out)
                print(f"wrote {args.out}")
            else:
                diff = export_bin(args.checkpoint, args.out, version=args.version, verify=not args.no_verify)
                note = "not verified" if args.no_verify else f"max |C - torch| logit diff {diff:.3g}"
                print(f"wrote {args.out} (v{args.version}, {note})")
        elif args.command == "tokenizer":
            tokenizer_from_sentencepiece(args.model, args.out)
            print(f"wrote {args.out}")
        else:
            diff = verify_bin(args.bin, args.checkpoint)
            print(f"{args.bin}: max |C - torch| logit diff {diff:.3g} (ok)")
    except (ExportError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
