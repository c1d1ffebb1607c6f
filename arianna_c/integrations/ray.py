"""Batch inference on Ray Data: callable classes for ``Dataset.map_batches``.

    import ray
    from arianna_c.integrations.ray import Generator, Scorer, Embedder

    ray.init()                                    # a cluster: ray.init(address="auto")
    ds = ray.data.read_text("corpus/")            # one row per line, column "text"
    scored = ds.map_batches(Scorer, fn_constructor_kwargs={"model": "model.bin"},
                            compute=ray.data.ActorPoolStrategy(size=4), batch_size=64)
    scored.write_parquet("scores/")

Ray starts one actor per unit of concurrency; each loads the model once (in ``__init__``) and
is then handed batches (a dict of column arrays, or a pandas DataFrame). Every input column
comes back unchanged, plus the results and an ``error`` column (``error_column=`` renames it,
e.g. to chain several of these): "" for a row that worked, else the exception's type and
message; a failing row keeps its place with empty results (text "", NaN numbers), so no row
is lost. Every class takes ``model`` and ``tokenizer`` (paths or bytes, as ``Model``),
``column`` (the text column, default "text"), ``threads`` (per actor, default 1) and
``quantize``.

- ``Generator``: the continuation of each row (``generated``), through ``Model.generate_batch``,
  so a batch's sequences advance together. Row i of a batch samples with ``seed + i``; with
  ``seed_column`` each row samples with ``seed`` + its own value there, so the text of a row
  does not depend on how Ray cut the batches.
- ``Scorer``: per-row negative log-likelihood through ``Model.logits``: ``nll`` (mean nats per
  predicted token, BOS + the text, every token after BOS predicted), ``perplexity`` (exp nll),
  ``n_tokens`` (tokens predicted). A row longer than the model's context is an error row.
- ``Embedder``: ``embedding``, the model's final hidden state (after the last RMSNorm, before
  the classifier) averaged over BOS and the text's positions: float32, ``dim`` wide. The
  library returns logits, so the state is recovered from them through the classifier's
  pseudo-inverse (the classifier has more rows than columns, so this is exact up to
  rounding); the classifier's weights are read from the float32 model file.

The classes need nothing from Ray themselves (they are plain callables on dicts of arrays);
install Ray Data with ``pip install 'arianna_c[ray]'``. On a cluster every node must reach the
model and tokenizer: give paths present on every node, or the files' bytes.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import numpy as np

from ..formats import read_model
from ..paths import default_model_path
from ..perplexity import token_nll
from ..runtime import Model
from ..sampling import SamplingParams

Source = Union[str, bytes, os.PathLike]


class _RowMapper:
    """Loads the model once; maps a batch's text column to result columns plus ``error``."""

    def __init__(self, model: Optional[Source] = None, tokenizer: Optional[Source] = None, *,
                 column: str = "text", error_column: str = "error", threads: int = 1,
                 quantize: Optional[str] = None) -> None:
        self.model = Model(model, tokenizer, threads=threads, quantize=quantize)
        self.column, self.error_column = column, error_column

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = {name: np.asarray(batch[name]) for name in batch}
        if self.column not in out:
            raise KeyError(f"the batch has no column {self.column!r} (it has {', '.join(out)}); "
                           f"name the text column with column=")
        texts = [_plain(value) for value in out[self.column]]
        results, errors = self.rows(texts, out)
        out.update(results)
        out[self.error_column] = np.array(errors, dtype=object)
        return out

    def rows(self, texts: list, batch: dict) -> tuple[dict[str, np.ndarray], list[str]]:
        raise NotImplementedError


