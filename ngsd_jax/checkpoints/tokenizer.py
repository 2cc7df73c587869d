"""The checkpoint's own tokenizer and chat formatting, always offline.

`load_tokenizer` reads the tokenizer that ships with a model (a Hugging Face directory, a
converted ngsd-jax checkpoint or a .gguf file) through transformers with
`local_files_only=True`: nothing is ever fetched from the Hub. `encode_chat` turns one user
message into prompt ids with the model's chat template (or an override), an optional system
prompt and an optional forced start of the response (a prefilling attack).
`stop_token_ids` collects the ids that end a turn; `compare_vocabularies` tells whether a
base and an expert share a vocabulary token for token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jinja2
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    _SPECIAL_TOKENS,
    GGUF_TOKENIZER_MAPPING,
    convert_gguf_tokenizer,
)

from ngsd_jax.checkpoints.weights import open_gguf

# transformers serves only tokenizers here; its import-time "PyTorch was not found" advice does not apply.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# Literal end-of-turn markers of common chat templates (ChatML, Llama 3, Phi-3, Llama 2, Gemma).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


class TokenizerError(ValueError):
    """A tokenizer or chat template that cannot be used; the message is one line naming the fix."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_tokenizer(source: str | Path):
    """The tokenizer of a HF directory, an ngsd-jax checkpoint directory or a .gguf file."""
    source = Path(source).expanduser()
    if source.suffix == ".gguf":
        if not source.is_file():
            raise TokenizerError(f"{source}: no such GGUF file")
        try:
            return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)
        except ImportError:
            # transformers reads GGUF through torch, which ngsd-jax does not need; build it torch-free.
            return tokenizer_from_gguf_metadata(source)
        except Exception as err:  # noqa: BLE001 - transformers raises many types; report one line
            raise TokenizerError(f"{source}: cannot build a tokenizer from this GGUF file ({_first_line(err)})") from None
    if not source.is_dir():
        raise TokenizerError(f"{source}: no such checkpoint directory or .gguf file")
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); "
                             f"copy the model's tokenizer next to its weights")
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise TokenizerError(f"{source}: cannot load its tokenizer ({_first_line(err)})") from None


def tokenizer_from_gguf_metadata(path: str | Path):
    """The same tokenizer transformers builds from a GGUF file, read with gguf-py instead of torch."""
    reader = open_gguf(Path(path))
    meta = {key: field.contents() for key, field in reader.fields.items()
            if key.startswith("tokenizer.") or key == "general.architecture"}
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tokenizer_dict:
        raise TokenizerError(f"{path}: the GGUF file carries no tokenizer (tokenizer.ggml.tokens)")
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
    except (ValueError, KeyError) as err:
        raise TokenizerError(f"{path}: cannot build a tokenizer from this GGUF file ({_first_line(err)})") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def resolve_chat_template(tokenizer, chat_template: str | Path | None = None) -> str | dict:
    """The override (Jinja source, or the path of a .jinja file) or else the tokenizer's own template."""
    if chat_template is not None:
        text = str(chat_template)
        if "{{" in text or "{%" in text:
            return text
        path = Path(text).expanduser()
        if not path.is_file():
            raise TokenizerError(f"chat template {text!r}: neither Jinja source nor an existing .jinja file")
        return path.read_text(encoding="utf-8")
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise TokenizerError(f"{name}: the checkpoint has no chat template; pass one as a Jinja string or a "
                             f"path to a .jinja file (--chat-template)")
    return template


def as_ids(encoded) -> list[int]:
    """Token ids from what a tokenizer call or `apply_chat_template(tokenize=True)` returns."""
    # transformers 5 returns a BatchEncoding (a Mapping); 4.x returned the list itself.
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], (list, tuple)):
        encoded = encoded[0]
    return [int(t) for t in encoded]


