"""The NGSD decision rule as pure, batched, jit-able functions (NGSD_SPEC.md sections 1-3).

Every function takes a leading batch axis B and a vocabulary axis V where it has one, and
computes in float32. Nothing branches on traced values, so the whole rule can sit inside
the decode loop's XLA program; only `k`, `top_k`, the divergence name and `min_common`
are static.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# The reference's floor for probabilities before a log or a division.
PROBABILITY_FLOOR = 1e-8


@dataclasses.dataclass(frozen=True)
class GateConfig:
    tau: float = 8.0
    threshold: float = 1.0
    v_reset: float = 0.0
    soft_reset: float = 0.6
    top_k: int = 64
    divergence: str = "tv"

    def __post_init__(self):
        problem = gate_problem(dataclasses.asdict(self))
        if problem:
            raise ValueError(problem)


def gate_problem(gate: dict, names: dict[str, str] | None = None) -> str | None:
    """What is wrong with gate settings (GateConfig's fields by name), in one line naming the
    setting as `names` spells it, or None."""
    name = lambda field: (names or {}).get(field, field)  # noqa: E731
    tau, threshold, soft_reset, v_reset = gate["tau"], gate["threshold"], gate["soft_reset"], gate["v_reset"]
    if not tau >= 1:  # also catches NaN
        return f"{name('tau')} must be >= 1, so that the leak 1 - 1/tau lies in [0, 1) (got {tau})"
    if not threshold > 0:
        return f"{name('threshold')} must be > 0, or the neuron fires at every step (got {threshold})"
    if not 0 <= soft_reset <= 1:
        return f"{name('soft_reset')} must lie in [0, 1], the fraction of potential kept (got {soft_reset})"
    if not v_reset < threshold:
        return (f"{name('v_reset')} must be below {name('threshold')}, or the neuron fires at every step "
                f"(got {v_reset} and {threshold})")
    if not gate["top_k"] >= 1:
        return f"{name('top_k')} must be >= 1 (got {gate['top_k']}); it is capped at the vocabulary size"
    if gate["divergence"] not in DIVERGENCES:
        return f"{name('divergence')} must be one of {', '.join(sorted(DIVERGENCES))} (got {gate['divergence']!r})"
    return None


def _finite_or_zero(p):
    # torch.nan_to_num would map inf to float max; the spec counts NaN and inf alike as 0.
    return jnp.nan_to_num(jnp.asarray(p, jnp.float32), nan=0.0, posinf=0.0, neginf=0.0)


def _floored_distribution(p):
    # Flooring before renormalising keeps both sides strictly positive and summing to 1,
    # so the logs are finite even for an all-NaN row.
    p = jnp.maximum(_finite_or_zero(p), PROBABILITY_FLOOR)
    return p / jnp.sum(p, axis=-1, keepdims=True)


def _kl(p, q):
    return jnp.sum(p * (jnp.log(p) - jnp.log(q)), axis=-1)


def total_variation(p_b, p_e):
    return 0.5 * jnp.sum(jnp.abs(_finite_or_zero(p_b) - _finite_or_zero(p_e)), axis=-1)


def kl_divergence(p_b, p_e):
    """KL(p_b || p_e) in nats."""
    return _kl(_floored_distribution(p_b), _floored_distribution(p_e))


def js_divergence(p_b, p_e):
    """Jensen-Shannon divergence in nats, bounded by ln 2."""
    p, q = _floored_distribution(p_b), _floored_distribution(p_e)
    midpoint = 0.5 * (p + q)
    return 0.5 * _kl(p, midpoint) + 0.5 * _kl(q, midpoint)


DIVERGENCES = {"tv": total_variation, "kl": kl_divergence, "js": js_divergence}


def divergence(name: str, p_b, p_e):
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}")
    return DIVERGENCES[name](p_b, p_e)


def lif_step(v, d, cfg: GateConfig):
    """One leaky integrate-and-fire update per sequence: returns (new potential, spike)."""
    v = (1.0 - 1.0 / cfg.tau) * jnp.asarray(v, jnp.float32) + jnp.asarray(d, jnp.float32)
    spike = v >= cfg.threshold
    # Soft reset: a spike keeps part of the charge, so sustained disagreement refires sooner.
    v = jnp.where(spike, cfg.v_reset + cfg.soft_reset * (v - cfg.v_reset), v)
    return v, spike


def _top_k_mask(p, k: int):
    # Indices, not a k-th-value threshold: ties select exactly k tokens, lowest index first,
    # as torch.topk does in the reference. A K past the vocabulary selects every token.
    _, indices = jax.lax.top_k(p, min(k, p.shape[-1]))
    rows = jnp.arange(p.shape[0])[:, None]
    return jnp.zeros(p.shape, bool).at[rows, indices].set(True)


def _per_sequence(alpha):
    # Accepts a scalar or one value per sequence; [B, 1] broadcasts over the vocabulary.
    return jnp.reshape(jnp.asarray(alpha, jnp.float32), (-1, 1))


def union_top_k_merge(p_b, p_e, alpha, k: int):
    """score = p_b, moved by alpha toward p_e on top-k(p_b) ∪ top-k(p_e) only."""
    p_b, p_e = jnp.asarray(p_b, jnp.float32), jnp.asarray(p_e, jnp.float32)
    candidates = _top_k_mask(p_b, k) | _top_k_mask(p_e, k)
    merged = p_b + _per_sequence(alpha) * (p_e - p_b)
    return jnp.where(candidates, merged, p_b)


def ngsd_scores(p_b, p_e, spike, alpha, k: int):
    """The merged scores where the neuron spiked, the base distribution untouched elsewhere."""
    merged = union_top_k_merge(p_b, p_e, alpha, k)
    return jnp.where(jnp.asarray(spike)[:, None], merged, jnp.asarray(p_b, jnp.float32))


def _ranks(p):
    # Rank 0 is the most probable token; a stable sort breaks ties by lowest index.
    return jnp.argsort(jnp.argsort(-p, axis=-1, stable=True), axis=-1)


def safedecoding_scores(p_b, p_e, alpha, min_common: int = 5):
    """SafeDecoding's distribution (Xu et al. 2024) over the smallest common top-k set.

    Verified against uw-nsl/SafeDecoding utils/safe_decoding.py (`safedecoding_lora`): the
    sample space is the intersection of top-k(base) and top-k(expert) for the smallest
    k >= min_common holding at least min_common tokens (so it may hold more); it steers
    probabilities, q = p_b + alpha * (p_e - p_b), floors q <= 0 to 1e-8, and takes a
    softmax of log q over that set, i.e. q / sum(q). Tokens outside the set score 0.
    """
    p_b, p_e = jnp.asarray(p_b, jnp.float32), jnp.asarray(p_e, jnp.float32)
    # A token is in the top-k of both models from k = max(rank_b, rank_e) + 1 on, so the
    # smallest k with min_common common tokens is the min_common-th smallest such k.
    entry_k = jnp.maximum(_ranks(p_b), _ranks(p_e)) + 1
    count = min(min_common, p_b.shape[-1])
    smallest_k = -jax.lax.top_k(-entry_k, count)[0][:, -1:]
    common = entry_k <= smallest_k
    steered = p_b + _per_sequence(alpha) * (p_e - p_b)
    steered = jnp.where(common, jnp.where(steered > 0, steered, PROBABILITY_FLOOR), 0.0)
    return steered / jnp.sum(steered, axis=-1, keepdims=True)


# Tokens ranked by top-k before the nucleus is looked for: a nucleus almost always lies within
# the few hundred most probable tokens, and a partial top-k is far cheaper than sorting the
# vocabulary. A row whose nucleus reaches past them falls back to the full sort.
NUCLEUS_CANDIDATES = 256


def _nucleus_keep(probabilities, descending, mass_before, top_p):
    """Keeps the most probable tokens until the mass before them reaches top_p; `descending`
    is a prefix of the probabilities sorted in descending order that covers the nucleus."""
    smallest_kept = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1, keepdims=True)
    # top_p >= 1 must keep every token even where the float cumulative sum overshoots 1.
    return (probabilities >= smallest_kept) | (top_p >= 1.0)


def _mass_before(descending):
    return jnp.cumsum(descending, axis=-1) - descending


def nucleus_filter(logits, top_p):
    """Sets to -inf every token outside the top-p nucleus of softmax(logits); top_p: [B, 1].

    The nucleus holds the most probable tokens until the mass before them reaches top_p.
    """
    probabilities = jax.nn.softmax(logits, axis=-1)
    top = jax.lax.top_k(probabilities, min(NUCLEUS_CANDIDATES, probabilities.shape[-1]))[0]
    top_mass_before = _mass_before(top)
    # The nucleus ends inside the candidates when the mass before the last one reaches top_p.
    covered = jnp.all((top_mass_before[:, -1:] >= top_p) | (top_p >= 1.0))

    def full_sort():
        descending = -jnp.sort(-probabilities, axis=-1)
        return _nucleus_keep(probabilities, descending, _mass_before(descending), top_p)

    keep = jax.lax.cond(covered, lambda: _nucleus_keep(probabilities, top, top_mass_before, top_p), full_sort)
    return jnp.where(keep, logits, -jnp.inf)


def choose_token(scores, key, temperature, top_k: int = 0, top_p=1.0):
    """Next token per sequence: argmax where temperature == 0, else a tempered nucleus sample.

    For sampling, scores are clipped at 0 and renormalised into a distribution first, so
    the NGSD merge (which can leave negative scores) and SafeDecoding share one path.
    top_k = 0 and top_p = 1.0 switch those filters off; top_p lies in (0, 1].
    """
    scores = jnp.asarray(scores, jnp.float32)
    batch = scores.shape[0]
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))[:, None]
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (batch,))[:, None]

    probabilities = jnp.clip(scores, 0.0)
    probabilities = probabilities / jnp.sum(probabilities, axis=-1, keepdims=True)
    # The greedy rows discard this branch; a dummy temperature of 1 keeps them free of NaN.
    logits = jnp.log(probabilities) / jnp.where(temperature > 0, temperature, 1.0)
    if top_k > 0:
        kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    logits = nucleus_filter(logits, top_p)

    sampled = jax.random.categorical(key, logits, axis=-1)
    greedy = jnp.argmax(scores, axis=-1)
    return jnp.where(temperature[:, 0] > 0, sampled, greedy).astype(jnp.int32)
