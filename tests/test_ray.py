"""Batch inference through arianna_c.integrations.ray: the callable classes on their own (any
batching gives the same rows as direct Model calls; bad rows are reported in place; the
embedding is the model's final hidden state), then on a local Ray instance (127.0.0.1)."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import numpy as np
import pytest

from arianna_c import Model
from arianna_c.integrations.ray import Embedder, Generator, Scorer

REPO = Path(__file__).resolve().parent.parent
SETTINGS = dict(max_new_tokens=10, temperature=0.9, top_p=0.95)
SEED = 100
TOO_LONG = "many words " * 100  # far more tokens than the tiny model's 64-token context
LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": no cluster, Ray listens on 127.0.0.1 only
TEXTS = ["Once", "the sea", "", TOO_LONG, "a cat sat", "in the end", "so", "we went", "out again"]


def rows() -> dict[str, np.ndarray]:
    return {"id": np.arange(len(TEXTS)), "text": np.array(TEXTS, dtype=object)}


def expected_nll(model: Model, text: str) -> float:
    ids = model.encode(text, bos=True)
    logits = model.logits(ids[:-1]).astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -float(np.mean([logp[t, ids[t + 1]] for t in range(len(ids) - 1)]))


def check_rows(out: dict, files) -> None:
    """Each row equals the direct Model call with its seed; the bad rows carry their error."""
    order = np.argsort(out["id"])
    out = {k: np.asarray(v)[order] for k, v in out.items()}
    assert out["id"].tolist() == list(range(len(TEXTS)))
    assert list(out["text"]) == TEXTS
    with Model(files.model, files.tokenizer, threads=1) as model:
        for i, text in enumerate(TEXTS):
            if text == TOO_LONG:
                for column in ("generate_error", "score_error", "embed_error"):
                    assert "seq_len" in out[column][i], out[column][i]
                assert out["generated"][i] == "" and np.isnan(out["nll"][i])
                assert np.isnan(out["embedding"][i]).all()
                continue
            assert out["generate_error"][i] == "" and out["embed_error"][i] == ""
            assert out["generated"][i] == model.generate(text, seed=SEED + i, **SETTINGS)
            if text == "":  # BOS alone: nothing to predict
                assert out["score_error"][i] == "ValueError: the text has no tokens to score"
                continue
            assert out["score_error"][i] == ""
            assert out["nll"][i] == pytest.approx(expected_nll(model, text), rel=1e-9)
            assert out["perplexity"][i] == pytest.approx(np.exp(out["nll"][i]), rel=1e-12)
            assert out["n_tokens"][i] == len(model.encode(text, bos=True)) - 1
    embedder = Embedder(str(files.model), str(files.tokenizer))
    for i, text in enumerate(TEXTS):
        if text != TOO_LONG:
            np.testing.assert_array_equal(out["embedding"][i], embedder.embed(text))


def mappers(files) -> list:
    paths = dict(model=str(files.model), tokenizer=str(files.tokenizer))
    return [Generator(**paths, seed=SEED, seed_column="id", error_column="generate_error", **SETTINGS),
            Scorer(**paths, error_column="score_error"), Embedder(**paths, error_column="embed_error")]


@pytest.mark.parametrize("batch_size", [1, 4, len(TEXTS)])
def test_rows_do_not_depend_on_batching_and_bad_rows_keep_their_place(built, make_model, batch_size):
    files = make_model(seed=3)
    stages = mappers(files)
    whole = rows()
    parts = []
    for start in range(0, len(TEXTS), batch_size):
        batch = {k: v[start : start + batch_size] for k, v in whole.items()}
        for stage in stages:
            batch = stage(batch)
        parts.append(batch)
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    check_rows(out, files)


def test_unknown_sampling_settings_fail_at_construction(built, make_model):
    files = make_model(seed=3)
    with pytest.raises(TypeError, match="temprature"):
        Generator(str(files.model), str(files.tokenizer), temprature=0.5)


def test_a_batch_without_the_text_column_names_it(built, make_model):
    files = make_model(seed=3)
    with pytest.raises(KeyError, match="the batch has no column 'text' \\(it has prompt\\); name the text column"):
        Scorer(str(files.model), str(files.tokenizer))({"prompt": np.array(["a"], dtype=object)})


def test_rows_that_are_not_text_are_error_rows(built, make_model):
    files = make_model(seed=3)
    batch = {"text": np.array(["ok", None, 7], dtype=object)}
    out = Generator(str(files.model), str(files.tokenizer), max_new_tokens=3)(batch)
    assert out["error"][0] == "" and out["error"][1].startswith("TypeError") and out["error"][2].startswith("TypeError")
    assert Scorer(str(files.model), str(files.tokenizer))(batch)["error"][1].startswith("TypeError")


@pytest.mark.parametrize("layout", [dict(shared_classifier=True), dict(shared_classifier=False, version=0)])
def test_embedding_is_the_final_hidden_state(built, make_model, layout):
    torch = pytest.importorskip("torch", reason="the reference hidden state is computed in PyTorch")
    from arianna_c.export import torch_from_bin

    files = make_model(seed=5, **layout)
    text = "the sea is calm tonight"
    tokens = Model(files.model, files.tokenizer).encode(text, bos=True)
    net = torch_from_bin(files.model)
    with torch.no_grad():
        x = torch.tensor([tokens])
        h = net.tok_embeddings(x)
        cos, sin = net.rope_cos[: len(tokens)], net.rope_sin[: len(tokens)]
        for layer in net.layers:
            h = layer(h, cos, sin)
        reference = net.norm(h)[0].mean(dim=0).numpy()
    got = Embedder(str(files.model), str(files.tokenizer)).embed(text)
    assert got.shape == (files.cfg.dim,)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5 * float(np.abs(reference).max()))


# ---------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ray_local():
    # Ray's single-machine mode: the node's address, and so every Ray server's, is 127.0.0.1
    # (read when ray is imported, and by the processes Ray starts)
    saved = os.environ.get(LOCAL_ONLY)
    os.environ[LOCAL_ONLY] = "0"
    try:
        ray = pytest.importorskip("ray", reason="Ray Data is the ray extra (pip install 'arianna_c[ray]')")
        pytest.importorskip("ray.data")
        env = {"PYTHONPATH": str(REPO)}  # the actors import this checkout's arianna_c
        if os.environ.get("ARIANNA_C_LIB"):
            env["ARIANNA_C_LIB"] = os.environ["ARIANNA_C_LIB"]
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        try:
            assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
            yield ray
        finally:
            ray.shutdown()
    finally:
        if saved is None:
            del os.environ[LOCAL_ONLY]
        else:
            os.environ[LOCAL_ONLY] = saved


def test_map_batches_on_a_local_ray_instance(built, make_model, ray_local):
    import ray.data

    files = make_model(seed=3)
    paths = dict(model=str(files.model), tokenizer=str(files.tokenizer))
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    actors = dict(batch_size=2, num_cpus=0.25)
    ds = ds.map_batches(Generator, fn_constructor_kwargs=dict(paths, seed=SEED, seed_column="id",
                                                              error_column="generate_error", **SETTINGS),
                        compute=ray.data.ActorPoolStrategy(size=2), **actors)
    ds = ds.map_batches(Scorer, fn_constructor_kwargs=dict(paths, error_column="score_error"),
                        compute=ray.data.ActorPoolStrategy(size=1), **actors)
    ds = ds.map_batches(Embedder, fn_constructor_kwargs=dict(paths, error_column="embed_error"),
                        compute=ray.data.ActorPoolStrategy(size=1), **actors)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = pool.submit(ds.take_all).result(timeout=300)
    out = {k: [row[k] for row in result] for k in result[0]}
    out["embedding"] = np.stack(out["embedding"])
    check_rows(out, files)
