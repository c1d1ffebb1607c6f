"""Models in and out: Hugging Face Llama folders, GGUF files and tokenizers <-> the runtime's files.

    python -m arianna_c.convert from-hf HF_DIR OUT.bin [--quantize int8]
    python -m arianna_c.convert from-gguf MODEL.gguf OUT.bin [--quantize int8]
    python -m arianna_c.convert tokenizer tokenizer.model|tokenizer.json OUT.bin
    python -m arianna_c.convert to-hf MODEL.bin OUT_DIR [--tokenizer TOK]
    python -m arianna_c.convert to-gguf MODEL.bin OUT.gguf [--tokenizer TOK] [--type f32|f16|q8_0]

Imports write the model file and its tokenizer (tokenizer.bin next to the model unless
--tokenizer-out says otherwise), then check them: the runtime's logits on a short token sequence
must match the source's own (transformers for a Hugging Face folder, the NumPy reference on the
dequantized tensors for a GGUF) within --tolerance. Exports load their output back
(transformers, or this module's GGUF reader) and compare it with the model file.

Every output is written under a temporary name in its folder and renamed into place only when
its check passed: a failed or interrupted conversion leaves nothing behind. Errors are one
line on stderr and exit status 1.

Needs the ``convert`` extra (transformers, safetensors, gguf, tokenizers, protobuf); the
Hugging Face directions also need torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from . import formats
from .export import TOLERANCE, ExportError, c_logits, check_sequence
from .formats import FormatError, ModelConfig
from .interop import ConvertError
from .paths import tokenizer_lookup_text
from .vocab import Vocab

PathLike = Union[str, os.PathLike]
DEFAULT_TOKENIZER_NAME = "tokenizer.bin"
# Exports read a tokenizer with these suffixes as its source format (SentencePiece .model,
# tokenizer.json); any other file as the runtime's tokenizer .bin.
SOURCE_TOKENIZER_SUFFIXES = (".model", ".json")
MODEL_VERSIONS = (0, 1)
# Texts whose ids an exported Hugging Face tokenizer must give exactly as the runtime does.
TOKENIZER_CHECK_TEXTS = ("Resonance is", "Once upon a time, there was a quiet river.",
                         " leading space,  two spaces\nand a new line\tand a tab",
                         "Digits 2024-03-15, 3.14159; café, naïve, 東京, 🙂!")


@dataclass
class Result:
    """What a conversion wrote and what its check measured, for the user."""

    written: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ============================================================================ staged outputs


class Staged:
    """Outputs written under temporary names beside their final paths; commit() renames them
    all into place, and leaving the with-block removes whatever was not committed."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def __enter__(self) -> "Staged":
        return self

    def __exit__(self, *exc: object) -> None:
        for tmp, _ in self._pending:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        self._pending.clear()

    @staticmethod
    def _folder_of(final: Path) -> Path:
        folder = final.parent
        if not folder.is_dir():
            raise ConvertError(f"{final}: its folder {folder} does not exist")
        return folder

    def file(self, final: PathLike) -> Path:
        final = Path(final)
        if final.is_dir():
            raise ConvertError(f"{final}: is a directory; name the output file")
        fd, tmp = tempfile.mkstemp(dir=self._folder_of(final), prefix=f".{final.name}.", suffix=".part")
        os.close(fd)
        self._pending.append((Path(tmp), final))
        return Path(tmp)

    def folder(self, final: PathLike) -> Path:
        final = Path(final)
        if final.exists() and not (final.is_dir() and not any(final.iterdir())):
            raise ConvertError(f"{final}: exists and is not an empty folder; name a new one")
        tmp = tempfile.mkdtemp(dir=self._folder_of(final), prefix=f".{final.name}.", suffix=".part")
        self._pending.append((Path(tmp), final))
        return Path(tmp)

    def commit(self) -> None:
        mask = _umask()
        for tmp, final in self._pending:
            # mkstemp, mkdtemp (and safetensors) make private files: give them the usual modes
            if tmp.is_dir():
                os.chmod(tmp, 0o777 & ~mask)
                for inner in tmp.iterdir():
                    os.chmod(inner, 0o666 & ~mask)
                if final.is_dir():
                    final.rmdir()  # empty, checked in folder()
            else:
                os.chmod(tmp, 0o666 & ~mask)
            os.replace(tmp, final)
        self._pending.clear()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ============================================================================ checks


