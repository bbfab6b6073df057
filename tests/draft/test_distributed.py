"""Training under torch.distributed: two real CPU processes (gloo) launched with torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def test_two_ranks_give_the_gradient_of_the_global_batch():
    result = torchrun(os.path.join(HERE, "ddp_check.py"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "partitions 1: " in result.stdout and "partitions 3: " in result.stdout
    assert "MISMATCH" not in result.stdout


def test_train_demo_under_torchrun_writes_one_checkpoint_from_rank_0(tmp_path):
    from peagle_ext.draft.llama import LlamaEagle3DraftModel

    out = tmp_path / "ckpt"
    result = torchrun("-m", "peagle_ext", "train-demo", "--steps", "3", "--seq-len", "16", "--depths", "3",
                      "--device", "cpu", "--sequence-partitions", "2", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("written to") == 1  # rank 0 alone saves and reports
    assert "2 processes" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert LlamaEagle3DraftModel.from_pretrained(out).config.num_depths == 3
