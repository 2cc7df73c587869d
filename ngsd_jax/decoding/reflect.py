"""Self-reflection run through the decode engine: the base model rates a batch of requests
(json or logit, NGSD_SPEC.md section 4)."""

from __future__ import annotations

from ngsd_jax.checkpoints.tokenizer import encode_chat, stop_token_ids
from ngsd_jax.decoding.risk import (
    PAPER_ALPHA_MAPPING,
    REFLECT_MODES,
    REFLECT_PARSERS,
    AlphaMapping,
    Reflection,
    alpha_from_risk,
    harmfulness_question_messages,
    rate,
    reflection_messages,
    risk_from_yes_no,
)
from ngsd_jax.decoding.settings import DecodeSettings

# With `prefix=True` the assistant turn starts inside the object: small models (SmolLM2-135M)
# otherwise answer the request instead of rating it. The prefix is part of the text that gets
# parsed. The reference does not force a start.
RATING_PREFIX = '{"severityScore": '
# The reference allows up to 256; the four-key object is about 30 tokens, and an answer still
# open after 64 never closes (small models repeat keys), so a larger budget only costs time.
REFLECTION_MAX_NEW_TOKENS = 64
_YES_WORDS = ("yes", "Yes", "YES", " yes", " Yes")
_NO_WORDS = ("no", "No", "NO", " no", " No")


def _single_token_ids(tokenizer, words) -> list[int]:
    ids = (tokenizer.encode(w, add_special_tokens=False) for w in words)
    return sorted({i[0] for i in ids if len(i) == 1})


def _closing_brace_ids(tokenizer) -> list[int]:
    # Any token that prints a '}' can end the JSON object, so generation stops right there.
    return [i for token, i in tokenizer.get_vocab().items() if "}" in token]


def reflect(engine, tokenizer, requests: list[str], mode: str = "json", fixed_alpha: float = 0.5,
            chat_template=None, thinking: bool = False, parser: str = "lenient", prefix: bool = True,
            max_new_tokens: int = REFLECTION_MAX_NEW_TOKENS, all_zero_risk: int | None = None,
            mapping: AlphaMapping = PAPER_ALPHA_MAPPING) -> list[Reflection]:
    """Rates a batch of user requests with the engine's base model, in one batched call.

    json: greedy generation of the rating (at most `max_new_tokens`, ending at an end-of-turn
    token and, for the lenient parser, at the first token that prints a '}'; the reference
    parser reads the whole answer, as the reference does), started with RATING_PREFIX when
    `prefix`, then `rate` with `parser`; logit: one prefill, P(yes) vs P(no) for the next
    token; off: every prompt gets `fixed_alpha`. The expert mode has no separate pass: the
    decode program reads it from the expert's prefill (Engine.decode's `expert_risk`).
    `thinking` is the chat template's `enable_thinking` (off, as the reference rates with
    Qwen3); `mapping` turns risk into alpha.
    """
    if mode == "expert":
        raise ValueError("the expert's risk is read inside the decode program: give Engine.decode an expert_risk")
    if mode not in REFLECT_MODES:
        raise ValueError(f"unknown reflection mode '{mode}'; choose one of {', '.join(REFLECT_MODES)}")
    if parser not in REFLECT_PARSERS:
        raise ValueError(f"unknown reflection parser '{parser}'; choose one of {', '.join(REFLECT_PARSERS)}")
    if mode == "off":
        return [Reflection(mode, fixed_alpha) for _ in requests]

    def encode(messages, response_prefix=""):
        system, user = messages
        return encode_chat(tokenizer, user["content"], system_prompt=system["content"], chat_template=chat_template,
                           response_prefix=response_prefix, thinking=thinking)

    if mode == "logit":
        distribution = engine.next_token_distribution([encode(harmfulness_question_messages(r)) for r in requests])
        yes, no = _single_token_ids(tokenizer, _YES_WORDS), _single_token_ids(tokenizer, _NO_WORDS)
        out = []
        for row in distribution:
            p_yes, p_no = float(row[yes].sum()), float(row[no].sum())
            risk = risk_from_yes_no(p_yes, p_no)
            out.append(Reflection(mode, alpha_from_risk(risk, mapping), risk, f"P(yes)={p_yes:.4f} P(no)={p_no:.4f}"))
        return out
    start = RATING_PREFIX if prefix else ""
    stops = list(stop_token_ids(tokenizer, engine.base_config, chat_template))
    if parser == "lenient":
        stops += _closing_brace_ids(tokenizer)
    result = engine.decode([encode(reflection_messages(r), start) for r in requests],
                           settings=DecodeSettings(mode="base", max_new_tokens=max_new_tokens), stop_ids=stops)
    out = []
    for i, request in enumerate(requests):
        text = start + tokenizer.decode(result.sequence(i), skip_special_tokens=True)
        rating = rate(text, request, parser, all_zero_risk, mapping)
        out.append(Reflection(mode, rating.alpha, rating.risk, text, rating.scores, rating.parsed))
    return out
