"""The fused engine against independent oracles: a plain step-by-step reference loop written
from the spec (transformers forward over the whole sequence each step, no KV cache, numpy
math), transformers `generate`, and decoding each prompt alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ngsd_jax.checkpoints.weights import load_model
from ngsd_jax.decoding import risk
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.gate import GateConfig
from ngsd_jax.decoding.settings import DecodeSettings

VOCAB = 256
STOP = 3  # a token id treated as EOS in the tests that want early stops


def _tiny_llama(seed: int, init_range: float, tmp_path_factory, name: str):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=init_range,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return model, load_model(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base and an unrelated expert: sharp, disagreeing distributions, so the gate fires."""
    hf_base, base = _tiny_llama(0, 0.3, tmp_path_factory, "base")
    hf_expert, expert = _tiny_llama(1, 0.3, tmp_path_factory, "expert")
    return hf_base, base, hf_expert, expert


@pytest.fixture(scope="module")
def close_pair(tmp_path_factory, pair):
    """An expert that is the base slightly perturbed: it agrees, so the gate should never fire."""
    hf_base, base, _, _ = pair
    torch.manual_seed(5)
    hf_close = LlamaForCausalLM(hf_base.config).eval()
    hf_close.load_state_dict(hf_base.state_dict())
    with torch.no_grad():
        for p in hf_close.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("close")
    hf_close.save_pretrained(path)
    return hf_base, base, hf_close, load_model(path)


def _softmax(x):
    x = x.astype(np.float64) - x.max()
    e = np.exp(x)
    return e / e.sum()


def _top_k(p, k):
    return np.argsort(-p, kind="stable")[:k]


def reference_loop(hf_base, hf_expert, base_prompt, expert_prompt, steps, mode, alpha=0.5,
                   gate=GateConfig(), stop_ids=()):
    """Spec §1-3 literally: full recompute each step, float64 numpy math."""
    base_seq, expert_seq = list(base_prompt), list(expert_prompt)
    v, out, trace = gate.v_reset, [], []
    for step in range(steps):
        with torch.no_grad():
            p_b = _softmax(hf_base(torch.tensor([base_seq])).logits[0, -1].numpy())
            p_e = _softmax(hf_expert(torch.tensor([expert_seq])).logits[0, -1].numpy())
        d = 0.5 * np.abs(p_b - p_e).sum()
        spike = False
        if mode == "ngsd":
            v = (1 - 1 / gate.tau) * v + d
            spike = v >= gate.threshold
            if spike:
                v = gate.v_reset + gate.soft_reset * (v - gate.v_reset)
        score = p_b.copy()
        if spike or mode == "always":
            union = np.union1d(_top_k(p_b, gate.top_k), _top_k(p_e, gate.top_k))
            score[union] = p_b[union] + alpha * (p_e[union] - p_b[union])
        token = int(np.argmax(score))
        out.append(token)
        trace.append((d, v, spike))
        base_seq.append(token)
        expert_seq.append(token)
        if token in stop_ids:
            break
    return out, trace


def safedecoding_reference(hf_base, hf_expert, prompt, steps, first_m=2, alpha=3.0, min_common=5):
    """SafeDecoding as its authors' loop does it: grow k from min_common until top-k(base) and
    top-k(expert) share min_common tokens; steer probabilities on that set, floor at 1e-8,
    renormalise, take the argmax; after the first m tokens the base model decodes alone."""
    seq, out = list(prompt), []
    for step in range(steps):
        with torch.no_grad():
            p_b = _softmax(hf_base(torch.tensor([seq])).logits[0, -1].numpy())
            p_e = _softmax(hf_expert(torch.tensor([seq])).logits[0, -1].numpy())
        if step < first_m:
            k = min_common
            while True:
                common = set(_top_k(p_b, k).tolist()) & set(_top_k(p_e, k).tolist())
                if len(common) >= min_common:
                    break
                k += 1
            ids = sorted(common)
            q = np.array([p_b[i] + alpha * (p_e[i] - p_b[i]) for i in ids])
            q = np.where(q > 0, q, 1e-8)
            token = ids[int(np.argmax(q / q.sum()))]
        else:
            token = int(np.argmax(p_b))
        out.append(token)
        seq.append(token)
    return out


