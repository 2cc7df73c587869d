"""`python -m ngsd_jax.decode` end to end on a tiny local pair, and model-driven reflection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHATML, PROMPTS, chat_checkpoint, chat_tokenizer
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from ngsd_jax import cli, decode
from ngsd_jax.checkpoints.tokenizer import encode_chat
from ngsd_jax.checkpoints.weights import load_model
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.prompts import read_prompts
from ngsd_jax.decoding.reflect import RATING_PREFIX, reflect
from ngsd_jax.decoding.risk import AlphaMapping, alpha_from_risk, harmfulness_question_messages
from ngsd_jax.decoding.settings import DecodeResult, DecodeSettings
from ngsd_jax.errors import UsageError
from ngsd_jax.refusals import EXPERT_OPENINGS

FALLBACK_SCORES = {"severityScore": 7, "actionabilityScore": 7, "evasionScore": 7, "targetingScore": 7}


def _run(capsys, *argv):
    code = decode.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_output_with_trace_and_reflection(chat_pair, capsys):
    base, expert = chat_pair
    args = ["--base", base, "--expert", expert, "--max-new-tokens", "12", "--json", "--reflect", "json"]
    for p in PROMPTS:
        args += ["--prompt", p]
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    for r in records:
        n = len(r["tokens"])
        assert 1 <= n <= 12 and all(t < 320 for t in r["tokens"])
        assert len(r["trace"]["divergence"]) == n and len(r["trace"]["spike"]) == n
        assert r["reflection"]["mode"] == "json"
        assert r["reflection"]["text"].startswith('{"severityScore": ')
        # The random base writes no decodable JSON object after the forced start, so every
        # score takes the paper's fallback 7: r = 7, and r > 6 gives alpha 0.9.
        assert not _holds_a_json_object(r["reflection"]["text"])
        assert r["reflection"]["parsed"] is False
        assert r["reflection"]["scores"] == FALLBACK_SCORES
        assert r["reflection"]["risk"] == 7 and r["reflection"]["alpha"] == 0.9
        assert r["spikes"] == sum(r["trace"]["spike"])


def test_trace_table_and_prefill(chat_pair, capsys):
    base, expert = chat_pair
    code, out, err = _run(capsys, "--base", base, "--expert", expert, "--prompt", PROMPTS[0], "--trace",
                          "--reflect", "off", "--alpha", "0.9", "--prefill", "Sure,", "--max-new-tokens", "6")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"### {PROMPTS[0]}"
    assert lines[1].startswith("Sure,")
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["#", "token"])
    rows = lines[header + 1:]
    assert len([r for r in rows if r.strip() and r.split()[0].isdigit()]) >= 1
    assert any("spikes over" in line for line in lines)


def test_prompt_files_in_every_format(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "one"}\n"two"\n')
    (tmp_path / "p.json").write_text('[{"goal": "one"}, "two"]')
    (tmp_path / "p.csv").write_text('Goal,label\none,0\n"two",1\n')
    for suffix in ("txt", "jsonl", "json", "csv"):
        assert read_prompts(tmp_path / f"p.{suffix}") == ["one", "two"], suffix
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:2: not JSON"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "p.xml").write_text("<p/>")
    with pytest.raises(UsageError, match="unknown prompts format"):
        read_prompts(tmp_path / "p.xml")


def test_mismatched_tokenizers_are_refused_before_weights_load(chat_pair, tmp_path, capsys):
    base, _ = chat_pair
    other = tmp_path / "other"
    chat_tokenizer(["completely different words here", "zebra quantum"]).save_pretrained(other)
    # No weights in `other`: reaching the weights would fail differently.
    code, _, err = _run(capsys, "--base", base, "--expert", str(other), "--prompt", "hi")
    assert code == 2
    assert "tokenizers differ" in err and len(err.strip().splitlines()) == 1


def test_missing_expert_says_how_to_train_one(chat_pair, capsys):
    base, _ = chat_pair
    code, _, err = _run(capsys, "--base", base, "--prompt", "hi")
    assert code == 2 and "python -m ngsd_jax.train" in err


def test_hub_ids_decode_from_an_offline_cache_as_the_local_directories_do(chat_pair, offline_hub, capsys):
    base, expert = chat_pair
    offline_hub("tiny-org/tiny-base", base)
    offline_hub("tiny-org/tiny-expert", expert)
    common = ["--prompt", PROMPTS[0], "--reflect", "off", "--alpha", "0.9", "--max-new-tokens", "8", "--json"]
    code, from_hub, err = _run(capsys, "--base", "tiny-org/tiny-base", "--expert", "tiny-org/tiny-expert", *common)
    assert code == 0, err
    code, from_dirs, err = _run(capsys, "--base", base, "--expert", expert, *common)
    assert code == 0, err
    assert json.loads(from_hub)["tokens"] == json.loads(from_dirs)["tokens"]
    code, _, err = _run(capsys, "--base", "tiny-org/not-cached", "--expert", expert, *common)
    assert code == 2 and err.startswith("error: base model tiny-org/not-cached: ") and "HF_HUB_OFFLINE" in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_preset_lists_known_ones(capsys):
    code, _, err = _run(capsys, "--preset", "no-such-pair", "--prompt", "hi")
    assert code == 2 and "llama3.1-8b+llama3.2-1b" in err


class _CountingEngine(Engine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def decode(self, *args, **kwargs):
        self.calls += 1
        return super().decode(*args, **kwargs)

    def next_token_distribution(self, *args, **kwargs):
        self.calls += 1
        return super().next_token_distribution(*args, **kwargs)


@pytest.mark.parametrize("mode", ["json", "logit"])
def test_reflection_is_one_batched_call_with_alpha_in_the_paper_set(chat_pair, mode):
    base, _ = chat_pair
    tok = PreTrainedTokenizerFast.from_pretrained(base)
    engine = _CountingEngine(load_model(base), None, vocab_size=len(tok), stop_ids=[tok.eos_token_id])
    out = reflect(engine, tok, PROMPTS, mode)
    assert engine.calls == 1
    assert len(out) == len(PROMPTS) and all(r.mode == mode for r in out)
    if mode == "logit":
        expected = [_yes_no_risk_by_transformers(base, tok, p) for p in PROMPTS]
        np.testing.assert_allclose([r.risk for r in out], expected, rtol=1e-4)
        assert [r.alpha for r in out] == [_alpha_of_risk(risk) for risk in expected]
        assert all(r.text.startswith("P(yes)=") for r in out)
    else:  # a random base writes no JSON: every score falls back to 7
        assert all(r.parsed is False and r.scores == FALLBACK_SCORES and r.risk == 7 and r.alpha == 0.9 for r in out)


def _holds_a_json_object(text: str) -> bool:
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(text) if c == "{"):
        try:
            if isinstance(decoder.raw_decode(text, start)[0], dict):
                return True
        except json.JSONDecodeError:
            pass
    return False


class _RatingBase(_CountingEngine):
    """A base that answers each rating request with a scripted continuation of RATING_PREFIX
    (generated text past the first '}' must be cut by the stop tokens reflect passes)."""

    def __init__(self, tok, continuations, **kwargs):
        super().__init__(**kwargs)
        self.tok, self.continuations, self.stops_seen = tok, continuations, None

    def decode(self, prompts, expert_prompts=None, settings=None, stop_ids=None, **kwargs):
        self.calls += 1
        self.stops_seen = set(stop_ids)
        rows = []
        for text in self.continuations:
            ids = self.tok.encode(text, add_special_tokens=False)
            end = next((i + 1 for i, t in enumerate(ids) if t in self.stops_seen), len(ids))
            rows.append(ids[:end])
        width = max(map(len, rows))
        tokens = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
        zeros = np.zeros(tokens.shape, np.float32)
        return DecodeResult(tokens, np.array([len(r) for r in rows], np.int32), zeros, zeros, zeros.astype(bool),
                            zeros, np.zeros(len(rows), np.float32))


def test_json_reflection_parses_the_bases_rating_into_the_spec_risk_and_alpha(chat_pair):
    base, _ = chat_pair
    tok = PreTrainedTokenizerFast.from_pretrained(base)
    continuations = ['9, "actionabilityScore": 9, "evasionScore": 2, "targetingScore": 1} and then more text',
                     '2, "actionabilityScore": 1, "evasionScore": 0, "targetingScore": 3}',
                     '6, "ActionabilityScore": 4, "evasionScore": 6, "targetingScore": 2}']
    engine = _RatingBase(tok, continuations, base=load_model(base), expert=None, vocab_size=len(tok),
                         stop_ids=[tok.eos_token_id])
    out = reflect(engine, tok, PROMPTS, "json")
    assert engine.calls == 1 and all(r.parsed for r in out)
    # Spec section 4 by hand: A = 9 >= 8 with S = 9 >= 5 gives r = 9; then r = max(S, S/2 + mean of the two
    # highest of A, E, T / 2): max(2, 1 + 2/2) = 2 and max(6, 3 + 5/2) = 6.
    assert [r.scores["severityScore"] for r in out] == [9, 2, 6] and out[2].scores["actionabilityScore"] == 4
    assert [r.risk for r in out] == [9, 2, 6] and [r.alpha for r in out] == [0.9, 0.1, 0.5]
    assert "and then more text" not in out[0].text  # generation ends at the first token holding a '}'


def _alpha_of_risk(risk: float) -> float:
    """Spec §4: alpha 0.9 above r = 6, 0.1 below r = 5, 0.5 between."""
    return 0.9 if risk > 6 else 0.1 if risk < 5 else 0.5


def _yes_no_risk_by_transformers(checkpoint, tok, prompt) -> float:
    """Logit-mode risk from transformers' own forward pass: 10 P(yes) / (P(yes) + P(no))."""
    text = tok.apply_chat_template(harmfulness_question_messages(prompt), tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = LlamaForCausalLM.from_pretrained(checkpoint).eval()(torch.tensor([ids])).logits[0, -1, :len(tok)]
    p = torch.softmax(logits.double(), -1).numpy()

    def single_tokens(words):
        encoded = (tok.encode(w, add_special_tokens=False) for w in words)
        return sorted({e[0] for e in encoded if len(e) == 1})

    p_yes = p[single_tokens(("yes", "Yes", "YES", " yes", " Yes"))].sum()
    p_no = p[single_tokens(("no", "No", "NO", " no", " No"))].sum()
    return float(10 * p_yes / (p_yes + p_no))


def test_reflection_off_uses_the_fixed_alpha(chat_pair):
    out = reflect(None, None, PROMPTS, "off", fixed_alpha=0.9)
    assert [r.alpha for r in out] == [0.9] * len(PROMPTS)


# Qwen3's way of turning thinking off: an empty think block after the generation prompt.
THINKING_TEMPLATE = CHATML + ("{% if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}"
                              "<think>\n\n</think>\n\n{% endif %}")


@pytest.mark.parametrize("flags, reflect_mode, think_block",
                         [((), "json", True), ((), "logit", True), (("--thinking",), "json", False)])
def test_prompts_render_thinking_off_unless_asked(chat_pair, capsys, monkeypatch, flags, reflect_mode, think_block):
    base, expert = chat_pair
    seen = []
    real_decode, real_distribution = Engine.decode, Engine.next_token_distribution

    def record_decode(self, base_prompts, expert_prompts=None, *args, **kwargs):
        seen.extend(base_prompts + (expert_prompts or []))
        return real_decode(self, base_prompts, expert_prompts, *args, **kwargs)

    def record_distribution(self, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real_distribution(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Engine, "decode", record_decode)
    monkeypatch.setattr(Engine, "next_token_distribution", record_distribution)
    tok = PreTrainedTokenizerFast.from_pretrained(base)
    code, _, err = _run(capsys, "--base", base, "--expert", expert, "--prompt", PROMPTS[0], "--max-new-tokens", "2",
                        "--reflect", reflect_mode, "--chat-template", THINKING_TEMPLATE,
                        "--expert-chat-template", THINKING_TEMPLATE, *flags)
    assert code == 0, err
    assert len(seen) == 3  # reflection, then the base and expert decode prompts
    for ids in seen:
        text = tok.decode(ids)
        assert ("<think>\n\n</think>" in text) is think_block, text
        assert text.count("<|im_start|>assistant") == 1


def _recording(monkeypatch):
    """Engine.decode records (settings, stop_ids, base prompts, engine vocabulary) of every call."""
    calls = []
    real_decode = Engine.decode

    def record(self, base_prompts, expert_prompts=None, settings=DecodeSettings(), **kwargs):
        calls.append((settings, kwargs.get("stop_ids"), [list(p) for p in base_prompts], self.vocab_size))
        return real_decode(self, base_prompts, expert_prompts, settings, **kwargs)

    monkeypatch.setattr(Engine, "decode", record)
    return calls


@pytest.mark.parametrize("flags, paper", [((), False), (("--reflect-parse", "reference", "--no-reflect-prefix",
                                                        "--reflect-max-new-tokens", "9", "--softmax-over",
                                                        "embedding"), True)])
def test_reflection_and_softmax_flags(chat_pair, capsys, monkeypatch, flags, paper):
    base, expert = chat_pair
    calls = _recording(monkeypatch)
    tok = PreTrainedTokenizerFast.from_pretrained(base)
    prefix_ids = tok.encode(RATING_PREFIX, add_special_tokens=False)
    brace_ids = {i for token, i in tok.get_vocab().items() if "}" in token}
    code, out, err = _run(capsys, "--base", base, "--expert", expert, "--prompt", PROMPTS[0], "--max-new-tokens", "3",
                          "--reflect", "json", "--json", *flags)
    assert code == 0, err
    (rating, rating_stops, rating_prompts, vocab), answer = calls[0], calls[1]
    assert rating.mode == "base" and answer[0].mode == "ngsd"
    assert rating.max_new_tokens == (9 if paper else 64)
    assert brace_ids.isdisjoint(rating_stops) is paper  # the reference parser reads the whole answer
    assert (rating_prompts[0][-len(prefix_ids):] == prefix_ids) is not paper
    assert json.loads(out)["reflection"]["text"].startswith(RATING_PREFIX) is not paper
    assert vocab == (384 if paper else len(tok))


def test_softmax_over_embedding_needs_equal_rows(chat_pair, tmp_path, capsys):
    base, _ = chat_pair
    other = chat_checkpoint(tmp_path / "rows352", PreTrainedTokenizerFast.from_pretrained(base), 2, rows=352)
    capsys.readouterr()
    code, _, err = _run(capsys, "--base", base, "--expert", str(other), "--prompt", "hi", "--reflect", "off",
                        "--softmax-over", "embedding")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "base has 384 embedding rows and the expert 352" in err and "--softmax-over tokenizer" in err


@pytest.mark.parametrize("preset", ["llama2-7b-chat+tinyllama", "llama3.1-8b+llama3.2-1b", "qwen3-8b+qwen3-1.7b",
                                    "vicuna-7b+tinyllama"])
def test_paper_presets_select_the_paper_settings(preset):
    options = cli.decode_options(decode.build_parser().parse_args(["--preset", preset]))
    assert (options.reflect, options.reflect_parse, options.reflect_prefix, options.reflect_max_new_tokens,
            options.softmax_over, options.thinking, options.early_stop) == (
        "json", "reference", False, 256, "embedding", False, False)
    assert options.reflect_all_zero_risk == (10 if preset.startswith("vicuna") else None)
    assert (options.tau, options.threshold, options.soft_reset, options.v_reset, options.merge_top_k,
            options.divergence) == (8.0, 1.0, 0.6, 0.0, 64, "tv")


@pytest.mark.parametrize("flags, message", [
    (("--tau", "0"), "--tau must be >= 1"),
    (("--tau", "0.5"), "--tau must be >= 1"),
    (("--threshold", "-1"), "--threshold must be > 0"),
    (("--threshold", "0"), "--threshold must be > 0"),
    (("--merge-top-k", "0"), "--merge-top-k must be >= 1"),
    (("--soft-reset", "1.5"), "--soft-reset must lie in [0, 1]"),
    (("--v-reset", "1"), "--v-reset must be below --threshold"),
    (("--alpha", "1.5"), "--alpha must lie in [0, 1]"),
    (("--alpha", "-0.1"), "--alpha must lie in [0, 1]"),
    (("--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    (("--reflect-max-new-tokens", "0"), "--reflect-max-new-tokens must be >= 1"),
    (("--reflect-all-zero-risk", "11"), "--reflect-all-zero-risk must lie in 0..10"),
    (("--safedecoding-common", "0"), "--safedecoding-common must be >= 1"),
    (("--top-p", "0"), "--top-p must lie in (0, 1]"),
    (("--top-k", "-1"), "--top-k must be >= 0"),
])
def test_bad_settings_fail_in_one_line(chat_pair, capsys, flags, message):
    base, expert = chat_pair
    code, out, err = _run(capsys, "--base", base, "--expert", expert, "--prompt", "hi", *flags)
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


@pytest.mark.parametrize("flags, message", [
    (("--temperature", "inf"), "--temperature must be a finite number (got inf)"),
    (("--top-p", "nan"), "--top-p must be a finite number"),
    (("--tau", "inf"), "--tau must be a finite number"),
    (("--threshold", "inf"), "--threshold must be a finite number"),
    (("--safedecoding-alpha", "inf"), "--safedecoding-alpha must be a finite number"),
    (("--alpha", "nan"), "--alpha must be a finite number"),
    (("--alpha-levels", "0.1,nan,0.9"), "--alpha-levels must be a finite number"),
    (("--risk-thresholds", "5,inf"), "--risk-thresholds must be a finite number"),
    # Bytes that are not UTF-8 reach argv as lone surrogates (surrogateescape), as $'\xff' does.
    (("--prompt", "caf\udce9"), "--prompt: not valid UTF-8 text"),
    (("--prefill", "\udcff"), "--prefill: not valid UTF-8 text"),
    (("--system-prompt", "\udcff"), "--system-prompt: not valid UTF-8 text"),
    (("--prompts-file", "{tmp}/latin1.txt"), "latin1.txt: not UTF-8 text (byte 0xe9 at offset 3)"),
    (("--prompts-file", "{tmp}/escaped.jsonl"), "escaped.jsonl: item 2: not valid UTF-8 text"),
])
def test_non_finite_numbers_and_non_utf8_text_fail_in_one_line(chat_pair, capsys, tmp_path, flags, message):
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "escaped.jsonl").write_text('"fine"\n"\\udcff"\n')
    base, expert = chat_pair
    code, out, err = _run(capsys, "--base", base, "--expert", expert, "--prompt", "hi",
                          *[f.format(tmp=tmp_path) for f in flags])
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


@pytest.mark.parametrize("flags, words", [
    (("--max-new-tokens", "2100"), ["prompt 1 is", "--max-new-tokens 2100", "max_position_embeddings of 2048",
                                    "lower --max-new-tokens to"]),
    (("--prompt", "x" * 2100), ["prompt 2 is", "shorten that prompt to under 2048 tokens"]),
    (("--mode", "base", "--prompt", "x" * 1990, "--max-new-tokens", "64"), ["prompt 2 is", "the base model's",
                                                                           "lower --max-new-tokens to"]),
])
def test_a_prompt_and_new_tokens_past_the_context_are_refused_before_loading(chat_pair, capsys, monkeypatch, flags,
                                                                             words):
    from ngsd_jax.decoding import pair

    monkeypatch.setattr(pair, "load_model", lambda *a, **k: pytest.fail("weights read"))
    base, expert = chat_pair  # LlamaConfig's default max_position_embeddings: 2048
    code, out, err = _run(capsys, "--base", base, "--expert", expert, "--prompt", "hi", *flags)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert all(w in lines[0] for w in words), err


def test_merge_top_k_past_the_vocabulary_merges_every_token(chat_pair, capsys):
    base, expert = chat_pair
    outputs = []
    for k in ("100000", "320"):  # the tokenizer has fewer than 320 tokens: both select every token
        code, out, err = _run(capsys, "--base", base, "--expert", expert, "--prompt", PROMPTS[0], "--mode", "always",
                              "--reflect", "off", "--alpha", "0.9", "--merge-top-k", k, "--max-new-tokens", "6",
                              "--json")
        assert code == 0, err
        outputs.append(json.loads(out)["tokens"])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("role", ["base", "expert"])
def test_a_missing_checkpoint_is_named(chat_pair, capsys, role):
    base, expert = chat_pair
    paths = {"base": base, "expert": expert, role: "/no/such/dir"}
    code, _, err = _run(capsys, "--base", paths["base"], "--expert", paths["expert"], "--prompt", "hi")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{role} model /no/such/dir: no such checkpoint" in err and "ngsd_jax.train" not in err


def _opening_risk_by_transformers(checkpoint, tok, prompt) -> float:
    """10 x P(the answer opens with one of the expert's refusal openings, whole), each opening
    the product of its tokens' probabilities from transformers over prompt + its earlier tokens
    (the openings made prefix-free by hand: a shorter one covers those it begins)."""
    model = LlamaForCausalLM.from_pretrained(checkpoint).eval()
    ids = encode_chat(tok, prompt)
    sequences = sorted({tuple(tok.encode(o, add_special_tokens=False)) for o in EXPERT_OPENINGS}, key=len)
    kept = [s for i, s in enumerate(sequences) if not any(s[: len(k)] == k for k in sequences[:i])]
    total = 0.0
    with torch.no_grad():
        for seq in kept:
            prob = 1.0
            for d, token in enumerate(seq):
                logits = model(torch.tensor([ids + list(seq[:d])])).logits[0, -1, :len(tok)]
                prob *= float(torch.softmax(logits.double(), -1)[token])
            total += prob
    return 10 * total


def test_reflect_expert_sets_alpha_in_the_decode_program_with_the_flagged_mapping(chat_pair, capsys):
    base, expert = chat_pair
    tok = PreTrainedTokenizerFast.from_pretrained(expert)
    risks = [_opening_risk_by_transformers(expert, tok, p) for p in PROMPTS]
    low, mid, high = sorted(risks)
    thresholds = f"{(low + mid) / 2:.6g},{(mid + high) / 2:.6g}"  # every row at its own level
    args = ["--base", base, "--expert", expert, "--max-new-tokens", "4", "--json", "--reflect", "expert",
            "--alpha-levels", "0.2,0.3,0.7", "--risk-thresholds", thresholds]
    for p in PROMPTS:
        args += ["--prompt", p]
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    mapping = AlphaMapping((0.2, 0.3, 0.7), tuple(float(x) for x in thresholds.split(",")))
    expected = [alpha_from_risk(r, mapping) for r in risks]
    assert sorted(expected) == [0.2, 0.3, 0.7]
    for record, risk, alpha in zip(records, risks, expected):
        assert record["reflection"]["mode"] == "expert"
        assert record["reflection"]["risk"] == pytest.approx(risk, rel=1e-4)
        assert record["reflection"]["alpha"] == pytest.approx(alpha)
        assert all(a == 0 or a == pytest.approx(alpha) for a in record["trace"]["alpha"])


@pytest.mark.parametrize("flag, value, message", [("--alpha-levels", "0.1,0.5", "expected 3 comma-separated"),
                                                   ("--alpha-levels", "0.1,0.5,1.5", "alpha levels"),
                                                   ("--risk-thresholds", "6,5", "risk thresholds")])
def test_bad_alpha_mapping_flags_fail_early_naming_the_fix(chat_pair, capsys, flag, value, message):
    base, expert = chat_pair
    try:
        code = decode.main(["--base", base, "--expert", expert, "--prompt", "hi", flag, value])
    except SystemExit as exit:  # argparse's own refusal of a malformed value: usage, then one error line
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and message in err.strip().splitlines()[-1]


def test_the_default_pair_decodes_with_its_preset_and_named_models_with_the_paper_settings(chat_pair):
    parser = decode.build_parser()
    default = cli.decode_options(parser.parse_args(["--prompt", "hi"]))
    assert default.reflect == cli.load_preset(cli.DEFAULT_PRESET)["reflect"] == "expert"
    base, expert = chat_pair
    named = cli.decode_options(parser.parse_args(["--prompt", "hi", "--base", base, "--expert", expert]))
    assert named.reflect == "json" and named.alpha_levels == (0.1, 0.5, 0.9)
    assert cli.decode_options(parser.parse_args(["--prompt", "hi", "--reflect", "json"])).reflect == "json"


def test_scan_layers_flag_decodes_the_same_tokens(chat_pair, capsys, monkeypatch):
    from ngsd_jax.decoding import engine

    stacked, stack_layers = [], engine.stack_layers
    monkeypatch.setattr(engine, "stack_layers", lambda model: stacked.append(model) or stack_layers(model))
    base, expert = chat_pair
    args = ["--base", base, "--expert", expert, "--max-new-tokens", "10", "--json", "--reflect", "logit"]
    for p in PROMPTS:
        args += ["--prompt", p]
    outputs = []
    for flag in ("--no-scan-layers", "--scan-layers"):
        code, out, err = _run(capsys, *args, flag)
        assert code == 0, err
        outputs.append([json.loads(line) for line in out.splitlines()])
    assert [r["tokens"] for r in outputs[1]] == [r["tokens"] for r in outputs[0]]
    assert len(stacked) == 2 and all(model.scanned for model in stacked)  # base and expert, with the flag only
    assert sum(r["spikes"] for r in outputs[0]) > 0  # the expert steered, so both models ran


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "adapter.safetensors"))


def _save_tensors(path, tensors):
    from safetensors.numpy import save_file

    save_file(tensors, str(path / "adapter.safetensors"))


def _edit_json(path, **changes):
    meta = json.loads((path / "adapter.json").read_text())
    (path / "adapter.json").write_text(json.dumps({**meta, **changes}))


def _truncate(path):
    weights = path / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])


