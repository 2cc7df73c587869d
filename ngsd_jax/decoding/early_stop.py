"""The authors' early stop (spec §5), in token space, inside the jitted loop.

The rule, as the authors' NGSD loop applies it (utils/dis_safeDecoding_self_instinct_time_count.py:
the decode loop and `detect_abnormal_output`), with n the number of generated tokens after
each new token, in `ngsd` mode only (the engine turns it off in every other mode):

- Check, while no check has triggered, when alpha >= 0.5 and n >= 128, n % 7 == 0 and
  n <= 256 (n = 133, 140, ..., 252): decode the last 64 generated tokens (special tokens
  skipped). It triggers when the text, lower-cased (`str.lower`), holds one of
  `refusals.EARLY_STOP_PHRASES`, or ends with >= 3 ' ', or holds a character of the authors'
  emoji ranges (`EMOJI_RANGES`) or a control character U+0000-U+001F (newline and tab
  included). A trigger at n sets the cap to n + 128.
- From the next token on, a triggered row stops after its n-th token when n reaches the
  cap, or when 2n >= cap and that token decoded alone (`tokenizer.decode(token)`, the
  tokenizer's defaults, as the authors call it) is exactly '.', '!' or '?'. (With the
  authors' constants 2n >= cap at once: a triggered row stops at its next such token.)

It is OFF by default (`DecodeSettings.early_stop`); when off, none of this is traced into
the decode program. One deviation (README, deviations): the authors replace the length
limit by the cap, so a trigger at n lets an answer run to n + 128 tokens past
max_new_tokens; here the program's output buffer holds max_new_tokens, so an answer stops
at the smaller of the two (the same lengths whenever max_new_tokens >= 380, as with the
authors' default of 1024).

XLA cannot decode text, so everything the rule asks of the text is answered from tables
computed once on the host from the tokenizer (`early_stop_tables`), indexed by token id
inside the loop (`early_stop_step`):

- Token text. Each token's text in context: decode([anchor, id]) minus decode([anchor])
  with anchor = the tokens of "a" (so SentencePiece's word-initial space is kept), special
  tokens decoding to "" (skip_special_tokens=True), no clean-up of spaces. For byte-level
  BPE the window's text is then exactly the concatenation of its tokens' texts.
- Token bytes: a byte-level BPE token's raw bytes, a SentencePiece byte-fallback token's
  one byte, any other token's text in context in UTF-8, and nothing for special tokens.
- Triggers (`trigger_automaton[V, S]`): every spelling of every phrase (`phrase_spellings`:
  the texts whose `lower()` holds it), the UTF-8 encoding of every emoji and every control
  byte are patterns of one Aho-Corasick automaton over bytes (upper-case ASCII read as lower
  case), with one absorbing state for "a pattern was read". Row v is the state reached from
  each state after reading token v's bytes. Running the window's 64 tokens through it finds
  a phrase wherever its characters fall across tokens, in any case and tokenization, and an
  emoji wherever its bytes are split, and only when all of its bytes lie in the window, as
  when the window is decoded (UTF-8 synchronises itself: an encoding that appears in the
  bytes is that character).
- Trailing spaces. `trailing_spaces[V]` counts ' ' at the end of the token's text and
  `only_spaces[V]` marks texts made only of ' ' (empty included). The window's text ends with
  the sum of trailing_spaces over its last non-only-spaces token and every token after it.
- Sentence end. `ends_sentence[V]`: the token decoded alone is exactly '.', '!' or '?'.

Where token space differs from the authors' decoded window (README, deviations): the
authors decode the window as one text with the tokenizer's default clean-up of spaces, so
for a tokenizer that is not byte-level, or whose decode cleans up spaces (" 'm" -> "'m",
"ca n't" -> "can't"), the window's text can differ from its tokens' texts put together (a
SentencePiece window's first token keeps its word-initial space here, which matters only
for a window made of spaces).

Positions, with m the generated length after the newest token: the check runs (under a
`lax.cond`, so other steps skip it) at the m above for untriggered rows whose alpha >= 0.5,
over tokens [m - 64, m).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ngsd_jax.refusals import EARLY_STOP_PHRASES

CHECK_FROM = 128  # no check before this generated length
CHECK_EVERY = 7  # checks where the generated length is a multiple of this
CHECK_UNTIL = 256  # no check past this generated length
WINDOW = 64  # tokens decoded at a check
EXTRA_TOKENS = 128  # a trigger caps the length at (current + EXTRA_TOKENS)
MIN_ALPHA = 0.5  # rows with a smaller alpha are never checked
TRAILING_SPACES = 3  # this many trailing ' ' in the window trigger
NO_CAP = np.iinfo(np.int32).max

# The authors' emoji regex (detect_abnormal_output), range for range.
EMOJI_RANGES = ((0x1F600, 0x1F64F), (0x1F300, 0x1F5FF), (0x1F680, 0x1F6FF), (0x1F1E0, 0x1F1FF), (0x2700, 0x27BF),
                (0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF))
CONTROL_UNTIL = 0x1F  # U+0000..U+001F are control characters, newline and tab included
SENTENCE_ENDS = (".", "!", "?")
# Every non-ASCII character whose str.lower() holds ASCII (tested): the Kelvin sign -> "k",
# and "İ" -> "i" + U+0307.
_LOWER_TO_ASCII = {c: c.lower() for c in ("\u0130", "\u212a")}


@dataclasses.dataclass(frozen=True)
class EarlyStopRule:
    """The heuristic's constants (the authors' by default); static, part of DecodeSettings."""

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
        return (m >= self.check_from) & (m <= self.check_until) & (m % self.check_every == 0)


class EarlyStopTables(NamedTuple):
    """Per-token facts about the tokenizer's texts, and the triggers as an automaton over token ids."""

    trigger_automaton: np.ndarray  # [V, S] int16/int32: state after the token's bytes; S - 1 = triggered
    ends_sentence: np.ndarray  # [V] bool: the token decoded alone is exactly '.', '!' or '?'
    trailing_spaces: np.ndarray  # [V] int32
    only_spaces: np.ndarray  # [V] bool


