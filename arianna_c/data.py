"""Training data: the SentencePiece tokenizer, per-file token shards, and the train/val split.

Every corpus file becomes its own shard ``<name>.bin`` (uint16 token ids) in a data folder, and
every shard in the folder is used: dropping in another shard adds text without touching the
rest. The validation set is a fixed tail of EVERY shard (not a subset of the shards), so one
shard works as well as a hundred.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

BOS_ID = 1
SHARD_DTYPE = np.uint16

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


def train_tokenizer(corpus_dir: os.PathLike | str, model_prefix: os.PathLike | str,
                    vocab_size: int = 4096, threads: int = 2) -> Path:
    """Train the SentencePiece BPE model; returns the path of ``<model_prefix>.model``."""
    import sentencepiece as spm

    files = corpus_files(corpus_dir)
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
    return Path(f"{model_prefix}.model")


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs; line breaks inside a paragraph (verse) are kept."""
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def tokenize_text(sp, text: str) -> np.ndarray:
    """Every paragraph as BOS + its pieces, concatenated: the model learns BOS as 'paragraph ends'."""
    ids: list[int] = []
    for piece_ids in sp.encode(paragraphs(text)):
        ids.append(BOS_ID)
        ids.extend(piece_ids)
    if sp.get_piece_size() > np.iinfo(SHARD_DTYPE).max + 1:
        raise DataError(f"vocabulary of {sp.get_piece_size()} does not fit uint16 shards")
    return np.asarray(ids, dtype=SHARD_DTYPE)


def pretokenize(corpus_dir: os.PathLike | str, tokenizer_model: os.PathLike | str,
                out_dir: os.PathLike | str) -> dict[str, int]:
    """Write one shard per corpus file; returns {shard name: token count}."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for path in corpus_files(corpus_dir):
        tokens = tokenize_text(sp, path.read_text(encoding="utf-8"))
        shard = out / f"{path.stem}.bin"
        tokens.tofile(shard)
        counts[shard.name] = len(tokens)
    return counts


@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray
    shards: list[str]


def load_split(data_dir: os.PathLike | str, val_fraction: float = 0.05) -> Split:
    """Concatenated train and validation tokens; the last val_fraction of each shard is validation."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    shards = sorted(Path(data_dir).glob("*.bin"))
    if not shards:
        raise DataError(f"{data_dir}: no .bin shards (run the pretokenize step first)")
    train_parts, val_parts = [], []
    for shard in shards:
        tokens = np.fromfile(shard, dtype=SHARD_DTYPE)
        n_val = int(np.ceil(len(tokens) * val_fraction))
        train_parts.append(tokens[: len(tokens) - n_val])
        val_parts.append(tokens[len(tokens) - n_val :])
    return Split(np.concatenate(train_parts), np.concatenate(val_parts), [s.name for s in shards])


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


def random_batch(tokens: np.ndarray, batch_size: int, seq_len: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """batch_size random windows: inputs and the targets shifted by one."""
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    return windows[:, :-1], windows[:, 1:]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fixed, evenly spread windows, so every evaluation scores the very same tokens."""
    n_windows = min(max_batches * batch_size, (len(tokens) - 1) // seq_len)
    starts = np.linspace(0, len(tokens) - seq_len - 1, n_windows).astype(np.int64)
    for i in range(0, n_windows, batch_size):
        windows = np.stack([tokens[s : s + seq_len + 1] for s in starts[i : i + batch_size]]).astype(np.int64)
        yield windows[:, :-1], windows[:, 1:]


def shard_summary(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return f"{len(counts)} shards, {total:,} tokens"