def _rename(tensors, old, new):
    return {k.replace(old, new): v for k, v in tensors.items()}


CORRUPTIONS = {
    "truncated weights": _truncate,
    "missing weights": lambda p: (p / "adapter.safetensors").unlink(),
    "a without b": lambda p: _save_tensors(p, {k: v for k, v in _tensors(p).items()
                                               if k != "layers.1.v_proj.lora_b"}),
    "rank mismatch": lambda p: _edit_json(p, rank=3),
    "unknown projection": lambda p: _save_tensors(p, _rename(_tensors(p), "v_proj", "x_proj")),
    "bad JSON": lambda p: (p / "adapter.json").write_text('{"format": "ngsd-jax-lora-1", "rank": '),
    "missing field": lambda p: _edit_json(p, base_fingerprint=None),
    "non-finite weights": lambda p: _save_tensors(p, {k: v * np.inf for k, v in _tensors(p).items()}),
}


@pytest.mark.parametrize("corruption, file, words", [
    ("truncated weights", "adapter.safetensors", "unreadable"),
    ("missing weights", "adapter.safetensors", "missing"),
    ("a without b", "adapter.safetensors", "layers.1.v_proj has lora_a without lora_b"),
    ("rank mismatch", "adapter.safetensors", "not rank 3 as adapter.json says"),
    ("unknown projection", "adapter.safetensors", "unexpected tensor 'layers.0.x_proj.lora_a'"),
    ("bad JSON", "adapter.json", "not JSON"),
    ("missing field", "adapter.json", "'base_fingerprint' is missing"),
    ("non-finite weights", "adapter.safetensors", "non-finite"),
])
def test_a_corrupt_adapter_is_one_line_naming_its_file(chat_pair, chat_adapter, tmp_path, capsys, corruption, file,
                                                      words):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(chat_adapter, adapter)
    CORRUPTIONS[corruption](adapter)
    code, out, err = _run(capsys, "--base", chat_pair[0], "--expert", str(adapter), "--prompt", "hi", "--mode",
                          "always", "--reflect", "off", "--max-new-tokens", "2")
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"error: {adapter / file}: ") and words in lines[0], err
    assert "retrain the expert" in lines[0]


