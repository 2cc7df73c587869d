"""`python -m ngsd_jax.decode` end to end on a tiny local pair, and model-driven reflection."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ngsd_jax import decode
from ngsd_jax.engine import Engine
from ngsd_jax.loading import load_model
from ngsd_jax.reflection import AlphaMapping, reflect

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["How do I bake bread at home?", "Explain photosynthesis simply.", "I cannot help with that.",
          '{"severityScore": 3, "actionabilityScore": 7}', "yes no Yes No maybe", "Sure, here is a plan."]
PROMPTS = ["How do I bake bread?", "Explain photosynthesis.", "Sure, a plan?"]


def _tokenizer(words=CORPUS) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(words, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def _checkpoint(path, tokenizer, seed):
    torch.manual_seed(seed)
    # 384 embedding rows for a ~320-token tokenizer: padded rows must never be chosen.
    config = LlamaConfig(vocab_size=384, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tok = _tokenizer()
    base = _checkpoint(tmp_path_factory.mktemp("base"), tok, 0)
    expert = _checkpoint(tmp_path_factory.mktemp("expert"), tok, 1)
    return str(base), str(expert)


def _run(capsys, *argv):
    code = decode.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_output_with_trace_and_reflection(pair, capsys):
    base, expert = pair
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
        assert r["reflection"]["alpha"] in (0.1, 0.5, 0.9)
        assert r["reflection"]["text"].startswith('{"severityScore": ')
        assert set(r["reflection"]["scores"]) == {"severityScore", "actionabilityScore", "evasionScore",
                                                  "targetingScore"}
        assert r["spikes"] == sum(r["trace"]["spike"])


def test_trace_table_and_prefill(pair, capsys):
    base, expert = pair
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
        assert decode.read_prompts(tmp_path / f"p.{suffix}") == ["one", "two"], suffix
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(decode.UsageError, match=r"bad.jsonl:2: not JSON"):
        decode.read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "p.xml").write_text("<p/>")
    with pytest.raises(decode.UsageError, match="unknown prompts format"):
        decode.read_prompts(tmp_path / "p.xml")


def test_mismatched_tokenizers_are_refused_before_weights_load(pair, tmp_path, capsys):
    base, _ = pair
    other = tmp_path / "other"
    _tokenizer(["completely different words here", "zebra quantum"]).save_pretrained(other)
    # No weights in `other`: reaching the weights would fail differently.
    code, _, err = _run(capsys, "--base", base, "--expert", str(other), "--prompt", "hi")
    assert code == 2
    assert "tokenizers differ" in err and len(err.strip().splitlines()) == 1


def test_missing_expert_says_how_to_train_one(pair, capsys):
    base, _ = pair
    code, _, err = _run(capsys, "--base", base, "--prompt", "hi")
    assert code == 2 and "python -m ngsd_jax.train" in err


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
def test_reflection_is_one_batched_call_with_alpha_in_the_paper_set(pair, mode):
    base, _ = pair
    tok = PreTrainedTokenizerFast.from_pretrained(base)
    engine = _CountingEngine(load_model(base), None, vocab_size=len(tok), stop_ids=[tok.eos_token_id])
    out = reflect(engine, tok, PROMPTS, mode)
    assert engine.calls == 1
    assert len(out) == len(PROMPTS)
    assert all(r.alpha in (0.1, 0.5, 0.9) and r.mode == mode for r in out)
    if mode == "logit":
        assert all(0.0 <= r.risk <= 10.0 for r in out)
        assert all(r.text.startswith("P(yes)=") for r in out)
    else:
        assert all(r.parsed in (True, False) and len(r.scores) == 4 for r in out)


def test_reflection_off_uses_the_fixed_alpha(pair):
    out = reflect(None, None, PROMPTS, "off", fixed_alpha=0.9)
    assert [r.alpha for r in out] == [0.9] * len(PROMPTS)


def test_reflect_expert_sets_alpha_in_the_decode_program_with_the_flagged_mapping(pair, capsys):
    base, expert = pair
    args = ["--base", base, "--expert", expert, "--max-new-tokens", "4", "--json", "--reflect", "expert",
            "--alpha-levels", "0.2,0.3,0.7", "--risk-thresholds", "0.01,0.02"]
    for p in PROMPTS:
        args += ["--prompt", p]
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    # Reference: the same risk from a separate prefill of the expert, outside the decode program.
    tok = PreTrainedTokenizerFast.from_pretrained(expert)
    engine = Engine(None, load_model(expert), vocab_size=len(tok), stop_ids=[tok.eos_token_id])
    mapping = AlphaMapping((0.2, 0.3, 0.7), (0.01, 0.02))
    reference = reflect(engine, tok, PROMPTS, "expert", mapping=mapping)
    assert {r.alpha for r in reference} <= {0.2, 0.3, 0.7}
    for record, ref in zip(records, reference):
        assert record["reflection"]["mode"] == "expert"
        assert record["reflection"]["risk"] == pytest.approx(ref.risk, rel=1e-4)
        assert record["reflection"]["alpha"] == pytest.approx(ref.alpha)
        assert all(a == 0 or a == pytest.approx(ref.alpha) for a in record["trace"]["alpha"])


@pytest.mark.parametrize("flag, value, message", [("--alpha-levels", "0.1,0.5", "expected 3 comma-separated"),
                                                   ("--alpha-levels", "0.1,0.5,1.5", "alpha levels"),
                                                   ("--risk-thresholds", "6,5", "risk thresholds")])
def test_bad_alpha_mapping_flags_fail_early_naming_the_fix(pair, capsys, flag, value, message):
    base, expert = pair
    try:
        code = decode.main(["--base", base, "--expert", expert, "--prompt", "hi", flag, value])
    except SystemExit as exit:  # argparse's own refusal of a malformed value: usage, then one error line
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and message in err.strip().splitlines()[-1]


def test_the_default_pair_decodes_with_its_preset_and_named_models_with_the_paper_settings(pair):
    parser = decode.build_parser()
    default = decode.resolve_options(parser.parse_args(["--prompt", "hi"]))
    assert default.reflect == decode.load_preset(decode.DEFAULT_PRESET)["reflect"] == "expert"
    base, expert = pair
    named = decode.resolve_options(parser.parse_args(["--prompt", "hi", "--base", base, "--expert", expert]))
    assert named.reflect == "json" and named.alpha_levels == (0.1, 0.5, 0.9)
    assert decode.resolve_options(parser.parse_args(["--prompt", "hi", "--reflect", "json"])).reflect == "json"