def _prompts(seed, lengths):
    rng = np.random.RandomState(seed)
    return [rng.randint(4, VOCAB, size=n).tolist() for n in lengths]


def test_ngsd_greedy_equals_reference_loop_with_gate_firing(pair):
    hf_base, base, hf_expert, expert = pair
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    base_prompt, expert_prompt = _prompts(0, [9, 13])
    result = engine.decode([base_prompt], [expert_prompt], DecodeSettings(mode="ngsd", max_new_tokens=64), alpha=0.9)
    ref, trace = reference_loop(hf_base, hf_expert, base_prompt, expert_prompt, 64, "ngsd", alpha=0.9)
    spikes = sum(s for _, _, s in trace)
    assert spikes >= 3, "the test pair must make the gate fire several times"
    # the merge must actually change some choices, or this test would not tell ngsd from base
    base_only, _ = reference_loop(hf_base, hf_expert, base_prompt, expert_prompt, 64, "base")
    assert ref != base_only
    assert result.sequence(0) == ref
    np.testing.assert_allclose(result.divergence[0], [d for d, _, _ in trace], atol=1e-5)
    np.testing.assert_allclose(result.potential[0], [v for _, v, _ in trace], atol=1e-4)
    np.testing.assert_array_equal(result.spike[0], [s for _, _, s in trace])
    np.testing.assert_allclose(result.alpha_in_force[0], [0.9 if s else 0.0 for _, _, s in trace])


def test_ngsd_gate_never_fires_for_agreeing_expert(close_pair):
    hf_base, base, hf_close, close = close_pair
    engine = Engine(base, close, vocab_size=VOCAB, stop_ids=[])
    prompt = _prompts(1, [12])[0]
    result = engine.decode([prompt], None, DecodeSettings(mode="ngsd", max_new_tokens=64), alpha=0.9)
    ref, trace = reference_loop(hf_base, hf_close, prompt, prompt, 64, "ngsd", alpha=0.9)
    assert not any(s for _, _, s in trace)
    assert not result.spike.any()
    assert result.sequence(0) == ref


def test_always_mode_equals_reference_loop(pair):
    hf_base, base, hf_expert, expert = pair
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    prompt = _prompts(2, [10])[0]
    result = engine.decode([prompt], None, DecodeSettings(mode="always", max_new_tokens=32), alpha=0.5)
    ref, _ = reference_loop(hf_base, hf_expert, prompt, prompt, 32, "always", alpha=0.5)
    assert result.sequence(0) == ref


def test_safedecoding_mode_equals_reference_loop(pair):
    hf_base, base, hf_expert, expert = pair
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    for seed in (12, 13, 14):
        prompt = _prompts(seed, [10])[0]
        result = engine.decode([prompt], None, DecodeSettings(mode="safedecoding", max_new_tokens=12))
        ref = safedecoding_reference(hf_base, hf_expert, prompt, 12)
        assert result.sequence(0) == ref
    # the steering must matter on this pair, or the test could not tell it from base mode
    firsts = [safedecoding_reference(hf_base, hf_expert, _prompts(s, [10])[0], 1)[0] for s in (12, 13, 14)]
    bases = [reference_loop(hf_base, hf_expert, _prompts(s, [10])[0], _prompts(s, [10])[0], 1, "base")[0][0]
             for s in (12, 13, 14)]
    assert firsts != bases


@pytest.mark.parametrize("mode", ["base", "expert"])
def test_single_model_modes_equal_transformers_generate(pair, mode):
    hf_base, base, hf_expert, expert = pair
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    prompt = _prompts(3, [11])[0]
    hf = hf_base if mode == "base" else hf_expert
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40, min_new_tokens=40,
                               pad_token_id=0)[0, len(prompt):].tolist()
    result = engine.decode([prompt], None, DecodeSettings(mode=mode, max_new_tokens=40))
    assert result.sequence(0) == expected


