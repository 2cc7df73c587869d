"""The optional early-stop heuristic (spec §5): token tables from a tiny tokenizer, the jnp check
against a plain-Python version of the rule on decoded text, and the fused engine with it on."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ngsd_jax import early_stop as es
from ngsd_jax.engine import DecodeSettings, Engine
from ngsd_jax.loading import load_model

CORPUS = [
    "I'm sorry, I cannot help with that. I can't do it! As an AI I will not. Is it not appropriate?",
    "the cat sat on the mat and the dog ran in the park with a red ball",
    "Smile 😀 and sun ☀ and rocket 🚀 bell \x07 carriage \r tab \t newline \n quotes “like this” — dash",
    "spaces   here  and there. Done! Really? Yes.\n",
]
FILLER = " the cat sat on the mat and the dog ran in the park with a red ball"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tables(tokenizer):
    return es.early_stop_tables(tokenizer, len(tokenizer))


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# Tables


def test_tables_flag_emoji_control_sentence_ends_and_spaces(tokenizer, tables):
    flagged = lambda text: [bool(tables.emoji_or_control[i]) for i in _ids(tokenizer, text)]  # noqa: E731
    for emoji in ("😀", "🚀", "☀", " 😀"):
        assert any(flagged(emoji)), emoji  # split or whole, some token of it is flagged
    for emoji in ("⭐", "❤"):  # not in the corpus: three byte tokens, 0xE2 first; a pair in the window
        ids = _ids(tokenizer, emoji)
        assert not any(flagged(emoji)) and tables.ends_with_e2[ids[0]] and tables.emoji_after_e2[ids[1]]
    quote = _ids(tokenizer, "“")  # 0xE2 0x80 0x9C: the same lead, not an emoji
    assert len(quote) == 1 or not (tables.ends_with_e2[quote[0]] and tables.emoji_after_e2[quote[1]])
    for control in ("\x07", "\r"):
        assert all(flagged(control)), repr(control)
    for plain in ("\n", "\t", "the cat sat.", "“like this”", "—", "I'm sorry", "   "):
        assert not any(flagged(plain)), repr(plain)

    def one(text):
        ids = _ids(tokenizer, text)
        assert len(ids) == 1, (text, ids)
        return ids[0]

    for end in (".", "!", "?"):
        assert tables.ends_sentence[one(end)]
    for other in (",", " the", "a"):
        assert not tables.ends_sentence[one(other)]
    assert tables.trailing_spaces[one("  ")] == 2 and tables.only_spaces[one("  ")]
    assert tables.trailing_spaces[one(" ")] == 1 and tables.only_spaces[one(" ")]
    assert tables.trailing_spaces[one(" the")] == 0 and not tables.only_spaces[one(" the")]
    assert tables.only_spaces[tokenizer.eos_token_id]  # special tokens decode to nothing
    assert tables.emoji_or_control.shape == (len(tokenizer),)


def test_phrase_table_holds_each_phrase_alone_and_after_a_space(tokenizer, tables):
    rows = {tuple(r[:n]) for r, n in zip(tables.phrases.tolist(), tables.phrase_lengths.tolist())}
    for phrase in es.REFUSAL_PHRASES:
        assert tuple(_ids(tokenizer, phrase)) in rows
        assert tuple(_ids(tokenizer, " " + phrase)) in rows
    assert len(rows) == len(tables.phrases)  # deduplicated
    assert (tables.phrases[np.arange(tables.phrases.shape[1])[None, :] >= tables.phrase_lengths[:, None]] == -1).all()


def test_partial_emoji_bytes():
    assert es.has_partial_emoji(b"\xf0\x9f")  # 4-byte emoji split after two bytes
    assert es.has_partial_emoji(b" \xf0")  # the lone 4-byte lead
    assert es.has_partial_emoji(b"\x9f\x98\x80")  # the rest of 😀
    assert es.has_partial_emoji(b"\xe2\x98")  # ☀ (U+2600) split after two bytes
    assert not es.has_partial_emoji(b"\xe2")  # 0xE2 also starts curly quotes and dashes
    assert not es.has_partial_emoji(b"\xe2\x80")  # “ ” — …
    assert not es.has_partial_emoji(b"\x98\x80")  # two continuation bytes: could be CJK
    assert not es.has_partial_emoji("😀".encode())  # whole: the text rule covers it
    assert es.has_emoji_or_control("a 😀") and es.has_emoji_or_control("\x1b[0m")
    assert not es.has_emoji_or_control("a\n\tb “c” — ©")


def test_check_positions_and_rule_validation():
    rule = es.EarlyStopRule()
    assert [m for m in range(400) if rule.is_check(m)] == list(range(128, 257, 7))
    assert (es.CHECK_FROM, es.CHECK_EVERY, es.CHECK_UNTIL, es.WINDOW, es.EXTRA_TOKENS, es.MIN_ALPHA) == (
        128, 7, 256, 64, 128, 0.5)
    with pytest.raises(ValueError):
        es.EarlyStopRule(check_from=32, window=64)
    assert not DecodeSettings().early_stop  # off by default


# ---------------------------------------------------------------------------------------------
# The rule in plain Python on decoded text (the spec's wording), against the jnp check


def reference_stop(decode, tokens, alpha, rule=es.EarlyStopRule(), phrases=es.REFUSAL_PHRASES):
    """(length at which the rule ends the sequence or None, final cap or None)."""
    cap = None
    for m in range(1, len(tokens) + 1):
        if cap is not None and (m >= cap or (m > cap // 2 and decode([tokens[m - 1]]).rstrip().endswith(
                (".", "!", "?")))):
            return m, m
        if (rule.check_from <= m <= rule.check_until and (m - rule.check_from) % rule.check_every == 0
                and alpha >= rule.min_alpha):
            text = decode(tokens[m - rule.window: m])
            if (any(p in text for p in phrases) or len(text) - len(text.rstrip(" ")) >= rule.trailing_spaces
                    or any(es.is_emoji(c) or (ord(c) < 32 or 127 <= ord(c) < 160) and c not in "\n\t"
                           for c in text)):
                cap = m + rule.extra_tokens if cap is None else min(cap, m + rule.extra_tokens)
    return None, cap


@functools.partial(jax.jit, static_argnums=0)
def _run_rule(rule, tables, tokens, alpha):
    """The engine's per-step use of early_stop_step over given token rows: (stop length or 0, cap)."""
    b, n = tokens.shape

    def body(carry, m):
        buf, cap, triggered, done, length = carry
        token = tokens[:, m - 1]
        buf = buf.at[:, m - 1].set(token)
        stop, cap, triggered = es.early_stop_step(tables, rule, buf, m, token, alpha, cap, triggered, ~done)
        return (buf, cap, triggered, done | stop, jnp.where(stop, m, length)), None

    init = (jnp.zeros_like(tokens), jnp.full((b,), es.NO_CAP, jnp.int32), jnp.zeros((b,), bool),
            jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    (_, cap, _, _, length), _ = jax.lax.scan(body, init, jnp.arange(1, n + 1))
    return length, cap


def _sequence(tokenizer, events: dict[int, str], total: int) -> list[int]:
    """Filler tokens with each event's text inserted at its token index."""
    filler = _ids(tokenizer, FILLER)
    out, f = [], 0
    while len(out) < total:
        if len(out) in events:
            out += _ids(tokenizer, events[len(out)])
        else:
            out.append(filler[f % len(filler)])
            f += 1
    return out[:total]


def _compare(tokenizer, tables, cases, rule=es.EarlyStopRule(), total=320):
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    rows = [_sequence(tokenizer, events, total) for events, _ in cases]
    alphas = np.asarray([a for _, a in cases], np.float32)
    length, cap = jax.device_get(_run_rule(rule, tables, jnp.asarray(rows, jnp.int32), jnp.asarray(alphas)))
    got = []
    for i, row in enumerate(rows):
        ref_len, ref_cap = reference_stop(decode, row, alphas[i], rule)
        assert (length[i] or None) == ref_len, (i, length[i], ref_len)
        assert (None if cap[i] == es.NO_CAP else cap[i]) == ref_cap, (i, cap[i], ref_cap)
        got.append(ref_len)
    return got


def test_window_check_matches_the_text_rule(tokenizer, tables):
    refusal = " I cannot"
    n_ref, n3, n2 = (len(_ids(tokenizer, t)) for t in (refusal, "   ", "  "))
    cases = [
        ({130 - n_ref: refusal, 132: ".", 150: "."}, 0.9),  # ends at 130: seen at 135 only; '.' at 132 too early
        ({130 - n_ref: refusal, 150: "."}, 0.5),  # alpha 0.5 is enough
        ({130 - n_ref: refusal, 150: "."}, 0.49),  # ... 0.49 is not
        ({60: refusal, 150: "."}, 0.9),  # gone from the window by 128
        ({127 - n_ref: refusal, 129: "!"}, 0.9),  # inside the window at exactly 128; stops at the next '!'
        ({100: refusal, 20: ".", 120: "?"}, 0.9),  # no stop before the trigger (128): then the cap
        ({256: refusal, 280: "."}, 0.9),  # after the last check (254)
        ({249: refusal, 280: "."}, 0.9),  # seen at 254, the last check
        ({110: refusal}, 0.9),  # no sentence end: stops at the cap 128 + 128
        ({40: "I'm sorry", 150: "."}, 0.9),  # only before 128: never checked
        ({140: "I'm sorry", 150: "."}, 0.9),  # no leading space
        ({135 - n3: "   ", 150: "."}, 0.9),  # three trailing spaces at check 135
        ({135 - n2: "  ", 150: "."}, 0.9),  # two are not enough
        ({128: "   ", 150: "."}, 0.9),  # spaces followed by filler at the check: not trailing
        ({100: " 😀", 150: "."}, 0.9),
        ({100: " 🚀", 150: "."}, 0.9),
        ({100: " ☀", 150: "."}, 0.9),
        ({100: " ⭐", 150: "."}, 0.9),  # split after 0xE2: the neighbour-pair rule
        ({100: "❤", 150: "."}, 0.9),
        ({126: "⭐", 150: "."}, 0.9),  # 0xE2 at 126, the rest at 127 and 128: seen at 128 already
        ({127: "⭐", 150: "."}, 0.9),  # the rest falls outside the window at 128; seen at 135
        ({63: "⭐", 150: "."}, 0.9),  # the first window [64, 128) starts mid-character: nothing
        ({100: " bell \x07", 150: "."}, 0.9),
        ({100: "\n\t“like this” —", 150: "."}, 0.9),  # newline, tab, quotes, dash: no trigger
    ]
    got = _compare(tokenizer, tables, cases)
    cap_stop = 128 + es.EXTRA_TOKENS
    assert got[:9] == [151, 151, None, None, 130, cap_stop, None, 281, cap_stop]
    assert got[9:] == [None, 151, 151, None, None, 151, 151, 151, 151, 151, 151, 151, None, 151, None]


def test_window_check_with_short_rule_uses_half_the_cap(tokenizer, tables):
    # trigger at 8 -> cap 48: sentence ends at or before 24 are ignored, the next one ends it
    rule = es.EarlyStopRule(check_from=8, check_every=4, check_until=40, window=8, extra_tokens=40)
    cases = [({3: " I cannot", 10: ".", 20: "!", 30: "?"}, 0.9),
             ({3: " I cannot", 10: ".", 23: "!"}, 0.9),  # the 24th token is not past half the cap
             ({3: " I cannot"}, 0.9),
             ({3: " I cannot", 30: "?"}, 0.1)]
    got = _compare(tokenizer, tables, cases, rule, total=80)
    assert got == [31, 48, 48, None]


# ---------------------------------------------------------------------------------------------
# The fused engine with early_stop on


VOCAB = 256


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    models_ = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                             tie_word_embeddings=False)
        path = tmp_path_factory.mktemp(f"model{seed}")
        LlamaForCausalLM(config).save_pretrained(path)
        models_.append(load_model(path))
    return models_


