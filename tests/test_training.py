"""The training pipeline: tokenizer options, shards, the per-shard split, schedule, train/resume,
and fine-tuning that stops before it ruins the base model. Everything runs on tiny data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs the torch extra (pip install torch==2.13.0)")

from arianna_c import data as D  # noqa: E402
from arianna_c import train as T  # noqa: E402

VERSE = (
    "The sea is calm tonight.\nThe tide is full, the moon lies fair\nUpon the straits.\n\n"
    "Know then thyself, presume not God to scan;\nThe proper study of mankind is man.\n\n"
    "In 1859 the river rose 12 feet, and the mill stood still for 3 days.\n\n"
)


def write_shard(path, tokens) -> None:
    np.asarray(tokens, dtype=D.SHARD_DTYPE).tofile(path)


def tiny_config(data_dir, out_dir, **overrides) -> T.TrainConfig:
    settings = dict(data=str(data_dir), out=str(out_dir), dim=32, n_layers=2, n_heads=4, vocab_size=64,
                    seq_len=16, batch_size=4, max_steps=12, warmup_steps=2, eval_interval=4,
                    eval_batches=2, log_interval=4, lr=3e-3, min_lr=3e-4)
    settings.update(overrides)
    return T.TrainConfig(**settings)


def patterned_shards(folder, n_shards: int, length: int = 2000, vocab: int = 64) -> None:
    """Shards of a simple learnable pattern, so a few steps visibly lower the loss."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_shards):
        base = np.arange(length) * (i + 1)
        write_shard(folder / f"part{i}.bin", 3 + base % (vocab - 3))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "a.txt").write_text(VERSE * 20, encoding="utf-8")
    (corpus / "b.txt").write_text(VERSE.upper() * 10 + "Café, naïve résumé.\n", encoding="utf-8")
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    return corpus, D.train_tokenizer(corpus, prefix, vocab_size=320, threads=1)


def test_tokenizer_options_reproduce_text_and_split_digits(sp_model):
    import sentencepiece as spm

    _, model_path = sp_model
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    text = "In 1859  the\triver rose — 日本 🎉\n"
    assert sp.decode(sp.encode(text)) == text  # identity normalization, byte fallback
    digits = [sp.id_to_piece(i) for i in sp.encode("1859")]
    assert all(sum(ch.isdigit() for ch in piece) <= 1 for piece in digits)
    assert sp.id_to_piece(3) == "<0x00>" and sp.bos_id() == 1 and sp.eos_id() == 2


def test_pretokenize_writes_one_shard_per_file_with_bos_per_paragraph(sp_model, tmp_path):
    import sentencepiece as spm

    corpus, model_path = sp_model
    counts = D.pretokenize(corpus, model_path, tmp_path / "data")
    assert sorted(counts) == ["a.bin", "b.bin"]
    tokens = np.fromfile(tmp_path / "data" / "a.bin", dtype=D.SHARD_DTYPE)
    assert len(tokens) == counts["a.bin"]
    assert int((tokens == D.BOS_ID).sum()) == 3 * 20  # three paragraphs, repeated 20 times
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    first = tokens[1 : list(tokens[1:]).index(D.BOS_ID) + 1]
    assert sp.decode(first.tolist()) == VERSE.split("\n\n")[0]


def test_paragraphs_keep_line_breaks_and_drop_blank_runs():
    assert D.paragraphs("a\nb\n\n\n\nc\n  \nd\n") == ["a\nb", "c", "d"]


@pytest.mark.parametrize("n_shards", [1, 2, 17])
def test_split_takes_the_tail_of_every_shard(tmp_path, n_shards):
    lengths = [1000 + 37 * i for i in range(n_shards)]
    for i, length in enumerate(lengths):
        write_shard(tmp_path / f"s{i:02d}.bin", np.full(length, i + 3))
    split = D.load_split(tmp_path, val_fraction=0.1)
    n_val = [math.ceil(length * 0.1) for length in lengths]
    assert len(split.val) == sum(n_val)
    assert len(split.train) == sum(lengths) - sum(n_val)
    # every shard contributes to both sets, and the validation part is each shard's tail
    assert sorted(set(split.val.tolist())) == [i + 3 for i in range(n_shards)]
    assert sorted(set(split.train.tolist())) == [i + 3 for i in range(n_shards)]
    assert split.val[: n_val[0]].tolist() == [3] * n_val[0]


