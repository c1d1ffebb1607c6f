"""The training pipeline: tokenizer options, shards, the per-shard split, schedule, train/resume,
and fine-tuning that stops before it ruins the base model. Everything runs on tiny data."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs the torch extra (pip install torch==2.13.0)")
pytest.importorskip("safetensors", reason="checkpoints need the torch extra (pip install safetensors)")

from arianna_c import checkpoint as C  # noqa: E402
from arianna_c import data as D  # noqa: E402
from arianna_c import train as T  # noqa: E402
from arianna_c.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

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


TINY_FLAGS = ["--dim", "32", "--n-layers", "2", "--n-heads", "4", "--vocab-size", "64", "--seq-len", "16",
              "--batch-size", "4", "--warmup-steps", "2", "--eval-interval", "4", "--eval-batches", "2",
              "--log-interval", "1", "--lr", "3e-3", "--min-lr", "3e-4", "--threads", "1"]


def quiet(line: str) -> None:
    pass


def train_losses(out) -> list:
    return [loss for _, _, loss in json.loads((Path(out) / "history.json").read_text())["train"]]


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
    assert D.recorded_vocab_size(tmp_path / "data") == (320, str(Path(model_path).resolve()))
    assert D.load_split(tmp_path / "data").shards == ["a.bin", "b.bin"]  # the record is no shard


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
        Trainer(cfg)


def test_empty_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(D.DataError, match="no .bin shards"):
        D.load_split(tmp_path)


def one_error_line(capsys) -> str:
    """The command's stderr, which must be a single `error: ...` line."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_reports_data_errors_with_exit_code_1(tmp_path, capsys):
    write_shard(tmp_path / "only.bin", np.arange(30) + 3)
    code = T.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--batch-size", "8"])
    assert code == 1
    assert "but one batch of 8 x 256 needs" in one_error_line(capsys)


# ---------------------------------------------------------------------------- tool errors


def test_tokenizer_into_a_missing_folder_is_an_error(sp_model, tmp_path, capsys):
    corpus, _ = sp_model
    out = tmp_path / "missing" / "dir" / "tok"
    assert T.main(["tokenizer", "--corpus", str(corpus), "--out", str(out), "--vocab-size", "320"]) == 1
    assert f"the folder {out.parent} does not exist; create it first" in one_error_line(capsys)
    assert not out.parent.exists()


@pytest.mark.parametrize("size, says", [
    (200, "--vocab-size 200 is out of range: it must be above 259"),
    (270, "--vocab-size 270 is too small for"),  # above the fixed pieces, below them + the characters
    (60000, "--vocab-size 60000 is more pieces than"),
    (70000, "at most 65536 (token ids are stored as uint16)"),
])
def test_tokenizer_vocab_size_the_corpus_cannot_give_is_an_error(sp_model, tmp_path, capsys, size, says):
    corpus, _ = sp_model
    assert T.main(["tokenizer", "--corpus", str(corpus), "--out", str(tmp_path / "tok"),
                   "--vocab-size", str(size)]) == 1
    err = one_error_line(capsys)
    assert says in err
    if size == 270:  # the message names the smallest size that works, and that size does work
        need = int(err.rsplit("use --vocab-size ", 1)[1].split()[0])
        assert T.main(["tokenizer", "--corpus", str(corpus), "--out", str(tmp_path / "tok"),
                       "--vocab-size", str(need)]) == 0
        assert T.main(["tokenizer", "--corpus", str(corpus), "--out", str(tmp_path / "tok"),
                       "--vocab-size", str(need - 1)]) == 1


