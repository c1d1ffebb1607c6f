"""Training data: the SentencePiece tokenizer, per-file token shards, and the train/val split.

Every corpus file becomes its own shard ``<name>.bin`` (uint16 token ids) in a data folder, and
every shard in the folder is used: dropping in another shard adds text without touching the
rest. The validation set is a fixed tail of EVERY shard (not a subset of the shards), so one
shard works as well as a hundred.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

BOS_ID = 1
SHARD_DTYPE = np.uint16
SHARD_BYTES = np.dtype(SHARD_DTYPE).itemsize  # per token id
MAX_VOCAB = int(np.iinfo(SHARD_DTYPE).max) + 1  # ids must fit the uint16 shards
# <unk> <s> </s> and the 256 byte-fallback pieces: every tokenizer holds them
RESERVED_PIECES = 3 + 256
# Written by pretokenize beside the shards: which tokenizer made them, and their sizes.
SHARDS_RECORD = "shards.json"

# Options that make the tokenizer reproducible by the C encoder: plain BPE with byte fallback,
# no normalization at all (text in == pieces out), a dummy-prefix space, digits split apart.
SENTENCEPIECE_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    split_digits=True,
    character_coverage=1.0,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


class DataError(ValueError):
    """The data folder cannot feed training as configured."""


def corpus_files(corpus_dir: os.PathLike | str) -> list[Path]:
    files = sorted(Path(corpus_dir).glob("*.txt"))
    if not files:
        raise DataError(f"{corpus_dir}: no .txt files to train on")
    return files


def read_text(path: Path) -> str:
    """A corpus file's text; DataError naming the file and the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}: "
                        f"{exc.reason}); convert the file to UTF-8") from None


def read_shard(path: Path) -> np.ndarray:
    """A shard's token ids; DataError for a file that is not a whole number of them."""
    size = path.stat().st_size
    if size % SHARD_BYTES:
        raise DataError(f"{path}: {size} bytes, not a whole number of {SHARD_BYTES}-byte token ids (a truncated "
                        f"shard, or not a shard at all); pretokenize its text again")
    return np.fromfile(path, dtype=SHARD_DTYPE)


def train_tokenizer(corpus_dir: os.PathLike | str, model_prefix: os.PathLike | str,
                    vocab_size: int = 4096, threads: int = 2) -> Path:
    """Train the SentencePiece BPE model; returns the path of ``<model_prefix>.model``."""
    import sentencepiece as spm

    files = corpus_files(corpus_dir)
    folder = Path(model_prefix).parent
    if not folder.is_dir():
        raise DataError(f"--out {model_prefix}: the folder {folder} does not exist; create it first "
                        f"(mkdir -p {folder})")
    if not RESERVED_PIECES < vocab_size <= MAX_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is out of range: it must be above {RESERVED_PIECES} "
                        f"(<unk> <s> </s> and 256 byte pieces, plus the corpus' characters) and at "
                        f"most {MAX_VOCAB} (token ids are stored as uint16)")
    try:
        spm.SentencePieceTrainer.train(
            input=[str(f) for f in files],
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            num_threads=threads,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            minloglevel=1,
            **SENTENCEPIECE_OPTIONS,
        )
    except RuntimeError as exc:
        raise DataError(_explain_sentencepiece_error(str(exc), vocab_size, corpus_dir)) from None
    return Path(f"{model_prefix}.model")


def _explain_sentencepiece_error(message: str, vocab_size: int, corpus_dir) -> str:
    """SentencePiece's INTERNAL check failures, said in terms of the command's options."""
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_small:
        need = int(too_small.group(1))
        return (f"--vocab-size {vocab_size} is too small for {corpus_dir}: its {need - RESERVED_PIECES} "
                f"distinct characters, 256 byte pieces and <unk> <s> </s> need at least {need}; "
                f"use --vocab-size {need} or more")
    too_large = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
    if too_large:
        return (f"--vocab-size {vocab_size} is more pieces than {corpus_dir} yields (at most "
                f"{too_large.group(1)}); lower --vocab-size or add text")
    return f"SentencePiece could not train on {corpus_dir}: {message.splitlines()[0]}"


