"""The authors' early stop (spec §5). The reference is a port written here, rule for rule, from the
authors' utils/dis_safeDecoding_self_instinct_time_count.py (`detect_abnormal_output` and the decode
loop of SelfInstinctSafeDecoding.generate that calls it), as plain Python over decoded strings; the
module's tables, its jitted check and the fused engine are run against it on token sequences built
for each rule and its boundary."""

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

from ngsd_jax.checkpoints.weights import load_model
from ngsd_jax.decoding import early_stop as es
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.settings import MODES, DecodeSettings
from ngsd_jax.refusals import EARLY_STOP_PHRASES

# ---------------------------------------------------------------------------------------------
# The port. Data copied from detect_abnormal_output: its refusal patterns and its emoji regex.

AUTHORS_REFUSAL_PATTERNS = [
    "i cannot", "i can't", "just an ai", "cannot provide", "cannot fulfill", "i am sorry", "i'm sorry",
    "i apologize", "cannot help with", "can't help with", "cannot answer", "can't answer",
]
AUTHORS_EMOJI = re.compile(
    "["
    "\U0001F600-\U0001F64F"
    "\U0001F300-\U0001F5FF"
    "\U0001F680-\U0001F6FF"
    "\U0001F1E0-\U0001F1FF"
    "\U00002700-\U000027BF"
    "\U0001F900-\U0001F9FF"
    "\U0001FA70-\U0001FAFF"
    "]",
    flags=re.UNICODE,
)


def authors_detect(text: str, refusal_patterns=AUTHORS_REFUSAL_PATTERNS) -> bool:
    """detect_abnormal_output after its `tokenizer.decode(last 64 generated, skip_special_tokens=True)`."""
    if sum(p in text.lower() for p in refusal_patterns) >= 1:
        return True
    if len(text) - len(text.rstrip(" ")) >= 3:
        return True
    text_with_no_space_tail = text.rstrip(" ")
    if AUTHORS_EMOJI.search(text_with_no_space_tail):
        return True
    if any("\u0000" <= ch <= "\u001F" for ch in text_with_no_space_tail):
        return True
    return False


def authors_loop(decode, decode_token, tokens, alpha, max_new_tokens, eos_id=None, first=128, every=7, last=256,
                 window=64, extra=128, refusal_patterns=AUTHORS_REFUSAL_PATTERNS):
    """The loop's stopping rules (num_speculate_tokens = 1) over a given stream of chosen tokens:
    (the generated length it ends at, or None when it would run past the stream; the length at
    which a check triggered, or None)."""
    dynamic_M, early_stop_flag, triggered_at, cur_len, generated = max_new_tokens, False, None, 0, []
    while cur_len < dynamic_M:
        if cur_len == len(tokens):
            return None, triggered_at
        cur_token = tokens[cur_len]
        generated.append(cur_token)
        cur_len += 1
        if cur_len >= dynamic_M:
            break
        if cur_token == eos_id:
            break
        if early_stop_flag and cur_len >= dynamic_M / 2:
            if decode_token(cur_token) in [".", "!", "?"]:
                break
        if cur_len >= first and alpha >= 0.5:
            if cur_len % every == 0 and not early_stop_flag and cur_len <= last:
                seq = generated[-window:] if len(generated) > window else generated
                if authors_detect(decode(seq), refusal_patterns):
                    early_stop_flag, triggered_at = True, cur_len
                    dynamic_M = cur_len + extra
    return cur_len, triggered_at


def _port_rule(rule: es.EarlyStopRule) -> dict:
    return dict(first=rule.check_from, every=rule.check_every, last=rule.check_until, window=rule.window,
                extra=rule.extra_tokens)


# ---------------------------------------------------------------------------------------------
# A tiny byte-level BPE tokenizer

