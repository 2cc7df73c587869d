"""Training under (data, fsdp, tensor) meshes of 8 fake CPU devices: the same losses and updates
as one device, the state kept where the rules table puts it, checkpoints that move between
meshes, and `python -m ngsd_jax.train --mesh` ending where the one-device run ends.

The device count is fixed when jax initialises, so the 8-device runs are fresh interpreters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import env_with_8_devices, final_params, train_args

from ngsd_jax import train

SCRIPT = Path(__file__).with_name("train_sharding_check.py")
MESHES = ["data=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2", "fsdp=8"]


@pytest.fixture(scope="module")
def result():
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env_with_8_devices(), capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_train_steps_match_one_device(result, method, mesh):
    r = result[f"{method}/{mesh}"]
    assert r["loss"][1] < r["loss"][0]  # the steps did something
    assert r["loss_diff"] < 1e-5 * r["loss"][0]
    assert r["norm_diff"] < 1e-5 * max(r["norm"])
    assert r["param_rel_diff"] < 1e-4  # float32 reductions in another order, through two Adam steps


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("mesh, rows", [("data=8", 1), ("data=2,fsdp=2,tensor=2", 2), ("fsdp=4,tensor=2", 2),
                                        ("fsdp=8", 1)])
def test_state_and_batch_are_placed(result, method, mesh, rows):
    r = result[f"{method}/{mesh}"]
    assert r["shardings_kept"]  # the step's outputs stay where its inputs were
    assert r["moments_like_params"]  # AdamW's moments split exactly like their parameters
    assert r["batch_rows"] == [rows]  # 8 rows over data x fsdp
    assert r["some_split"] == (mesh != "data=8")  # fsdp/tensor really split weights (data=8 replicates them)


@pytest.mark.parametrize("target", ["tensor=8", "one device"])
def test_checkpoint_saved_on_one_mesh_restores_onto_another(result, target):
    r = result["checkpoints"][target]
    assert r["meta"] == "saved on data=2,fsdp=2,tensor=2"
    assert r["state_equal"] and r["model_equal"]  # training state (params + Adam) and the model checkpoint
    if target == "one device":
        assert r["state_devices"] == [1] and r["model_q_devices"] == 1
    else:
        assert r["state_devices"] == [8] and r["model_q_devices"] == 8
        assert r["restored_q_spec"] == r["model_q_spec"] == "P('fsdp', None)"  # 4 heads do not split over 8


def test_train_cli_under_mesh_ends_where_one_device_ends(tiny_checkpoint, data_file, tmp_path):
    checkpoint, data = tiny_checkpoint, data_file
    settings = ["--epochs", "2", "--lr", "3e-3", "--batch-size", "4"]
    assert train.main(train_args(checkpoint, data, tmp_path / "one", *settings)) == 0
    run = subprocess.run([sys.executable, "-m", "ngsd_jax.train", *train_args(checkpoint, data, tmp_path / "mesh",
                                                                             *settings, "--mesh",
                                                                             "data=2,fsdp=2,tensor=2")],
                         env=env_with_8_devices(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "memory plan per device on --mesh data=2,fsdp=2,tensor=2, batch 4" in run.stderr
    logs = [(tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines() for name in ("one", "mesh")]
    losses = [[json.loads(line)["loss"] for line in log] for log in logs]
    assert len(losses[0]) == 4  # 6 examples / batch 4 (the partial batch padded) x 2 epochs
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    for meshed, single in zip(final_params(tmp_path / "mesh" / "expert"), final_params(tmp_path / "one" / "expert")):
        np.testing.assert_allclose(meshed, single, rtol=1e-4, atol=1e-5)


def test_batch_that_does_not_split_is_refused(tiny_checkpoint, data_file, tmp_path):
    checkpoint, data = tiny_checkpoint, data_file
    run = subprocess.run([sys.executable, "-m", "ngsd_jax.train", *train_args(checkpoint, data, tmp_path, "--mesh",
                                                                             "data=8", "--batch-size", "4")],
                         env=env_with_8_devices(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: batch size 4 does not split over data x fsdp = 8")
