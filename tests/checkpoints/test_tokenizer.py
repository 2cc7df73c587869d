"""Chat encoding, stop ids and vocabulary comparison on tiny tokenizers built offline."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ngsd_jax.checkpoints.tokenizer import (
    TokenizerError,
    compare_vocabularies,
    encode_chat,
    load_tokenizer,
    stop_token_ids,
)
from ngsd_jax.models.config import ModelConfig

SENTENCES = ["What is the capital of France?", "Paris is the capital of France.", "Be brief and kind.",
             "I cannot help with that request.", "Sure, here is how to do it step by step."]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BRACKETS = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTION = "What is the capital of France?"


def _tiny(chat_template=None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                                   chat_template=chat_template)


@pytest.fixture(scope="module")
def chat_tok():
    return _tiny(CHATML)


def test_encoding_matches_apply_chat_template_and_the_literal_render(chat_tok):
    ids = encode_chat(chat_tok, QUESTION)
    expected = chat_tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                            tokenize=True)
    assert ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert all(isinstance(t, int) for t in ids)
    assert chat_tok.decode(ids) == f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt_is_a_system_message(chat_tok):
    text = chat_tok.decode(encode_chat(chat_tok, QUESTION, system_prompt="Be brief."))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_template_refusing_the_system_role_gets_it_in_the_user_message():
    tok = _tiny(NO_SYSTEM)
    text = tok.decode(encode_chat(tok, QUESTION, system_prompt="Be brief."))
    assert text == f"<|im_start|>user\nBe brief.\n\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(TokenizerError, match="chat template failed"):
        encode_chat(_tiny("{{ raise_exception('broken') }}"), QUESTION)


def test_missing_template_is_a_one_line_error_unless_one_is_given(tmp_path):
    tok = _tiny()
    with pytest.raises(TokenizerError) as err:
        encode_chat(tok, QUESTION)
    assert "no chat template" in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)
    assert tok.decode(encode_chat(tok, QUESTION, chat_template=BRACKETS)) == f"[user] {QUESTION}\n[assistant]"


def test_template_override_from_a_string_or_a_jinja_file(chat_tok, tmp_path):
    from_string = encode_chat(chat_tok, QUESTION, chat_template=BRACKETS)
    assert chat_tok.decode(from_string) == f"[user] {QUESTION}\n[assistant]"
    path = tmp_path / "brackets.jinja"
    path.write_text(BRACKETS)
    assert encode_chat(chat_tok, QUESTION, chat_template=str(path)) == from_string
    assert encode_chat(chat_tok, QUESTION, chat_template=path) == from_string
    with pytest.raises(TokenizerError, match="neither Jinja source nor an existing"):
        encode_chat(chat_tok, QUESTION, chat_template=str(tmp_path / "absent.jinja"))


def test_response_prefix_tokens_are_appended(chat_tok):
    plain = encode_chat(chat_tok, QUESTION)
    prefix = "Sure, here is how"
    forced = encode_chat(chat_tok, QUESTION, response_prefix=prefix)
    prefix_ids = chat_tok.encode(prefix, add_special_tokens=False)
    assert len(prefix_ids) > 1
    assert forced == plain + prefix_ids
    assert chat_tok.decode(forced).endswith("<|im_start|>assistant\n" + prefix)
    assert encode_chat(chat_tok, QUESTION, response_prefix=[7, 8, 9]) == plain + [7, 8, 9]
    assert encode_chat(chat_tok, QUESTION, response_prefix="") == plain


def test_stop_ids_take_config_tokenizer_and_end_of_turn(chat_tok):
    vocab = chat_tok.get_vocab()
    config = ModelConfig("llama", 300, 16, 32, 1, 2, 1, 8, 1e-5, 1e4, eos_token_ids=(7,))
    ids = stop_token_ids(chat_tok, config)
    assert ids == (7, vocab["<|endoftext|>"], vocab["<|im_end|>"])
    assert stop_token_ids(_tiny(), None) == (vocab["<|endoftext|>"],)  # no template: no end-of-turn token
    # an override template is searched too
    assert vocab["<|im_end|>"] in stop_token_ids(_tiny(), None, chat_template=CHATML)


def test_load_tokenizer_from_a_directory(chat_tok, tmp_path):
    chat_tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.get_vocab() == chat_tok.get_vocab()
    assert encode_chat(loaded, QUESTION, system_prompt="Be brief.") == encode_chat(chat_tok, QUESTION,
                                                                                 system_prompt="Be brief.")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(TokenizerError, match="no such"):
        load_tokenizer(tmp_path / "HuggingFaceTB-not-here")
    with pytest.raises(TokenizerError, match="no such GGUF"):
        load_tokenizer(tmp_path / "absent.gguf")


def _word_level(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_compare_vocabularies():
    words = {"<unk>": 0, **{f"w{i}": i for i in range(1, 20)}}
    same = _word_level(dict(words))
    assert compare_vocabularies(_word_level(words), same) is None

    swapped = dict(words, w3=4, w4=3)
    message = compare_vocabularies(_word_level(words), _word_level(swapped))
    assert message is not None and "'w3': 3 vs 4" in message and "'w4': 4 vs 3" in message
    assert "\n" not in message

    renamed = {("w5x" if k == "w5" else k): v for k, v in words.items()}
    message = compare_vocabularies(_word_level(words), _word_level(renamed))
    assert "'w5': 5 vs absent" in message and "'w5x': absent vs 5" in message

    shuffled = {"<unk>": 0, **{f"w{i}": 20 - i for i in range(1, 20)}}
    message = compare_vocabularies(_word_level(words), _word_level(shuffled), names=("llama", "tiny"))
    assert message.count(";") == 5 and "18 mismatches" in message and "llama and tiny" in message

    bigger = _word_level(words)
    bigger.add_tokens(["<extra>"])
    assert "'<extra>': absent vs 20" in compare_vocabularies(same, bigger)
