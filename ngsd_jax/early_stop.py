"""The reference's optional early-stop heuristic (spec §5), in token space, inside the jitted loop.

The rule, as the spec states it: from 128 generated tokens on, when alpha >= 0.5, every 7
tokens up to 256, decode the last 64 output tokens; if they contain a refusal phrase, >= 3
trailing spaces, emoji or control characters, cap the length at (current + 128) and, past
half of that cap, stop at the next '.', '!' or '?'. It is OFF by default (`DecodeSettings.
early_stop`); when off, none of this is traced into the decode program.

XLA cannot decode text, so everything the rule asks of the window's text is answered from
tables computed once on the host from the tokenizer (`early_stop_tables`), indexed by token
id inside the loop (`early_stop_step`):

- Token text. Each token's text is its text *in context*: decode([anchor, id]) minus
  decode([anchor]) with anchor = the tokens of "a" (so SentencePiece's word-initial space is
  kept), special tokens decoding to "" (skip_special_tokens=True), no clean-up of spaces. For
  byte-level BPE the window's text is then exactly the concatenation of its tokens' texts.
- Emoji or control (`emoji_or_control[V]`). A character is an emoji when its Unicode category
  is So or Sk and its code point lies in one of `EMOJI_RANGES` (Misc Technical U+2300-23FF,
  Misc Symbols and Dingbats U+2600-27BF, Misc Symbols and Arrows U+2B00-2BFF, and the
  supplementary emoji planes U+1F000-1FAFF; skin-tone modifiers are Sk there). A control
  character is category Cc other than '\\n' and '\\t' ('\\r' counts). A token is flagged when
  its text holds either. Byte-level vocabularies (and SentencePiece byte fallback) split most
  emoji across tokens, whose own text is then U+FFFD, so a token is flagged too when its raw
  bytes end with an incomplete prefix of an emoji's UTF-8 encoding (at least its first two
  bytes, or the lone 4-byte lead 0xF0: code points past U+FFFF are overwhelmingly emoji) or
  begin with the last three bytes of a 4-byte emoji encoding. Every emoji of the
  supplementary planes therefore flags at least one of its tokens, whatever the split. A
  3-byte emoji split right after its lead byte 0xE2 (SmolLM2 splits ☀ ❤ ⭐ ⚠ so) cannot be
  told by one token, since 0xE2 also starts curly quotes and dashes: `ends_with_e2[V]` (raw
  bytes end with a lone 0xE2) and `emoji_after_e2[V]` (raw bytes begin with a continuation
  byte c such that 0xE2 c starts an emoji) flag it as a pair of neighbours in the window.
- Trailing spaces. `trailing_spaces[V]` counts ' ' at the end of the token's text and
  `only_spaces[V]` marks texts made only of ' ' (empty included). The window's text ends with
  the sum of trailing_spaces over its last non-only-spaces token and every token after it;
  ">= 3 trailing spaces" means >= 3 ' ' characters (not tabs or newlines).
- Sentence end (`ends_sentence[V]`): the token's text, stripped of trailing whitespace, ends
  with '.', '!' or '?'.
- Refusal phrases (`REFUSAL_PHRASES`, case-sensitive, the reference's kind of list), each
  tokenized alone and after a space, deduplicated, padded with -1 into [n, max_len] with
  their lengths. The loop matches them at every offset of the 64-token window. A phrase the
  model spells with a different tokenization than these two (rare for word-splitting
  pre-tokenizers) is not seen.

Positions, with m the generated length after the newest token: checks run at m = 128, 135,
..., 254 (m >= 128, m <= 256, (m - 128) % 7 == 0) for rows whose alpha >= 0.5; the window is
tokens [m - 64, m). A trigger sets cap = min(cap, m + 128) (a later trigger never extends
it). From the next token on, a triggered row stops after a token with m > cap // 2 that ends
a sentence, or when m reaches cap. With the spec's constants cap // 2 <= m at once, so a
triggered row stops at its next sentence end or at the cap.
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CHECK_FROM = 128  # first generated length at which the window is checked
CHECK_EVERY = 7  # check period in tokens
CHECK_UNTIL = 256  # no check past this generated length
WINDOW = 64  # tokens decoded at a check
EXTRA_TOKENS = 128  # a trigger caps the length at (current + EXTRA_TOKENS)
MIN_ALPHA = 0.5  # rows with a smaller alpha are never checked
TRAILING_SPACES = 3  # this many trailing ' ' in the window trigger
NO_CAP = np.iinfo(np.int32).max

REFUSAL_PHRASES = (
    "I'm sorry", "I am sorry", "I cannot", "I can't", "I apologize", "As an AI", "I'm not able to",
    "I am unable", "I will not", "I won't", "not appropriate", "illegal and unethical",
)
EMOJI_RANGES = ((0x2300, 0x23FF), (0x2600, 0x27BF), (0x2B00, 0x2BFF), (0x1F000, 0x1FAFF))
SENTENCE_ENDS = (".", "!", "?")


@dataclasses.dataclass(frozen=True)
class EarlyStopRule:
    """The heuristic's constants (the spec's by default); static, part of DecodeSettings."""

    check_from: int = CHECK_FROM
    check_every: int = CHECK_EVERY
    check_until: int = CHECK_UNTIL
    window: int = WINDOW
    extra_tokens: int = EXTRA_TOKENS
    min_alpha: float = MIN_ALPHA
    trailing_spaces: int = TRAILING_SPACES

    def __post_init__(self):
        if self.window < 1 or self.check_every < 1 or self.extra_tokens < 1 or self.trailing_spaces < 1:
            raise ValueError("early stop: window, check_every, extra_tokens and trailing_spaces must be >= 1")
        if self.check_from < self.window:
            raise ValueError("early stop: check_from must be >= window (the window holds generated tokens only)")

    def is_check(self, m):
        """Whether generated length m (int or int array) is a check position."""
        return (m >= self.check_from) & (m <= self.check_until) & ((m - self.check_from) % self.check_every == 0)


class EarlyStopTables(NamedTuple):
    """Per-token facts about the tokenizer's texts, and the refusal phrases as token ids."""

    emoji_or_control: np.ndarray  # [V] bool
    ends_sentence: np.ndarray  # [V] bool
    trailing_spaces: np.ndarray  # [V] int32
    only_spaces: np.ndarray  # [V] bool
    ends_with_e2: np.ndarray  # [V] bool
    emoji_after_e2: np.ndarray  # [V] bool
    phrases: np.ndarray  # [P, L] int32, -1 padded
    phrase_lengths: np.ndarray  # [P] int32