def _max_diff(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))


def check_logits(model_path: Path, want: np.ndarray, tokens: Sequence[int], what: str,
                 tolerance: float) -> float:
    """max |runtime logits - want| on tokens; ConvertError above tolerance."""
    try:
        got = c_logits(model_path, tokens)
    except ExportError as exc:
        raise ConvertError(str(exc)) from exc
    diff = _max_diff(got, want)
    if not diff <= tolerance:  # also catches nan
        raise ConvertError(f"the converted model's logits differ from {what} by {diff:.3g} "
                           f"(tolerance {tolerance:g}); nothing was written")
    return diff


def write_runtime_files(stage: Staged, out: PathLike, tokenizer_out: Optional[PathLike],
                        cfg: ModelConfig, weights: dict, vocab: Vocab) -> tuple[Path, Path, Path, Path]:
    """Stages the float32 model file and the tokenizer; returns (model tmp, model final,
    tokenizer tmp, tokenizer final)."""
    out = Path(out)
    tok_final = Path(tokenizer_out) if tokenizer_out is not None else out.parent / DEFAULT_TOKENIZER_NAME
    if tok_final.resolve() == out.resolve():
        raise ConvertError(f"{out}: the model and the tokenizer cannot be the same file")
    model_tmp, tok_tmp = stage.file(out), stage.file(tok_final)
    formats.write_model(model_tmp, cfg, weights)
    tok_tmp.write_bytes(vocab.bin_bytes())
    return model_tmp, out, tok_tmp, tok_final


def quantize_int8(model_tmp: Path, tok_tmp: Path, tokens: Sequence[int]) -> np.ndarray:
    """Rewrites the staged float32 model as the runtime's int8 file (its own quantizer) and
    checks that the file gives exactly the logits of quantizing at load; returns them."""
    import arianna_c

    int8_tmp = model_tmp.with_name(model_tmp.name + ".int8")
    try:
        with arianna_c.Model(model_tmp, tokenizer=tok_tmp, quantize="int8") as model:
            at_load = np.asarray(model.logits(list(tokens)))
            model.save(int8_tmp)
        with arianna_c.Model(int8_tmp, tokenizer=tok_tmp) as model:
            saved = np.asarray(model.logits(list(tokens)))
        if not np.array_equal(at_load, saved):
            raise ConvertError("the int8 file does not reproduce the runtime's int8 quantization")
        os.replace(int8_tmp, model_tmp)
    finally:
        int8_tmp.unlink(missing_ok=True)
    return at_load


def _finish_import(stage: Staged, paths: tuple[Path, Path, Path, Path], want: Optional[np.ndarray],
                   tokens: Sequence[int], what: str, quantize: Optional[str], tolerance: float,
                   result: Result) -> Result:
    model_tmp, model_final, tok_tmp, tok_final = paths
    if want is not None:
        diff = check_logits(model_tmp, want, tokens, what, tolerance)
        result.checks.append(f"max |runtime - {what}| logit difference {diff:.3g} over "
                             f"{len(tokens)} positions (tolerance {tolerance:g})")
    if quantize == "int8":
        int8 = quantize_int8(model_tmp, tok_tmp, tokens)
        if want is not None:
            result.notes.append(f"int8: max |int8 - {what}| logit difference "
                                f"{_max_diff(int8, want):.3g} (the quantization error)")
    stage.commit()
    result.written += [str(model_final), str(tok_final)]
    result.notes.append(f"run it: ./run {model_final} -z {tok_final}")
    return result


def _check_output(quantize: Optional[str], version: int) -> None:
    if quantize not in (None, "int8"):
        raise ConvertError(f"quantize {quantize!r} is invalid: it must be None or 'int8'")
    if version not in MODEL_VERSIONS:
        raise ConvertError(f"version {version!r} is invalid: float32 files are version "
                           f"{' or '.join(map(str, MODEL_VERSIONS))}")


# ============================================================================ imports


