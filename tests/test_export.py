"""The exporters: PyTorch -> .bin (v0 / v1) / .npz, SentencePiece -> tokenizer .bin, .bin -> PyTorch.

Round trip: a random PyTorch model exported in both layouts gives the same logits in C as in
PyTorch (the exporter's own check, and an independent one over a full context); a bad export is
refused and removed.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers_parity as hp  # noqa: E402

from arianna_c import formats  # noqa: E402
from arianna_c.reference import Reference, Tokenizer  # noqa: E402


def random_torch_model(tied: bool, n_kv_heads: int, seed: int, vocab: int = 517, seq_len: int = 64):
    """A Transformer with realistic random weights (not the tiny training init)."""
    torch = hp.need_torch()
    from arianna_c.model import ModelArgs, Transformer

    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=vocab,
                     max_seq_len=seq_len, tied=tied)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name in ("tok_embeddings.weight", "output.weight"):
                p.copy_(torch.randn_like(p) * 2.5 / args.dim ** 0.5)
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model.eval()


@pytest.fixture(params=[(True, 2), (False, 4), (True, 1)], ids=["tied-gqa2", "untied-mha", "tied-mqa1"])
def torch_model(request):
    tied, kv = request.param
    return random_torch_model(tied, kv, seed=5 + kv)


@pytest.mark.parametrize("version", [0, 1])
def test_round_trip_torch_to_c(built, torch_model, version, tmp_path, record_property):
    from arianna_c.export import export_bin, torch_logits

    import arianna_c

    out = tmp_path / f"m.v{version}.bin"
    checked = export_bin(torch_model, out, version=version)  # verifies through C itself
    assert checked <= hp.TOL
    cfg, _ = formats.read_model(out)
    assert cfg.version == version
    assert cfg.shared_classifier == torch_model.args.tied
    head = out.read_bytes()[:8]
    if version == 0:  # legacy layout: stock llama2.c reads it (negative vocab = untied)
        vocab = struct.unpack_from("<7i", out.read_bytes())[5]
        assert vocab == (517 if torch_model.args.tied else -517)
    else:
        assert head[:4] == struct.pack("<I", formats.MAGIC_V1)
    tokens = hp.parity_tokens(cfg, seed=3)  # the whole context: 64 tokens
    with arianna_c.Model(out, tokenizer=hp.placeholder_tokenizer(cfg.vocab_size)) as model:
        c = model.logits(tokens)
    t = torch_logits(torch_model, tokens)
    diff = hp.max_abs_diff(c, t)
    hp.report(record_property, f"round trip v{version} tied={torch_model.args.tied} kv={torch_model.args.n_kv_heads} C vs PyTorch", diff)
    assert diff <= hp.TOL
    assert float(t.std()) > 0.5


def test_npz_and_torch_from_bin(torch_model, tmp_path, record_property):
    from arianna_c.export import export_bin, export_npz, torch_from_bin, torch_logits

    export_npz(torch_model, tmp_path / "m.npz")
    export_bin(torch_model, tmp_path / "m.bin", version=1, verify=False)
    tokens = hp.parity_tokens(formats.read_model(tmp_path / "m.bin")[0], seed=4)
    t = torch_logits(torch_model, tokens)
    ref_npz = Reference(tmp_path / "m.npz").logits(tokens)
    ref_bin = Reference(tmp_path / "m.bin").logits(tokens)
    np.testing.assert_array_equal(ref_npz, ref_bin)
    diff = hp.max_abs_diff(ref_npz, t)
    hp.report(record_property, "npz NumPy vs PyTorch", diff)
    assert diff <= hp.TOL
    back = torch_from_bin(tmp_path / "m.bin")
    assert back.args.tied == torch_model.args.tied
    if back.args.tied:
        assert back.output.weight is back.tok_embeddings.weight
    for (name, a), (name_b, b) in zip(sorted(torch_model.state_dict().items()), sorted(back.state_dict().items())):
        assert name == name_b
        assert bool((a == b).all()), name
    np.testing.assert_array_equal(torch_logits(back, tokens), t)


def test_checkpoint_cli(built, tmp_path, capsys):
    """A one-file .pt checkpoint (the layout of earlier versions) -> CLI -> v0 (default), v1, .npz."""
    torch = hp.need_torch()
    from arianna_c.export import main

    model = random_torch_model(True, 2, seed=1)
    # torch.compile'd modules save "_orig_mod." keys; the exporter strips them
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": state, "model_args": model.args.to_dict(), "step": 3, "config": {"lr": 1e-3},
                "optimizer": {}, "history": {"train": [[1, 2.0]]}}, ckpt)
    assert main(["model", str(ckpt), str(tmp_path / "a.bin")]) == 0
    assert "max |C - torch| logit diff" in capsys.readouterr().out
    assert formats.read_model(tmp_path / "a.bin")[0].version == 0
    assert main(["model", str(ckpt), str(tmp_path / "b.bin"), "--version", "1"]) == 0
    assert formats.read_model(tmp_path / "b.bin")[0].version == 1
    assert main(["model", str(ckpt), str(tmp_path / "c.npz")]) == 0
    assert main(["check", str(tmp_path / "b.bin"), str(ckpt)]) == 0
    tokens = [1, 5, 9, 200]
    np.testing.assert_allclose(Reference(tmp_path / "c.npz").logits(tokens),
                               Reference(tmp_path / "a.bin").logits(tokens), atol=0, rtol=0)


def test_export_refuses_a_mismatch(built, tmp_path, monkeypatch):
    """A file whose C logits differ from the model's is removed and the export raises."""
    hp.need_torch()
    from arianna_c import export

    model = random_torch_model(False, 2, seed=2)
    real = export.c_logits
    monkeypatch.setattr(export, "c_logits", lambda path, tokens: real(path, tokens) + 1e-3)
    out = tmp_path / "bad.bin"
    with pytest.raises(export.ExportError, match="differ"):
        export.export_bin(model, out)
    assert not out.exists()
    # a .bin that really disagrees (weights changed after the export) fails the check too
    export.export_bin(model, out, verify=False)
    monkeypatch.setattr(export, "c_logits", real)
    with __import__("torch").no_grad():
        model.norm.weight.mul_(1.01)
    with pytest.raises(export.ExportError):
        export.verify_bin(out, model)


