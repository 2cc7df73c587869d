"""Decoding on (data, fsdp, tensor) meshes of 8 fake CPU devices gives the one-device result,
with the batch split over data and fsdp and the weights split per the rules table.

The device count is fixed when jax initialises, which this pytest process has already
done, so the check runs in a fresh interpreter (tests/sharding_check.py) with 8 devices.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import env_with_8_devices
from jax.sharding import AbstractMesh

from ngsd_jax.parallel.sharding import LOGICAL_RULES, MeshError, MeshShape, parse_mesh, partition_spec

SCRIPT = Path(__file__).with_name("sharding_check.py")


def run_with_8_devices(script: Path, *args: str) -> dict:
    run = subprocess.run([sys.executable, str(script), *args], env=env_with_8_devices(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def result():
    return run_with_8_devices(SCRIPT)


MESHES = ["data=8/sharded", "tensor=8/sharded", "data=2,tensor=4/sharded", "data=2,fsdp=2,tensor=2/sharded",
          "data=2,tensor=4/replicated"]


def test_the_gate_fired(result):
    assert result["spikes"] > 0, "the gate never fired, so the merge path went untested"


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_ngsd_decode_matches_one_device(result, mesh):
    r = result["meshes"][mesh]
    assert r["tokens_equal"] and r["lengths_equal"]
    assert r["divergence_diff"] < 1e-5
    assert r["potential_diff"] < 1e-5
    # Row-parallel layers sum their partial products in another order: an error of a few
    # float32 ulps of the largest logit, so the bound is relative to that scale.
    assert r["logits_diff"] <= 1e-5 * r["logits_scale"]


@pytest.mark.parametrize("mesh, rows", [("data=8/sharded", 1), ("tensor=8/sharded", 8),
                                        ("data=2,tensor=4/sharded", 4), ("data=2,fsdp=2,tensor=2/sharded", 2)])
def test_batch_is_split_over_data_and_fsdp(result, mesh, rows):
    # Of 8 rows, each device holds 8 / (data * fsdp): the loop ran on its own rows only.
    assert result["meshes"][mesh]["output_shard_rows"] == [rows]


@pytest.mark.parametrize("mesh, rows", [("data=8/sharded", 1), ("tensor=8/sharded", 4), ("data=2,tensor=4/sharded", 2),
                                        ("data=2,fsdp=2,tensor=2/sharded", 1), ("data=2,tensor=4/replicated", 2)])
def test_kv_caches_in_the_loop_hold_only_the_devices_rows(result, mesh, rows):
    # Per-device buffer shapes in the compiled, partitioned program: no device ever holds a KV
    # cache of the whole batch (3 prompts padded to 4 rows, or to 8 on data=8).
    assert result["one_device_cache_shapes"] == [[4, 2]]
    assert {b for b, _ in result["meshes"][mesh]["cache_shapes"]} == {rows}


def test_params_are_really_sharded(result):
    r = result["meshes"]["data=2,tensor=4/sharded"]
    rows, cols = r["q_shape"]
    assert r["q_spec"] == ["fsdp", "tensor"]  # column-parallel: output features split over tensor
    assert r["q_shard_shapes"] == [[rows, cols // 4]]
    assert r["down_spec"] == ["tensor", "fsdp"]  # row-parallel
    assert r["embedding_spec"] == ["tensor", "fsdp"]  # vocab-parallel
    assert r["k_spec"] == ["fsdp", None]  # 2 kv heads cannot split over 4 devices
    fsdp = result["meshes"]["data=2,fsdp=2,tensor=2/sharded"]
    assert fsdp["q_shard_shapes"] == [[rows // 2, cols // 2]]  # embed over fsdp, heads over tensor
    assert fsdp["k_spec"] == ["fsdp", "tensor"]  # 2 kv heads over 2 devices do split


def test_expert_placed_apart_from_base(result):
    r = result["meshes"]["data=2,tensor=4/replicated"]
    assert r["expert_q_spec"] == [] and r["q_spec"] == ["fsdp", "tensor"]


def test_scanned_layers_decode_on_a_mesh_with_the_layer_axis_whole(result):
    r = result["scanned"]  # data=2,fsdp=2,tensor=2
    assert r["tokens_equal"]
    assert r["q_spec"] == [None, "fsdp", "tensor"]
    assert {b for b, _ in r["cache_shapes"]} == {1}  # the stacked caches too hold each device's rows only


@pytest.mark.parametrize("mesh", ["data=8", "tensor=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2"])
def test_adapter_expert_over_a_sharded_base_matches_one_device(result, mesh):
    assert result["adapter_spikes"] > 0, "the adapter expert never moved the gate"
    r = result["adapter"][mesh]
    assert r["tokens_equal"] and r["lengths_equal"]
    assert r["divergence_diff"] < 1e-5 and r["potential_diff"] < 1e-5
    # A [in, rank] is split like the kernel's input dimension, B [rank, out] like its output.
    for projection in r["specs"].values():
        assert projection["a"] == [projection["kernel"][0], None]
        assert projection["b"] == [None, projection["kernel"][1]]
    if mesh == "data=2,tensor=4":
        assert r["specs"]["q_proj"]["b"] == [None, "tensor"] and r["specs"]["down_proj"]["a"] == ["tensor", None]


def test_partition_spec_rules():
    assert tuple(partition_spec(("embed", "mlp"))) == ("fsdp", "tensor")
    assert tuple(partition_spec(("norm",))) == (None,)
    assert tuple(partition_spec(("layers", "embed", "heads"))) == (None, "fsdp", "tensor")
    assert tuple(partition_spec(("batch", "unlisted", "vocab"), LOGICAL_RULES)) == (("data", "fsdp"), None, "tensor")


def test_indivisible_dimension_is_replicated():
    mesh = AbstractMesh((2, 1, 4), ("data", "fsdp", "tensor"))  # shapes only: no devices needed
    assert tuple(partition_spec(("embed", "kv_heads"), units=(64, 3), mesh=mesh)) == ("fsdp", None)
    assert tuple(partition_spec(("embed", "heads"), units=(64, 8), mesh=mesh)) == ("fsdp", "tensor")
    assert tuple(partition_spec(("batch",), units=(3,), mesh=mesh)) == (None,)


def test_parse_mesh():
    assert parse_mesh("data=2,tensor=4", 8) == MeshShape(data=2, fsdp=1, tensor=4)
    assert parse_mesh("fsdp=8") == MeshShape(fsdp=8)
    assert str(parse_mesh("tensor=4, data=2")) == "data=2,tensor=4"
    for bad, names in [("data=3", "product"), ("model=8", "AXIS one of"), ("data=2,data=4", "twice"),
                       ("", "at least one"), ("data=0,tensor=8", "at least one")]:
        with pytest.raises(MeshError, match=names):
            parse_mesh(bad, 8)
