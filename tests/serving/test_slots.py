"""The slot engine against `Engine.decode`: a request's greedy tokens and gate trace are those
of decoding it alone, whatever step it joins at, whatever shares the batch, whichever slot
(fresh or reused) it lands in; and no program is compiled after warm-up."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ngsd_jax.checkpoints.weights import load_model
from ngsd_jax.decoding import risk
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.gate import GateConfig
from ngsd_jax.decoding.settings import DecodeSettings
from ngsd_jax.serving.slots import ServingError, SlotConfig, SlotEngine, SlotRequest

VOCAB = 256
# Refusal openings as token sequences (some sharing a first token), for --reflect expert.
OPENINGS = [(5,), (17, 40), (17, 99, 123), (17, 99, 7), (200, 201, 250, 9)]


@pytest.fixture(scope="module")
def models(make_tiny_hf):
    # Two unrelated random models: sharp, disagreeing distributions, so the gate fires often.
    return load_model(make_tiny_hf("llama", seed=0)), load_model(make_tiny_hf("llama", seed=1))


def _prompts(seed, lengths):
    rng = np.random.RandomState(seed)
    return [rng.randint(4, VOCAB, size=n).tolist() for n in lengths]


def drive(slots: SlotEngine, schedule):
    """Runs (join_chunk, request) pairs: a request is prefilled and inserted into the first free
    slot once `join_chunk` generate calls have run (or later, when no slot is free). Returns, per
    request, its tokens and trace, and the slot it ran in."""
    pending = sorted(enumerate(schedule), key=lambda item: item[1][0])
    results = {i: {"tokens": [], "divergence": [], "potential": [], "spike": [], "alpha": []} for i in range(len(schedule))}
    owner, calls = {}, 0
    while pending or slots.active.any():
        while pending and pending[0][1][0] <= calls and slots.free_slots:
            index, (_, request) = pending.pop(0)
            inserted = slots.insert(slots.prefill(request), slots.free_slots[0], request)
            owner[inserted.slot] = index
            results[index].update(slot=inserted.slot, row_alpha=inserted.alpha, risk=inserted.risk)
        chunk = slots.generate()
        calls += 1
        for slot, index in list(owner.items()):
            valid = chunk.valid[slot]
            results[index]["tokens"] += chunk.tokens[slot, valid].tolist()
            for name in ("divergence", "potential", "spike", "alpha"):
                results[index][name] += getattr(chunk, name)[slot, valid].tolist()
            if chunk.done[slot]:
                del owner[slot]
    return results


def _alone(engine, request: SlotRequest, expert_risk=None):
    gate = GateConfig(**{k: getattr(request, k) for k in ("tau", "threshold", "soft_reset", "v_reset")
                         if getattr(request, k) is not None})
    settings = DecodeSettings(mode="ngsd" if request.steer else "base", max_new_tokens=request.max_tokens, gate=gate)
    risk_lengths = None if expert_risk is None or request.risk_length is None else [request.risk_length]
    return engine.decode([request.base_prompt], [request.expert_prompt or request.base_prompt], settings,
                         alpha=0.5 if request.alpha is None else request.alpha, expert_risk=expert_risk,
                         risk_lengths=risk_lengths)


def _assert_same_as_alone(engine, got, request, expert_risk=None):
    alone = _alone(engine, request, expert_risk)
    n = int(alone.lengths[0])
    assert got["tokens"] == alone.sequence(0)
    np.testing.assert_allclose(got["divergence"], alone.divergence[0, :n], atol=1e-5)
    np.testing.assert_allclose(got["potential"], alone.potential[0, :n], atol=1e-4)
    assert got["spike"] == alone.spike[0, :n].tolist()
    np.testing.assert_allclose(got["alpha"], alone.alpha_in_force[0, :n], atol=1e-6)
    return alone


def test_greedy_equals_decode_alone_whatever_the_join_step(models):
    base, expert = models
    # A stop token that the base-mode request below emits early, so rows also end by stopping.
    free = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    prompts = _prompts(0, [9, 5, 14, 21, 7, 30])
    expert_prompts = _prompts(1, [12, 5, 9, 17, 3, 11])
    stop = free.decode([prompts[2]], None, DecodeSettings(mode="base", max_new_tokens=8)).sequence(0)[5]
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[stop])
    slots = SlotEngine(engine, SlotConfig(slots=3, context=96, chunk=4))
    requests = [
        (0, SlotRequest(prompts[0], expert_prompts[0], max_tokens=20, alpha=0.9)),
        (1, SlotRequest(prompts[1], expert_prompts[1], max_tokens=9, alpha=0.1)),
        # Mode base, stops at its 6th token; a low threshold that a base row must ignore.
        (1, SlotRequest(prompts[2], None, max_tokens=8, steer=False, threshold=0.3, alpha=0.9)),
        (3, SlotRequest(prompts[3], expert_prompts[3], max_tokens=13, alpha=0.9, tau=4.0, threshold=1.5,
                        soft_reset=0.3)),
        # Joins a slot that an ngsd request left with a charged neuron.
        (4, SlotRequest(prompts[4], expert_prompts[4], max_tokens=17, alpha=0.9)),
        (5, SlotRequest(prompts[5], expert_prompts[5], max_tokens=11, alpha=0.5)),
    ]
    results = drive(slots, requests)
    assert len({r["slot"] for r in results.values()}) == 3  # slots were reused
    for i, (_, request) in enumerate(requests):
        alone = _assert_same_as_alone(engine, results[i], request)
        if i == 2:
            assert alone.lengths[0] == 6 and results[i]["tokens"][-1] == stop
    assert sum(sum(r["spike"]) for r in results.values()) >= 5, "the gate must fire for this test to mean much"


def _check_alpha_from_the_expert(engine, slots_config, prompts, expert_prompts=None):
    """Each request's risk and alpha read from its own prefill equal Engine.decode's (the
    whole-opening risk at the prompt's end), and so do its tokens."""
    expert_prompts = expert_prompts or [None] * len(prompts)
    trie = risk.opening_trie(OPENINGS, VOCAB)
    # Thresholds between the risks, so that the requests span the alpha levels.
    risks = sorted(engine.decode(prompts, [e or p for p, e in zip(prompts, expert_prompts)],
                                 DecodeSettings(max_new_tokens=1), expert_risk=risk.ExpertRisk(trie)).risk)
    mapping = risk.AlphaMapping((0.0, 0.4, 0.95), ((risks[0] + risks[1]) / 2, (risks[2] + risks[3]) / 2))
    expert_risk = risk.ExpertRisk(trie, mapping)
    slots = SlotEngine(engine, slots_config, expert_risk=expert_risk)
    requests = [(i, SlotRequest(p, e, max_tokens=12)) for i, (p, e) in enumerate(zip(prompts, expert_prompts))]
    requests.append((0, SlotRequest(prompts[0], expert_prompts[0], max_tokens=12, alpha=0.25)))  # its own alpha wins
    # Forced answer text after the prompt: the risk is read at the prompt's end, as decode's risk_lengths.
    forced = _prompts(13, [3])[0]
    attacked = (expert_prompts[1] or prompts[1]) + forced
    requests.append((1, SlotRequest(prompts[1] + forced, None if expert_prompts[1] is None else attacked,
                                    max_tokens=6, risk_length=len(attacked) - len(forced))))
    results = drive(slots, requests)
    for i, (_, request) in enumerate(requests):
        alone = _assert_same_as_alone(engine, results[i], request, None if request.alpha else expert_risk)
        if request.alpha is None:
            assert results[i]["row_alpha"] == pytest.approx(float(alone.alpha[0]))
            assert results[i]["risk"] == pytest.approx(float(alone.risk[0]), rel=1e-5)
        else:
            assert results[i]["row_alpha"] == 0.25 and results[i]["risk"] is None
    assert results[len(prompts) + 1]["risk"] == pytest.approx(results[1]["risk"], rel=1e-5)
    assert len({r["row_alpha"] for r in results.values()}) >= 3
    assert min(risks) > 0  # every prompt gives the openings some probability


def test_alpha_from_the_expert_equals_decode(models):
    base, expert = models
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    _check_alpha_from_the_expert(engine, SlotConfig(slots=2, context=64, chunk=3), _prompts(3, [7, 11, 5, 9]))


def test_no_compilation_after_warm_up(models):
    base, expert = models
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    config = SlotConfig(slots=2, context=40, chunk=4)
    slots = SlotEngine(engine, config)
    compiled = slots.warm_up()
    # One prefill per bucket, insert, greedy and sampling generate per width (init ran in the constructor).
    assert config.buckets == (16, 24, 32, 40) and slots.widths == (1, 2)
    assert compiled == len(config.buckets) + 1 + 2 * 2 and slots.compilations == compiled + 1
    before = slots.compilations
    sizes = [jit._cache_size() for jit in (slots._prefill_jit, slots._insert_jit, slots._generate_jit)]
    lengths = [3, 16, 17, 30, 39 - 1, 24]
    requests = [(i, SlotRequest(p, max_tokens=2 if len(p) > 30 else 6, temperature=0.7 * (i % 2), seed=i,
                                alpha=0.3 + 0.1 * i, tau=6.0 + i)) for i, p in enumerate(_prompts(4, lengths))]
    drive(slots, requests)
    assert slots.compilations == before
    assert [jit._cache_size() for jit in (slots._prefill_jit, slots._insert_jit, slots._generate_jit)] == sizes


def test_refuses_what_it_cannot_serve(models):
    base, expert = models
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    slots = SlotEngine(engine, SlotConfig(slots=1, context=32, chunk=2))
    with pytest.raises(ServingError, match="context is 32 tokens; the prompt has 30"):
        slots.check(SlotRequest(list(range(4, 34)), max_tokens=3))
    with pytest.raises(ServingError, match="tau must be >= 1"):
        slots.check(SlotRequest([5, 6], max_tokens=3, tau=0.5))
    with pytest.raises(ServingError, match="modes ngsd, base"):
        SlotConfig(mode="always")


def test_sampling_is_seeded_per_request_not_per_slot(models):
    base, expert = models
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    slots = SlotEngine(engine, SlotConfig(slots=3, context=48, chunk=4))
    prompt = _prompts(5, [8])[0]
    sampled = lambda seed: SlotRequest(prompt, max_tokens=10, temperature=1.0, seed=seed, alpha=0.9)  # noqa: E731
    first = drive(slots, [(0, sampled(7)), (0, SlotRequest(prompt, max_tokens=10)), (1, sampled(8))])
    # The same seeded request again, alone, in another slot, joining later: the same tokens.
    again = drive(slots, [(0, SlotRequest(prompt, max_tokens=3)), (0, sampled(7))])
    assert first[0]["slot"] != again[1]["slot"]
    assert first[0]["tokens"] == again[1]["tokens"]
    assert first[0]["tokens"] != first[2]["tokens"]
    # A greedy row decoded beside sampling rows (the sampling program) is still decode's.
    _assert_same_as_alone(engine, first[1], SlotRequest(prompt, max_tokens=10))


@pytest.fixture(scope="module")
def adapter_engine(make_tiny_hf):
    """A 4-layer base with an all-linear LoRA expert on its top two layers, run as an adapter."""
    from flax import nnx

    from ngsd_jax.checkpoints.adapter import extract_adapter
    from ngsd_jax.models.lora import apply_lora

    base = load_model(make_tiny_hf("llama", num_hidden_layers=4))
    model = nnx.clone(base)
    apply_lora(model, rank=4, alpha=8.0, targets="all-linear", layers=[2, 3], seed=1)
    rng = np.random.RandomState(0)
    for i in (2, 3):
        for owner in (model.layers[i].attn, model.layers[i].mlp):
            for module in vars(owner).values():
                if hasattr(module, "lora_b"):
                    module.lora_b.set_value(0.5 * rng.randn(*module.lora_b.shape).astype(np.float32))
    return Engine(base, None, VOCAB, stop_ids=[], adapter=extract_adapter(model))


def _mixed_schedule(seed):
    prompts, expert_prompts = _prompts(seed, [9, 5, 14, 21]), _prompts(seed + 1, [12, 5, 9, 17])
    return [(0, SlotRequest(prompts[0], None, max_tokens=14, alpha=0.9)),
            (1, SlotRequest(prompts[1], expert_prompts[1], max_tokens=9, alpha=0.5)),
            (2, SlotRequest(prompts[2], None, max_tokens=10, steer=False)),
            (2, SlotRequest(prompts[3], expert_prompts[3], max_tokens=12, alpha=0.9, tau=4.0))]


def test_adapter_expert_equals_decode_alone(adapter_engine):
    # Shared prompts (decode computes the layers below the adapter once) and the expert's own.
    slots = SlotEngine(adapter_engine, SlotConfig(slots=2, context=64, chunk=3))
    schedule = _mixed_schedule(6)
    results = drive(slots, schedule)
    for i, (_, request) in enumerate(schedule):
        _assert_same_as_alone(adapter_engine, results[i], request)
    assert sum(sum(r["spike"]) for r in results.values()) >= 3


def test_scanned_layers_equal_decode_alone(make_tiny_hf):
    base = load_model(make_tiny_hf("llama", seed=0))
    expert = load_model(make_tiny_hf("llama", seed=1))
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[], scan_layers=True)
    slots = SlotEngine(engine, SlotConfig(slots=2, context=64, chunk=5))
    schedule = _mixed_schedule(8)
    results = drive(slots, schedule)
    for i, (_, request) in enumerate(schedule):
        _assert_same_as_alone(engine, results[i], request)