CORPUS = [
    "I'm sorry, I cannot help with that. I can't do it! As an AI I will not. Is it not appropriate?",
    "the cat sat on the mat and the dog ran in the park with a red ball",
    "Smile 😀 and sun ☀ and rocket 🚀 bell \x07 carriage \r tab \t newline \n quotes “like this” — dash",
    "spaces   here  and there. Done! Really? Yes.\n",
    "Wait... so . and so ! or so ? Wait... Wait...",
]
FILLER = " the cat sat on the mat and the dog ran in the park with a red ball"
TOTAL = 320  # tokens in each test stream, and the max_new_tokens the port runs with


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


def _one(tokenizer, text):
    ids = _ids(tokenizer, text)
    assert len(ids) == 1, (text, ids)
    return ids[0]


# ---------------------------------------------------------------------------------------------
# Tables and the automaton against the port


def test_constants_phrases_and_checks_are_the_authors():
    assert sorted(EARLY_STOP_PHRASES) == sorted(AUTHORS_REFUSAL_PATTERNS)
    assert [m for m in range(400) if es.EarlyStopRule().is_check(m)] == list(range(133, 253, 7))
    assert (es.CHECK_FROM, es.CHECK_EVERY, es.CHECK_UNTIL, es.WINDOW, es.EXTRA_TOKENS, es.MIN_ALPHA,
            es.TRAILING_SPACES) == (128, 7, 256, 64, 128, 0.5, 3)
    with pytest.raises(ValueError):
        es.EarlyStopRule(check_from=32, window=64)
    with pytest.raises(ValueError, match="lower-case"):
        es.trigger_patterns(["I cannot"])
    assert not DecodeSettings().early_stop  # off by default
    # The spellings assume these are the only non-ASCII characters that lower-case into ASCII.
    into_ascii = {chr(cp) for cp in range(0x80, 0x110000) if any(ord(c) < 0x80 for c in chr(cp).lower())}
    assert into_ascii == {"\u0130", "\u212a"}


def _host_triggers(tables, ids) -> bool:
    """The trigger automaton run over token ids, on the host."""
    state = 0
    for i in ids:
        state = tables.trigger_automaton[i, state]
    return state == tables.trigger_automaton.shape[1] - 1


def test_automaton_on_every_code_point_near_the_emoji_and_control_ranges():
    points = [cp for cp in list(range(0x3000)) + list(range(0x1F000, 0x1FC00)) if not 0xD800 <= cp < 0xE000]
    automaton = es.trigger_automaton([chr(cp).encode("utf-8") for cp in points])
    got = automaton[:, 0] == automaton.shape[1] - 1
    expected = np.asarray([authors_detect(chr(cp)) for cp in points])
    assert (got == expected).all(), [hex(points[i]) for i in np.flatnonzero(got != expected)][:10]
    # the project's former ranges flagged these; the authors' regex does not
    for cp in (0x26A0, 0x2605, 0x2B50, 0x231A, 0x2600, 0x1F000, 0x1F650, 0x1F700, 0x1FA00):
        assert not authors_detect(chr(cp)) and not got[points.index(cp)], hex(cp)


def test_every_phrase_and_no_other_in_any_case(tokenizer, tables):
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
    texts = [f" so {p} x" for p in AUTHORS_REFUSAL_PATTERNS] + [f" {p.upper()}" for p in AUTHORS_REFUSAL_PATTERNS]
    texts += [" JUST AN A\u0130", " Just an a\u0130 x", " \u0130 cannot", " \u0131 cannot", " I can’t"]
    # the project's former extra phrases, which the authors do not have
    texts += [" I will not", " I won't", " As an AI", " not appropriate", " illegal and unethical",
              " I'm not able to", " I am unable", " I'm sorr", " cannot help", " I can"]
    for text in texts:
        ids = _ids(tokenizer, text)
        assert _host_triggers(tables, ids) == authors_detect(decode(ids)), repr(text)
    verdicts = {t: authors_detect(t) for t in texts}
    assert all(verdicts[f" so {p} x"] for p in AUTHORS_REFUSAL_PATTERNS)
    assert verdicts[" JUST AN A\u0130"] and not verdicts[" \u0130 cannot"] and not verdicts[" I can’t"]
    assert not any(verdicts[t] for t in texts[-10:])


