"""torchrun DistributedDataParallel training (gloo, 127.0.0.1): two processes train what one
process trains with the same global batch and seed, a checkpoint resumes with another number of
processes, and the result exports to a file ./run loads."""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs the torch extra (pip install torch==2.13.0)")
pytest.importorskip("safetensors", reason="checkpoints need the torch extra (pip install safetensors)")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("this PyTorch build has no gloo backend", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers_parity as hp  # noqa: E402

from arianna_c import checkpoint as C  # noqa: E402
from arianna_c import train as T  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# a step: 2 x 4 = 8 rows; two processes take 4 rows each, as 2 micro-batches of 2 (no_sync on the first)
FLAGS = ["--dim", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--vocab-size", "64",
         "--seq-len", "16", "--batch-size", "2", "--grad-accum", "4", "--warmup-steps", "2",
         "--eval-interval", "2", "--eval-batches", "2", "--log-interval", "1", "--lr", "3e-3",
         "--min-lr", "3e-4", "--threads", "1"]
STEPS = 4
TOLERANCE = 1e-6  # relative: the processes' gradients are summed in another order
# A torchrun call costs about 11 s of CPU (three processes importing torch, a few steps); the
# bound leaves room for a machine that runs other test suites at the same time.
TORCHRUN_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=None)
def loopback_only() -> list[str]:
    """A command prefix that runs the command in a network namespace of its own holding only
    the loopback interface: torchrun's rendezvous store listens on every interface, and
    there every interface is 127.0.0.1. Empty where unshare (root) or ip is not at hand."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return []
    try:
        probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        return []
    if probe.returncode != 0:
        return []
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """torchrun -m arianna_c.train train ARGS.  Outside a namespace of its own the port picked
    here may be taken by another program before torchrun listens on it; torchrun then fails
    before any training with EADDRINUSE, and the command is run again on another port."""
    env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1")
    for _ in range(3):
        command = [*loopback_only(), sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                   "-m", "arianna_c.train", "train", *args]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=TORCHRUN_TIMEOUT_S)
        if "EADDRINUSE" not in result.stderr:
            break
    return result


def failure(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"


def history(out: Path) -> dict:
    return json.loads((out / "history.json").read_text())


def losses(out: Path) -> list[float]:
    return [loss for _, _, loss in history(out)["train"]]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    for i in range(2):
        (3 + (np.arange(3000) * (i + 1)) % 61).astype(np.uint16).tofile(folder / f"part{i}.bin")
    return folder


def test_two_processes_train_what_one_process_trains(built, data, tmp_path):
    from arianna_c.export import export_bin

    one, two = tmp_path / "one", tmp_path / "two"
    assert T.main(["train", "--data", str(data), "--out", str(one), *FLAGS, "--max-steps", str(STEPS)]) == 0
    result = torchrun(2, "--data", str(data), "--out", str(two), *FLAGS, "--max-steps", str(STEPS))
    assert result.returncode == 0, failure(result)
    # only rank 0 logs: one progress line per step
    assert result.stdout.count(" process(es) on cpu") == 1 and "2 process(es)" in result.stdout
    assert sum(line.startswith("[") for line in result.stdout.splitlines()) == STEPS
    assert len(losses(two)) == STEPS
    np.testing.assert_allclose(losses(two), losses(one), rtol=TOLERANCE, atol=0)
    np.testing.assert_allclose([v for _, _, v in history(two)["val"]], [v for _, _, v in history(one)["val"]],
                               rtol=TOLERANCE, atol=0)
    meta = C.read_meta(two / "ckpt")
    assert meta["processes"] == 2 and meta["tokens_seen"] == STEPS * 8 * 16

    # the two-process checkpoint resumes in one process, as the one-process checkpoint does
    for out in (one, two):
        assert T.main(["train", "--out", str(out), "--resume", "--max-steps", str(2 * STEPS)]) == 0
    assert len(losses(two)) == 2 * STEPS
    np.testing.assert_allclose(losses(two), losses(one), rtol=TOLERANCE, atol=0)

    # and the result is a model ./run loads (export_bin checks the C logits against PyTorch's)
    model_bin = tmp_path / "two.bin"
    assert export_bin(two / "best", model_bin) <= hp.TOL
    (tmp_path / "tok.bin").write_bytes(hp.placeholder_tokenizer(64))
    run = subprocess.run([str(built / "run"), str(model_bin), "-z", str(tmp_path / "tok.bin"), "-t", "0",
                          "-n", "8", "-e", "1"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "achieved tok/s" in run.stderr


def test_one_process_checkpoint_resumes_in_two(data, tmp_path):
    from arianna_c.trainer import Trainer

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert T.main(["train", "--data", str(data), "--out", str(straight), *FLAGS, "--max-steps", str(STEPS)]) == 0
    first = Trainer(T.resolve_config(dict(options(FLAGS), data=str(data), out=str(split), max_steps=STEPS)))
    first.log = lambda line: first.request_stop() if "step 1 " in line else None
    assert first.train()["step"] == 2
    result = torchrun(2, "--out", str(split), "--resume")
    assert result.returncode == 0, failure(result)
    assert f"resumed from {split / 'ckpt'} at step 2" in result.stdout, failure(result)
    np.testing.assert_allclose(losses(split), losses(straight), rtol=TOLERANCE, atol=0)


def test_a_batch_that_does_not_split_over_the_processes_is_an_error(data, tmp_path):
    from arianna_c.trainer import Trainer, World

    cfg = T.resolve_config(dict(options(FLAGS), data=str(data), out=str(tmp_path / "o"), batch_size=3, grad_accum=1))
    with pytest.raises(T.ConfigError, match=r"^a step's 3 x 1 = 3 rows do not split over 2 processes; make "
                                            r"--batch-size x --grad-accum a multiple of 2$"):
        Trainer(cfg, world=World(rank=0, size=2, device=torch.device("cpu")))


def options(flags: list[str]) -> dict:
    """Command-line flags as the options resolve_config takes."""
    args = T.build_parser().parse_args(["train", *flags])
    return {k: v for k, v in vars(args).items() if k != "command"}