def encode_chat(tokenizer, user_message: str, system_prompt: str | None = None,
                chat_template: str | Path | None = None,
                response_prefix: str | Sequence[int] = "", thinking: bool = False) -> list[int]:
    """Prompt ids for one user turn, ending with the assistant's generation prompt.

    A system prompt (when not None) becomes a system message; a template that refuses the
    system role gets it prepended to the user message instead. `response_prefix` forces the
    start of the reply: text is tokenized on its own (no special tokens) and appended after
    the generation prompt; a sequence of ids is appended as is. `thinking` is passed to the
    template as `enable_thinking`: Qwen3's template renders an empty think block when it is
    False, as the reference runs Qwen3, so the gate never runs over a <think> block;
    templates that do not read the variable ignore it.
    """
    template = resolve_chat_template(tokenizer, chat_template)
    messages = [{"role": "user", "content": user_message}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})

    def render(msgs):
        return tokenizer.apply_chat_template(msgs, chat_template=template, add_generation_prompt=True, tokenize=True,
                                             enable_thinking=thinking)

    try:
        try:
            ids = as_ids(render(messages))
        except jinja2.TemplateError:
            if system_prompt is None:
                raise
            ids = as_ids(render([{"role": "user", "content": f"{system_prompt}\n\n{user_message}"}]))
    except jinja2.TemplateError as err:
        raise TokenizerError(f"the chat template failed on this conversation ({_first_line(err)})") from None
    if isinstance(response_prefix, str):
        ids += tokenizer.encode(response_prefix, add_special_tokens=False) if response_prefix else []
    else:
        ids += [int(t) for t in response_prefix]
    return ids


def stop_token_ids(tokenizer, config=None, chat_template: str | Path | None = None) -> tuple[int, ...]:
    """EOS ids of the model config and the tokenizer, plus the template's end-of-turn token."""
    ids: list[int] = list(getattr(config, "eos_token_ids", None) or ())
    eos = getattr(tokenizer, "eos_token_id", None)
    ids += list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    try:
        ids += _template_end_of_turn_ids(tokenizer, chat_template)
    except TokenizerError:
        pass
    return tuple(dict.fromkeys(int(i) for i in ids))


def _template_end_of_turn_ids(tokenizer, chat_template=None) -> list[int]:
    """The ids of the END_OF_TURN_TOKENS the chat template writes, in that list's order."""
    template = resolve_chat_template(tokenizer, chat_template)
    text = " ".join(template.values()) if isinstance(template, dict) else template
    vocab = tokenizer.get_vocab()
    return [vocab[tok] for tok in END_OF_TURN_TOKENS if tok in text and tok in vocab]


def end_of_turn_id(tokenizer, chat_template=None) -> int:
    """The token that closes an assistant turn: the template's literal end-of-turn marker
    (<|im_end|>, <|eot_id|>, ...) when it has one, else the tokenizer's EOS."""
    found = _template_end_of_turn_ids(tokenizer, chat_template)
    if found:
        return found[0]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TokenizerError("the tokenizer has no end-of-turn or EOS token; add one to its tokenizer_config.json")
    return int(eos[0] if isinstance(eos, (list, tuple)) else eos)


def compare_vocabularies(tok_a, tok_b, names: tuple[str, str] = ("base", "expert")) -> str | None:
    """None when both map the same token strings to the same ids; else one line naming up to 5 differences."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va == vb:
        return None
    diffs = [f"{tok!r}: {i} vs {vb.get(tok, 'absent')}" for tok, i in sorted(va.items(), key=lambda kv: kv[1])
             if vb.get(tok) != i]
    diffs += [f"{tok!r}: absent vs {i}" for tok, i in sorted(vb.items(), key=lambda kv: kv[1]) if tok not in va]
    return (f"the {names[0]} and {names[1]} tokenizers differ ({len(va)} vs {len(vb)} tokens, {len(diffs)} "
            f"mismatches, e.g. {'; '.join(diffs[:5])}); NGSD needs one shared vocabulary")