def load_sentencepiece(model_path: os.PathLike | str):
    """A SentencePieceProcessor, or a DataError saying what the file is instead."""
    import sentencepiece as spm

    path = Path(model_path)
    if not path.is_file():
        raise DataError(f"{path}: no such SentencePiece model file")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
        from .export import describe_file

        raise DataError(f"{path}: not a SentencePiece .model file (it is {describe_file(path)}); give "
                        f"the tokenizer's .model, as `train tokenizer` writes it") from None


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs; line breaks inside a paragraph (verse) are kept."""
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def tokenize_text(sp, text: str) -> np.ndarray:
    """Every paragraph as BOS + its pieces, concatenated: the model learns BOS as 'paragraph ends'."""
    ids: list[int] = []
    for piece_ids in sp.encode(paragraphs(text)):
        ids.append(BOS_ID)
        ids.extend(piece_ids)
    if sp.get_piece_size() > MAX_VOCAB:
        raise DataError(f"vocabulary of {sp.get_piece_size()} does not fit uint16 shards")
    return np.asarray(ids, dtype=SHARD_DTYPE)


def pretokenize(corpus_dir: os.PathLike | str, tokenizer_model: os.PathLike | str,
                out_dir: os.PathLike | str) -> dict[str, int]:
    """Write one shard per corpus file, and SHARDS_RECORD naming the tokenizer; returns
    {shard name: token count}."""
    sp = load_sentencepiece(tokenizer_model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for path in corpus_files(corpus_dir):
        tokens = tokenize_text(sp, read_text(path))
        shard = out / f"{path.stem}.bin"
        tokens.tofile(shard)
        counts[shard.name] = len(tokens)
    record = {"tokenizer": recorded_tokenizer(tokenizer_model), "vocab_size": sp.get_piece_size(),
              "shards": counts}
    (out / SHARDS_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return counts


def recorded_tokenizer(tokenizer_model: os.PathLike | str) -> str:
    """How SHARDS_RECORD names the tokenizer that made the shards: its resolved path."""
    return str(Path(tokenizer_model).resolve())


def recorded_vocab_size(data_dir: os.PathLike | str) -> Optional[tuple[int, str]]:
    """(vocab_size, tokenizer path) of the tokenizer that made the shards, if pretokenize recorded it."""
    path = Path(data_dir) / SHARDS_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return int(record["vocab_size"]), str(record["tokenizer"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable shard record ({exc}); delete it or pretokenize again") from None


@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray
    shards: list[str]
    sizes: list[int]  # tokens per shard, in the order of shards

    def fingerprint(self) -> dict[str, int]:
        """{shard name: token count}: what a checkpoint records of the data it was trained on."""
        return dict(zip(self.shards, self.sizes))


def load_split(data_dir: os.PathLike | str, val_fraction: float = 0.05) -> Split:
    """Concatenated train and validation tokens; the last val_fraction of each shard is validation."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    shards = sorted(Path(data_dir).glob("*.bin"))
    if not shards:
        raise DataError(f"{data_dir}: no .bin shards (run the pretokenize step first)")
    train_parts, val_parts, sizes = [], [], []
    for shard in shards:
        tokens = read_shard(shard)
        sizes.append(len(tokens))
        n_val = int(np.ceil(len(tokens) * val_fraction))
        train_parts.append(tokens[: len(tokens) - n_val])
        val_parts.append(tokens[len(tokens) - n_val :])
    return Split(np.concatenate(train_parts), np.concatenate(val_parts), [s.name for s in shards], sizes)


def check_fits(split: Split, data_dir: os.PathLike | str, batch_size: int, seq_len: int) -> None:
    """Fail with a message that says what to change when the data cannot make one batch."""
    need_train = batch_size * seq_len + 1
    if len(split.train) < need_train:
        raise DataError(
            f"{data_dir}: {len(split.train)} training tokens in {len(split.shards)} shard(s), but one "
            f"batch of {batch_size} x {seq_len} needs at least {need_train}; add data or lower "
            f"--batch-size / --seq-len"
        )
    if len(split.val) < seq_len + 1:
        raise DataError(
            f"{data_dir}: {len(split.val)} validation tokens, but one sequence of {seq_len} needs "
            f"{seq_len + 1}; add data, raise --val-fraction or lower --seq-len"
        )


def check_vocab(split: Split, data_dir: os.PathLike | str, vocab_size: int) -> None:
    """The model's vocabulary must be the shards' tokenizer's: every id below vocab_size, and the
    tokenizer pretokenize recorded (if any) of the same size."""
    recorded = recorded_vocab_size(data_dir)
    if recorded is not None and recorded[0] != vocab_size:
        raise DataError(f"--vocab-size {vocab_size} does not match the shards in {data_dir}: they were "
                        f"made with {recorded[1]} ({recorded[0]} pieces); use --vocab-size {recorded[0]}")
    largest = max(int(split.train.max(initial=0)), int(split.val.max(initial=0)))
    if largest >= vocab_size:
        raise DataError(f"--vocab-size {vocab_size} does not match the shards in {data_dir}: they hold "
                        f"token id {largest}; use the vocabulary size of the tokenizer that made them")


def batch_starts(rng: np.random.Generator, n_tokens: int, rows: int, seq_len: int) -> np.ndarray:
    """rows random window starts over n_tokens tokens (each window holds seq_len + 1 tokens)."""
    return rng.integers(0, n_tokens - seq_len, size=rows)


def windows_at(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The windows at starts: inputs (rows, seq_len) and the targets shifted by one, int64."""
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    return windows[:, :-1], windows[:, 1:]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fixed, evenly spread windows, so every evaluation scores the very same tokens."""
    n_windows = min(max_batches * batch_size, (len(tokens) - 1) // seq_len)
    starts = np.linspace(0, len(tokens) - seq_len - 1, n_windows).astype(np.int64)
    for i in range(0, n_windows, batch_size):
        yield windows_at(tokens, starts[i : i + batch_size], seq_len)


def shard_summary(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return f"{len(counts)} shards, {total:,} tokens"