# ---------------------------------------------------------------------------------------------
# Text predicates (host side)


def trailing_space_count(text: str) -> int:
    return len(text) - len(text.rstrip(" "))


def phrase_spellings(phrase: str) -> list[str]:
    """The texts whose `lower()` holds `phrase` (lower-case) are those holding one of these, ASCII case
    aside: the Kelvin sign may stand for any "k", and "İ" for a final "i" (U+0307 follows its "i")."""
    if phrase != phrase.lower():
        raise ValueError(f"early-stop phrase {phrase!r}: phrases are matched in lower-cased text, so lower-case")
    options = [[ch] + [c for c, low in _LOWER_TO_ASCII.items() if low == ch or (j == len(phrase) - 1 and low[0] == ch)]
               for j, ch in enumerate(phrase)]
    return ["".join(spelling) for spelling in itertools.product(*options)]


# ---------------------------------------------------------------------------------------------
# Phrases, emoji and control characters as one automaton over bytes (host side, once)

_LOWER_ASCII = np.asarray([b + 32 if ord("A") <= b <= ord("Z") else b for b in range(256)])


def trigger_patterns(phrases=EARLY_STOP_PHRASES) -> list[bytes]:
    """Byte strings whose presence in the window triggers: every phrase's spellings, emoji, controls."""
    spellings = [s.encode("utf-8") for p in phrases if p for s in phrase_spellings(p)]
    emoji = [chr(cp).encode("utf-8") for lo, hi in EMOJI_RANGES for cp in range(lo, hi + 1)]
    return spellings + emoji + [bytes([b]) for b in range(CONTROL_UNTIL + 1)]


def byte_automaton(patterns) -> np.ndarray:
    """Aho-Corasick over bytes, upper-case ASCII folded: delta [S, 256]. State 0 is the start; the
    last state is absorbing and is entered whenever a pattern has just been read."""
    children: list[dict[int, int]] = [{}]
    accepts = [False]
    for pattern in patterns:
        state = 0
        for byte in pattern:
            if byte not in children[state]:
                children[state][byte] = len(children)
                children.append({})
                accepts.append(False)
            state = children[state][byte]
        accepts[state] = True
    n = len(children)
    delta = np.zeros((n, 256), np.int64)
    fail = np.zeros(n, np.int64)
    order = [0]
    for state in order:  # breadth first: a failure state is shallower, so its row is complete
        if state:
            delta[state] = delta[fail[state]]
        for byte, child in children[state].items():
            fail[child] = delta[fail[state], byte] if state else 0
            accepts[child] = accepts[child] or accepts[fail[child]]
            delta[state, byte] = child
            order.append(child)
    accepts = np.asarray(accepts)
    # Keep the states reachable without reading a pattern; every accepting one becomes `seen`.
    kept, frontier = {0}, [0]
    while frontier:
        nxt = {int(t) for t in np.unique(delta[frontier]) if not accepts[t]} - kept
        kept |= nxt
        frontier = sorted(nxt)
    kept = sorted(kept)
    seen = len(kept)
    renumber = np.full(n, seen, np.int64)
    renumber[kept] = np.arange(seen)
    folded = renumber[delta[kept]][:, _LOWER_ASCII]
    return np.concatenate([folded, np.full((1, 256), seen, np.int64)])


def trigger_automaton(raws, phrases=EARLY_STOP_PHRASES) -> np.ndarray:
    """[V, S]: the state reached from each state after reading each token's bytes."""
    delta = byte_automaton(trigger_patterns(phrases))
    states = delta.shape[0]
    table = np.tile(np.arange(states), (len(raws), 1))
    by_length: dict[int, list[int]] = {}
    for i, raw in enumerate(raws):
        if raw:
            by_length.setdefault(len(raw), []).append(i)
    for length, ids in by_length.items():  # all tokens of one length advance together
        codes = np.frombuffer(b"".join(raws[i] for i in ids), np.uint8).reshape(len(ids), length)
        current = np.tile(np.arange(states), (len(ids), 1))
        for k in range(length):
            current = delta[current, codes[:, k:k + 1]]
        table[ids] = current
    return table.astype(np.int16 if states <= np.iinfo(np.int16).max else np.int32)


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


