"""Expert training on tiny random models: masking, bucketing, LoRA merge, loss going down,
malformed data, and resuming after SIGKILL to the same final weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TRAIN_PAIRS, build_tiny_hf, final_params, train_args, train_tokenizer
from flax import nnx

from ngsd_jax import train
from ngsd_jax.checkpoints.tokenizer import encode_chat, end_of_turn_id
from ngsd_jax.checkpoints.weights import load_model
from ngsd_jax.models.config import config_from_hf
from ngsd_jax.models.decoder import Decoder
from ngsd_jax.models.lora import apply_lora, merge_lora
from ngsd_jax.training import data as train_data
from ngsd_jax.training import recipe as recipes
from ngsd_jax.training import step as train_step

TINY_CONFIG = dict(model_type="llama", vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                   rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
                   bos_token_id=1, eos_token_id=2)
def test_loss_mask_covers_exactly_the_response_and_end_of_turn(tokenizer):
    eot = end_of_turn_id(tokenizer)
    assert eot == tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt, response = TRAIN_PAIRS[0]
    record = train_data.parse_record({"prompt": prompt, "response": response, "prefix": "Sure, here"})
    example = train_data.encode_record(record, tokenizer, eot, "x:1")
    prompt_ids = encode_chat(tokenizer, prompt)
    prefix_ids = tokenizer.encode("Sure, here", add_special_tokens=False)
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [eot]
    assert example.tokens.tolist() == prompt_ids + prefix_ids + response_ids
    assert example.tokens[example.loss_mask == 1].tolist() == response_ids
    assert example.loss_mask.tolist() == [0] * (len(prompt_ids) + len(prefix_ids)) + [1] * len(response_ids)
    # A truncated answer (end_of_turn false) is trained without an end-of-turn token.
    cut = train_data.parse_record({"prompt": prompt, "response_ids": response_ids[:3], "end_of_turn": False})
    assert train_data.encode_record(cut, tokenizer, eot, "x:2").tokens[-3:].tolist() == response_ids[:3]
    # Collation shifts by one: the mask sits on targets, i.e. the tokens the model must predict.
    batch = train_data.PlannedBatch(epoch=0, width=64, indices=(0,))
    arrays = train_data.collate([example], batch, batch_size=2, pad_id=0)
    assert arrays["targets"][0][arrays["mask"][0] == 1].tolist() == response_ids
    assert arrays["mask"][1].sum() == 0  # the filler row trains nothing


def test_decision_tokens_weigh_only_the_first_targets_of_each_response(tokenizer):
    eot = end_of_turn_id(tokenizer)
    examples = [train_data.encode_record(train_data.parse_record({"prompt": p, "response": r, "weight": w}),
                                         tokenizer, eot, "x") for (p, r), w in zip(TRAIN_PAIRS[:2], (1.0, 0.5))]
    batch = train_data.PlannedBatch(epoch=0, width=64, indices=(0, 1))
    plain = train_data.collate(examples, batch, batch_size=2, pad_id=0)
    weighted = train_data.collate(examples, batch, batch_size=2, pad_id=0, decision_tokens=3, decision_weight=4.0)
    for row, weight in enumerate((1.0, 0.5)):
        targets = np.flatnonzero(plain["mask"][row])
        assert weighted["weights"][row, targets[:3]].tolist() == [4.0 * weight] * 3
        assert weighted["weights"][row, targets[3:]].tolist() == [weight] * (len(targets) - 3)
        assert weighted["weights"][row][plain["mask"][row] == 0].sum() == 0  # prompt and padding stay out
    assert (weighted["mask"] == plain["mask"]).all()


def test_recovery_prompts_share_the_prefix_lengths_in_turn(tokenizer):
    harmful = [{"id": f"h{i}", "prompt": f"bad request {i}", "response": "I can't help with that."} for i in range(4)]
    answers = {f"h{i}": {"response_ids": list(range(10, 50)), "response": "Sure, here is how", "finished": False}
               for i in range(4)}
    records = train_data.build_default_records(
        harmful, [], answers, recovery_ids=[r["id"] for r in harmful], recovery_prefix_tokens=[1, 2, 4],
        prefixes_per_prompt=1, eot_id=0, tokenizer=tokenizer, harmful_weight=1.0, benign_weight=1.0,
        recovery_weight=1.0, match_teacher=True)
    recovery = [(r["id"], len(r["prefix_ids"])) for r in records if r["kind"].startswith("recovery")]
    assert recovery == [("h0", 1), ("h1", 2), ("h2", 4), ("h3", 1)]
    records = train_data.build_default_records(
        harmful[:1], [], answers, recovery_ids=["h0"], recovery_prefix_tokens=[1, 2, 4], prefixes_per_prompt=None,
        eot_id=0, tokenizer=tokenizer, harmful_weight=1.0, benign_weight=1.0, recovery_weight=1.0,
        match_teacher=True)
    assert [len(r["prefix_ids"]) for r in records if r["kind"].startswith("recovery")] == [1, 2, 4]


def test_recovery_refusal_starts_with_the_recipe_separator(tokenizer):
    harmful = [{"id": "h0", "prompt": "bad request", "response": "I can't help with that."}]
    answers = {"h0": {"response_ids": list(range(10, 20)), "response": "Sure, here is how", "finished": False}}
    recipe = recipes.build_recipe(recipes.DEFAULT_RECIPE, overrides=["recovery_separator=\n\n"])
    assert recipe.recovery_separator == "\n\n" and recipes.Recipe().recovery_separator == ""
    records = train_data.build_default_records(
        harmful, [], answers, recovery_ids=["h0"], recovery_prefix_tokens=[1], prefixes_per_prompt=None,
        eot_id=0, tokenizer=tokenizer, harmful_weight=1.0, benign_weight=1.0, recovery_weight=1.0,
        match_teacher=True, recovery_separator=recipe.recovery_separator)
    refusal, recovery = records
    assert refusal["response"] == "I can't help with that."  # the plain refusal keeps no separator
    assert recovery["prefix_ids"] == [10] and recovery["response"] == "\n\nI can't help with that."
    example = train_data.encode_record(train_data.parse_record(recovery), tokenizer, 0, "x")
    targets = example.tokens[example.loss_mask == 1].tolist()
    assert targets[:2] == tokenizer.encode("\n\n", add_special_tokens=False)[:2]


def test_default_dataset_reads_file_lists_and_draws_the_ordinary_prompts(tokenizer, tmp_path):
    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    harmful = write("h.jsonl", [{"id": "h0", "prompt": "bad", "response": "I can't.", "split": "train"},
                                {"id": "h1", "prompt": "worse", "response": "I won't.", "split": "heldout"}])
    tasks = write("ht.jsonl", [{"id": "ht0", "prompt": "summarise how to do bad", "response": "No.", "split": "train"}])
    benign = write("b.jsonl", [{"id": "b0", "prompt": "bake bread", "split": "train"}])
    ordinary = write("o.jsonl", [{"id": f"o{i}", "prompt": f"rewrite text {i}", "split": "train" if i < 9 else
                                  "heldout"} for i in range(10)])
    recipe = recipes.build_recipe(recipes.DEFAULT_RECIPE, overrides=[
        f"harmful_data={json.dumps([harmful, tasks])}", f"benign_data={benign}",
        f"ordinary_data={ordinary}", "ordinary_prompts=4", "recovery_prompts=0"])
    teacher = "teacher"
    cache = tmp_path / "run" / "data" / "base_answers.jsonl"
    cache.parent.mkdir(parents=True)
    cache.write_text("".join(json.dumps({"id": rid, "prompt": prompt, "teacher": teacher,
                                         "max_new_tokens": recipe.distill_max_new_tokens, "system": None,
                                         "finished": True, "response_ids": [5, 6], "response": "ok"}) + "\n"
                             for rid, prompt in [("b0", "bake bread")] +
                             [(f"o{i}", f"rewrite text {i}") for i in range(10)]))
    answers_from = train_data.BaseAnswers(teacher, tokenizer, make_engine=None)  # every answer is cached
    path = train_data.build_default_dataset(recipe, tokenizer, answers_from, eot=0, run_dir=tmp_path / "run",
                                            strict=True)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["id"] for r in records if r["kind"] == "refusal") == ["h0", "ht0"]  # train split only
    distilled = [r["id"] for r in records if r["kind"] == "distill"]
    assert distilled[0] == "b0" and len(distilled) == 5 and set(distilled[1:]) < {f"o{i}" for i in range(9)}

    recipe.refusal_prompts = 1  # one of the two harmful train prompts stays a plain refusal
    path = train_data.build_default_dataset(recipe, tokenizer, answers_from, eot=0, run_dir=tmp_path / "run",
                                            strict=True)
    refusals = [json.loads(line)["id"] for line in path.read_text().splitlines() if '"refusal"' in line]
    assert len(refusals) == 1 and refusals[0] in {"h0", "ht0"}

    # Each draw has its own generator: more harmful rows change none of the distilled prompts
    # (whose base answers are cached), only draws over the harmful rows.
    more = write("more.jsonl", [{"id": f"x{i}", "prompt": f"bad {i}", "response": "No.", "split": "train"}
                                for i in range(5)])
    with cache.open("a") as f:
        for rid, prompt in [("h0", "bad"), ("ht0", "summarise how to do bad")] + [(f"x{i}", f"bad {i}") for i in
                                                                                 range(5)]:
            f.write(json.dumps({"id": rid, "prompt": prompt, "teacher": teacher, "finished": False, "system": None,
                                "max_new_tokens": recipe.distill_max_new_tokens, "response_ids": [7, 8, 9],
                                "response": "Sure"}) + "\n")
    draws = []
    for harmful_files in ([harmful, tasks], [harmful, tasks, more]):
        recipe.harmful_data, recipe.recovery_prompts, recipe.recovery_prefix_tokens = harmful_files, 1, [1]
        path = train_data.build_default_dataset(recipe, tokenizer, answers_from, eot=0, run_dir=tmp_path / "run",
                                                strict=True)
        draws.append([json.loads(line)["id"] for line in path.read_text().splitlines() if '"distill"' in line])
    assert draws[0] == draws[1] == distilled


def test_messages_and_prompt_response_records_agree(tokenizer):
    prompt, response = TRAIN_PAIRS[1]
    eot = end_of_turn_id(tokenizer)
    a = train_data.encode_record(train_data.parse_record({"prompt": prompt, "response": response}), tokenizer, eot, "a")
    b = train_data.encode_record(train_data.parse_record({"messages": [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}), tokenizer, eot, "b")
    assert a.tokens.tolist() == b.tokens.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()


def test_batches_are_bucketed_and_deterministic():
    lengths = np.random.default_rng(0).integers(5, 120, size=100)
    plan = train_data.plan_batches(lengths, batch_size=8, widths=[32, 64, 128], epochs=2, seed=3)
    assert plan == train_data.plan_batches(lengths, batch_size=8, widths=[32, 64, 128], epochs=2, seed=3)
    assert plan != train_data.plan_batches(lengths, batch_size=8, widths=[32, 64, 128], epochs=2, seed=4)
    for epoch in (0, 1):
        seen = sorted(i for b in plan if b.epoch == epoch for i in b.indices)
        assert seen == list(range(100))  # every example once per epoch
    assert {b.width for b in plan} <= {32, 64, 128}
    assert all(max(lengths[list(b.indices)]) <= b.width for b in plan)
    # Sorted by length, a batch holds similar lengths, so padding is mostly the bucket rounding.
    spreads = [np.ptp(lengths[list(b.indices)]) for b in plan]
    assert np.mean(spreads) < 15


class RandomHead:
    """Stands in for a Decoder where only its vocabulary projection is used."""

    def __init__(self, rng):
        self.kernel = jnp.asarray(rng.normal(size=(32, 320)), jnp.float32)

    def logits(self, hidden):
        return hidden @ self.kernel


def test_loss_on_gathered_targets_equals_the_loss_over_all_positions():
    rng = np.random.default_rng(0)
    model = RandomHead(rng)
    hidden = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.float32)
    mask = np.zeros((2, 16), np.float32)
    mask[0, 5:12], mask[1, 9:16] = 1, 1
    batch = {"targets": jnp.asarray(rng.integers(0, 320, (2, 16)), jnp.int32), "mask": jnp.asarray(mask),
             "weights": jnp.asarray(mask * 2.0), "soft": jnp.zeros((2, 16))}
    token_loss = optax.softmax_cross_entropy_with_integer_labels(model.logits(hidden), batch["targets"])
    expected = float((token_loss * mask).sum() / mask.sum())
    for capacity in (14, 20, 32):  # exactly the targets, rounded up, every position
        weighted, sums = train_step.response_loss(model, hidden, batch, capacity)
        metrics = train_step.loss_metrics({k: float(v) for k, v in sums.items()})
        np.testing.assert_allclose([weighted, metrics["loss"], metrics["ce"]], [2 * expected] + [expected] * 2,
                                   rtol=1e-5)
        assert metrics["kl"] is None
    plan = [train_data.PlannedBatch(0, 16, (0, 1))]
    examples = [train_data.Example(np.zeros(17, np.int32), np.r_[0, mask[i]].astype(np.uint8), 1.0, False, "x", "x")
                for i in range(2)]
    assert train_step.target_capacities(examples, plan, batch_size=2, multiple=8) == {16: 16}


def test_matching_the_starting_model_costs_nothing_at_the_start_and_keeps_it_close(tiny_checkpoint, tmp_path):
    """Records with match_teacher learn the starting model's own distributions: their loss starts
    at 0, and training on them beside ordinary records keeps it far below those records' loss."""
    def write(path, match_teacher):
        path.write_text("".join(json.dumps({"prompt": p, "response": r, "match_teacher": match_teacher(i)}) + "\n"
                                for i, (p, r) in enumerate(TRAIN_PAIRS)))
        return path

    # At the start: on match_teacher records alone the first step, whichever batch it is,
    # measures the starting model against itself, before any update.
    only_kl = write(tmp_path / "only_kl.jsonl", lambda i: True)
    assert train.main(train_args(tiny_checkpoint, only_kl, tmp_path / "start", "--epochs", "1", "--batch-size", "1",
                                 "--set", "max_steps=1")) == 0
    first = json.loads((tmp_path / "start" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["ce"] is None
    assert abs(first["kl"]) < 1e-5

    mixed = write(tmp_path / "mixed.jsonl", lambda i: i % 2 == 0)
    assert train.main(train_args(tiny_checkpoint, mixed, tmp_path, "--epochs", "3", "--batch-size", "1",
                                 "--lr", "1e-2")) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kl = [entry["kl"] for entry in log if entry["kl"] is not None]  # batch 1: a step is all KL or all CE
    ce = [entry["ce"] for entry in log if entry["ce"] is not None]
    assert len(kl) == len(ce) == 9
    assert max(kl) < 0.5 * min(ce)


def test_merged_lora_gives_the_same_logits():
    config = config_from_hf(TINY_CONFIG)
    model = Decoder(config, rngs=nnx.Rngs(1))
    assert apply_lora(model, rank=4, alpha=8, targets="all-linear", seed=2) == 2 * 7
    key = jax.random.key(5)
    for _, var in nnx.iter_graph(model):  # b starts at zero; give the adapters something to merge
        if isinstance(var, nnx.LoRAParam) and var.shape[0] == 4:
            key, sub = jax.random.split(key)
            var.set_value(0.1 * jax.random.normal(sub, var.shape))
    tokens = jnp.asarray([[5, 9, 30, 41, 7, 77]], jnp.int32)
    logits = nnx.jit(lambda m: m.logits(m(tokens, jnp.arange(6, dtype=jnp.int32)[None])[0]))
    with_adapters = logits(model)
    merged = merge_lora(model)
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(merged))
    np.testing.assert_allclose(logits(merged), with_adapters, atol=2e-5, rtol=2e-5)
    assert not np.allclose(logits(Decoder(config, rngs=nnx.Rngs(1))), with_adapters, atol=1e-3)


def test_loss_falls_and_the_expert_loads(tiny_checkpoint, data_file, tmp_path):
    assert train.main(train_args(tiny_checkpoint, data_file, tmp_path, "--epochs", "7", "--lr", "3e-2",
                                 "--set", "warmup_fraction=0.1")) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 21  # 6 examples / batch 2 x 7 epochs
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    expert = load_model(tmp_path / "expert")  # a plain project checkpoint: adapters merged in
    base = load_model(tiny_checkpoint)
    assert expert.config == base.config
    assert not np.allclose(expert.layers[0].attn.q_proj.kernel[...], base.layers[0].attn.q_proj.kernel[...])
    np.testing.assert_array_equal(expert.layers[0].attn.k_proj.kernel[...], base.layers[0].attn.k_proj.kernel[...])
    assert json.loads((tmp_path / "expert" / "ngsd_train.json").read_text())["examples"] == 6


def test_full_fine_tuning_with_accumulation_trains_every_weight(tiny_checkpoint, data_file, tmp_path):
    assert train.main(train_args(tiny_checkpoint, data_file, tmp_path, "--method", "full", "--grad-accum", "3",
                                 "--epochs", "4", "--lr", "1e-3")) == 0
    expert, base = load_model(tmp_path / "expert"), load_model(tiny_checkpoint)
    assert not np.allclose(expert.layers[0].mlp.up_proj.kernel[...], base.layers[0].mlp.up_proj.kernel[...])
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) == 12  # 3 batches per epoch x 4 epochs = 4 optimizer updates
    per_update = [lrs[i: i + 3] for i in range(0, 12, 3)]
    assert all(len(set(group)) == 1 for group in per_update)  # one learning rate per 3 micro-batches
    assert per_update[1][0] > per_update[2][0] > per_update[3][0]  # linear decay after the warmup