def test_a_failed_check_keeps_the_file_already_there(built, tmp_path, monkeypatch):
    """The new file is checked before it replaces OUT: a failure leaves OUT as it was, and no
    OUT.tmp."""
    hp.need_torch()
    from arianna_c import export

    model = random_torch_model(True, 2, seed=4)
    out = tmp_path / "m.bin"
    export.export_bin(model, out)
    before = out.read_bytes()
    real = export.c_logits
    monkeypatch.setattr(export, "c_logits", lambda path, tokens: real(path, tokens) + 1e-3)
    with pytest.raises(export.ExportError, match=f"{out} was not written: .*differ"):
        export.export_bin(model, out, version=1)
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.bin"]


def test_export_refuses_a_folder_as_output(tmp_path, capsys):
    hp.need_torch()
    from arianna_c import export

    model = random_torch_model(True, 2, seed=4)
    folder = tmp_path / "out"
    folder.mkdir()
    for write in (export.export_bin, export.export_npz):
        with pytest.raises(ValueError, match=f"output {folder} is a folder: name the file to write"):
            write(model, folder)
    source = tmp_path / "m.bin"
    export.export_bin(model, source, verify=False)
    assert "is a folder" in export_error(capsys, "model", source, folder)
    assert sorted(os.listdir(tmp_path)) == ["m.bin", "out"] and not os.listdir(folder)