# ---------------------------------------------------------------------------------------------
# Text predicates (host side; also the spec's rule on decoded text, which the tests use)


def is_emoji(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in EMOJI_RANGES) and unicodedata.category(ch) in ("So", "Sk")


def is_control(ch: str) -> bool:
    return unicodedata.category(ch) == "Cc" and ch not in "\n\t"


def has_emoji_or_control(text: str) -> bool:
    return any(is_emoji(c) or is_control(c) for c in text)


def trailing_space_count(text: str) -> int:
    return len(text) - len(text.rstrip(" "))


def ends_sentence(text: str) -> bool:
    return text.rstrip().endswith(SENTENCE_ENDS)


def _emoji_encodings() -> list[bytes]:
    return [chr(cp).encode("utf-8") for lo, hi in EMOJI_RANGES for cp in range(lo, hi + 1) if is_emoji(chr(cp))]


def _partial_emoji_patterns() -> tuple[frozenset, frozenset]:
    heads, tails = set(), set()
    for enc in _emoji_encodings():
        heads.update(enc[:k] for k in range(2, len(enc)))
        if len(enc) == 4:
            heads.add(enc[:1])
            tails.add(enc[1:])
    return frozenset(heads), frozenset(tails)


def has_partial_emoji(raw: bytes) -> bool:
    """Raw token bytes that end with an incomplete emoji encoding or begin with the rest of one."""
    heads, tails = _PARTIAL
    return any(raw[-k:] in heads for k in (1, 2, 3) if len(raw) >= k) or raw[:3] in tails


def ends_with_lone_e2(raw: bytes) -> bool:
    return raw.endswith(b"\xe2")