def import_hf(folder: PathLike, out: PathLike, tokenizer_out: Optional[PathLike] = None,
              quantize: Optional[str] = None, version: int = 0, verify: bool = True,
              tolerance: float = TOLERANCE) -> Result:
    """A Hugging Face Llama folder -> model file + tokenizer, checked against transformers."""
    from . import hf

    _check_output(quantize, version)
    cfg, weights, vocab, note = hf.read_hf(folder)
    cfg = replace(cfg, version=version)
    result = Result(notes=[note] if note else [])
    tokens = check_sequence(cfg.vocab_size, cfg.seq_len)
    want = hf.reference_logits(folder, tokens) if verify else None
    with Staged() as stage:
        paths = write_runtime_files(stage, out, tokenizer_out, cfg, weights, vocab)
        return _finish_import(stage, paths, want, tokens, "transformers", quantize, tolerance, result)


def import_gguf(path: PathLike, out: PathLike, tokenizer_out: Optional[PathLike] = None,
                quantize: Optional[str] = None, version: int = 0, verify: bool = True,
                tolerance: float = TOLERANCE) -> Result:
    """A llama GGUF -> model file + tokenizer, checked against the NumPy reference run on the
    GGUF's dequantized tensors."""
    from . import gguf_io
    from .reference import Reference

    _check_output(quantize, version)
    src = gguf_io.read_gguf(path)
    cfg = replace(src.cfg, version=version)
    kinds = sorted(set(src.tensor_types.values()))
    result = Result(notes=[f"{path}: tensors {', '.join(kinds)} (read as float32)"])
    tokens = check_sequence(cfg.vocab_size, cfg.seq_len)
    want = Reference((cfg, src.weights)).logits(tokens) if verify else None
    with Staged() as stage:
        paths = write_runtime_files(stage, out, tokenizer_out, cfg, src.weights, src.vocab)
        return _finish_import(stage, paths, want, tokens, "the GGUF tensors", quantize, tolerance, result)


def import_tokenizer(source: PathLike, out: PathLike) -> Result:
    """A SentencePiece tokenizer.model or a Llama-style tokenizer.json -> tokenizer .bin."""
    from .vocab import read_tokenizer_file

    vocab, note = read_tokenizer_file(source)
    with Staged() as stage:
        Path(stage.file(out)).write_bytes(vocab.bin_bytes())
        stage.commit()
    return Result(written=[str(out)], checks=[f"{len(vocab)} pieces"], notes=[note] if note else [])


# ============================================================================ exports


def _read_runtime_files(model: PathLike, tokenizer: Optional[PathLike]):
    from .paths import find_tokenizer  # the lookup arianna_c.Model and ./run -z use

    cfg, weights = formats.read_model(model)
    tok_path = Path(find_tokenizer(os.fspath(model), None if tokenizer is None else os.fspath(tokenizer)))
    if tok_path.suffix in SOURCE_TOKENIZER_SUFFIXES:
        from .vocab import read_tokenizer_file

        vocab, _ = read_tokenizer_file(tok_path)
    else:
        vocab = Vocab(*formats.read_tokenizer(tok_path))
    if len(vocab) != cfg.vocab_size:
        raise ConvertError(f"{tok_path}: {len(vocab)} pieces but {model}'s vocab_size is {cfg.vocab_size}")
    return cfg, weights, vocab


def export_hf(model: PathLike, out_dir: PathLike, tokenizer: Optional[PathLike] = None,
              verify: bool = True, tolerance: float = TOLERANCE) -> Result:
    """A model file + tokenizer -> a Hugging Face Llama folder; checked by loading it back with
    transformers (logits, and AutoTokenizer's ids on a few texts)."""
    from . import hf

    cfg, weights, vocab = _read_runtime_files(model, tokenizer)
    result = Result()
    with Staged() as stage:
        tmp = stage.folder(out_dir)
        hf.write_hf(tmp, cfg, weights, vocab)
        if verify:
            tokens = check_sequence(cfg.vocab_size, cfg.seq_len)
            want, what = _runtime_reference(model, cfg, weights, tokens)
            diff = _max_diff(hf.reference_logits(tmp, tokens), want)
            if not diff <= tolerance:
                raise ConvertError(f"transformers' logits of the export differ from {what}'s by "
                                   f"{diff:.3g} (tolerance {tolerance:g}); nothing was written")
            result.checks.append(f"max |transformers - {what}| logit difference {diff:.3g} over "
                                 f"{len(tokens)} positions (tolerance {tolerance:g})")
            _check_hf_tokenizer(tmp, model, vocab)
            result.checks.append(f"AutoTokenizer ids equal the runtime's on {len(TOKENIZER_CHECK_TEXTS)} texts")
        stage.commit()
    result.written.append(str(out_dir))
    return result


