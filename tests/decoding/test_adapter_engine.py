"""A LoRA expert run as an adapter over the base's own weights (one weight stream) against
the oracle: the same adapter merged into a separate expert model, decoded by the
two-model path."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ngsd_jax.checkpoints.adapter import (
    adapter_mismatch,
    extract_adapter,
    is_adapter,
    load_adapter,
    save_adapter,
    weights_fingerprint,
)
from ngsd_jax.checkpoints.weights import load_model
from ngsd_jax.decoding import program, risk
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.gate import GateConfig
from ngsd_jax.decoding.settings import DecodeSettings
from ngsd_jax.models.lora import apply_lora, merge_lora

VOCAB = 256
STOP = 3
ADAPTED = [2, 3]  # the top two of four layers, as the default recipe adapts the top ten of thirty


@pytest.fixture(scope="module")
def base(make_tiny_hf):
    return load_model(make_tiny_hf("llama", num_hidden_layers=4))


@pytest.fixture(scope="module")
def lora_model(base):
    """The base with an all-linear rank-4 LoRA on its top layers, b non-zero so the delta matters."""
    model = nnx.clone(base)
    apply_lora(model, rank=4, alpha=8.0, targets="all-linear", layers=ADAPTED, seed=1)
    rng = np.random.RandomState(0)
    for i in ADAPTED:
        layer = model.layers[i]
        for owner in (layer.attn, layer.mlp):
            for module in vars(owner).values():
                if hasattr(module, "lora_b"):
                    module.lora_b.set_value(0.5 * rng.randn(*module.lora_b.shape).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def engines(base, lora_model):
    adapter = extract_adapter(lora_model)
    merged = merge_lora(nnx.clone(lora_model))
    return (Engine(base, None, VOCAB, stop_ids=[STOP], adapter=adapter),
            Engine(base, merged, VOCAB, stop_ids=[STOP]))


def _prompts(seed, lengths):
    rng = np.random.RandomState(seed)
    return [rng.randint(4, VOCAB, size=n).tolist() for n in lengths]


def _assert_same_decode(adapted, merged, rows):
    for i in range(rows):
        assert adapted.sequence(i) == merged.sequence(i)
    np.testing.assert_array_equal(adapted.spike, merged.spike)
    np.testing.assert_allclose(adapted.divergence, merged.divergence, atol=1e-5)
    np.testing.assert_allclose(adapted.potential, merged.potential, atol=1e-4)
    np.testing.assert_allclose(adapted.alpha_in_force, merged.alpha_in_force)


@pytest.mark.parametrize("mode", ["ngsd", "always", "safedecoding", "expert"])
def test_adapter_expert_equals_the_merged_expert_token_for_token(engines, mode):
    adapter_engine, merged_engine = engines
    prompts = _prompts(0, [5, 17, 11])  # three lengths, and a fourth, padding row in the batch of 4
    settings = DecodeSettings(mode=mode, max_new_tokens=24)
    adapted = adapter_engine.decode(prompts, None, settings, alpha=[0.9, 0.5, 0.9])
    merged = merged_engine.decode(prompts, None, settings, alpha=[0.9, 0.5, 0.9])
    _assert_same_decode(adapted, merged, 3)
    if mode == "ngsd":  # the delta must matter, or the test could not tell the expert from the base
        assert merged.spike.sum() >= 3
        base_only = merged_engine.decode(prompts, None, DecodeSettings(mode="base", max_new_tokens=24))
        assert any(merged.sequence(i) != base_only.sequence(i) for i in range(3))


@pytest.mark.parametrize("mode", ["ngsd", "safedecoding"])
def test_adapter_expert_with_its_own_prompts_equals_the_merged_expert(engines, mode):
    # Different expert prompts (an expert system prompt) run every layer on both row sets.
    adapter_engine, merged_engine = engines
    prompts, expert_prompts = _prompts(1, [6, 13, 9]), _prompts(2, [20, 4, 9])
    settings = DecodeSettings(mode=mode, max_new_tokens=20)
    adapted = adapter_engine.decode(prompts, expert_prompts, settings, alpha=0.9)
    merged = merged_engine.decode(prompts, expert_prompts, settings, alpha=0.9)
    _assert_same_decode(adapted, merged, 3)


@pytest.mark.parametrize("own_prompts", [False, True])
def test_adapter_expert_risk_equals_the_merged_experts(engines, own_prompts):
    """The in-program risk's teacher-forced pass over the paired rows (shared lower layers, or
    every layer on both row sets) equals the separate merged expert's, with or without a forced
    answer start after the prompt."""
    adapter_engine, merged_engine = engines
    prompts = _prompts(3, [6, 13, 9])
    expert_prompts = _prompts(4, [11, 5, 8]) if own_prompts else None
    expert_risk = risk.ExpertRisk(risk.opening_trie([(5,), (17, 40), (17, 99, 123), (200, 201, 250)], VOCAB))
    settings = DecodeSettings(mode="ngsd", max_new_tokens=6)
    adapted = adapter_engine.decode(prompts, expert_prompts, settings, expert_risk=expert_risk)
    merged = merged_engine.decode(prompts, expert_prompts, settings, expert_risk=expert_risk)
    np.testing.assert_allclose(adapted.risk, merged.risk, rtol=1e-4)
    assert len(set(np.round(merged.risk, 4))) == 3  # the prompts are told apart
    _assert_same_decode(adapted, merged, 3)
    forced = [p + [7, 8] for p in (expert_prompts or prompts)]
    attacked = adapter_engine.decode([p + [7, 8] for p in prompts], forced, settings, expert_risk=expert_risk,
                                     risk_lengths=[len(p) - 2 for p in forced])
    np.testing.assert_allclose(attacked.risk, merged.risk, rtol=1e-4)


def test_adapter_expert_next_token_distribution_equals_the_merged_one(engines):
    adapter_engine, merged_engine = engines
    prompts = _prompts(3, [4, 15, 8])
    adapted = adapter_engine.next_token_distribution(prompts, model="expert")
    np.testing.assert_allclose(adapted, merged_engine.next_token_distribution(prompts, model="expert"), atol=1e-5)
    assert np.abs(adapted - merged_engine.next_token_distribution(prompts, model="base")).max() > 0.1


def test_identical_prompts_run_the_layers_below_the_adapter_once(base, engines, monkeypatch):
    adapter_engine, _ = engines
    assert adapter_engine.first_adapted == ADAPTED[0]
    built = []  # the caches the decode program builds, while it is traced
    real = program.paired_cache
    monkeypatch.setattr(program, "paired_cache", lambda *args: built.append(real(*args)) or built[-1])
    settings = DecodeSettings(mode="ngsd", max_new_tokens=3 + len(built))  # a new program each call
    prompts = _prompts(7, [5, 9, 6])
    adapter_engine.decode(prompts, None, settings)
    adapter_engine.decode(prompts, _prompts(8, [4, 9, 7]), dataclasses.replace(settings, max_new_tokens=4))
    # Shared prompts: the layers below the first adapted one hold the batch of 4 once; own prompts: twice.
    assert [[keys.shape[0] for keys, _ in cache] for cache in built] == [[4, 4, 8, 8], [8, 8, 8, 8]]
    # one weight stream: the paired model holds the base's arrays themselves, not copies
    base_kernel = adapter_engine.base_params["layers"][2]["attn"]["q_proj"]["kernel"][...]
    paired_kernel = adapter_engine.paired_params["layers"][2]["attn"]["q_proj"]["base"]["kernel"][...]
    assert paired_kernel is base_kernel


def test_adapter_saves_loads_and_knows_its_base(base, lora_model, tmp_path, make_tiny_hf):
    adapter = extract_adapter(lora_model)
    assert adapter.base_fingerprint == weights_fingerprint(base)
    save_adapter(adapter, tmp_path / "adapter")
    assert is_adapter(tmp_path / "adapter")
    loaded = load_adapter(tmp_path / "adapter")
    assert (loaded.rank, loaded.alpha, loaded.layers, loaded.targets) == (4, 8.0, (2, 3), adapter.targets)
    for key, (a, b) in adapter.weights.items():
        np.testing.assert_array_equal(loaded.weights[key][0], a)
        np.testing.assert_array_equal(loaded.weights[key][1], b)
    assert adapter_mismatch(loaded, base, "base") is None
    other_weights = load_model(make_tiny_hf("llama", seed=7, num_hidden_layers=4))
    message = adapter_mismatch(loaded, other_weights, "other")
    assert "different weights" in message and "\n" not in message
    other_shape = load_model(make_tiny_hf("llama", num_hidden_layers=2))
    assert "configs differ" in adapter_mismatch(loaded, other_shape, "small")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("expert_kind", ["adapter", "merged", "separate"])
@pytest.mark.parametrize("own_prompts", [False, True])
def test_where_the_neuron_never_fires_ngsd_is_the_base_token_for_token(make_tiny_hf, base, lora_model, dtype,
                                                                      expert_kind, own_prompts):
    """The light touch: NGSD's answer is the base's own answer (the engine's --mode base) wherever
    the neuron never fires, in every dtype, for every kind of expert and prompt."""
    path = make_tiny_hf("llama", num_hidden_layers=4)  # the same weights as `base`, loaded in `dtype`
    low = load_model(path, dtype)
    adapter = extract_adapter(lora_model)
    if expert_kind == "adapter":
        engine = Engine(low, None, VOCAB, stop_ids=[STOP], adapter=adapter)
    elif expert_kind == "merged":
        engine = Engine(low, _cast(merge_lora(nnx.clone(lora_model)), dtype), VOCAB, stop_ids=[STOP])
    else:
        engine = Engine(low, load_model(make_tiny_hf("llama", num_hidden_layers=4, seed=5), dtype), VOCAB,
                        stop_ids=[STOP])
    prompts = _prompts(11, [5, 17, 11, 8, 3])
    expert_prompts = _prompts(12, [9, 4, 13, 6, 7]) if own_prompts else None
    base_only = engine.decode(prompts, expert_prompts, DecodeSettings(mode="base", max_new_tokens=16))
    # No spike at all: a threshold the divergence never reaches.
    quiet = engine.decode(prompts, expert_prompts, DecodeSettings(
        mode="ngsd", max_new_tokens=16, gate=GateConfig(threshold=1e9)), alpha=0.9)
    assert not quiet.spike.any()
    for i in range(len(prompts)):
        assert quiet.sequence(i) == base_only.sequence(i)
    # The paper's gate: the rows that never spiked are the base's; some rows spike and change.
    gated = engine.decode(prompts, expert_prompts, DecodeSettings(mode="ngsd", max_new_tokens=16), alpha=0.9)
    for i in range(len(prompts)):
        if not gated.spike[i].any():
            assert gated.sequence(i) == base_only.sequence(i)


def _cast(model, dtype):
    """A copy of `model` with its parameters in `dtype`."""
    graph, state = nnx.split(nnx.clone(model))
    return nnx.merge(graph, jax.tree.map(lambda x: x.astype(dtype), state))