def starts_emoji_after_e2(raw: bytes) -> bool:
    """Raw bytes that, after a token ending with a lone 0xE2, complete a (2-byte prefix of an) emoji."""
    return len(raw) > 0 and 0x80 <= raw[0] < 0xC0 and b"\xe2" + raw[:1] in _PARTIAL[0]


_PARTIAL = _partial_emoji_patterns()


# ---------------------------------------------------------------------------------------------
# Tables from a tokenizer (host side, once)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of byte-level BPE tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return False
    try:
        state = json.loads(decoder.__getstate__())
    except Exception:  # noqa: BLE001 - an exotic decoder: treat as not byte-level
        return False
    return '"ByteLevel"' in json.dumps(state)


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Each token's text in context (see the module doc)."""
    kwargs = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    anchor = list(tokenizer.encode("a", add_special_tokens=False))
    prefix = tokenizer.decode(anchor, **kwargs)
    pairs = tokenizer.batch_decode([anchor + [i] for i in range(vocab_size)], **kwargs)
    return [pair[len(prefix):] if pair.startswith(prefix) else tokenizer.decode([i], **kwargs)
            for i, pair in enumerate(pairs)]


def token_bytes(tokenizer, vocab_size: int) -> list[bytes | None]:
    """Raw bytes of byte-level BPE tokens and of SentencePiece byte-fallback tokens; None otherwise."""
    byte_level = _is_byte_level(tokenizer)
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    out: list[bytes | None] = []
    for piece in tokenizer.convert_ids_to_tokens(list(range(vocab_size))):
        raw = None
        if isinstance(piece, str):
            fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            if fallback:
                raw = bytes([int(fallback.group(1), 16)])
            elif byte_level and piece and all(c in inverse for c in piece):
                raw = bytes(inverse[c] for c in piece)
        out.append(raw)
    return out