def test_random_windows_match_the_port():
    """The jitted window check (automaton + trailing spaces) on random token windows, any split."""
    rng = np.random.RandomState(0)
    texts = ["I cannot do it", "i CANNOT", "you can not", "Just an a", "I", "\u0130", "i", "\u212a", " ",
             "  ", "x ", "cannot help ", "with", "CAN'T ANSWER", "I'M SORRY", "I am sorr", "y", "I can", "'t",
             "x", "", "😀", "☀", "\u00a0", "\x1f", "\x7f"]
    raws = [t.encode() for t in texts] + ["😀".encode()[:1], "😀".encode()[1:3], "😀".encode()[3:],
                                          "✂".encode()[:2], "✂".encode()[2:], "“".encode()[:1]]
    texts += [r.decode("utf-8", errors="replace") for r in raws[len(texts):]]
    phrases = EARLY_STOP_PHRASES + ("ok",)  # "ok" puts the Kelvin sign to the test
    tables = es.build_tables(texts, raws, None, phrases)
    width = 6
    rows = [[texts.index("")] * width for _ in range(3000)]
    for row in rows:
        n = rng.randint(1, width + 1)
        row[width - n:] = rng.randint(0, len(raws), size=n).tolist()
    rule = es.EarlyStopRule(check_from=width, window=width)
    got = jax.jit(es.window_triggers, static_argnums=3)(tables, jnp.asarray(rows), width, rule)
    for row, hit in zip(rows, np.asarray(got)):
        text = b"".join(raws[i] for i in row).decode("utf-8", errors="replace")
        expected = authors_detect(text) or "ok" in text.lower()
        assert bool(hit) == expected, [raws[i] for i in row]
    assert es.trigger_automaton([b"x"]).dtype == np.int16