def _fake_texts(sentence_ends=()):
    # "|" keeps token texts from running into each other, so a phrase's text matches only its tokens
    return [f" w{i}|" + ("." if i in sentence_ends else "") for i in range(VOCAB)]


def _engine_case(engine, prompts, alphas, settings, texts, phrase):
    ids, lengths = es.pad_phrases([phrase])
    tables = es.build_tables(texts, None, ids, lengths)
    free = engine.decode(prompts, None, dataclasses.replace(settings, early_stop=False), alpha=alphas)
    stopped = engine.decode(prompts, None, dataclasses.replace(settings, early_stop=True), alpha=alphas,
                            early_stop_tables=tables)
    decode = lambda toks: "".join(texts[t] for t in toks)  # noqa: E731
    phrases = ["".join(texts[t] for t in phrase)]
    n = settings.max_new_tokens
    for i, alpha in enumerate(alphas):
        ref, _ = reference_stop(decode, free.sequence(i), alpha, settings.early_stop_rule, phrases)
        end = n if ref is None else ref
        assert stopped.lengths[i] == end
        assert stopped.sequence(i) == free.sequence(i)[:end]
        assert (stopped.tokens[i, end:] == engine.pad_id).all()
        for a, b in ((stopped.divergence, free.divergence), (stopped.potential, free.potential),
                     (stopped.spike, free.spike), (stopped.alpha_in_force, free.alpha_in_force)):
            np.testing.assert_array_equal(a[i, :end], b[i, :end])
            assert not a[i, end:].any()
    return free, stopped


