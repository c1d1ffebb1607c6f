"""What the training tools are given that they cannot use: damaged checkpoints (a truncated
safetensors file, tensors that do not fit the model's shape, a checkpoint.json without an
entry), text that is not UTF-8, shards of an odd number of bytes, settings out of range, and
what the help says. Each is one error line naming the file or option; nothing runs on tiny
data but one short training run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs the torch extra (pip install torch==2.13.0)")
pytest.importorskip("safetensors", reason="checkpoints need the torch extra (pip install safetensors)")

from arianna_c import checkpoint as C  # noqa: E402
from arianna_c import data as D  # noqa: E402
from arianna_c import export as E  # noqa: E402
from arianna_c import train as T  # noqa: E402
from arianna_c.trainer import Trainer  # noqa: E402

TINY = dict(dim=32, n_layers=2, n_heads=4, vocab_size=64, seq_len=16, batch_size=4, warmup_steps=1,
            eval_interval=2, eval_batches=1, log_interval=1, lr=3e-3, min_lr=3e-4, threads=1, dtype="fp32")


def shards(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        np.asarray(3 + np.arange(1500) * (i + 1) % 61, dtype=D.SHARD_DTYPE).tofile(folder / f"part{i}.bin")
    return folder


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A finished two-step run: RUN/ckpt (with the optimizer), RUN/best; the data in RUN.data."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run")
    cfg = T.TrainConfig(data=str(shards(root / "data")), out=str(root / "run"), max_steps=2, **TINY)
    Trainer(cfg, log=lambda line: None).train()
    return root / "run"


@pytest.fixture
def damaged(saved_run, tmp_path):
    """damaged(how) -> a copy of the saved run whose ckpt/ how() has changed."""
    def make(how) -> Path:
        run = tmp_path / "run"
        shutil.copytree(saved_run, run)
        how(run / "ckpt")
        return run

    return make


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def resume(run: Path) -> int:
    return T.main(["train", "--resume", "--out", str(run), "--max-steps", "4"])


def init_from(run: Path, data: Path) -> int:
    return T.main(["train", "--init-from", str(run / "ckpt"), "--data", str(data), "--out", str(run.parent / "ft"),
                   "--max-steps", "1", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1",
                   "--threads", "1", "--dtype", "fp32"])


def export(run: Path) -> int:
    return E.main(["model", str(run / "ckpt"), str(run.parent / "out.bin"), "--no-verify"])


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(100)


# ---------------------------------------------------------------------------- checkpoints


def test_a_truncated_model_file_is_a_checkpoint_error_naming_it(damaged, saved_run, capsys):
    run = damaged(lambda ckpt: truncate(ckpt / C.MODEL_FILE))
    says = f"error: {run / 'ckpt' / C.MODEL_FILE}: not a readable safetensors file ("
    for command in (lambda: resume(run), lambda: init_from(run, saved_run.parent / "data"), lambda: export(run)):
        assert command() == 1
        assert error_line(capsys).startswith(says)


def test_a_truncated_optimizer_file_fails_only_the_resume(damaged, saved_run, capsys):
    run = damaged(lambda ckpt: truncate(ckpt / C.OPTIMIZER_FILE))
    assert resume(run) == 1
    assert error_line(capsys).startswith(f"error: {run / 'ckpt' / C.OPTIMIZER_FILE}: not a readable "
                                         f"safetensors file (")
    assert init_from(run, saved_run.parent / "data") == 0  # the weights are all it reads
    assert export(run) == 0
    assert C.load_any(run / "ckpt").optimizer_state is None


def edit_meta(change):
    def how(ckpt: Path) -> None:
        meta = json.loads((ckpt / C.META_FILE).read_text())
        change(meta)
        (ckpt / C.META_FILE).write_text(json.dumps(meta))

    return how


def test_tensors_that_do_not_fit_the_model_args_are_a_checkpoint_error_naming_one(damaged, saved_run, capsys):
    def wider(meta: dict) -> None:
        meta["model_args"]["dim"] = meta["settings"]["dim"] = 64

    run = damaged(edit_meta(wider))
    says = ("error: the checkpoint's tok_embeddings.weight has shape (64, 32), but its model_args make it "
            "(64, 64)")
    for command in (lambda: resume(run), lambda: init_from(run, saved_run.parent / "data"), lambda: export(run)):
        assert command() == 1
        assert error_line(capsys) == says


def test_a_checkpoint_json_without_an_entry_is_a_checkpoint_error_naming_it(damaged, saved_run, tmp_path, capsys):
    run = damaged(edit_meta(lambda meta: meta.pop("settings")))
    missing = "no 'settings' entry (training writes one into every checkpoint: the file is damaged)"
    assert resume(run) == 1
    assert error_line(capsys) == (f"error: --resume: {run / 'ckpt' / C.META_FILE}: {missing}; train without "
                                  f"--resume to start this run")
    cfg = T.TrainConfig(data=str(saved_run.parent / "data"), out=str(run), resume=True, max_steps=4, **TINY)
    with pytest.raises(C.CheckpointError, match=re.escape(missing)):
        Trainer(cfg, log=lambda line: None)  # a TrainConfig made in Python: the same check
    # a module checkpoint the same: `train module --resume` reads its settings first
    shutil.copytree(run / "ckpt", tmp_path / "m.ckpt" / "last")
    assert T.main(["module", "--base", str(tmp_path / "base.bin"), "--data", str(tmp_path), "--out",
                   str(tmp_path / "m.bin"), "--ckpt", str(tmp_path / "m.ckpt"), "--resume"]) == 1
    assert error_line(capsys) == f"error: {tmp_path / 'm.ckpt' / 'last' / C.META_FILE}: {missing}"
    # the weights need no settings: they still export
    assert export(run) == 0


# ---------------------------------------------------------------------------- data


def test_text_that_is_not_utf8_is_a_data_error_naming_the_file_and_byte(sp_tok, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("The river rose.\n")
    (corpus / "bad.txt").write_bytes(b"hello \xff world\n")
    with pytest.raises(D.DataError) as e:
        D.pretokenize(corpus, sp_tok.model_file, tmp_path / "data")
    assert str(e.value).startswith(f"{corpus / 'bad.txt'}: not UTF-8 text (byte 0xff at offset 6")


def test_a_shard_of_an_odd_number_of_bytes_is_a_data_error_naming_it(tmp_path, capsys):
    from arianna_c.lora_trainer import every_token

    data = shards(tmp_path / "data")
    with open(data / "part1.bin", "ab") as f:
        f.write(b"\x07")
    says = f"{data / 'part1.bin'}: 3001 bytes, not a whole number of 2-byte token ids"
    for read in (lambda: D.load_split(data), lambda: every_token(str(data))):
        with pytest.raises(D.DataError, match=re.escape(says)):
            read()
    assert T.main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--max-steps", "1",
                   "--warmup-steps", "0"]) == 1
    assert error_line(capsys).startswith(f"error: {says}")


# ---------------------------------------------------------------------------- settings and help


def test_a_validation_fraction_out_of_range_is_refused_naming_the_option(tmp_path, capsys):
    data = shards(tmp_path / "data")
    for value, says in (("2", "--val-fraction 2.0 is invalid: it must be below 1"),
                        ("0", "--val-fraction 0.0 is invalid: it must be above 0")):
        assert T.main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--val-fraction", value]) == 1
        assert error_line(capsys) == f"error: {says}"


def test_the_top_level_help_names_every_command(capsys):
    with pytest.raises(SystemExit):
        T.main(["--help"])
    assert "arianna_c.train {tokenizer,pretokenize,train,module}" in " ".join(capsys.readouterr().out.split())
