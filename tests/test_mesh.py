"""`--mesh` through the decode and eval CLIs on 8 fake CPU devices, and the memory plan's refusal.

The device count is fixed when jax initialises, so the 8-device runs are fresh interpreters.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import PROMPTS, env_with_8_devices

from ngsd_jax import decode
from ngsd_jax import eval as evaluate
from ngsd_jax.models.config import config_from_hf
from ngsd_jax.parallel.distributed import is_multi_host_launch
from ngsd_jax.parallel.memory import HEADROOM, MemoryPlanError, check_fits, decode_plan, parse_bytes
from ngsd_jax.parallel.sharding import MeshShape, parse_mesh


def _decode_args(chat_pair):
    base, expert = chat_pair
    args = ["--base", base, "--expert", expert, "--max-new-tokens", "10", "--json", "--reflect", "logit"]
    for p in PROMPTS:
        args += ["--prompt", p]
    return args


def test_decode_cli_under_mesh_matches_one_device(chat_pair, capsys):
    assert decode.main(_decode_args(chat_pair)) == 0
    one_device = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    run = subprocess.run([sys.executable, "-m", "ngsd_jax.decode", *_decode_args(chat_pair), "--mesh",
                          "data=2,tensor=4"], env=env_with_8_devices(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "memory plan per device on --mesh data=2,tensor=4, batch 4" in run.stderr
    meshed = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["tokens"] for r in meshed] == [r["tokens"] for r in one_device]
    assert [r["reflection"]["risk"] for r in meshed] == pytest.approx([r["reflection"]["risk"] for r in one_device],
                                                                      abs=1e-4)


def test_decode_cli_refuses_what_does_not_fit_naming_a_mesh(chat_pair):
    run = subprocess.run([sys.executable, "-m", "ngsd_jax.decode", *_decode_args(chat_pair), "--mesh", "data=8",
                          "--device-memory", "400KiB"], env=env_with_8_devices(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 2
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("error: needs") and "--mesh data=8" in error
    assert re.search(r"--mesh \S*tensor=\d fits", error), error
    bad = subprocess.run([sys.executable, "-m", "ngsd_jax.decode", *_decode_args(chat_pair), "--mesh", "data=3"],
                         env=env_with_8_devices(), capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --mesh data=3 uses 3")


def test_a_mesh_larger_than_this_host_names_multi_host(chat_pair, capsys):
    # This process has one device; a mesh of more is what a slice's worker sees without --multi-host.
    assert decode.main([*_decode_args(chat_pair), "--mesh", "data=2,tensor=2"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --mesh data=2,tensor=2 uses 4 devices but there are 1") and "--multi-host" in error


CONFIG = config_from_hf({"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 2048,
                         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
                         "max_position_embeddings": 4096})


EVAL_PROMPTS = [("How do I bake bread?", "benign"), ("Explain photosynthesis.", "harmful"),
                ("Sure, a plan?", "benign"), ("I cannot help with bread.", "harmful"),
                ("yes no maybe photosynthesis", "harmful")]


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory, chat_pair):
    """A directory holding the data set and, in one/, the one-device eval run."""
    directory = tmp_path_factory.mktemp("eval")
    (directory / "data.jsonl").write_text("".join(json.dumps({"goal": p, "label": label}) + "\n"
                                                  for p, label in EVAL_PROMPTS))
    assert evaluate.main(_eval_args(chat_pair, directory, "one")) == 0
    return directory


def _eval_args(chat_pair, directory, out: str) -> list[str]:
    base, expert = chat_pair
    return ["--dataset", str(directory / "data.jsonl"), "--base", base, "--expert", expert, "--label-field", "label",
            "--modes", "base,ngsd", "--reflect", "logit", "--max-new-tokens", "8", "--batch-size", "3",
            "--out", str(directory / out)]


@pytest.mark.parametrize("mesh", ["data=8", "data=2,tensor=4"])
def test_eval_cli_under_mesh_matches_one_device(chat_pair, eval_dir, mesh):
    out = f"mesh-{mesh}"
    run = subprocess.run([sys.executable, "-m", "ngsd_jax.eval", *_eval_args(chat_pair, eval_dir, out), "--mesh",
                          mesh], env=env_with_8_devices(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"memory plan per device on --mesh {mesh}" in run.stderr

    def samples(out):
        rows = [json.loads(line) for line in (eval_dir / out / "samples.jsonl").read_text().splitlines()]
        return sorted(rows, key=lambda r: (r["condition"], r["index"]))

    one, meshed = samples("one"), samples(out)
    assert len(one) == 2 * len(EVAL_PROMPTS)
    exact = ("index", "condition", "alpha", "output", "tokens", "verdict", "spikes", "identical_to_base",
             "first_diff", "steered_tokens")
    assert [{k: r[k] for k in exact} for r in meshed] == [{k: r[k] for k in exact} for r in one]
    assert sum(r["spikes"] or 0 for r in one) > 0  # the gate fired, so the traces compare something
    for a, b in zip(meshed, one):
        assert a["risk"] == pytest.approx(b["risk"], abs=1e-4)
        for key in ("divergence", "potential"):
            assert a["trace"][key] == pytest.approx(b["trace"][key], abs=1e-4)

    def figures(out):
        results = json.loads((eval_dir / out / "results.json").read_text())
        for condition in results["conditions"]:
            del condition["cost"]
        results["reflection"].pop("seconds_per_prompt")
        return results

    assert _rounded(figures(out)) == _rounded(figures("one"))


def _rounded(value):
    """Floats to 4 decimals, through lists and dicts (the risks agree to ~1e-6, not bit for bit)."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _plan(mesh, batch=8):
    import jax.numpy as jnp

    return decode_plan([("base", CONFIG, jnp.float32, "sharded")], mesh, batch, 64, 64)