@pytest.mark.parametrize("mode", ["ngsd", "base", "always"])
def test_batch_equals_one_by_one(pair, mode):
    _, base, _, expert = pair
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[STOP])
    # The longest prompts put the batch in the 32-token bucket (batch 4); alone, each of the
    # others decodes in the 16-token bucket, the 16-token ones with no padding at all, so
    # padding that leaks into attention or the last-position pick cannot affect both alike.
    prompts = _prompts(4, [5, 16, 9, 30])
    expert_prompts = _prompts(5, [16, 3, 12, 27])
    settings = DecodeSettings(mode=mode, max_new_tokens=24)
    alphas = [0.1, 0.9, 0.5, 0.9]
    batched = engine.decode(prompts, expert_prompts, settings, alpha=alphas)
    for i in range(3):
        alone = engine.decode([prompts[i]], [expert_prompts[i]], settings, alpha=alphas[i])
        assert batched.sequence(i) == alone.sequence(0)
        np.testing.assert_allclose(batched.potential[i], alone.potential[0], atol=1e-5)


def test_stop_token_ends_a_sequence_early(pair):
    hf_base, base, hf_expert, expert = pair
    prompt = _prompts(6, [8])[0]
    free, _ = reference_loop(hf_base, hf_expert, prompt, prompt, 16, "base")
    stop = free[5]
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[stop])
    result = engine.decode([prompt], None, DecodeSettings(mode="base", max_new_tokens=16))
    first = free.index(stop)
    assert result.lengths[0] == first + 1
    assert result.sequence(0) == free[: first + 1]
    assert (result.tokens[0, first + 1:] == engine.pad_id).all()


def test_new_prompt_in_seen_bucket_compiles_nothing(pair):
    _, base, _, expert = pair
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    settings = DecodeSettings(mode="ngsd", max_new_tokens=8)
    engine.decode(_prompts(7, [10]), None, settings)
    assert engine.compilations == 1
    engine.decode(_prompts(8, [13]), None, settings, alpha=0.9, seed=3)  # same 16-token bucket, batch 1
    assert engine.compilations == 1
    engine.decode(_prompts(9, [20]), None, settings)  # the 24-token bucket: one more program
    assert engine.compilations == 2


def test_sampling_is_seeded_and_differs_from_greedy(pair):
    _, base, _, expert = pair
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    prompt = _prompts(10, [10])
    settings = DecodeSettings(mode="ngsd", max_new_tokens=32)
    a = engine.decode(prompt, None, settings, temperature=1.0, seed=11).sequence(0)
    b = engine.decode(prompt, None, settings, temperature=1.0, seed=11).sequence(0)
    c = engine.decode(prompt, None, settings, temperature=1.0, seed=12).sequence(0)
    greedy = engine.decode(prompt, None, settings).sequence(0)
    assert a == b
    assert a != c  # another seed, another sample
    assert a != greedy and c != greedy  # temperature 1 samples rather than taking the argmax


def test_per_prompt_settings_are_checked_at_the_boundary(pair):
    _, base, _, expert = pair
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    prompts, settings = _prompts(12, [6, 7]), DecodeSettings(mode="ngsd", max_new_tokens=4)
    with pytest.raises(AssertionError, match=r"alpha: give a scalar or one value per prompt"):
        engine.decode(prompts, None, settings, alpha=[0.1, 0.5, 0.9])
    with pytest.raises(AssertionError, match=r"temperature must be finite"):
        engine.decode(prompts, None, settings, temperature=[1.0, float("nan")])
    with pytest.raises(AssertionError, match=r"alpha must be finite"):
        engine.decode(prompts, None, settings, alpha=float("nan"))


def test_padded_vocabulary_rows_are_never_chosen(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, initializer_range=0.3)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # make the padded rows the most likely tokens
        hf.lm_head.weight[200:] = 50 * hf.lm_head.weight[200:].sign()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    engine = Engine(model, model, vocab_size=200, stop_ids=[])
    result = engine.decode(_prompts(11, [6]), None, DecodeSettings(mode="ngsd", max_new_tokens=16))
    assert (result.tokens < 200).all()


