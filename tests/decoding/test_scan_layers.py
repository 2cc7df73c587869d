"""Stacked, scanned layers (`Engine(scan_layers=True)`, `--scan-layers`) against the oracle:
the same models with unrolled layers, token for token, in every kind of pair (base alone, a
separate expert, a LoRA adapter expert with shared and with its own prompts)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from ngsd_jax.checkpoints.adapter import extract_adapter
from ngsd_jax.checkpoints.weights import load_model
from ngsd_jax.decoding import risk
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.settings import DecodeSettings
from ngsd_jax.models.decoder import stack_layers
from ngsd_jax.models.lora import apply_lora, merge_lora

VOCAB = 256
STOP = 3


@pytest.fixture(scope="module")
def base(make_tiny_hf):
    return load_model(make_tiny_hf("llama", num_hidden_layers=4))


def _lora(base, layers, targets):
    """An adapter on `layers`, b non-zero so that the delta matters."""
    model = nnx.clone(base)
    apply_lora(model, rank=4, alpha=8.0, targets=targets, layers=layers, seed=1)
    rng = np.random.RandomState(0)
    for i in layers:
        for owner in (model.layers[i].attn, model.layers[i].mlp):
            for module in vars(owner).values():
                if hasattr(module, "lora_b"):
                    module.lora_b.set_value(0.5 * rng.randn(*module.lora_b.shape).astype(np.float32))
    return extract_adapter(model), merge_lora(model)


def _prompts(seed, lengths):
    rng = np.random.RandomState(seed)
    return [rng.randint(4, VOCAB, size=n).tolist() for n in lengths]


def _engines(**models):
    """The same models, unrolled and scanned (the scanned engine stacks its own copies)."""
    copies = {k: None if v is None or k == "adapter" else nnx.clone(v) for k, v in models.items()}
    if "adapter" in models:
        copies["adapter"] = models["adapter"]
    unrolled = Engine(models["base"], models.get("expert"), VOCAB, stop_ids=[STOP], adapter=models.get("adapter"))
    scanned = Engine(copies["base"], copies.get("expert"), VOCAB, stop_ids=[STOP], adapter=copies.get("adapter"),
                     scan_layers=True)
    return unrolled, scanned


def _assert_same_tokens(unrolled, scanned, prompts, expert_prompts=None, mode="ngsd"):
    settings = DecodeSettings(mode=mode, max_new_tokens=20)
    a = unrolled.decode(prompts, expert_prompts, settings, alpha=0.9)
    b = scanned.decode(prompts, expert_prompts, settings, alpha=0.9)
    for i in range(len(prompts)):
        assert a.sequence(i) == b.sequence(i)
    np.testing.assert_array_equal(a.spike, b.spike)
    np.testing.assert_allclose(a.divergence, b.divergence, atol=1e-5)
    return a


def test_stacking_keeps_one_copy_with_the_layer_axis_named(base):
    model = nnx.clone(base)
    kernels = [np.asarray(layer.attn.q_proj.kernel[...]) for layer in model.layers]
    stack_layers(model)
    stacked = model.layers.layer.attn.q_proj.kernel
    assert model.scanned and len(model.layers) == 4 and stacked.shape == (4, *kernels[0].shape)
    assert stacked.get_metadata()["logical_axes"] == ("layers", "embed", "heads")
    for i, kernel in enumerate(kernels):
        np.testing.assert_array_equal(stacked[...][i], kernel)
    # every parameter exists once: the stack's, plus embedding, final norm and head
    sizes = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model)))
    assert sizes == sum(leaf.size for leaf in jax.tree.leaves(nnx.state(base)))


@pytest.mark.parametrize("mode", ["base", "ngsd"])
def test_scanned_equals_unrolled_with_a_separate_expert(base, mode):
    _, merged = _lora(base, [2, 3], "all-linear")
    unrolled, scanned = _engines(base=base, expert=merged)
    a = _assert_same_tokens(unrolled, scanned, _prompts(0, [5, 17, 11]), mode=mode)
    if mode == "ngsd":  # the expert must matter, or the test could not tell it from the base
        assert a.spike.sum() >= 3


@pytest.mark.parametrize("adapted,targets", [([2, 3], "all-linear"), ([1, 3], ("q_proj", "v_proj"))])
def test_scanned_equals_unrolled_with_an_adapter_expert(base, adapted, targets):
    # [1, 3]: a layer (2) inside the adapted segment that the adapter leaves alone
    adapter, _ = _lora(base, adapted, targets)
    unrolled, scanned = _engines(base=base, adapter=adapter)
    assert scanned.paired_graph is not None
    prompts = _prompts(1, [6, 13, 9])
    a = _assert_same_tokens(unrolled, scanned, prompts)  # shared prompts: two segments, B then 2B rows
    assert a.spike.sum() >= 3
    _assert_same_tokens(unrolled, scanned, prompts, _prompts(2, [20, 4, 9]))  # own prompts: 2B rows throughout
    np.testing.assert_allclose(scanned.next_token_distribution(prompts, model="expert"),
                               unrolled.next_token_distribution(prompts, model="expert"), atol=1e-5)
    expert_risk = risk.ExpertRisk(risk.opening_trie([(5,), (17, 40), (17, 99, 123)], VOCAB))
    for expert_prompts in (None, _prompts(2, [20, 4, 9])):  # the risk's pass over both cache layouts
        settings = DecodeSettings(mode="ngsd", max_new_tokens=4)
        np.testing.assert_allclose(scanned.decode(prompts, expert_prompts, settings, expert_risk=expert_risk).risk,
                                   unrolled.decode(prompts, expert_prompts, settings, expert_risk=expert_risk).risk,
                                   rtol=1e-4)
    # one weight stream: the paired decoder scans the base's stacked arrays themselves
    base_kernel = scanned.base_params["layers"]["layer"]["attn"]["k_proj"]["kernel"][...]
    assert scanned.paired_params["layers"]["layer"]["attn"]["k_proj"]["kernel"][...] is base_kernel