def test_engine_early_stop_truncates_exactly_where_the_rule_says(pair):
    base, expert = pair
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    rng = np.random.RandomState(0)
    prompts = [rng.randint(4, VOCAB, size=n).tolist() for n in (9, 12, 7)]
    alphas = [0.9, 0.1, 0.5]
    settings = DecodeSettings(mode="ngsd", max_new_tokens=200)
    free = engine.decode(prompts, None, settings, alpha=alphas)
    row = free.sequence(0)
    phrase = row[100:102]  # in row 0's window at the first check (tokens 64..127)
    ends = {row[m - 1] for m in range(140, 200, 11)} - set(phrase)
    _, stopped = _engine_case(engine, prompts, alphas, settings, _fake_texts(ends), phrase)
    assert stopped.lengths[0] < 200  # the forced trigger stopped row 0 ...
    assert stopped.lengths[1] == 200  # ... never a row with alpha < 0.5
    with pytest.raises(ValueError, match="tables"):
        engine.decode(prompts, None, dataclasses.replace(settings, early_stop=True))


def test_engine_early_stop_at_the_cap_with_a_short_rule(pair):
    base, expert = pair
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    prompts = [np.random.RandomState(1).randint(4, VOCAB, size=10).tolist()]
    rule = es.EarlyStopRule(check_from=16, check_every=5, check_until=40, window=8, extra_tokens=20)
    settings = DecodeSettings(mode="ngsd", max_new_tokens=64, early_stop_rule=rule)
    free = engine.decode(prompts, None, settings, alpha=0.9)
    phrase = free.sequence(0)[12:13]  # one token in the window at 16
    _, stopped = _engine_case(engine, prompts, [0.9], settings, _fake_texts(), phrase)
    assert stopped.lengths[0] == 36  # no sentence ends: cap = 16 + 20
