"""Work the decode loop must not do: a forward pass after the last token, SafeDecoding's merge
after its first m tokens, a full-vocabulary sort for a nucleus that the top-k prefilter
covers, a merge for a row that has finished."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ngsd_jax.checkpoints.weights import load_model
from ngsd_jax.decoding import gate, program
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.program import DecodeState
from ngsd_jax.decoding.settings import DecodeSettings

VOCAB = 256


@pytest.fixture(scope="module")
def pair(make_tiny_hf):
    return load_model(make_tiny_hf("llama")), load_model(make_tiny_hf("llama", seed=1))


def _counting(monkeypatch, module, name):
    """Replaces module.name with a wrapper that counts its executions inside the compiled loop."""
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        jax.debug.callback(lambda: calls.append(1))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _prompts(seed, lengths):
    rng = np.random.RandomState(seed)
    return [rng.randint(4, VOCAB, size=n).tolist() for n in lengths]


def test_no_forward_pass_after_the_last_token(pair, monkeypatch):
    base, expert = pair
    steps = _counting(monkeypatch, program, "step")
    prompt = _prompts(0, [7])
    free = Engine(base, expert, VOCAB, stop_ids=[]).decode(prompt, None, DecodeSettings(mode="base",
                                                                                        max_new_tokens=10))
    assert len(steps) == 9  # 10 tokens: the prefill's logits choose the first, 9 forwards the rest
    steps.clear()
    stop = free.sequence(0)[4]
    stopped = Engine(base, expert, VOCAB, stop_ids=[stop]).decode(prompt, None, DecodeSettings(
        mode="base", max_new_tokens=10))
    assert stopped.sequence(0) == free.sequence(0)[: free.sequence(0).index(stop) + 1]
    assert len(steps) == stopped.lengths[0] - 1  # none after the stop token
    steps.clear()
    Engine(base, expert, VOCAB, stop_ids=[]).decode(prompt, None, DecodeSettings(mode="ngsd", max_new_tokens=10))
    assert len(steps) == 2 * 9  # both models


def test_safedecoding_merges_only_during_its_first_m_tokens(pair, monkeypatch):
    base, expert = pair
    merges = _counting(monkeypatch, gate, "safedecoding_scores")
    result = Engine(base, expert, VOCAB, stop_ids=[]).decode(
        _prompts(1, [9, 5]), None, DecodeSettings(mode="safedecoding", max_new_tokens=8, safedecoding_first_m=3))
    assert result.tokens.shape == (2, 8)
    assert len(merges) == 3


def _full_sort_nucleus(logits, top_p):
    """The filter before the prefilter: a sort of the whole vocabulary."""
    probabilities = jax.nn.softmax(logits, axis=-1)
    descending = -jnp.sort(-probabilities, axis=-1)
    mass_before = jnp.cumsum(descending, axis=-1) - descending
    smallest_kept = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1, keepdims=True)
    keep = (probabilities >= smallest_kept) | (top_p >= 1.0)
    return jnp.where(keep, logits, -jnp.inf)


@pytest.mark.parametrize("sharpness", [8.0, 0.05])  # a nucleus inside the prefilter, and one far past it
def test_nucleus_from_the_prefilter_equals_the_full_sort(sharpness):
    logits = sharpness * jax.random.normal(jax.random.key(0), (4, 3000))
    top_p = jnp.asarray([[0.3], [0.9], [0.999], [1.0]])
    filtered = gate.nucleus_filter(logits, top_p)
    np.testing.assert_array_equal(np.isfinite(filtered), np.isfinite(_full_sort_nucleus(logits, top_p)))
    kept = np.isfinite(filtered).sum(axis=1)
    assert kept[-1] == 3000
    assert (kept[2] < gate.NUCLEUS_CANDIDATES) == (sharpness > 1)  # the two cases are the two paths
    scores = jax.nn.softmax(logits)
    normalised = jnp.log(scores / jnp.sum(scores, axis=-1, keepdims=True))  # as choose_token prepares them
    for seed in range(3):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(gate.choose_token(scores, key, 1.0, 0, top_p[:, 0]),
                                      jax.random.categorical(key, _full_sort_nucleus(normalised, top_p), axis=-1))


def test_a_finished_row_cannot_spike():
    base_logits = jnp.asarray([[9.0, 0.0, 0.0, 0.0]] * 2)
    expert_logits = jnp.asarray([[0.0, 9.0, 0.0, 0.0]] * 2)  # total disagreement: D near 1 in both rows
    state = DecodeState(step=jnp.int32(5), key=None, base_cache=None, expert_cache=None, base_len=None,
                        expert_len=None, base_logits=base_logits, expert_logits=expert_logits,
                        v=jnp.asarray([0.5, 0.5]), done=jnp.asarray([False, True]), tokens=None, trace_d=None,
                        trace_v=None, trace_spike=None, trace_alpha=None)
    settings = DecodeSettings(mode="ngsd", gate=gate.GateConfig(top_k=2))
    scores, _, _, spike, in_force = program.choose_scores(settings, state, jnp.asarray([0.9, 0.9]), None, None, 4)
    np.testing.assert_array_equal(spike, [True, False])
    np.testing.assert_allclose(in_force, [0.9, 0.0])
    assert int(jnp.argmax(scores[0])) == 1 and int(jnp.argmax(scores[1])) == 0
