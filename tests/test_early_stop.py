"""The optional early-stop heuristic (spec §5): token tables from a tiny tokenizer, the jnp check
against a direct Python port of the reference's rule on decoded text, and the fused engine with it on."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ngsd_jax.decoding import early_stop as es
from ngsd_jax.decoding.settings import DecodeSettings
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.checkpoints.weights import load_model

CORPUS = [
    "I'm sorry, I cannot help with that. I can't do it! As an AI I will not. Is it not appropriate?",
    "the cat sat on the mat and the dog ran in the park with a red ball",
    "Smile 😀 and sun ☀ and rocket 🚀 bell \x07 carriage \r tab \t newline \n quotes “like this” — dash",
    "spaces   here  and there. Done! Really? Yes.\n",
]
FILLER = " the cat sat on the mat and the dog ran in the park with a red ball"

# ---------------------------------------------------------------------------------------------
# The reference's rule, ported directly onto decoded text (spec §5 and the reference's checks:
# lengths n >= 128, n % 7 == 0, n <= 256; phrases case-insensitive; control = U+0000-U+001F).

REFERENCE_PHRASES = ("I'm sorry", "I am sorry", "I cannot", "I can't", "I apologize", "As an AI", "I'm not able to",
                     "I am unable", "I will not", "I won't", "not appropriate", "illegal and unethical")
REFERENCE_EMOJI = re.compile("[\u2300-\u23ff\u2600-\u27bf\u2b00-\u2bff\U0001F000-\U0001FAFF]")
REFERENCE_CONTROL = re.compile("[\x00-\x1f]")


def reference_step(decode, output_ids, alpha, cap, phrases=REFERENCE_PHRASES, first=128, every=7, last=256,
                   window=64, extra=128):
    """After each new token: (stop now, cap). `cap` is None until a check triggers."""
    n = len(output_ids)
    if cap is not None and (n >= cap or (n > cap // 2 and decode(output_ids).rstrip().endswith((".", "!", "?")))):
        return True, cap
    if alpha >= 0.5 and n >= first and n % every == 0 and n <= last:
        text = decode(output_ids[-window:])
        if (any(p.lower() in text.lower() for p in phrases) or text.endswith("   ")
                or REFERENCE_EMOJI.search(text) or REFERENCE_CONTROL.search(text)):
            cap = n + extra if cap is None else min(cap, n + extra)
    return False, cap


def reference_stop(decode, tokens, alpha, phrases=REFERENCE_PHRASES, **rule):
    """(length at which the reference ends the sequence or None, final cap or None)."""
    cap = None
    for n in range(1, len(tokens) + 1):
        stop, cap = reference_step(decode, tokens[:n], alpha, cap, phrases, **rule)
        if stop:
            return n, n
    return None, cap


def _port_rule(rule: es.EarlyStopRule) -> dict:
    return dict(first=rule.check_from, every=rule.check_every, last=rule.check_until, window=rule.window,
                extra=rule.extra_tokens)


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


def test_module_constants_are_the_reference_s():
    assert es.REFUSAL_PHRASES == REFERENCE_PHRASES
    assert [m for m in range(400) if es.EarlyStopRule().is_check(m)] == list(range(133, 253, 7))
    assert (es.CHECK_FROM, es.CHECK_EVERY, es.CHECK_UNTIL, es.WINDOW, es.EXTRA_TOKENS, es.MIN_ALPHA) == (
        128, 7, 256, 64, 128, 0.5)
    for cp in list(range(0x2200, 0x2C00)) + list(range(0x1EF00, 0x1FC00)) + list(range(0, 0x80)):
        assert es.is_emoji(chr(cp)) == bool(REFERENCE_EMOJI.match(chr(cp))), hex(cp)
        assert es.is_control(chr(cp)) == bool(REFERENCE_CONTROL.match(chr(cp))), hex(cp)
    with pytest.raises(ValueError):
        es.EarlyStopRule(check_from=32, window=64)
    assert not DecodeSettings().early_stop  # off by default


def _triggers(tables, ids) -> bool:
    """The trigger automaton run over token ids, on the host."""
    state = 0
    for i in ids:
        state = tables.trigger_automaton[i, state]
    return state == tables.trigger_automaton.shape[1] - 1


def test_tables_flag_emoji_control_sentence_ends_and_spaces(tokenizer, tables):
    for text in ("😀", "🚀", "☀", " 😀", "⭐", "❤", " x ⭐ y", "\x07", "\r", "\n", "\t", "\x00", "\x1f",
                 "I'm sorry", "SO i AM UNABLE to"):
        assert _triggers(tables, _ids(tokenizer, text)), repr(text)
    for text in ("\x7f", "the cat sat.", "“like this”", "—", "I'm sorr", "   ", "©", "→", " I am"):
        assert not _triggers(tables, _ids(tokenizer, text)), repr(text)
    star = _ids(tokenizer, "⭐")  # not in the corpus: three byte tokens; only all three make the emoji
    assert len(star) == 3 and not _triggers(tables, star[:2]) and not _triggers(tables, star[1:])

    def one(text):
        ids = _ids(tokenizer, text)
        assert len(ids) == 1, (text, ids)
        return ids[0]

    for end in (".", "!", "?"):
        assert tables.ends_sentence[one(end)] and not tables.blank[one(end)]
    for other in (",", " the", "a"):
        assert not tables.ends_sentence[one(other)]
    assert tables.blank[one(" ")] and tables.blank[one("\n")] and tables.blank[tokenizer.eos_token_id]
    assert tables.trailing_spaces[one("  ")] == 2 and tables.only_spaces[one("  ")]
    assert tables.trailing_spaces[one(" ")] == 1 and tables.only_spaces[one(" ")]
    assert tables.trailing_spaces[one(" the")] == 0 and not tables.only_spaces[one(" the")]
    assert tables.only_spaces[tokenizer.eos_token_id]  # special tokens decode to nothing
    assert tables.trigger_automaton[tokenizer.eos_token_id].tolist() == list(range(tables.trigger_automaton.shape[1]))
    assert tables.ends_sentence.shape == (len(tokenizer),)


def test_trigger_automaton_finds_any_split_in_any_case():
    rng = np.random.RandomState(0)
    texts = ["I cannot do it", "i CANNOT", "you can not", "As an a", "s an AI!", "not appropriat", "e",
             "I'M SORRY", "I am sorr", "y", "illegal and unethical", "I can", "'t", "x", "", "😀", "☀"]
    pieces = [t.encode() for t in texts] + ["😀".encode()[:1], "😀".encode()[1:3], "😀".encode()[3:],
                                            "☀".encode()[:2], "☀".encode()[2:], "“".encode()[:1], "\n".encode()]
    automaton = es.trigger_automaton(pieces, REFERENCE_PHRASES)
    seen = automaton.shape[1] - 1

    def run(ids):
        state = 0
        for i in ids:
            state = automaton[i, state]
        return state == seen

    for _ in range(2000):
        ids = rng.randint(0, len(pieces), size=rng.randint(1, 7)).tolist()
        text = b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")
        expected = (any(p.lower() in text.lower() for p in REFERENCE_PHRASES) or bool(REFERENCE_EMOJI.search(text))
                    or bool(REFERENCE_CONTROL.search(text)))
        assert run(ids) == expected, [pieces[i] for i in ids]
    assert run([texts.index("I can"), texts.index("'t")]) and not run([texts.index("I can")])
    assert automaton.dtype == np.int16


# ---------------------------------------------------------------------------------------------
# The jnp check against the port, on token sequences built to hit each rule and boundary


@functools.partial(jax.jit, static_argnums=0)
def _run_rule(rule, tables, tokens, alpha):
    """The engine's per-step use of early_stop_step over given token rows: (stop length or 0, cap)."""
    b, n = tokens.shape

    def body(carry, m):
        buf, cap, triggered, done, length = carry
        buf = buf.at[:, m - 1].set(tokens[:, m - 1])
        stop, cap, triggered = es.early_stop_step(tables, rule, buf, m, alpha, cap, triggered, ~done)
        return (buf, cap, triggered, done | stop, jnp.where(stop, m, length)), None

    init = (jnp.zeros_like(tokens), jnp.full((b,), es.NO_CAP, jnp.int32), jnp.zeros((b,), bool),
            jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    (_, cap, _, _, length), _ = jax.lax.scan(body, init, jnp.arange(1, n + 1))
    return length, cap


def _sequence(tokenizer, events: dict, total: int) -> list[int]:
    """Filler tokens with each event (a text, or token ids) inserted at its token index."""
    filler = _ids(tokenizer, FILLER)
    out, f = [], 0
    while len(out) < total:
        if len(out) in events:
            event = events[len(out)]
            out += _ids(tokenizer, event) if isinstance(event, str) else list(event)
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
        ref_len, ref_cap = reference_stop(decode, row, alphas[i], **_port_rule(rule))
        assert (length[i] or None) == ref_len, (i, cases[i], length[i], ref_len)
        assert (None if cap[i] == es.NO_CAP else cap[i]) == ref_cap, (i, cases[i], cap[i], ref_cap)
        got.append(ref_len)
    return got


def test_window_check_matches_the_reference(tokenizer, tables):
    refusal = " I cannot"
    n_ref, n3, n2 = (len(_ids(tokenizer, t)) for t in (refusal, "   ", "  "))
    split = _ids(tokenizer, " I can") + _ids(tokenizer, "not")  # a tokenization no table of phrases holds
    assert split != _ids(tokenizer, refusal)
    cap_stop = 133 + es.EXTRA_TOKENS
    cases = [  # (events by token index, alpha), expected stop length
        (({130 - n_ref: refusal, 132: ".", 150: "."}, 0.9), 151),  # seen at 133; '.' at 132 is before the trigger
        (({133 - n_ref: refusal, 150: "."}, 0.9), 151),  # ends exactly at 133, the first check
        (({134 - n_ref: refusal, 150: "."}, 0.9), 151),  # ends at 134: seen at 140
        (({134 - n_ref: refusal, 138: "."}, 0.9), 140 + es.EXTRA_TOKENS),  # '.' at 139, before the trigger
        (({130 - n_ref: refusal, 150: "."}, 0.5), 151),  # alpha 0.5 is enough
        (({130 - n_ref: refusal, 150: "."}, 0.49), None),  # ... 0.49 is not
        (({66: refusal, 150: "."}, 0.9), None),  # in the window at 128, which is no check; gone by 133
        (({68: refusal, 150: "."}, 0.9), None),  # starts one token before the window [69, 133)
        (({69: refusal, 150: "."}, 0.9), 151),  # starts at the window's first token
        (({100: refusal, 20: ".", 120: "?"}, 0.9), cap_stop),  # no stop before the trigger: then the cap
        (({252 - n_ref: refusal, 280: "."}, 0.9), 281),  # seen at 252, the last check
        (({253 - n_ref: refusal, 280: "."}, 0.9), None),  # ends at 253: no check after 252
        (({110: refusal}, 0.9), cap_stop),  # no sentence end: stops at the cap 133 + 128
        (({40: "I'm sorry", 150: "."}, 0.9), None),  # only before 128: never checked
        (({140: "I'm sorry", 150: "."}, 0.9), 151),  # no leading space
        (({100: " i CANNOT", 150: "."}, 0.9), 151),  # any case
        (({100: " AS AN AI", 150: "."}, 0.9), 151),
        (({100: split, 150: "."}, 0.9), 151),  # any tokenization
        (({100: " I can", 150: "."}, 0.9), None),
        (({133 - n3: "   ", 150: "."}, 0.9), 151),  # three trailing spaces at check 133
        (({133 - n2: "  ", 150: "."}, 0.9), None),  # two are not enough
        (({130: "   ", 150: "."}, 0.9), None),  # spaces followed by filler at the check: not trailing
        (({100: " 😀", 150: "."}, 0.9), 151),
        (({100: " 🚀", 150: "."}, 0.9), 151),
        (({100: " ☀", 150: "."}, 0.9), 151),
        (({100: " ⭐", 150: "."}, 0.9), 151),  # split after 0xE2: the neighbour-pair rule
        (({100: "❤", 150: "."}, 0.9), 151),
        (({131: "⭐", 150: "."}, 0.9), 151),  # 0xE2 at 131, the rest at 132 and 133: seen at 140
        (({68: "⭐", 150: "."}, 0.9), None),  # the first window [69, 133) starts mid-character: nothing
        (({100: " bell \x07", 150: "."}, 0.9), 151),
        (({100: "\n", 150: "."}, 0.9), 151),  # newline and tab are control characters
        (({100: "\t", 150: "."}, 0.9), 151),
        (({100: "\r", 150: "."}, 0.9), 151),
        (({100: "“like this” — \x7f ©", 150: "."}, 0.9), None),  # quotes, dash, DEL, ©: no trigger
        (({120: refusal, 132: ".", 133: " "}, 0.9), 134),  # the text ends with '.' then a space: stops
        (({120: refusal, 132: "."}, 0.9), cap_stop),  # the '.' came with the trigger, filler after it
        (({120: refusal, 140: "!"}, 0.9), 141),
        (({120: refusal, 140: "?"}, 0.9), 141),
        (({120: refusal, 140: ",", 200: "."}, 0.9), 201),
    ]
    got = _compare(tokenizer, tables, [case for case, _ in cases])
    assert got == [expected for _, expected in cases]


def test_window_check_with_short_rule_uses_half_the_cap(tokenizer, tables):
    # trigger at 8 -> cap 48: sentence ends at or before 24 are ignored, the next one ends it
    rule = es.EarlyStopRule(check_from=8, check_every=4, check_until=40, window=8, extra_tokens=40)
    cases = [({3: " I cannot", 10: ".", 20: "!", 30: "?"}, 0.9),
             ({3: " I cannot", 10: ".", 23: "!"}, 0.9),  # the 24th token is not past half the cap
             ({3: " I cannot", 10: ".", 24: "!"}, 0.9),  # the 25th is
             ({3: " I cannot"}, 0.9),
             ({3: " I cannot", 30: "?"}, 0.1)]
    got = _compare(tokenizer, tables, cases, rule, total=80)
    assert got == [31, 48, 25, 48, None]


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
    phrases = ["".join(texts[t] for t in phrase)]
    tables = es.build_tables(texts, None, phrases)
    free = engine.decode(prompts, None, dataclasses.replace(settings, early_stop=False), alpha=alphas)
    stopped = engine.decode(prompts, None, dataclasses.replace(settings, early_stop=True), alpha=alphas,
                            early_stop_tables=tables)
    decode = lambda toks: "".join(texts[t] for t in toks)  # noqa: E731
    n = settings.max_new_tokens
    for i, alpha in enumerate(alphas):
        ref, _ = reference_stop(decode, free.sequence(i), alpha, phrases, **_port_rule(settings.early_stop_rule))
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
    phrase = row[100:102]  # in row 0's window at the first check (tokens 69..132)
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
    phrase = free.sequence(0)[12:13]  # one token in the window [12, 20) of the first check, at 20
    _, stopped = _engine_case(engine, prompts, [0.9], settings, _fake_texts(), phrase)
    assert stopped.lengths[0] == 40  # no sentence ends: cap = 20 + 20