def _runtime_reference(model: PathLike, cfg: ModelConfig, weights: dict,
                       tokens: Sequence[int]) -> tuple[np.ndarray, str]:
    """What an export's logits must match: the runtime's for a float32 file; for an int8 file,
    whose runtime logits carry int8 activations too, the NumPy reference on its dequantized
    weights (what the export holds)."""
    if not cfg.group_size:
        return c_logits(model, tokens), "the runtime"
    from .reference import Reference

    return Reference((cfg, weights)).logits(tokens), "the NumPy reference"


def _check_hf_tokenizer(folder: Path, model: PathLike, vocab: Vocab) -> None:
    import arianna_c

    from . import hf

    theirs = hf.reference_tokenizer_ids(folder, list(TOKENIZER_CHECK_TEXTS))
    with tempfile.TemporaryDirectory() as tmp:  # the runtime reads its own format, whatever the source was
        tok_bin = Path(tmp) / DEFAULT_TOKENIZER_NAME
        tok_bin.write_bytes(vocab.bin_bytes())
        with arianna_c.Model(model, tokenizer=tok_bin) as m:
            ours = [m.encode(text, bos=True) for text in TOKENIZER_CHECK_TEXTS]
    for text, a, b in zip(TOKENIZER_CHECK_TEXTS, theirs, ours):
        if a != b:
            raise ConvertError(f"the exported tokenizer encodes {text!r} as {a}, the runtime as "
                               f"{b}; nothing was written")


def export_gguf(model: PathLike, out: PathLike, tokenizer: Optional[PathLike] = None,
                out_type: str = "f32", name: Optional[str] = None, verify: bool = True) -> Result:
    """A model file + tokenizer -> a llama GGUF (F32, F16 or Q8_0 matrices), checked by reading
    it back: F32 bit for bit, F16 within half a float16 step, Q8_0 within its quantization error."""
    from . import gguf_io

    cfg, weights, vocab = _read_runtime_files(model, tokenizer)
    result = Result()
    with Staged() as stage:
        tmp = stage.file(out)
        gguf_io.write_gguf(tmp, cfg, weights, vocab, out_type=out_type, name=name or Path(out).stem)
        if verify:
            result.checks.append(_check_gguf(tmp, cfg, weights, vocab, out_type))
        stage.commit()
    result.written.append(str(out))
    result.notes.append(f"llama.cpp: llama-cli -m {out} -no-cnv --temp 0 -p PROMPT")
    return result


def _check_gguf(path: Path, cfg: ModelConfig, weights: dict, vocab: Vocab, out_type: str) -> str:
    from . import gguf_io

    back = gguf_io.read_gguf(path)
    if back.vocab != vocab or back.cfg.seq_len != cfg.seq_len:
        raise ConvertError("the GGUF read back has another vocabulary or context length; nothing was written")
    # the most writing a matrix as out_type may move each value, and the bound's name (f32: bit for bit)
    bounds = {"f16": (_f16_error_bound, "float16's rounding (half a float16 step)"),
              "q8_0": (gguf_io.q8_0_error_bound, "Q8_0's bound")}
    bound, bound_name = bounds.get(out_type, (None, ""))
    worst = 0.0
    for key, array in weights.items():
        got, want = back.weights[key], np.asarray(array, np.float32)
        if bound is None or want.ndim == 1 or key.startswith("rms"):
            if not np.array_equal(got, want):
                raise ConvertError(f"the GGUF read back changed {key}; nothing was written")
            continue
        change = np.abs(got.astype(np.float64) - want)
        if not (change <= bound(want)).all():  # also catches nan, and inf past float16's range
            raise ConvertError(f"the GGUF read back moved {key} past {bound_name}; nothing was written")
        worst = max(worst, float(change.max()))
    if bound is None:
        return "read back: every tensor bit for bit"
    return f"read back: norms bit for bit, matrices within {bound_name} (largest change {worst:.3g})"


def _f16_error_bound(weights: np.ndarray) -> np.ndarray:
    """Per element, the most a float16 round trip may move it: half a float16 step, at most
    2^-11 of the value (2^-25 for float16's subnormals, whose step is 2^-24)."""
    return np.maximum(np.abs(np.asarray(weights, np.float64)) * 2.0 ** -11, 2.0 ** -25)