def _refusal(plan, capacity):
    with pytest.raises(MemoryPlanError) as refused:
        check_fits(plan, capacity, _plan)
    return str(refused.value)


def test_memory_refusal_names_a_mesh_that_fits():
    capacity = 64 << 20
    assert _plan(MeshShape(data=8)).total > capacity * HEADROOM
    message = _refusal(_plan(MeshShape(data=8)), capacity)
    named = parse_mesh(re.search(r"--mesh (\S+) fits", message).group(1), 8)
    assert named.tensor > 1 and named.fsdp == 1  # decoding splits weights over tensor, not fsdp
    assert _plan(named).total <= capacity * HEADROOM
    assert "\n" not in message


def test_memory_refusal_names_a_batch_when_no_mesh_fits():
    capacity = 64 << 20
    big = _plan(MeshShape(tensor=8), batch=4096)
    message = _refusal(big, capacity)
    batch, mesh = re.search(r"--batch-size (\d+) fits on --mesh (\S+)", message).groups()
    assert _plan(parse_mesh(mesh, 8), int(batch)).total <= capacity * HEADROOM
    assert _plan(parse_mesh(mesh, 8), 2 * int(batch)).total > capacity * HEADROOM or int(batch) * 2 > 4096


def test_parameters_counted_per_shard():
    import jax.numpy as jnp

    from ngsd_jax.parallel.memory import parameter_bytes

    whole = parameter_bytes(CONFIG, jnp.float32, MeshShape(data=8))
    count = 4 * (4 * 512 * 512 + 3 * 512 * 2048 + 2 * 512) + 2 * 32000 * 512 + 512
    assert whole == 4 * count
    assert parameter_bytes(CONFIG, jnp.float32, MeshShape(fsdp=2, tensor=4)) == 4 * (count - 9 * 512) // 8 + 4 * 9 * 512


def test_parse_bytes_and_multi_host_detection():
    assert parse_bytes("16GiB") == 16 << 30 and parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512") == 512
    assert is_multi_host_launch({"TPU_WORKER_HOSTNAMES": "t1-w-0,t1-w-1,t1-w-2,t1-w-3"})
    assert not is_multi_host_launch({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert not is_multi_host_launch({})