def test_malformed_lines_are_reported_and_skipped_or_fatal(tiny_checkpoint, data_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = data_file.read_text().splitlines()
    bad.write_text("\n".join([good[0], "{not json", json.dumps({"prompt": "no response"}), *good[1:]]) + "\n")
    records = train_data.read_jsonl(bad, train_data.parse_record, strict=False)
    assert len(records) == len(good)
    err = capsys.readouterr().err
    assert f"{bad}:2: not JSON" in err and f"{bad}:3: missing field 'response'" in err
    with pytest.raises(train_data.DataError, match=rf"{bad}:2: not JSON"):
        train_data.read_jsonl(bad, train_data.parse_record, strict=True)
    # Through the command line: --strict turns the report into a one-line error and exit status 2.
    assert train.main(train_args(tiny_checkpoint, bad, tmp_path, "--strict")) == 2
    assert f"error: {bad}:2: not JSON" in capsys.readouterr().err


def test_bad_recipe_input_is_one_line_naming_the_fix(capsys):
    assert train.main(["--recipe", "no-such-recipe"]) == 2
    assert "unknown recipe 'no-such-recipe'; known: " in capsys.readouterr().err
    assert train.main(["--set", "lora_rank=many"]) == 2
    assert "lora_rank: 'many' is not int" in capsys.readouterr().err
    assert train.main(["--set", "colour=blue"]) == 2
    assert "expected KEY=VALUE with KEY one of" in capsys.readouterr().err


@pytest.mark.parametrize("flag, parent", [("--run-dir", False), ("--output", False), ("--hf-output", False),
                                          ("--output", True)])
def test_an_output_directory_flag_naming_a_file_is_refused_naming_the_flag(tiny_checkpoint, data_file, tmp_path,
                                                                           capsys, flag, parent):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    target = blocker / "sub" if parent else blocker
    args = [a for a in train_args(tiny_checkpoint, data_file, tmp_path) if a != "--no-hf-export"]
    assert train.main([*args, flag, str(target)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} {target}") and "give a directory" in lines[0]
    assert blocker.read_text() == "not a directory" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, words", [
    (("--lr", "inf"), ["recipe: learning_rate must be a finite number (got inf); set it with --lr"]),
    (("--set", "learning_rate=NaN"), ["learning_rate must be a finite number (got nan)"]),
    (("--set", "harmful_weight=-Infinity"), ["harmful_weight must be a finite number", "--set harmful_weight="]),
    # Finite, but the first update throws the adapters to ~1e36 and the next loss overflows.
    (("--lr", "1e36"), ["training diverged at step 2: the loss is nan", "lower --lr (now 1e+36)"]),
    # Past float32: the first update itself makes the weights infinite.
    (("--lr", "1e39"), ["training diverged at step 1: its update made weights non-finite", "lower --lr"]),
])
def test_a_non_finite_learning_rate_or_loss_stops_training_writing_no_expert(tiny_checkpoint, data_file, tmp_path,
                                                                            capsys, flags, words):
    args = [a for a in train_args(tiny_checkpoint, data_file, tmp_path) if a != "--no-hf-export"]
    code = train.main([*args, "--hf-output", str(tmp_path / "hf"), "--epochs", "1", "--set", "warmup_fraction=0",
                       *flags])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    assert all(w in errors[0] for w in words), err
    assert not (tmp_path / "expert").exists() and not (tmp_path / "hf").exists()
    assert not any(p.name.startswith(".expert") for p in tmp_path.iterdir())  # no staging left either


