"""Real multi-host runs on one machine: the decode and train CLIs started as 2 JAX processes
of 2 fake CPU devices each (`jax.distributed` with CPU collectives), against the one-device
run. (Eval's process-0-only writes are tested with a pretended process index in test_eval.py,
and eval under --mesh in test_mesh.py.)

`--multi-host` makes each process call `jax.distributed.initialize()` with no arguments, as on
a TPU slice; JAX's cluster detection then reads the process count and index from the
environment of a SLURM job step, which is the launcher this test pretends to be.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import PROMPTS, final_params, train_args

from ngsd_jax import decode, train

PROCESSES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(argv: list[str]) -> list[subprocess.CompletedProcess]:
    """`python -m argv...` as PROCESSES processes of one multi-host run; their results in order."""
    port = _free_port()
    launched = []
    for index in range(PROCESSES):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_LOCAL_DEVICE_IDS="0,1",
                   SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(PROCESSES),
                   SLURM_PROCID=str(index), SLURM_LOCALID="0")
        launched.append(subprocess.Popen([sys.executable, "-m", *argv, "--multi-host"], env=env, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    runs = []
    for process in launched:
        stdout, stderr = process.communicate(timeout=600)
        runs.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    return runs


def _records(text: str) -> list[dict]:
    # CPU collectives (gloo) log to stdout as well; the CLI's own lines are the JSON ones.
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_decode_on_two_processes_matches_one_device(chat_pair, capsys):
    base, expert = chat_pair
    args = ["--base", base, "--expert", expert, "--max-new-tokens", "10", "--json", "--reflect", "logit"]
    for p in PROMPTS:
        args += ["--prompt", p]
    assert decode.main(args) == 0
    one_device = _records(capsys.readouterr().out)
    first, second = run_processes(["ngsd_jax.decode", *args, "--mesh", "data=2,tensor=2"])
    assert [r["tokens"] for r in _records(first.stdout)] == [r["tokens"] for r in one_device]
    assert [r["reflection"]["risk"] for r in _records(first.stdout)] == pytest.approx(
        [r["reflection"]["risk"] for r in one_device], abs=1e-4)
    assert _records(second.stdout) == [] and "memory plan" in first.stderr and "memory plan" not in second.stderr


def test_train_on_two_processes_ends_where_one_device_ends(tiny_checkpoint, data_file, tmp_path):
    settings = ["--epochs", "2", "--lr", "3e-3", "--batch-size", "4", "--hf-output", "HF"]
    one = train_args(tiny_checkpoint, data_file, tmp_path / "one", *settings)
    two = train_args(tiny_checkpoint, data_file, tmp_path / "two", *settings, "--mesh", "fsdp=2,tensor=2")
    one.remove("--no-hf-export")
    two.remove("--no-hf-export")
    one[one.index("HF")], two[two.index("HF")] = str(tmp_path / "one" / "hf"), str(tmp_path / "two" / "hf")
    assert train.main(one) == 0
    first, second = run_processes(["ngsd_jax.train", *two])
    assert "expert written" in first.stderr and "expert written" not in second.stderr
    logs = [(tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines() for name in ("one", "two")]
    assert len(logs[1]) == len(logs[0]) == 4  # one line per step: process 1 logged nothing
    np.testing.assert_allclose([json.loads(x)["loss"] for x in logs[1]], [json.loads(x)["loss"] for x in logs[0]],
                               rtol=1e-5)
    for two_processes, single in zip(final_params(tmp_path / "two" / "expert"),
                                     final_params(tmp_path / "one" / "expert")):
        np.testing.assert_allclose(two_processes, single, rtol=1e-4, atol=1e-5)
    from safetensors.numpy import load_file

    exported = [load_file(tmp_path / name / "hf" / "model.safetensors") for name in ("one", "two")]
    for key, value in exported[0].items():
        np.testing.assert_allclose(exported[1][key], value, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two" / "expert" / "adapter" / "adapter.json").is_file()