def phrase_table(tokenizer, phrases=REFUSAL_PHRASES, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each phrase tokenized alone and after a space, deduplicated: ([P, L] ids padded -1, [P] lengths)."""
    variants = []
    for phrase in phrases:
        for text in (phrase, " " + phrase):
            ids = tuple(int(t) for t in tokenizer.encode(text, add_special_tokens=False))
            if ids and ids not in variants and (max_len is None or len(ids) <= max_len):
                variants.append(ids)
    return pad_phrases(variants)


def pad_phrases(variants) -> tuple[np.ndarray, np.ndarray]:
    """Token-id phrases -> ([P, L] ids padded with -1, [P] lengths); no phrases gives one empty row."""
    variants = [[int(t) for t in v] for v in variants]
    rows = max(len(variants), 1)
    ids = np.full((rows, max([len(v) for v in variants] + [1])), -1, np.int32)
    lengths = np.zeros((rows,), np.int32)
    for i, v in enumerate(variants):
        ids[i, : len(v)] = v
        lengths[i] = len(v)
    return ids, lengths


def early_stop_tables(tokenizer, vocab_size: int, phrases=REFUSAL_PHRASES,
                      rule: EarlyStopRule = EarlyStopRule()) -> EarlyStopTables:
    """All tables for `vocab_size` token ids (the engine's vocabulary), built once on the host."""
    variants = phrase_table(tokenizer, phrases, max_len=rule.window)
    return build_tables(token_texts(tokenizer, vocab_size), token_bytes(tokenizer, vocab_size), *variants)


def build_tables(texts, raws, phrase_ids, phrase_lengths) -> EarlyStopTables:
    """Tables from each token's text in context, its raw bytes (or None) and the padded phrase ids."""
    raws = [None] * len(texts) if raws is None else raws
    return EarlyStopTables(
        emoji_or_control=np.asarray([has_emoji_or_control(t) or (r is not None and has_partial_emoji(r))
                                     for t, r in zip(texts, raws)], bool),
        ends_sentence=np.asarray([ends_sentence(t) for t in texts], bool),
        trailing_spaces=np.asarray([trailing_space_count(t) for t in texts], np.int32),
        only_spaces=np.asarray([t.strip(" ") == "" for t in texts], bool),
        ends_with_e2=np.asarray([r is not None and ends_with_lone_e2(r) for r in raws], bool),
        emoji_after_e2=np.asarray([r is not None and starts_emoji_after_e2(r) for r in raws], bool),
        phrases=np.asarray(phrase_ids, np.int32),
        phrase_lengths=np.asarray(phrase_lengths, np.int32),
    )


# ---------------------------------------------------------------------------------------------
# The check inside the loop (pure jnp)


def _contains_phrase(window, phrases, lengths):
    """[B, W] tokens, [P, L] phrases (-1 padded), [P] lengths -> [B] any phrase at any offset."""
    w, width = window.shape[1], phrases.shape[1]
    offsets = jnp.arange(w)[:, None] + jnp.arange(width)[None, :]  # [W, L]
    grams = window[:, jnp.minimum(offsets, w - 1)]  # [B, W, L]
    needed = jnp.arange(width)[None, :] < lengths[:, None]  # [P, L]
    equal = grams[:, None, :, :] == phrases[None, :, None, :]  # [B, P, W, L]
    hit = jnp.all(equal | ~needed[None, :, None, :], axis=-1)  # [B, P, W]
    fits = (jnp.arange(w)[None, :] + lengths[:, None] <= w) & (lengths[:, None] > 0)  # [P, W]
    return jnp.any(hit & fits[None], axis=(1, 2))


def _trailing_spaces(window, tables):
    """' ' characters at the end of the window's text: [B]."""
    transparent = jnp.asarray(tables.only_spaces)[window].astype(jnp.int32)  # [B, W]
    # after[i]: every token after position i is only spaces.
    after = jnp.flip(jnp.cumprod(jnp.flip(transparent, 1), axis=1), 1)
    after = jnp.concatenate([after[:, 1:], jnp.ones_like(after[:, :1])], axis=1).astype(bool)
    return jnp.sum(jnp.where(after, jnp.asarray(tables.trailing_spaces)[window], 0), axis=1)


def window_triggers(tables: EarlyStopTables, tokens, m, rule: EarlyStopRule = EarlyStopRule()):
    """Whether the `rule.window` tokens before generated length m look like the rule's triggers: [B]."""
    window = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(m - rule.window, 0), rule.window, axis=1)
    refusal = _contains_phrase(window, jnp.asarray(tables.phrases), jnp.asarray(tables.phrase_lengths))
    odd = jnp.any(jnp.asarray(tables.emoji_or_control)[window], axis=1)
    split = jnp.asarray(tables.ends_with_e2)[window[:, :-1]] & jnp.asarray(tables.emoji_after_e2)[window[:, 1:]]
    odd = odd | jnp.any(split, axis=1)
    spaces = _trailing_spaces(window, tables) >= rule.trailing_spaces
    return refusal | odd | spaces


def early_stop_update(tables: EarlyStopTables, tokens, m, alpha, cap, triggered,
                      rule: EarlyStopRule = EarlyStopRule()):
    """The check at generated length m over tokens [B, N]: (cap, triggered) after it."""
    if tokens.shape[1] < rule.window:  # static: no check position is reachable
        return cap, triggered
    hit = rule.is_check(m) & (alpha >= rule.min_alpha) & window_triggers(tables, tokens, m, rule)
    return jnp.where(hit, jnp.minimum(cap, m + rule.extra_tokens), cap), triggered | hit


def should_stop(tables: EarlyStopTables, token, m, cap, triggered):
    """A triggered row ends with its m-th token at the cap, or past half the cap at a sentence end."""
    return triggered & ((m >= cap) | ((m > cap // 2) & jnp.asarray(tables.ends_sentence)[token]))


def early_stop_step(tables: EarlyStopTables, rule: EarlyStopRule, tokens, m, token, alpha, cap, triggered, live):
    """One loop step, after `token` [B] was written as generated token number m into tokens [B, N].

    Returns (stop [B], cap, triggered). The stop rule sees the trigger state from before this
    token ("the next" sentence end); rows not `live` are left alone; a stopped row's cap
    becomes its length, so the host can read lengths as min(stop-token length, cap).
    """
    stop = live & should_stop(tables, token, m, cap, triggered)
    new_cap, new_triggered = early_stop_update(tables, tokens, m, alpha, cap, triggered, rule)
    update = live & ~stop
    cap = jnp.where(stop, m, jnp.where(update, new_cap, cap))
    return stop, cap, jnp.where(update, new_triggered, triggered)