def test_an_expert_with_non_finite_weights_is_never_written(tiny_checkpoint, tmp_path):
    from ngsd_jax.errors import UsageError
    from ngsd_jax.training.export import write_expert

    model = load_model(tiny_checkpoint)
    model.layers[1].mlp.up_proj.kernel[...] = model.layers[1].mlp.up_proj.kernel[...].at[0, 0].set(jnp.nan)
    with pytest.raises(UsageError, match=r"non-finite weights \(.*layers.*1.*up_proj.*\); no expert was written"):
        write_expert(model, train_tokenizer(), tmp_path / "expert", tmp_path / "hf", {})
    assert list(tmp_path.iterdir()) == []


def test_resume_after_sigkill_ends_where_an_uninterrupted_run_ends(tiny_checkpoint, data_file, tmp_path):
    # Enough steps that the run is still going when its first checkpoint appears.
    settings = ["--epochs", "100", "--lr", "3e-3", "--set", "checkpoint_every=50", "--set", "max_steps=null"]
    reference = tmp_path / "reference"
    assert train.main(train_args(tiny_checkpoint, data_file, reference, *settings)) == 0

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "ngsd_jax.train", *train_args(tiny_checkpoint, data_file, killed, *settings)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = killed / "run" / "state"
    deadline = time.monotonic() + 120
    while not (state.is_dir() and any(p.name.isdigit() for p in state.iterdir())):
        assert process.poll() is None, f"the run ended before its first checkpoint: {process.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "expert").exists()
    assert train.main(train_args(tiny_checkpoint, data_file, killed, *settings)) == 2  # needs --resume

    assert train.main(train_args(tiny_checkpoint, data_file, killed, *settings, "--resume")) == 0
    for resumed, uninterrupted in zip(final_params(killed / "expert"), final_params(reference / "expert")):
        np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-6, atol=1e-7)
    steps = [json.loads(line)["step"] for line in (killed / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 301))  # the killed run's extra log lines were dropped on resume