OPENINGS = [(5,), (17, 40), (17, 99, 123), (17, 99, 7), (200, 201, 250, 9)]


def _opening_risk(hf_model, prompt, openings=OPENINGS) -> float:
    """10 x P(the answer opens with one of `openings`), each the product of its tokens'
    probabilities, from transformers over prompt + the opening's earlier tokens (no cache)."""
    total = 0.0
    with torch.no_grad():
        for seq in openings:
            for d, token in enumerate(seq):
                if d == 0:
                    prob = 1.0
                logits = hf_model(torch.tensor([prompt + list(seq[:d])])).logits[0, -1].numpy()
                prob *= _softmax(logits)[token]
            total += prob
    return 10.0 * total


def test_alpha_from_expert_prefill_equals_reference_computed_outside(pair):
    """--reflect expert: the risk read inside the program (the expert's probability of opening
    with a whole refusal opening) must equal the same probability computed outside with
    transformers, alpha its mapping, and the decode then the reference loop at that alpha."""
    hf_base, base, hf_expert, expert = pair
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    prompts = _prompts(3, [7, 11, 5, 9])
    trie = risk.opening_trie(OPENINGS, VOCAB)
    risks = [_opening_risk(hf_expert, p) for p in prompts]
    # Thresholds between the risks, so that the batch spans all three alpha levels.
    ordered = sorted(risks)
    mapping = risk.AlphaMapping(levels=(0.0, 0.4, 0.95),
                                thresholds=((ordered[0] + ordered[1]) / 2, (ordered[2] + ordered[3]) / 2))
    expected_alpha = [risk.alpha_from_risk(r, mapping) for r in risks]
    assert len(set(expected_alpha)) == 3
    settings = DecodeSettings(mode="ngsd", max_new_tokens=24)
    result = engine.decode(prompts, None, settings, alpha=0.5, expert_risk=risk.ExpertRisk(trie, mapping))
    np.testing.assert_allclose(result.risk, risks, rtol=1e-4)
    np.testing.assert_allclose(result.alpha, expected_alpha)
    for i, prompt in enumerate(prompts):
        ref, trace = reference_loop(hf_base, hf_expert, prompt, prompt, 24, "ngsd", alpha=expected_alpha[i])
        assert result.sequence(i) == ref
        np.testing.assert_allclose(result.alpha_in_force[i], [expected_alpha[i] if s else 0.0 for _, _, s in trace])
    # The passed alpha is ignored, and without expert_risk the program uses it and reports no risk.
    fixed = engine.decode(prompts, None, settings, alpha=0.5)
    assert fixed.risk is None and fixed.alpha.tolist() == [0.5] * 4


def test_a_forced_answer_start_does_not_set_the_risk(pair):
    """A prefilling attacker's tokens come after the prompt: the risk read with `risk_lengths` at
    the prompt's end equals the risk of the prompt alone, whatever was forced."""
    _, base, hf_expert, expert = pair
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    prompts = _prompts(5, [6, 9, 4])
    forced = _prompts(6, [3, 8, 1])
    expert_risk = risk.ExpertRisk(risk.opening_trie(OPENINGS, VOCAB))
    settings = DecodeSettings(mode="ngsd", max_new_tokens=4)
    alone = engine.decode(prompts, None, settings, expert_risk=expert_risk)
    attacked = engine.decode([p + f for p, f in zip(prompts, forced)], None, settings, expert_risk=expert_risk,
                             risk_lengths=[len(p) for p in prompts])
    np.testing.assert_allclose(attacked.risk, alone.risk, rtol=1e-5)
    np.testing.assert_allclose(alone.risk, [_opening_risk(hf_expert, p) for p in prompts], rtol=1e-4)
    # Read at the end of the forced text instead, the risk is another one: the forced tokens would set it.
    unguarded = engine.decode([p + f for p, f in zip(prompts, forced)], None, settings, expert_risk=expert_risk)
    assert not np.allclose(unguarded.risk, alone.risk, rtol=1e-3)