def test_check_help_describes_its_arguments(capsys):
    from arianna_c.export import main

    with pytest.raises(SystemExit) as e:
        main(["check", "--help"])
    assert e.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "bin model .bin to check" in shown and "checkpoint what it must reproduce" in shown


def test_export_without_the_c_library(tmp_path, monkeypatch):
    """No loadable C library: a clear error and no file; verify=False still exports."""
    hp.need_torch()
    import arianna_c
    from arianna_c import export

    def broken(*args, **kwargs):
        raise OSError("libarianna.so: cannot open shared object file")

    monkeypatch.setattr(arianna_c, "Model", broken)
    model = random_torch_model(True, 2, seed=3)
    out = tmp_path / "m.bin"
    with pytest.raises(export.ExportError, match="C library could not load"):
        export.export_bin(model, out)
    assert not out.exists()
    export.export_bin(model, out, verify=False)
    assert formats.read_model(out)[0].vocab_size == 517


def test_tied_detection():
    torch = hp.need_torch()
    from arianna_c.export import is_tied, weights_from_torch

    tied = random_torch_model(True, 2, seed=4)
    untied = random_torch_model(False, 2, seed=4)
    assert is_tied(tied.state_dict())
    assert not is_tied(untied.state_dict())
    with torch.no_grad():  # untied module holding equal data: written as shared
        untied.output.weight.copy_(untied.tok_embeddings.weight)
    assert is_tied(untied.state_dict())
    cfg, weights = weights_from_torch(untied)
    assert cfg.shared_classifier and "wcls" not in weights
    sd = tied.state_dict()
    del sd["output.weight"]
    assert is_tied(sd)


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_from_sentencepiece(tmp_path):
    spm = hp.need_sentencepiece()
    from arianna_c.export import main, tokenizer_from_sentencepiece

    model = hp.PERSONA_TOKENIZER_MODEL
    out = tmp_path / "tok.bin"
    assert tokenizer_from_sentencepiece(model, out) == out
    pieces, scores = formats.read_tokenizer(out)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert len(pieces) == sp.get_piece_size() == 4096
    assert pieces[:3] == [b"<unk>", b"<s>", b"</s>"]
    for i in range(3, len(pieces)):
        assert pieces[i] == sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")
        assert scores[i] == np.float32(sp.get_score(i))
    assert b"<0x0A>" in pieces and b"<0xFF>" in pieces  # byte pieces kept as their text
    assert not any("\u2581".encode() in p for p in pieces)
    assert any(p.startswith(b" ") for p in pieces)
    # the bytes form (used by tests/conftest.py) and the CLI give the same file
    assert tokenizer_from_sentencepiece(model) == out.read_bytes()
    assert main(["tokenizer", str(model), str(tmp_path / "cli.bin")]) == 0
    assert (tmp_path / "cli.bin").read_bytes() == out.read_bytes()
    ref = Tokenizer(out, sp_model=model)
    assert ref.encode("Resonance is") == [1] + sp.encode("Resonance is")


# ---------------------------------------------------------------------------- sources and errors


def test_export_reads_a_checkpoint_folder_and_a_legacy_pt(built, tmp_path):
    """The checkpoint folder training writes, and the one-file .pt of earlier versions (read
    with weights_only=True), export to the same file."""
    torch = hp.need_torch()
    pytest.importorskip("safetensors", reason="checkpoint folders need the torch extra")
    from arianna_c import checkpoint
    from arianna_c.export import export_bin, load_checkpoint, torch_logits

    model = random_torch_model(True, 2, seed=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]))[0].sum().backward()
    optimizer.step()
    checkpoint.save(tmp_path / "best", model.state_dict(), {"model_args": model.args.to_dict()},
                    optimizer.state_dict())
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "model_args": model.args.to_dict(), "config": {"lr": 1e-3, "data": "d"}, "step": 7,
                "tokens_seen": 99, "elapsed": 1.5, "best_val": 3.9, "history": {"train": [[7, 99, 4.0]]},
                "guard_baseline": None}, tmp_path / "best.pt")
    export_bin(tmp_path / "best", tmp_path / "a.bin")
    export_bin(tmp_path / "best.pt", tmp_path / "b.bin")
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    loaded = checkpoint.load(tmp_path / "best")
    assert loaded.optimizer_state["state"][0]["exp_avg"].shape == model.tok_embeddings.weight.shape
    assert "output.weight" not in loaded.model_state  # the tied classifier is stored once
    back = load_checkpoint(tmp_path / "best")
    assert back.output.weight is back.tok_embeddings.weight
    tokens = [1, 5, 9, 200]
    np.testing.assert_array_equal(torch_logits(back, tokens), torch_logits(model, tokens))