def test_a_lora_expert_keeps_its_adapter_and_decodes_as_the_merged_one(tiny_checkpoint, data_file, tmp_path,
                                                                       capsys):
    from ngsd_jax import decode
    from ngsd_jax.checkpoints.adapter import adapter_mismatch, load_adapter

    assert train.main(train_args(tiny_checkpoint, data_file, tmp_path, "--epochs", "3", "--lr", "3e-2")) == 0
    adapter_dir = tmp_path / "expert" / "adapter"
    adapter = load_adapter(adapter_dir)
    assert adapter.targets == ("q_proj", "v_proj") and adapter.layers == (0, 1)
    assert adapter_mismatch(adapter, load_model(tiny_checkpoint), "base") is None
    assert any(np.abs(b).max() > 0 for _, b in adapter.weights.values())  # trained, not the zero initialisation

    def tokens(expert):
        code = decode.main(["--base", str(tiny_checkpoint), "--expert", str(expert), "--max-new-tokens", "12",
                            "--json", "--reflect", "off", "--alpha", "0.9", "--mode", "always",
                            "--prompt", TRAIN_PAIRS[0][0], "--prompt", TRAIN_PAIRS[2][0]])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return [json.loads(line)["tokens"] for line in captured.out.splitlines()]

    assert tokens(adapter_dir) == tokens(tmp_path / "expert")
    other = tmp_path / "other_base"
    build_tiny_hf("llama", other, seed=3, vocab_size=len(train_tokenizer()))  # same shapes, other weights
    train_tokenizer().save_pretrained(str(other))
    capsys.readouterr()
    code = decode.main(["--base", str(other), "--expert", str(adapter_dir), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "trained on different weights" in err