def test_too_little_data_is_a_clear_error(tmp_path):
    write_shard(tmp_path / "only.bin", np.arange(50) % 60 + 3)
    cfg = tiny_config(tmp_path, tmp_path / "out", batch_size=8, seq_len=16)
    with pytest.raises(D.DataError, match=r"training tokens in 1 shard\(s\), but one batch of 8 x 16 needs"):
        T.Trainer(cfg)


def test_empty_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(D.DataError, match="no .bin shards"):
        D.load_split(tmp_path)


def test_cli_reports_data_errors_with_exit_code_1(tmp_path, capsys):
    write_shard(tmp_path / "only.bin", np.arange(30) + 3)
    code = T.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--batch-size", "8"])
    assert code == 1
    assert "error:" in capsys.readouterr().err


def test_schedule_warms_up_then_decays_to_min_lr(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, warmup_steps=10, max_steps=100)
    assert T.learning_rate(cfg, 0, 0.0) == pytest.approx(cfg.lr / 10)
    assert T.learning_rate(cfg, 9, 0.09) == pytest.approx(cfg.lr)
    assert T.learning_rate(cfg, 50, 0.5) == pytest.approx((cfg.lr + cfg.min_lr) / 2)
    assert T.learning_rate(cfg, 100, 1.0) == pytest.approx(cfg.min_lr)


def test_progress_is_the_larger_of_steps_and_time(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, max_steps=100, time_budget=2.0)
    assert T.progress_of(cfg, 10, 0.0) == pytest.approx(0.1)
    assert T.progress_of(cfg, 10, 60.0) == pytest.approx(0.5)
    assert T.progress_of(tiny_config(tmp_path, tmp_path, max_steps=100), 10, 1e6) == pytest.approx(0.1)


@pytest.mark.parametrize("n_shards", [1, 3])
def test_training_lowers_validation_loss_and_resumes(tmp_path, n_shards):
    patterned_shards(tmp_path / "data", n_shards)
    cfg = tiny_config(tmp_path / "data", tmp_path / "out", max_steps=12)
    summary = T.Trainer(cfg, log=lambda s: None).train()
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    first_val, last_val = history["val"][0][2], history["val"][-1][2]
    assert summary["step"] == 12 and last_val < first_val - 0.3
    assert (tmp_path / "out" / "ckpt.pt").exists() and (tmp_path / "out" / "best.pt").exists()

    resumed = T.Trainer(tiny_config(tmp_path / "data", tmp_path / "out", max_steps=16, resume=True),
                        log=lambda s: None)
    assert resumed.step == 12
    assert resumed.train()["step"] == 16


def test_finetune_guard_stops_and_keeps_the_best_checkpoint(tmp_path):
    patterned_shards(tmp_path / "base", 2, length=4000)
    T.Trainer(tiny_config(tmp_path / "base", tmp_path / "pre", max_steps=40, lr=1e-2),
              log=lambda s: None).train()
    # a tiny fine-tuning set of a completely different pattern, trained hard
    (tmp_path / "tune").mkdir()
    write_shard(tmp_path / "tune" / "dialogs.bin", np.tile([5, 9, 7, 60, 61], 200))
    logs: list[str] = []
    tune = tiny_config(tmp_path / "tune", tmp_path / "ft", max_steps=200, lr=3e-2, eval_interval=2,
                       init_from=str(tmp_path / "pre" / "ckpt.pt"), guard_data=str(tmp_path / "base"),
                       guard_margin=0.05, warmup_steps=1)
    summary = T.Trainer(tune, log=logs.append).train()
    assert summary["step"] < 200, "the guard should have stopped the run"
    assert any(line.startswith("stopping: base-corpus validation loss worsened") for line in logs)
    best = torch.load(tmp_path / "ft" / "best.pt", weights_only=False)
    baseline = best["guard_baseline"]
    kept = [g for s, _, g in best["history"]["guard"] if s == best["step"]][0]
    assert kept <= baseline * 1.05