class NotPlainData:
    """An object torch.load(weights_only=True) must refuse to rebuild."""


def test_legacy_pt_holding_pickled_code_is_refused(tmp_path, capsys):
    torch = hp.need_torch()
    from arianna_c.export import main

    torch.save({"model": {}, "model_args": {}, "extra": NotPlainData()}, tmp_path / "odd.pt")
    assert main(["model", str(tmp_path / "odd.pt"), str(tmp_path / "m.bin")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "loads without running pickled code" in err
    assert not (tmp_path / "m.bin").exists()


def export_error(capsys, *args) -> str:
    from arianna_c.export import main

    assert main(list(map(str, args))) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_export_names_what_a_wrong_file_is(tmp_path, capsys):
    hp.need_torch()
    spm_model = hp.PERSONA_TOKENIZER_MODEL
    err = export_error(capsys, "model", spm_model, tmp_path / "m.bin")
    assert "not a training checkpoint (it is a SentencePiece .model: `export tokenizer` converts it)" in err
    tok_bin = tmp_path / "tok.bin"
    tok_bin.write_bytes(hp.placeholder_tokenizer(300))
    assert "not a training checkpoint (it is a runtime tokenizer .bin)" in export_error(
        capsys, "model", tok_bin, tmp_path / "m.bin")
    (tmp_path / "run" / "best").mkdir(parents=True)
    (tmp_path / "run" / "best" / "checkpoint.json").write_text("{}")
    assert "not an arianna_c training checkpoint" in export_error(capsys, "model", tmp_path / "run" / "best",
                                                                 tmp_path / "m.bin")
    assert "not a checkpoint folder (no checkpoint.json); it holds best: name one of them" in export_error(
        capsys, "model", tmp_path / "run", tmp_path / "m.bin")
    assert "no such checkpoint file or folder" in export_error(capsys, "model", tmp_path / "nope", tmp_path / "m.bin")
    assert not (tmp_path / "m.bin").exists()


def test_export_tokenizer_names_what_a_wrong_file_is(tmp_path, capsys):
    hp.need_sentencepiece()
    tok_bin = tmp_path / "tok.bin"
    tok_bin.write_bytes(hp.placeholder_tokenizer(300))
    assert "not a SentencePiece .model file (it is a runtime tokenizer .bin)" in export_error(
        capsys, "tokenizer", tok_bin, tmp_path / "out.bin")
    model_bin = tmp_path / "m.bin"
    cfg = formats.ModelConfig(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=300,
                              seq_len=8, shared_classifier=True, version=1)
    formats.write_model(model_bin, cfg, formats.random_weights(cfg, seed=1))
    assert "not a SentencePiece .model file (it is a model .bin)" in export_error(
        capsys, "tokenizer", model_bin, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_export_model_without_torch_says_how_to_install_it(tmp_path):
    import subprocess

    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['export'] + sys.argv[1:]; "
            "runpy.run_module('arianna_c.export', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, "model", "ckpt", str(tmp_path / "m.bin")],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(hp.REPO)))
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: `export model` needs PyTorch: pip install torch==2.13.0 "
                                     "(or pip install 'arianna_c[train]')")
