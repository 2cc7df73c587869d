"""The NGSD rule checked against hand-worked values and plain-numpy transcriptions of the spec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ngsd_jax.decoding import gate
from ngsd_jax.decoding.gate import GateConfig

RNG = np.random.default_rng(0)


def random_distributions(batch, vocab):
    return RNG.dirichlet(np.full(vocab, 0.3), size=batch).astype(np.float32)


def numpy_floored(p):
    p = np.nan_to_num(np.asarray(p, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    p = np.maximum(p, 1e-8)
    return p / p.sum(-1, keepdims=True)


def numpy_kl(p, q):
    return np.sum(p * np.log(p / q), axis=-1)


# --- divergences -----------------------------------------------------------------------


def test_total_variation_matches_half_l1_and_is_bounded():
    p_b, p_e = random_distributions(16, 50), random_distributions(16, 50)
    d = np.asarray(gate.total_variation(p_b, p_e))
    np.testing.assert_allclose(d, 0.5 * np.abs(p_b - p_e).sum(-1), rtol=1e-5)
    assert np.all((d >= 0) & (d <= 1 + 1e-6))
    disjoint = gate.total_variation(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    np.testing.assert_allclose(disjoint, [1.0])


def test_nan_and_inf_entries_count_as_zero():
    p_b = np.array([[0.5, np.nan, 0.5, 0.0]], np.float32)
    p_e = np.array([[0.25, 0.25, np.inf, 0.5]], np.float32)
    cleaned_b = np.array([[0.5, 0.0, 0.5, 0.0]])
    cleaned_e = np.array([[0.25, 0.25, 0.0, 0.5]])
    np.testing.assert_allclose(gate.total_variation(p_b, p_e), [0.75], rtol=1e-6)  # 0.5 * (0.25 + 0.25 + 0.5 + 0.5)
    np.testing.assert_allclose(
        gate.kl_divergence(p_b, p_e), numpy_kl(numpy_floored(cleaned_b), numpy_floored(cleaned_e)), rtol=1e-4
    )
    assert np.all(np.isfinite(gate.js_divergence(p_b, p_e)))


def test_kl_and_js_match_numpy_with_floor():
    p_b, p_e = random_distributions(8, 40), random_distributions(8, 40)
    p_e[:, :5] = 0.0  # exercises the 1e-8 floor on the denominator
    p, q = numpy_floored(p_b), numpy_floored(p_e)
    m = 0.5 * (p + q)
    np.testing.assert_allclose(gate.kl_divergence(p_b, p_e), numpy_kl(p, q), rtol=1e-4)
    np.testing.assert_allclose(gate.js_divergence(p_b, p_e), 0.5 * numpy_kl(p, m) + 0.5 * numpy_kl(q, m), rtol=1e-4)
    assert np.all(np.asarray(gate.js_divergence(p_b, p_e)) <= np.log(2) + 1e-6)


@pytest.mark.parametrize("name", ["tv", "kl", "js"])
def test_identical_distributions_have_zero_divergence(name):
    p = random_distributions(4, 30)
    np.testing.assert_allclose(gate.divergence(name, p, p), np.zeros(4), atol=1e-6)


def test_divergence_dispatch_and_unknown_name():
    p_b, p_e = random_distributions(3, 10), random_distributions(3, 10)
    np.testing.assert_array_equal(gate.divergence("js", p_b, p_e), gate.js_divergence(p_b, p_e))
    with pytest.raises(ValueError, match="'js', 'kl', 'tv'"):
        gate.divergence("hellinger", p_b, p_e)


# --- the neuron ------------------------------------------------------------------------


def run_lif(d_sequence, cfg=GateConfig()):
    step = jax.jit(lambda v, d: gate.lif_step(v, d, cfg))
    v = jnp.full((1,), cfg.v_reset, jnp.float32)
    potentials, spikes = [], []
    for d in d_sequence:
        v, spike = step(v, jnp.array([d], jnp.float32))
        potentials.append(float(v[0]))
        spikes.append(bool(spike[0]))
    return potentials, spikes


def test_single_large_disagreement_does_not_fire():
    potentials, spikes = run_lif([0.9, 0.0, 0.0])
    assert spikes == [False, False, False]
    assert potentials[0] == pytest.approx(0.9)
    assert potentials[1] == pytest.approx(0.9 * 0.875)


def test_sustained_disagreement_fires_at_the_hand_computed_step():
    # v_n = 0.2 * (1 - 0.875**n) / (1/8): v_7 = 0.972 < 1 <= v_8 = 1.050, so step 8 fires.
    potentials, spikes = run_lif([0.2] * 8)
    assert spikes == [False] * 7 + [True]
    pre_reset = np.float32(0.875) * np.float32(potentials[6]) + np.float32(0.2)
    assert pre_reset == pytest.approx(1.6 * (1 - 0.875**8), rel=1e-6)
    assert potentials[7] == np.float32(0.6) * pre_reset  # soft reset keeps rho * v exactly


def test_weak_disagreement_never_fires():
    potentials, spikes = run_lif([0.1] * 200)
    assert not any(spikes)
    assert potentials[-1] == pytest.approx(0.8, abs=1e-5)  # steady state tau * D


def test_lif_is_elementwise_over_the_batch():
    v, spike = gate.lif_step(jnp.array([0.0, 1.0, 0.5]), jnp.array([0.9, 0.2, 0.0]), GateConfig())
    np.testing.assert_array_equal(spike, [False, True, False])
    np.testing.assert_allclose(v, [0.9, 0.6 * (0.875 + 0.2), 0.5 * 0.875], rtol=1e-6)


# --- union top-K merge -----------------------------------------------------------------

# top-2(p_b) = {0, 1}, top-2(p_e) = {4, 5}; tokens 2 and 3 lie outside the union.
P_B = np.array([0.40, 0.30, 0.10, 0.10, 0.06, 0.04], np.float32)
P_E = np.array([0.05, 0.05, 0.01, 0.14, 0.60, 0.15], np.float32)
UNION = np.array([True, True, False, False, True, True])


def test_union_merge_by_hand():
    scores = np.asarray(gate.union_top_k_merge(P_B[None], P_E[None], jnp.array([0.9]), k=2))[0]
    expected = [0.40 - 0.9 * 0.35, 0.30 - 0.9 * 0.25, 0.10, 0.10, 0.06 + 0.9 * 0.54, 0.04 + 0.9 * 0.11]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    np.testing.assert_array_equal(scores[~UNION], P_B[~UNION])
    assert scores.argmax() == 4 and P_B.argmax() == 0


def test_union_merge_alpha_extremes_per_sequence():
    scores = np.asarray(gate.union_top_k_merge(np.stack([P_B, P_B]), np.stack([P_E, P_E]), jnp.array([0.0, 1.0]), k=2))
    np.testing.assert_array_equal(scores[0], P_B)
    np.testing.assert_allclose(scores[1, UNION], P_E[UNION], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(scores[1, ~UNION], P_B[~UNION])


def test_union_merge_selects_exactly_k_under_ties():
    # Four tied tokens: top-2 must take the two lowest indices, as torch.topk does.
    p_b = np.array([[0.2, 0.2, 0.2, 0.2, 0.1, 0.1]], np.float32)
    p_e = np.array([[0.0, 0.0, 0.0, 0.0, 0.5, 0.5]], np.float32)
    scores = np.asarray(gate.union_top_k_merge(p_b, p_e, 1.0, k=2))[0]
    np.testing.assert_allclose(scores, [0.0, 0.0, 0.2, 0.2, 0.5, 0.5], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(scores[2:4], p_b[0, 2:4])


# Worked by hand from P_B and P_E: on the union {0, 1, 4, 5}, p_b + alpha * (p_e - p_b).
MERGED_BY_HAND = {
    0.5: [0.40 - 0.5 * 0.35, 0.30 - 0.5 * 0.25, 0.10, 0.10, 0.06 + 0.5 * 0.54, 0.04 + 0.5 * 0.11],
    0.9: [0.40 - 0.9 * 0.35, 0.30 - 0.9 * 0.25, 0.10, 0.10, 0.06 + 0.9 * 0.54, 0.04 + 0.9 * 0.11],
}


def test_ngsd_scores_follow_the_spike():
    p_b, p_e = np.stack([P_B] * 3), np.stack([P_E] * 3)
    scores = np.asarray(gate.ngsd_scores(p_b, p_e, jnp.array([False, True, True]), jnp.array([0.9, 0.5, 0.9]), k=2))
    np.testing.assert_array_equal(scores[0], P_B)
    np.testing.assert_allclose(scores[1], MERGED_BY_HAND[0.5], rtol=1e-6)
    np.testing.assert_allclose(scores[2], MERGED_BY_HAND[0.9], rtol=1e-6)


# --- SafeDecoding ----------------------------------------------------------------------

# Base order 0,1,...,7; expert order 3,5,0,7,1,2,4,6. top-4 share {0, 3}; top-5 share {0, 1, 3};
# top-6 share {0, 1, 2, 3, 5} (two tokens enter at once).
SD_B = np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.06, 0.04, 0.03], np.float32)
SD_E = np.array([0.15, 0.08, 0.05, 0.35, 0.04, 0.20, 0.03, 0.10], np.float32)


def reference_safedecoding(p_b, p_e, alpha, num_common_tokens):
    """A line-by-line numpy port of utils/safe_decoding.py from uw-nsl/SafeDecoding."""
    sorted_b, sorted_e = np.argsort(-p_b, kind="stable"), np.argsort(-p_e, kind="stable")
    common, iter_range = set(), num_common_tokens
    while len(common) < num_common_tokens:
        common.update(set(sorted_b[:iter_range].tolist()) & set(sorted_e[:iter_range].tolist()))
        iter_range += 1
        if iter_range > len(p_b):
            break
    tokens = sorted(common)
    updated = [p_b[t] + alpha * (p_e[t] - p_b[t]) for t in tokens]
    updated = np.log([u if u > 0 else 1e-8 for u in updated])
    normalized = np.exp(updated - updated.max()) / np.exp(updated - updated.max()).sum()
    scores = np.zeros_like(p_b, dtype=np.float64)
    scores[tokens] = normalized
    return scores


def test_safedecoding_smallest_k_by_hand():
    scores = np.asarray(gate.safedecoding_scores(SD_B[None], SD_E[None], jnp.array([0.5]), min_common=3))[0]
    steered = {0: 0.225, 1: 0.14, 3: 0.235}
    expected = np.zeros(8)
    for token, q in steered.items():
        expected[token] = q / 0.6
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert scores.argmax() == 3

    wider = np.asarray(gate.safedecoding_scores(SD_B[None], SD_E[None], 0.5, min_common=4))[0]
    np.testing.assert_array_equal(np.flatnonzero(wider), [0, 1, 2, 3, 5])


def test_safedecoding_floors_negative_steered_probabilities():
    scores = np.asarray(gate.safedecoding_scores(SD_B[None], SD_E[None], 3.0, min_common=3))[0]
    # q_0 = 0.3 - 3 * 0.15 < 0 and q_1 = 0.2 - 3 * 0.12 < 0 are floored at 1e-8; q_3 = 0.81.
    np.testing.assert_allclose(scores[[0, 1]], 1e-8 / 0.81, rtol=1e-3)
    assert scores[3] == pytest.approx(1.0, abs=1e-6)


def test_safedecoding_matches_the_reference_loop():
    p_b, p_e = random_distributions(6, 40), random_distributions(6, 40)
    alphas = np.array([0.0, 0.5, 1.0, 3.0, 3.0, 0.9], np.float32)
    scores = np.asarray(gate.safedecoding_scores(p_b, p_e, alphas, min_common=5))
    for row in range(6):
        expected = reference_safedecoding(p_b[row], p_e[row], alphas[row], 5)
        np.testing.assert_allclose(scores[row], expected, rtol=1e-4, atol=1e-9)


def test_compiled_scores_with_traced_alpha_and_spike_per_row():
    # One program for every row: alpha and spike are traced arrays, not constants folded in,
    # so each row must still get its own alpha and its own gate.
    p_b, p_e = np.stack([P_B] * 3), np.stack([P_E] * 3)
    ngsd_jit = jax.jit(gate.ngsd_scores, static_argnames="k")
    scores = np.asarray(ngsd_jit(p_b, p_e, jnp.array([True, False, True]), jnp.array([0.5, 0.9, 0.9]), k=2))
    # Compiled code may fuse p_b + alpha * (p_e - p_b) into an FMA: equal up to an ulp.
    np.testing.assert_allclose(scores, [MERGED_BY_HAND[0.5], P_B, MERGED_BY_HAND[0.9]], rtol=1e-6)

    safe_jit = jax.jit(gate.safedecoding_scores, static_argnames="min_common")
    alphas = np.array([0.5, 3.0], np.float32)
    steered = np.asarray(safe_jit(np.stack([SD_B] * 2), np.stack([SD_E] * 2), jnp.asarray(alphas), min_common=3))
    for row, alpha in enumerate(alphas):
        np.testing.assert_allclose(steered[row], reference_safedecoding(SD_B, SD_E, alpha, 3), rtol=1e-4, atol=1e-9)


# --- token choice ----------------------------------------------------------------------

choose_jit = jax.jit(gate.choose_token, static_argnames="top_k")


def test_greedy_is_argmax_with_lowest_index_on_ties():
    scores = np.array([[0.1, 0.4, 0.4, 0.1], [-0.2, -0.1, 0.05, 0.05], [0.3, 0.1, 0.3, 0.3]], np.float32)
    tokens = choose_jit(scores, jax.random.key(0), 0.0)
    np.testing.assert_array_equal(tokens, np.argmax(scores, axis=-1))
    np.testing.assert_array_equal(tokens, [1, 2, 0])


# Token 4 is negative and 5 is zero: clipped away. Nucleus for top_p = 0.85 is {0, 1, 2}
# (mass before token 2 is 0.8 < 0.85, before token 3 it is 0.95).
SAMPLE_SCORES = np.array([0.5, 0.3, 0.15, 0.05, -0.1, 0.0], np.float32)


def sample_many(temperature, top_k, top_p, draws=400):
    keys = jax.random.split(jax.random.key(1), draws)
    batch = np.stack([SAMPLE_SCORES, SAMPLE_SCORES])
    choose = jax.vmap(lambda key: choose_jit(batch, key, temperature, top_k, top_p))
    return np.asarray(choose(keys))


def test_sampling_is_deterministic_for_a_key():
    scores = np.stack([SAMPLE_SCORES] * 8)
    first = choose_jit(scores, jax.random.key(7), 1.0)
    np.testing.assert_array_equal(first, choose_jit(scores, jax.random.key(7), 1.0))


def test_sampling_only_picks_positive_scores():
    tokens = sample_many(1.0, 0, 1.0)
    assert set(np.unique(tokens)) == {0, 1, 2, 3}


def test_sampling_stays_in_the_nucleus():
    tokens = sample_many(1.0, 0, 0.85)
    assert set(np.unique(tokens)) == {0, 1, 2}


def test_sampling_respects_top_k():
    tokens = sample_many(1.0, 2, 1.0)
    assert set(np.unique(tokens)) == {0, 1}


def test_temperature_is_per_sequence_and_traced():
    tokens = sample_many(jnp.array([0.0, 1.0]), 0, jnp.array([1.0, 1.0]))
    assert set(np.unique(tokens[:, 0])) == {0}
    assert len(np.unique(tokens[:, 1])) > 1


def test_top_p_of_one_keeps_tokens_below_float_resolution():
    # In float32 the mass before token 1 rounds to exactly 1.0, yet top_p = 1.0 means no filter.
    logits = jnp.log(jnp.array([[1.0, 1e-9, 0.0]], jnp.float32))
    kept = np.isfinite(gate.nucleus_filter(logits, jnp.array([[1.0]])))
    np.testing.assert_array_equal(kept, [[True, True, False]])
    np.testing.assert_array_equal(np.isfinite(gate.nucleus_filter(logits, jnp.array([[0.5]]))), [[True, False, False]])


def test_low_temperature_sharpens_toward_argmax():
    hot, cold = sample_many(2.0, 0, 1.0), sample_many(0.05, 0, 1.0)
    assert np.mean(cold == 0) > 0.99
    assert np.mean(hot == 0) < np.mean(sample_many(1.0, 0, 1.0) == 0)