def token_bytes(tokenizer, vocab_size: int, texts: list[str]) -> list[bytes]:
    """Each token's bytes (see the module doc); `texts` are the tokens' texts in context."""
    byte_level = _is_byte_level(tokenizer)
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    out: list[bytes] = []
    for piece, text in zip(tokenizer.convert_ids_to_tokens(list(range(vocab_size))), texts):
        raw = text.encode("utf-8")
        if text and isinstance(piece, str):  # special tokens decode to "": no bytes
            fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            if fallback:
                raw = bytes([int(fallback.group(1), 16)])
            elif byte_level and piece and all(c in inverse for c in piece):
                raw = bytes(inverse[c] for c in piece)
        out.append(raw)
    return out


def early_stop_tables(tokenizer, vocab_size: int, phrases=EARLY_STOP_PHRASES) -> EarlyStopTables:
    """All tables for `vocab_size` token ids (the engine's vocabulary), built once on the host."""
    texts = token_texts(tokenizer, vocab_size)
    alone = tokenizer.batch_decode([[i] for i in range(vocab_size)])  # decode(token), the tokenizer's defaults
    return build_tables(texts, token_bytes(tokenizer, vocab_size, texts), alone, phrases)


def build_tables(texts, raws=None, alone=None, phrases=EARLY_STOP_PHRASES) -> EarlyStopTables:
    """Tables from each token's text in context, its bytes (default: the text in UTF-8), its text
    decoded alone (default: the text in context) and the phrases."""
    raws = [t.encode("utf-8") for t in texts] if raws is None else raws
    alone = texts if alone is None else alone
    return EarlyStopTables(
        trigger_automaton=trigger_automaton(raws, phrases),
        ends_sentence=np.asarray([t in SENTENCE_ENDS for t in alone], bool),
        trailing_spaces=np.asarray([trailing_space_count(t) for t in texts], np.int32),
        only_spaces=np.asarray([t.strip(" ") == "" for t in texts], bool),
    )


# ---------------------------------------------------------------------------------------------
# The check inside the loop (pure jnp)


def _contains_pattern(automaton, window):
    """[V, S] automaton, [B, W] tokens -> [B] some pattern lies inside the window's bytes."""
    automaton = jnp.asarray(automaton)
    seen = automaton.shape[1] - 1
    advance = lambda j, state: automaton[window[:, j], state].astype(jnp.int32)  # noqa: E731
    start = jnp.zeros((window.shape[0],), jnp.int32)
    return jax.lax.fori_loop(0, window.shape[1], advance, start) == seen


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
    spaces = _trailing_spaces(window, tables) >= rule.trailing_spaces
    return _contains_pattern(tables.trigger_automaton, window) | spaces


def early_stop_update(tables: EarlyStopTables, tokens, m, alpha, cap, triggered,
                      rule: EarlyStopRule = EarlyStopRule()):
    """The check at generated length m over tokens [B, N]: (cap, triggered) after it."""
    if tokens.shape[1] < rule.window:  # static: no check position is reachable
        return cap, triggered
    eligible = (alpha >= rule.min_alpha) & ~triggered  # the authors check until the first trigger
    # Checks are rare (19 lengths); the cond keeps the window scan off every other step.
    hit = eligible & jax.lax.cond(rule.is_check(m) & jnp.any(eligible),
                                  lambda: window_triggers(tables, tokens, m, rule),
                                  lambda: jnp.zeros(eligible.shape, bool))
    return jnp.where(hit, m + rule.extra_tokens, cap), triggered | hit


def should_stop(tables: EarlyStopTables, tokens, m, cap, triggered):
    """A triggered row ends with its m-th token at the cap, or, once 2m >= cap, when that token
    decoded alone is exactly '.', '!' or '?'."""
    sentence_end = jnp.asarray(tables.ends_sentence)[tokens[:, m - 1]]
    return triggered & ((m >= cap) | ((2 * m >= cap) & sentence_end))


def early_stop_step(tables: EarlyStopTables, rule: EarlyStopRule, tokens, m, alpha, cap, triggered, live):
    """One loop step, after the generated token number m was written into tokens [B, N].

    Returns (stop [B], cap, triggered). The stop rule sees the trigger state from before this
    token ("the next" sentence end); rows not `live` are left alone; a stopped row's cap
    becomes its length, so the host can read lengths as min(stop-token length, cap).
    """
    stop = live & should_stop(tables, tokens, m, cap, triggered)
    new_cap, new_triggered = early_stop_update(tables, tokens, m, alpha, cap, triggered, rule)
    update = live & ~stop
    cap = jnp.where(stop, m, jnp.where(update, new_cap, cap))
    return stop, cap, jnp.where(update, new_triggered, triggered)