def test_adapter_expert_on_shared_prompts_equals_decode_alone(adapter_engine):
    # Every expert prompt is the base's: the layers below the adapter run once per slot.
    slots = SlotEngine(adapter_engine, SlotConfig(slots=3, context=64, chunk=3, shared_prompts=True))
    schedule = [(join, dataclasses.replace(request, expert_prompt=None)) for join, request in _mixed_schedule(9)]
    schedule.append((3, SlotRequest(_prompts(11, [6])[0], max_tokens=8, alpha=0.9)))
    results = drive(slots, schedule)
    for i, (_, request) in enumerate(schedule):
        _assert_same_as_alone(adapter_engine, results[i], request)
    assert sum(sum(r["spike"]) for r in results.values()) >= 3
    with pytest.raises(ServingError, match="the expert's differs"):
        slots.check(SlotRequest([5, 6, 7], [5, 6], max_tokens=2))


def test_adapter_expert_alpha_from_the_expert_equals_decode(adapter_engine):
    # The risk's pass over the paired cache: the expert's own prompts, then the base's (shared layers).
    prompts = _prompts(14, [7, 11, 5, 9])
    _check_alpha_from_the_expert(adapter_engine, SlotConfig(slots=2, context=64, chunk=3), prompts,
                                 _prompts(15, [9, 6, 12, 8]))
    _check_alpha_from_the_expert(adapter_engine, SlotConfig(slots=2, context=64, chunk=3, shared_prompts=True),
                                 prompts)


def test_base_mode_server_on_an_adapter_pair_runs_the_paired_layout(adapter_engine):
    # As Engine.decode's --mode base on an adapter engine: the base rows beside the expert's.
    slots = SlotEngine(adapter_engine, SlotConfig(slots=2, context=64, chunk=3, mode="base"))
    assert slots.paired
    schedule = [(join, dataclasses.replace(request, steer=False)) for join, request in _mixed_schedule(12)]
    results = drive(slots, schedule)
    for i, (_, request) in enumerate(schedule):
        _assert_same_as_alone(adapter_engine, results[i], request)