def _plain(value: Any) -> Any:
    """numpy's str and bytes scalars as Python str / bytes (anything else is left to fail)."""
    if isinstance(value, np.str_):
        return str(value)
    if isinstance(value, np.bytes_):
        return bytes(value)
    return value


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Generator(_RowMapper):
    """Generates a continuation of each row's ``column`` into ``generated``.

    Sampling settings are SamplingParams' fields (max_new_tokens, temperature, top_p, top_k,
    ignore_eos, ...), checked here; ``seed`` is the base seed (default 0, so runs repeat), and
    ``seed_column`` names an int column whose value is added to it per row."""

    def __init__(self, model: Optional[Source] = None, tokenizer: Optional[Source] = None, *,
                 column: str = "text", error_column: str = "error", threads: int = 1,
                 quantize: Optional[str] = None, seed: int = 0, seed_column: Optional[str] = None,
                 **settings: Any) -> None:
        super().__init__(model, tokenizer, column=column, error_column=error_column, threads=threads,
                         quantize=quantize)
        self.seed, self.seed_column, self.params = seed, seed_column, SamplingParams(**settings)

    def rows(self, texts: list, batch: dict) -> tuple[dict[str, np.ndarray], list[str]]:
        if self.seed_column is None:
            seeds = [self.seed + i for i in range(len(texts))]
        else:
            seeds = [self.seed + int(v) for v in batch[self.seed_column]]
        generated, errors = [""] * len(texts), [""] * len(texts)
        for start, stop in _consecutive_runs(seeds):
            try:  # one batched call per run of consecutive seeds (seed + i is its rule)
                generated[start:stop] = self.model.generate_batch(texts[start:stop], params=self.params,
                                                                  seed=seeds[start])
                continue
            except (ValueError, TypeError):
                pass
            for i in range(start, stop):  # a bad row spoils its batched call: find it alone
                try:
                    generated[i] = self.model.generate(texts[i], params=self.params, seed=seeds[i])
                except (ValueError, TypeError) as exc:
                    errors[i] = _error(exc)
        return {"generated": np.array(generated, dtype=object)}, errors


def _consecutive_runs(seeds: list[int]) -> list[tuple[int, int]]:
    """[start, stop) ranges of rows whose seeds go up by one."""
    runs, start = [], 0
    for i in range(1, len(seeds) + 1):
        if i == len(seeds) or seeds[i] != seeds[i - 1] + 1:
            runs.append((start, i))
            start = i
    return runs


class Scorer(_RowMapper):
    """Scores each row's ``column``: ``nll``, ``perplexity``, ``n_tokens``."""

    def rows(self, texts: list, batch: dict) -> tuple[dict[str, np.ndarray], list[str]]:
        n = len(texts)
        nll, count, errors = np.full(n, np.nan), np.zeros(n, dtype=np.int64), [""] * n
        for i, text in enumerate(texts):
            try:
                nll[i], count[i] = self.score(text)
            except (ValueError, TypeError) as exc:
                errors[i] = _error(exc)
        return {"nll": nll, "perplexity": np.exp(nll), "n_tokens": count}, errors

    def score(self, text: Union[str, bytes]) -> tuple[float, int]:
        """(mean NLL in nats per predicted token, tokens predicted) of BOS + text."""
        ids = self.model.encode(text, bos=True)
        if len(ids) < 2:
            raise ValueError("the text has no tokens to score")
        return float(token_nll(self.model.logits(ids[:-1]), ids[1:]).mean()), len(ids) - 1


class Embedder(_RowMapper):
    """Embeds each row's ``column`` into ``embedding`` (the mean final hidden state)."""

    def __init__(self, model: Optional[Source] = None, tokenizer: Optional[Source] = None, **options: Any) -> None:
        super().__init__(model, tokenizer, **options)
        _, weights = read_model(model if model is not None else default_model_path())
        classifier = weights.get("wcls", weights["token_embedding"])  # (vocab, dim)
        self.unproject = np.linalg.pinv(classifier.astype(np.float64)).T  # (vocab, dim)

    def rows(self, texts: list, batch: dict) -> tuple[dict[str, np.ndarray], list[str]]:
        dim = self.model.config.dim
        vectors, errors = np.full((len(texts), dim), np.nan, dtype=np.float32), [""] * len(texts)
        for i, text in enumerate(texts):
            try:
                vectors[i] = self.embed(text)
            except (ValueError, TypeError) as exc:
                errors[i] = _error(exc)
        return {"embedding": vectors}, errors

    def embed(self, text: Union[str, bytes]) -> np.ndarray:
        logits = self.model.logits(self.model.encode(text, bos=True))
        hidden = logits.astype(np.float64) @ self.unproject  # (positions, dim)
        return hidden.mean(axis=0).astype(np.float32)