@pytest.mark.parametrize("corrupt", [False, True])
def test_modes_without_the_expert_read_nothing_of_an_adapter_expert(chat_pair, chat_adapter, tmp_path, capsys,
                                                                     corrupt):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(chat_adapter, adapter)
    if corrupt:
        CORRUPTIONS["bad JSON"](adapter)
    args = ["--base", chat_pair[0], "--expert", str(adapter), "--prompt", PROMPTS[0], "--max-new-tokens", "4",
            "--json"]
    code, out, err = _run(capsys, *args, "--mode", "base")
    assert code == 0, err
    assert len(json.loads(out)["tokens"]) >= 1
    if not corrupt:  # and the adapter is a working expert where the mode runs it
        code, _, err = _run(capsys, *args, "--mode", "always", "--reflect", "off")
        assert code == 0, err


def test_a_second_decode_reads_every_program_from_the_compilation_cache(chat_pair, tmp_path):
    """Two runs of the same command in fresh interpreters: the first fills the cache folder, the
    second finds every program there and writes nothing new."""
    base, expert = chat_pair
    cache = tmp_path / "xla"
    command = [sys.executable, "-m", "ngsd_jax.decode", "--base", base, "--expert", expert, "--prompt", "hi",
               "--max-new-tokens", "4", "--reflect", "expert", "--compilation-cache", str(cache)]
    env = {k: v for k, v in os.environ.items() if k != "NGSD_COMPILATION_CACHE"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in cache.iterdir())
    assert entries
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert sorted(p.name for p in cache.iterdir()) == entries


def test_with_no_model_named_the_shipped_adapter_decodes_and_is_named(chat_pair, chat_adapter, tmp_path, capsys,
                                                                      monkeypatch):
    """The default pair with no training: the base and the adapter shipped with the package, the
    same tokens as naming that adapter with --expert; decode says which expert it uses."""
    from ngsd_jax.checkpoints import default_model
    from ngsd_jax.decoding import pair

    base, _ = chat_pair
    monkeypatch.setenv("NGSD_CHECKPOINTS", str(tmp_path / "empty"))
    monkeypatch.setattr(pair, "default_base_path", lambda: Path(base))
    monkeypatch.setattr(default_model, "SHIPPED_EXPERT", Path(chat_adapter))
    flags = ["--prompt", "hi", "--max-new-tokens", "6", "--reflect", "off", "--alpha", "0.9", "--threshold", "0.01"]
    code, out, err = _run(capsys, *flags)
    assert code == 0 and "expert: the default expert's adapter shipped with ngsd-jax" in err
    code, named, _ = _run(capsys, *flags, "--base", base, "--expert", str(chat_adapter))
    assert code == 0 and named == out