def test_pretokenize_given_a_tokenizer_bin_is_an_error(sp_model, tmp_path, capsys):
    from arianna_c.export import tokenizer_from_sentencepiece

    corpus, model_path = sp_model
    converted = tokenizer_from_sentencepiece(model_path, tmp_path / "tok.bin")
    assert T.main(["pretokenize", "--corpus", str(corpus), "--tokenizer", str(converted),
                   "--out", str(tmp_path / "data")]) == 1
    assert "not a SentencePiece .model file (it is a runtime tokenizer .bin)" in one_error_line(capsys)


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    """python -m arianna_c.train ARGS in a Python where `import torch` fails."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['train'] + sys.argv[1:]; "
            "runpy.run_module('arianna_c.train', run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_help_and_tokenizer_steps_work_without_torch(tmp_path):
    for args in (["--help"], ["train", "--help"]):
        result = run_without_torch(*args)
        assert result.returncode == 0, result.stderr
        assert "usage: python -m arianna_c.train" in result.stdout
    patterned_shards(tmp_path / "data", 1)
    result = run_without_torch("train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: training needs torch: pip install torch==2.13.0 "
                                     "(or pip install 'arianna_c[train]')")


def test_train_help_describes_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        T.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    defaults = T.TrainConfig(data="", out="")
    for name in T.TrainConfig.__dataclass_fields__:
        described = " ".join(T.OPTION_HELP[name].split())
        assert described.split("(")[0].strip() in text, name
        value = getattr(defaults, name)
        if value not in (None, "", False, True):
            assert f"{described} (default: {value})" in text, name
    assert "--seq-len SEQ_LEN tokens per batch row (the model's context length) (default: 256)" in text
    assert "--time-budget TIME_BUDGET minutes of training steps; 0 = no time limit" in text


# ---------------------------------------------------------------------------- settings


def test_warmup_longer_than_the_run_is_clamped_with_a_warning(tmp_path):
    warnings: list[str] = []
    cfg = T.resolve_config(dict(data=str(tmp_path), out=str(tmp_path / "o"), max_steps=50, warmup_steps=80),
                           warn=warnings.append)
    assert cfg.warmup_steps == 50
    assert warnings == ["warning: --warmup-steps 80 is longer than the run (--max-steps 50); "
                        "warming up over 50 steps"]
    assert T.learning_rate(cfg, 49, 0.98) == pytest.approx(cfg.lr)
    assert T.resolve_config(dict(data="d", out="o", max_steps=50, warmup_steps=50), warn=warnings.append)
    assert len(warnings) == 1


@pytest.mark.parametrize("flag, value, says", [
    ("--batch-size", "0", "--batch-size 0 is invalid: it must be above 0"),
    ("--lr", "-1", "--lr -1.0 is invalid: it must be above 0"),
    ("--dim", "30", "--dim 30 does not divide by --n-heads 4"),
    ("--n-kv-heads", "3", "--n-kv-heads 3 must be above 0 and divide --n-heads 4"),
    ("--dropout", "1", "--dropout 1.0 is invalid: it must be below 1"),
    ("--dropout", "-0.1", "--dropout -0.1 is invalid: it must be 0 or more"),
])
def test_bad_settings_are_errors_naming_the_option(tmp_path, capsys, flag, value, says):
    patterned_shards(tmp_path / "data", 1)
    args = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), *TINY_FLAGS, flag, value]
    assert T.main(args) == 1
    assert says in one_error_line(capsys)


def test_dropout_acts_while_training_only_and_resumes_with_the_run(tmp_path):
    patterned_shards(tmp_path / "data", 1)
    trainer = Trainer(tiny_config(tmp_path / "data", tmp_path / "o", max_steps=2, dropout=0.5), log=quiet)
    model, tokens = trainer.model, torch.arange(16).remainder(64)[None]
    torch.manual_seed(0)
    assert not torch.equal(model(tokens), model(tokens))  # a fresh mask every call
    model.eval()
    assert torch.equal(model(tokens), model(tokens))
    trainer.model.train()
    trainer.train()
    assert C.read_meta(tmp_path / "o" / "ckpt")["settings"]["dropout"] == 0.5
    resumed = Trainer(T.resolve_config(dict(out=str(tmp_path / "o"), resume=True, max_steps=3)), log=quiet)
    assert resumed.cfg.dropout == 0.5 and resumed.model.layers[0].residual_dropout.p == 0.5


def test_vocab_size_must_match_the_shards(sp_model, tmp_path, capsys):
    patterned_shards(tmp_path / "data", 1, vocab=64)  # ids up to 63
    base = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), *TINY_FLAGS]
    assert T.main(base + ["--vocab-size", "40"]) == 1
    assert "--vocab-size 40 does not match the shards in" in one_error_line(capsys)
    assert not (tmp_path / "o" / "ckpt").exists()  # refused before the first step
    # shards made by pretokenize record their tokenizer: its size must be the model's
    corpus, model_path = sp_model
    D.pretokenize(corpus, model_path, tmp_path / "sp")
    sp_run = ["train", "--data", str(tmp_path / "sp"), "--out", str(tmp_path / "o2"), *TINY_FLAGS]
    assert T.main(sp_run + ["--vocab-size", "400"]) == 1  # every id fits, but it is not the tokenizer's
    assert f"made with {Path(model_path).resolve()} (320 pieces); use --vocab-size 320" in one_error_line(capsys)


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


# ---------------------------------------------------------------------------- training and checkpoints


@pytest.mark.parametrize("n_shards", [1, 3])
def test_training_lowers_validation_loss_and_resumes(tmp_path, n_shards):
    patterned_shards(tmp_path / "data", n_shards)
    cfg = tiny_config(tmp_path / "data", tmp_path / "out", max_steps=12)
    summary = Trainer(cfg, log=quiet).train()
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    first_val, last_val = history["val"][0][2], history["val"][-1][2]
    assert summary["step"] == 12 and last_val < first_val - 0.3
    for name in ("ckpt", "best"):
        assert C.read_meta(tmp_path / "out" / name)["model_args"]["dim"] == 32
    assert sorted(p.name for p in (tmp_path / "out" / "ckpt").iterdir()) == [
        "checkpoint.json", "model.safetensors", "optimizer.safetensors"]
    assert not list((tmp_path / "out").glob("*.pt"))

    resumed = Trainer(tiny_config(tmp_path / "data", tmp_path / "out", max_steps=16, resume=True), log=quiet)
    assert resumed.step == 12
    assert resumed.train()["step"] == 16


def test_interrupted_and_resumed_run_has_the_same_loss_curve(tmp_path):
    """K steps straight == K/2 steps, a stop, --resume, K/2 steps: same losses, same weights."""
    patterned_shards(tmp_path / "data", 2)
    settings = dict(max_steps=8, log_interval=1, eval_interval=3, grad_accum=2, threads=1)
    Trainer(tiny_config(tmp_path / "data", tmp_path / "straight", **settings), log=quiet).train()

    first = Trainer(tiny_config(tmp_path / "data", tmp_path / "split", **settings), log=quiet)
    # asked while step 4 is logged: processes agree on a stop in each step's all-reduce, so it
    # takes effect after the step that follows
    first.log = lambda line: first.request_stop() if "step 4 " in line else None
    assert first.train()["step"] == 5
    assert len(train_losses(tmp_path / "split")) == 5
    options = dict(data=str(tmp_path / "data"), out=str(tmp_path / "split"), resume=True)
    second = Trainer(T.resolve_config(options), log=quiet)  # every setting from the checkpoint
    assert second.step == 5 and second.cfg.grad_accum == 2 and second.cfg.lr == 3e-3
    second.train()

    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "straight")
    straight, split = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("straight", "split"))
    assert split["val"] == straight["val"]
    a, b = (C.load(tmp_path / d / "ckpt") for d in ("straight", "split"))
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert a.meta["data"]["rng"] == b.meta["data"]["rng"]


def test_resume_takes_shape_and_learning_rate_from_the_checkpoint(tmp_path, capsys):
    patterned_shards(tmp_path / "data", 1)
    out = str(tmp_path / "o")
    assert T.main(["train", "--data", str(tmp_path / "data"), "--out", out, *TINY_FLAGS, "--n-kv-heads", "2",
                   "--max-steps", "4", "--weight-decay", "0.01"]) == 0
    # only --out, --resume and a longer run: no shape or learning-rate flag repeated
    assert T.main(["train", "--out", out, "--resume", "--max-steps", "6"]) == 0
    assert "resumed from" in capsys.readouterr().out
    settings = C.read_meta(tmp_path / "o" / "ckpt")["settings"]
    assert (settings["dim"], settings["n_kv_heads"], settings["lr"], settings["weight_decay"],
            settings["max_steps"]) == (32, 2, 3e-3, 0.01, 6)


@pytest.mark.parametrize("flag, value", [("--dim", "64"), ("--lr", "0.5"), ("--seed", "7"),
                                         ("--batch-size", "2")])
def test_resume_with_a_contradicting_flag_is_an_error_naming_it(tmp_path, capsys, flag, value):
    patterned_shards(tmp_path / "data", 1)
    out = str(tmp_path / "o")
    assert T.main(["train", "--data", str(tmp_path / "data"), "--out", out, *TINY_FLAGS, "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert T.main(["train", "--out", out, "--resume", flag, value]) == 1
    err = one_error_line(capsys)
    assert err.startswith(f"error: {flag} ") and "contradicts the checkpoint in" in err


def test_resume_refuses_other_data_and_a_missing_checkpoint(tmp_path, capsys):
    patterned_shards(tmp_path / "data", 1)
    patterned_shards(tmp_path / "other", 2)
    out = str(tmp_path / "o")
    assert T.main(["train", "--out", out, "--resume"]) == 1
    assert "--resume: " in one_error_line(capsys)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "ckpt.pt").write_bytes(b"PK\x03\x04")  # where earlier versions kept theirs
    assert T.main(["train", "--out", str(tmp_path / "old"), "--resume"]) == 1
    assert "is a checkpoint of an earlier version, which cannot be resumed; continue from its weights " \
           "with --init-from" in one_error_line(capsys)
    assert T.main(["train", "--data", str(tmp_path / "data"), "--out", out, *TINY_FLAGS, "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert T.main(["train", "--out", out, "--resume", "--data", str(tmp_path / "other")]) == 1
    assert "is not the data the checkpoint in" in one_error_line(capsys)


def test_a_saved_run_is_not_overwritten_without_resume(tmp_path, capsys):
    patterned_shards(tmp_path / "data", 1)
    out = tmp_path / "o"
    args = ["train", "--data", str(tmp_path / "data"), "--out", str(out), *TINY_FLAGS, "--max-steps", "2"]
    assert T.main(args) == 0
    saved = (out / "ckpt" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert T.main(args[:-1] + ["3"]) == 1
    assert one_error_line(capsys) == (f"error: {out / 'ckpt'}: a run is saved there; continue it with --resume "
                                      f"--out {out}, or start a new one in another folder")
    assert (out / "ckpt" / "model.safetensors").read_bytes() == saved


def test_sigint_stops_after_a_step_and_saves_a_checkpoint(tmp_path):
    patterned_shards(tmp_path / "data", 1)
    out = tmp_path / "o"
    args = [sys.executable, "-m", "arianna_c.train", "train", "--data", str(tmp_path / "data"), "--out", str(out),
            *TINY_FLAGS, "--max-steps", "100000", "--eval-interval", "100000"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        deadline = time.time() + 120
        for line in proc.stdout:
            if " step 3 " in line or time.time() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    stopped = [line for line in rest.splitlines() if line.startswith("stopped at step ")]
    assert stopped and "--resume" in stopped[0]
    step = int(stopped[0].split()[3].rstrip(";"))
    meta = C.read_meta(out / "ckpt")
    assert meta["step"] == step >= 3 and len(meta["history"]["train"]) == step


def test_training_in_process_gives_back_the_signal_handlers_and_the_trainer(tmp_path, monkeypatch):
    from arianna_c import trainer as trainer_module

    patterned_shards(tmp_path / "data", 1)
    built = []

    class Recorded(trainer_module.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(weakref.ref(self))

    monkeypatch.setattr(trainer_module, "Trainer", Recorded)
    alive_when_leaving = []
    monkeypatch.setattr(trainer_module, "leave_world", lambda: alive_when_leaving.append(built[0]() is not None))
    own = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, own)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        assert T.main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), *TINY_FLAGS,
                       "--max-steps", "2"]) == 0
        assert signal.getsignal(signal.SIGTERM) is own
        assert signal.getsignal(signal.SIGINT) is sigint
    finally:
        signal.signal(signal.SIGTERM, previous)
    # gone before the process group is left (a DistributedDataParallel wrapper holds the group)
    assert len(built) == 1 and alive_when_leaving == [False]


def test_finetune_guard_stops_and_keeps_the_best_checkpoint(tmp_path):
    patterned_shards(tmp_path / "base", 2, length=4000)
    Trainer(tiny_config(tmp_path / "base", tmp_path / "pre", max_steps=40, lr=1e-2), log=quiet).train()
    # a tiny fine-tuning set of a completely different pattern, trained hard
    (tmp_path / "tune").mkdir()
    write_shard(tmp_path / "tune" / "dialogs.bin", np.tile([5, 9, 7, 60, 61], 200))
    logs: list[str] = []
    tune = tiny_config(tmp_path / "tune", tmp_path / "ft", max_steps=200, lr=3e-2, eval_interval=2,
                       init_from=str(tmp_path / "pre" / "ckpt"), guard_data=str(tmp_path / "base"),
                       guard_margin=0.05, warmup_steps=1)
    summary = Trainer(tune, log=logs.append).train()
    assert summary["step"] < 200, "the guard should have stopped the run"
    assert any(line.startswith("stopping: base-corpus validation loss worsened") for line in logs)
    best = C.read_meta(tmp_path / "ft" / "best")
    baseline = best["guard_baseline"]
    kept = [g for s, _, g in best["history"]["guard"] if s == best["step"]][0]
    assert kept <= baseline * 1.05


@pytest.mark.parametrize("source", ["folder", "legacy-pt", "model-bin"])
def test_init_from_takes_the_model_s_shape_and_refuses_a_contradicting_flag(tmp_path, capsys, source):
    from arianna_c.export import export_bin, load_checkpoint

    patterned_shards(tmp_path / "data", 1)
    pre = Trainer(tiny_config(tmp_path / "data", tmp_path / "pre", max_steps=2, n_kv_heads=2), log=quiet)
    pre.train()
    init = {"folder": tmp_path / "pre" / "best", "legacy-pt": tmp_path / "pre.pt", "model-bin": tmp_path / "pre.bin"}
    if source == "legacy-pt":  # the one-file layout earlier versions wrote (plain dicts and tensors)
        torch.save({"model": pre.model.state_dict(), "optimizer": pre.optimizer.state_dict(),
                    "model_args": pre.model.args.to_dict(), "config": {"lr": 3e-3}, "step": 2,
                    "tokens_seen": 128, "elapsed": 0.1, "best_val": 4.0, "history": {"train": []},
                    "guard_baseline": None}, init[source])
    elif source == "model-bin":
        export_bin(load_checkpoint(tmp_path / "pre" / "best"), init[source], verify=False)
    base = ["train", "--data", str(tmp_path / "data"), "--init-from", str(init[source]), "--threads", "1",
            "--batch-size", "4", "--max-steps", "2", "--eval-batches", "2", "--warmup-steps", "1"]
    assert T.main(base + ["--out", str(tmp_path / "ft")]) == 0
    settings = C.read_meta(tmp_path / "ft" / "ckpt")["settings"]
    assert (settings["dim"], settings["n_kv_heads"], settings["vocab_size"], settings["seq_len"]) == (32, 2, 64, 16)
    capsys.readouterr()
    assert T.main(base + ["--out", str(tmp_path / "ft2"), "--n-layers", "3"]) == 1
    assert "--n-layers 3 contradicts --init-from" in one_error_line(capsys)