# ============================================================================ command line


def build_parser(prog: str = "python -m arianna_c.convert") -> argparse.ArgumentParser:
    from .gguf_io import OUT_TYPES

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def importer(name: str, src_help: str, help_text: str) -> None:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("source", help=src_help)
        p.add_argument("out", help="output model .bin")
        p.add_argument("--tokenizer-out", metavar="PATH",
                       help=f"output tokenizer .bin (default: {DEFAULT_TOKENIZER_NAME} in OUT's folder)")
        p.add_argument("--quantize", choices=("int8",), help="write the runtime's int8 (Q8_0, v2) "
                       "file, quantized by the runtime (default: float32)")
        p.add_argument("--version", type=int, choices=MODEL_VERSIONS, default=0,
                       help="float32 layout: 0 = legacy llama2.c, 1 = ak42 v1 (default: 0)")
        p.add_argument("--tolerance", type=float, default=TOLERANCE,
                       help=f"largest allowed |logit| difference from the source (default: {TOLERANCE:g})")
        p.add_argument("--no-verify", action="store_true", help="skip the logit check")

    importer("from-hf", "Hugging Face Llama folder (config.json, safetensors or pytorch_model.bin, "
             "tokenizer.model or tokenizer.json)", "Hugging Face Llama folder -> model .bin + tokenizer")
    importer("from-gguf", "llama GGUF file (F32, F16 or Q8_0 tensors)", "GGUF -> model .bin + tokenizer")
    text = "tokenizer.model or tokenizer.json -> tokenizer .bin"
    tok = sub.add_parser("tokenizer", help=text, description=text)
    tok.add_argument("source", help="SentencePiece tokenizer.model or Llama-style tokenizer.json")
    tok.add_argument("out", help="output tokenizer .bin")

    def exporter(name: str, out_help: str, help_text: str):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("model", help="model .bin (v0, v1 or int8 v2)")
        p.add_argument("out", help=out_help)
        p.add_argument("--tokenizer", metavar="TOK", help="tokenizer: the runtime's .bin, or a SentencePiece "
                       ".model / tokenizer.json; looked up like ./run -z (default: "
                       f"{tokenizer_lookup_text()})")
        p.add_argument("--no-verify", action="store_true", help="skip loading the output back")
        return p

    p = exporter("to-hf", "output folder (new or empty)", "model .bin -> Hugging Face Llama folder")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"largest allowed |logit| difference between transformers and the runtime "
                        f"(default: {TOLERANCE:g})")
    p = exporter("to-gguf", "output .gguf", "model .bin -> GGUF")
    p.add_argument("--type", dest="out_type", choices=OUT_TYPES, default=OUT_TYPES[0],
                   help=f"tensor type of the matrices; norms stay F32 (default: {OUT_TYPES[0]})")
    p.add_argument("--name", help="general.name (default: OUT's file name without .gguf)")
    return parser


def run_command(args: argparse.Namespace) -> Result:
    if args.command in ("from-hf", "from-gguf"):
        convert = import_hf if args.command == "from-hf" else import_gguf
        return convert(args.source, args.out, tokenizer_out=args.tokenizer_out, quantize=args.quantize,
                       version=args.version, verify=not args.no_verify, tolerance=args.tolerance)
    if args.command == "tokenizer":
        return import_tokenizer(args.source, args.out)
    if args.command == "to-hf":
        return export_hf(args.model, args.out, tokenizer=args.tokenizer, verify=not args.no_verify,
                         tolerance=args.tolerance)
    return export_gguf(args.model, args.out, tokenizer=args.tokenizer, out_type=args.out_type,
                       name=args.name, verify=not args.no_verify)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Optional[list[str]] = None, prog: str = "python -m arianna_c.convert") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        result = run_command(args)
    except ModuleNotFoundError as exc:
        print(f"error: {args.command} needs the {exc.name} package: pip install 'arianna_c[convert]'"
              f"{' and torch==2.13.0' if exc.name == 'torch' else ''}", file=sys.stderr)
        return 1
    except (ConvertError, FormatError, ExportError, OSError, ValueError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    for check in result.checks:
        print(f"checked: {check}", file=sys.stderr)
    for path in result.written:
        print(f"wrote {path}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
