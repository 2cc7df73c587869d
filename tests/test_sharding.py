"""Tensor-parallel decoding on a 2x4 mesh of fake CPU devices gives the unsharded result.

The device count is fixed when jax initialises, which this pytest process has already
done, so the check runs in a fresh interpreter (tests/sharding_check.py) with 8 devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh

from ngsd_jax.sharding import LOGICAL_RULES, partition_spec

SCRIPT = Path(__file__).with_name("sharding_check.py")


@pytest.fixture(scope="module")
def result():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip())
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_sharded_ngsd_decode_matches_unsharded(result):
    assert result["spikes"] > 0, "the gate never fired, so the merge path went untested"
    assert result["tokens_equal"] and result["lengths_equal"]
    assert result["divergence_diff"] < 1e-5
    assert result["potential_diff"] < 1e-5


def test_sharded_forward_matches_unsharded(result):
    # Row-parallel layers sum their partial products in another order: an error of a few
    # float32 ulps of the largest logit, so the bound is relative to that scale.
    assert result["logits_diff"] <= 1e-5 * result["logits_scale"]


def test_params_are_really_sharded(result):
    assert result["q_devices"] == 8
    assert result["q_spec"] == [None, "model"]  # column-parallel: output features split
    rows, cols = result["q_shape"]
    assert result["q_shard_shapes"] == [[rows, cols // 4]]
    assert result["down_spec"] == ["model", None]  # row-parallel
    assert result["embedding_spec"] == ["model", None]  # vocab-parallel
    assert result["k_spec"] == [None, None]  # 2 kv heads cannot split over 4 devices


def test_partition_spec_rules():
    assert tuple(partition_spec(("embed", "mlp"))) == (None, "model")
    assert tuple(partition_spec(("norm",))) == (None,)
    assert tuple(partition_spec(("unlisted", "vocab"), LOGICAL_RULES)) == (None, "model")


def test_indivisible_dimension_is_replicated():
    mesh = AbstractMesh((2, 4), ("data", "model"))  # shapes only: no devices needed
    assert tuple(partition_spec(("embed", "kv_heads"), units=(64, 3), mesh=mesh)) == (None, None)
    assert tuple(partition_spec(("embed", "heads"), units=(64, 8), mesh=mesh)) == (None, "model")