def test_sentence_end_is_the_token_decoded_alone(tokenizer, tables):
    alone = [tokenizer.decode(i) for i in range(len(tokenizer))]  # as the authors call it
    assert tables.ends_sentence.tolist() == [t in [".", "!", "?"] for t in alone]
    for end in (".", "!", "?"):
        assert tables.ends_sentence[_one(tokenizer, end)]
    for other in (" .", " !", "...", ",", " ", ".\n"):
        ids = _ids(tokenizer, other)
        assert len(ids) > 1 or not tables.ends_sentence[ids[0]], other
    assert len(_ids(tokenizer, " .")) == 1 and len(_ids(tokenizer, "...")) == 1
    padded = es.early_stop_tables(tokenizer, len(tokenizer) + 5)  # engine rows past the tokenizer
    assert not padded.ends_sentence[len(tokenizer):].any() and padded.only_spaces[len(tokenizer):].all()
    # SentencePiece-style: "▁." decodes alone to ".", so it ends a sentence, as for the authors.
    sp = Tokenizer(models.BPE(byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    sp.train_from_iterator(["so . and so ! ok", "Done. Wait"], trainers.BpeTrainer(
        vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    sp = PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="</s>", unk_token="<unk>")
    space_dot = sp.convert_tokens_to_ids("▁.")
    assert sp.decode(space_dot) == "." and es.early_stop_tables(sp, len(sp)).ends_sentence[space_dot]


# ---------------------------------------------------------------------------------------------
# The jnp check in a loop against the port, on token streams built to hit each rule and boundary


@functools.partial(jax.jit, static_argnums=0)
def _run_rule(rule, tables, tokens, alpha):
    """The engine's per-step use of early_stop_step over given token rows: (stop length or 0, cap, triggered)."""
    b, n = tokens.shape

    def body(carry, m):
        buf, cap, triggered, done, length = carry
        buf = buf.at[:, m - 1].set(tokens[:, m - 1])
        stop, cap, triggered = es.early_stop_step(tables, rule, buf, m, alpha, cap, triggered, ~done)
        return (buf, cap, triggered, done | stop, jnp.where(stop, m, length)), None

    init = (jnp.zeros_like(tokens), jnp.full((b,), es.NO_CAP, jnp.int32), jnp.zeros((b,), bool),
            jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    (_, cap, triggered, _, length), _ = jax.lax.scan(body, init, jnp.arange(1, n + 1))
    return length, cap, triggered


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


def _compare(tokenizer, tables, cases, rule=es.EarlyStopRule(), total=TOTAL):
    """Runs the module and the port on each (events, alpha); returns the port's lengths (None: the
    authors' cap lies past max_new_tokens, where the module stops at max_new_tokens)."""
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
    rows = [_sequence(tokenizer, events, total) for events, _ in cases]
    alphas = np.asarray([a for _, a in cases], np.float32)
    length, cap, triggered = jax.device_get(
        _run_rule(rule, tables, jnp.asarray(rows, jnp.int32), jnp.asarray(alphas)))
    got = []
    for i, row in enumerate(rows):
        end, at = authors_loop(decode, tokenizer.decode, row, float(alphas[i]), total, **_port_rule(rule))
        assert (length[i] or total) == (total if end is None else end), (i, cases[i], length[i], end)
        assert bool(triggered[i]) == (at is not None), (i, cases[i])
        if at is not None and not length[i]:
            assert cap[i] == at + rule.extra_tokens, (i, cases[i])
        got.append(end)
    return got


def test_stream_check_positions_alpha_phrases_and_sentence_ends(tokenizer, tables):
    refusal = " I cannot"
    n_ref, n3, n2 = (len(_ids(tokenizer, t)) for t in (refusal, "   ", "  "))
    split = _ids(tokenizer, " I can") + _ids(tokenizer, "not")  # a tokenization no table of phrases holds
    assert split != _ids(tokenizer, refusal)
    cap_133 = 133 + es.EXTRA_TOKENS
    cases = [  # (events by token index, alpha), the authors' length
        (({130 - n_ref: refusal, 132: ".", 150: "."}, 0.9), 151),  # seen at 133; '.' at 132 is before the trigger
        (({133 - n_ref: refusal, 150: "."}, 0.9), 151),  # ends exactly at 133, the first check
        (({134 - n_ref: refusal, 150: "."}, 0.9), 151),  # ends at 134: seen at 140
        (({134 - n_ref: refusal, 138: "."}, 0.9), 140 + es.EXTRA_TOKENS),  # '.' at 139, before the trigger
        (({130 - n_ref: refusal, 150: "."}, 0.5), 151),  # alpha 0.5 is enough
        (({130 - n_ref: refusal, 150: "."}, 0.49), TOTAL),  # ... 0.49 is not
        (({66: refusal, 150: "."}, 0.9), TOTAL),  # in the window at 128, which is no check; gone by 133
        (({68: refusal, 150: "."}, 0.9), TOTAL),  # starts one token before the window [69, 133)
        (({69: refusal, 150: "."}, 0.9), 151),  # starts at the window's first token
        (({100: refusal, 20: ".", 120: "?"}, 0.9), cap_133),  # no stop before the trigger: then the cap
        (({252 - n_ref: refusal, 280: "."}, 0.9), 281),  # seen at 252, the last check
        (({252 - n_ref: refusal}, 0.9), None),  # cap 380 > max_new_tokens: the authors run past it
        (({253 - n_ref: refusal, 280: "."}, 0.9), TOTAL),  # ends at 253: no check after 252
        (({110: refusal}, 0.9), cap_133),  # no sentence end: stops at the cap 133 + 128
        (({40: " I'm sorry", 150: "."}, 0.9), TOTAL),  # only before 128: never checked
        (({140: "I'm sorry", 150: "."}, 0.9), 151),  # no leading space; seen at 147
        (({100: " i CANNOT", 150: "."}, 0.9), 151),  # any case
        (({100: " JUST AN AI", 150: "."}, 0.9), 151),
        (({100: " Just an A\u0130", 150: "."}, 0.9), 151),  # 'İ'.lower() is 'i' + U+0307
        (({100: " \u0130 cannot", 150: "."}, 0.9), TOTAL),  # ... so this is no "i cannot"
        (({100: " As an AI", 150: "."}, 0.9), TOTAL),  # not one of the authors' phrases
        (({100: " I will not", 150: "."}, 0.9), TOTAL),
        (({100: " not appropriate", 150: "."}, 0.9), TOTAL),
        (({100: split, 150: "."}, 0.9), 151),  # any tokenization
        (({100: " I can", 150: "."}, 0.9), TOTAL),
        (({120: refusal, 140: "."}, 0.9), 141),  # the sentence-end tokens
        (({120: refusal, 140: "!"}, 0.9), 141),
        (({120: refusal, 140: "?"}, 0.9), 141),
        (({120: refusal, 140: ".", 141: " "}, 0.9), 141),
        (({120: refusal, 132: ".", 133: " "}, 0.9), cap_133),  # the text ends with '.' then ' ': not the token
        (({120: refusal, 132: "."}, 0.9), cap_133),  # the '.' came before the trigger
        (({120: refusal, 140: " ."}, 0.9), cap_133),  # " ." decoded alone is not "."
        (({120: refusal, 140: "...", 150: " !"}, 0.9), cap_133),  # nor is "..."
        (({120: refusal, 140: ",", 200: "."}, 0.9), 201),
        (({120: refusal, 140: "\x07"}, 0.9), cap_133),  # "\x07" ends nothing
    ]
    got = _compare(tokenizer, tables, [case for case, _ in cases])
    assert got == [expected for _, expected in cases]


def test_stream_trailing_spaces_emoji_and_control_characters(tokenizer, tables):
    n3, n2 = (len(_ids(tokenizer, t)) for t in ("   ", "  "))
    happy = _ids(tokenizer, "🙂")  # not in the corpus: split over byte tokens
    assert len(happy) >= 3
    cases = [
        (({133 - n3: "   ", 150: "."}, 0.9), 151),  # three trailing spaces at check 133
        (({133 - n2: "  ", 150: "."}, 0.9), TOTAL),  # two are not enough
        (({131: " ", 132: "  ", 150: "."}, 0.9), 151),  # three over two tokens
        (({130: "   ", 150: "."}, 0.9), TOTAL),  # spaces followed by filler at the check: not trailing
        (({130: "\u00a0\u00a0\u00a0", 150: "."}, 0.9), TOTAL),  # no-break spaces are not ' '
        (({100: " 😀", 150: "."}, 0.9), 151),
        (({100: " 🚀", 150: "."}, 0.9), 151),
        (({100: " ☀", 150: "."}, 0.9), TOTAL),  # U+2600: not in the authors' ranges
        (({100: " ⭐", 150: "."}, 0.9), TOTAL),  # U+2B50: nor this
        (({133 - len(happy): happy}, 0.9), 133 + es.EXTRA_TOKENS),  # its last byte at 132: seen at 133
        (({134 - len(happy): happy}, 0.9), 140 + es.EXTRA_TOKENS),  # its last byte at 133: seen whole at 140
        (({68: happy, 150: "."}, 0.9), TOTAL),  # the first window [69, 133) starts mid-character: nothing
        (({100: " bell \x07", 150: "."}, 0.9), 151),
        (({100: "\n", 150: "."}, 0.9), 151),  # newline and tab are control characters
        (({100: "\t", 150: "."}, 0.9), 151),
        (({100: "\r", 150: "."}, 0.9), 151),
        (({100: "\x00", 150: "."}, 0.9), 151),
        (({100: "\x1f", 150: "."}, 0.9), 151),
        (({100: "“like this” — \x7f \x85 \u2028 ©", 150: "."}, 0.9), TOTAL),  # quotes, dash, DEL, C1, ©
    ]
    # every boundary of the authors' emoji ranges, just inside and just outside
    for lo, hi in ((0x1F600, 0x1F64F), (0x1F300, 0x1F5FF), (0x1F680, 0x1F6FF), (0x1F1E0, 0x1F1FF),
                   (0x2700, 0x27BF), (0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF)):
        for cp in (lo - 1, lo, hi, hi + 1):
            cases.append((({100: " " + chr(cp), 150: "."}, 0.9), 151 if AUTHORS_EMOJI.match(chr(cp)) else TOTAL))
    got = _compare(tokenizer, tables, [case for case, _ in cases])
    assert got == [expected for _, expected in cases]
    assert got.count(151) > 10 and got.count(TOTAL) > 10


def test_short_rule_half_the_cap(tokenizer, tables):
    # trigger at 8 -> cap 48: a sentence end counts from the 24th token (2 * 24 >= 48) on
    rule = es.EarlyStopRule(check_from=8, check_every=4, check_until=40, window=8, extra_tokens=40)
    cases = [({3: " I cannot", 10: ".", 20: "!", 30: "?"}, 0.9),
             ({3: " I cannot", 10: ".", 22: "!"}, 0.9),  # the 23rd token is before half the cap
             ({3: " I cannot", 10: ".", 23: "!"}, 0.9),  # the 24th is at it
             ({3: " I cannot"}, 0.9),
             ({3: " I cannot", 30: "?"}, 0.1),
             ({3: " I cannot", 13: " I cannot"}, 0.9)]  # no check after a trigger: the cap stays 48
    got = _compare(tokenizer, tables, cases, rule, total=80)
    assert got == [31, 48, 24, 48, 80, 48]
    odd = dataclasses.replace(rule, extra_tokens=41)  # cap 49: from the 25th token (24.5) on
    got = _compare(tokenizer, tables, [({3: " I cannot", 23: "!"}, 0.9), ({3: " I cannot", 24: "!"}, 0.9)], odd, 80)
    assert got == [49, 25]


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
    return ["." if i in sentence_ends else f" w{i}|" for i in range(VOCAB)]


def _engine_case(engine, prompts, alphas, settings, texts, phrase):
    phrases = ["".join(texts[t] for t in phrase)]
    tables = es.build_tables(texts, None, None, phrases)
    free = engine.decode(prompts, None, dataclasses.replace(settings, early_stop=False), alpha=alphas)
    stopped = engine.decode(prompts, None, dataclasses.replace(settings, early_stop=True), alpha=alphas,
                            early_stop_tables=tables)
    decode = lambda toks: "".join(texts[t] for t in toks)  # noqa: E731
    n = settings.max_new_tokens
    for i, alpha in enumerate(alphas):
        ref, _ = authors_loop(decode, texts.__getitem__, free.sequence(i), alpha, n,
                              refusal_patterns=phrases, **_port_rule(settings.early_stop_rule))
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


def test_engine_early_stop_applies_to_ngsd_only(pair):
    base, expert = pair
    engine = Engine(base, expert, vocab_size=VOCAB, stop_ids=[])
    prompts = [np.random.RandomState(2).randint(4, VOCAB, size=8).tolist()]
    rule = es.EarlyStopRule(check_from=16, check_every=5, check_until=40, window=8, extra_tokens=20)
    tables = es.build_tables(_fake_texts(), None, None, ["|"])  # every window triggers
    for mode in MODES:
        settings = DecodeSettings(mode=mode, max_new_tokens=48, early_stop_rule=rule)
        free = engine.decode(prompts, None, settings, alpha=0.9)
        compilations = engine.compilations
        on = engine.decode(prompts, None, dataclasses.replace(settings, early_stop=True), alpha=0.9,
                           early_stop_tables=tables)
        if mode == "ngsd":
            assert on.lengths[0] == 40 and on.sequence(0) == free.sequence(0)[:40]
        else:  # the very program of early_stop=False, which needs no tables
            assert engine.compilations == compilations, mode
            assert on.lengths[0] == free.lengths[0] == 48 and on.sequence(0) == free.sequence(0), mode
            engine.decode(prompts, None, dataclasses.replace(settings, early_stop=True), alpha=0.9)
