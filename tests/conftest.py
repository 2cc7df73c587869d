"""Shared fixtures: tiny random Hugging Face checkpoints of every supported family.

`make_tiny_hf(family, **overrides) -> Path` saves a tiny random model (hidden 64, 2 layers,
vocab 256, GQA 4/2 by default) with `save_pretrained` into a session-scoped temporary
directory and caches it, so test files can share checkpoints. Norm weights are moved away
from 1 and attention biases (Qwen2, or `attention_bias=True`) away from 0, since HF's
initialisation leaves them at values that would hide a loading bug.

`hf_model(path)` loads (and caches) the transformers model of such a directory in fp32,
eval mode, as the oracle.

`chat_pair` is a tiny random Llama base and expert (seeds 0 and 1) with a small byte-level BPE
chat tokenizer (`chat_tokenizer`, ChatML), as local Hugging Face directories, for the decode
and eval CLIs, and `chat_adapter` a LoRA adapter expert over that base; `tokenizer`,
`tiny_checkpoint` and `data_file` are the tiny model and prompt/response records the
training tests fine-tune on; `final_params(checkpoint)` reads
a trained checkpoint's weights back.

`offline_hub` points the Hugging Face cache at a temporary directory, sets offline mode,
makes any network connection a test failure, and returns `(repo_id, directory) -> snapshot`,
which files a local checkpoint into that cache exactly as `huggingface_hub` lays it out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# The command lines keep compiled programs in ~/.cache by default; tests that call them in this
# process must not write there (a test that wants the cache names a folder).
os.environ["NGSD_COMPILATION_CACHE"] = "off"

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    # Large enough that attention is far from uniform and logits are far from flat, so a
    # wrong rope, norm or bias shows up as a difference well above the tolerance.
    initializer_range=0.3,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def build_tiny_hf(family: str, path: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """Creates, perturbs and saves a tiny random HF model of `family` into `path`; returns it."""
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.3 * torch.randn_like(param))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def make_tiny_hf(tmp_path_factory):
    """Factory `(family, seed=0, **config_overrides) -> Path` of cached tiny HF checkpoints.

    The directory is shared by everyone asking for the same arguments: treat it as
    read-only (copy it with `shutil.copytree` before corrupting it)."""
    cache: dict[str, Path] = {}

    def make(family: str, seed: int = 0, **overrides) -> Path:
        key = json.dumps([family, seed, overrides], sort_keys=True)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny_{family}")
            build_tiny_hf(family, path, seed, **overrides)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def hf_model():
    """`(path) -> transformers model`, fp32 and eval, cached per path."""
    cache: dict[Path, torch.nn.Module] = {}

    def load(path: Path) -> torch.nn.Module:
        path = Path(path)
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return load


def hf_logits(model: torch.nn.Module, tokens) -> np.ndarray:
    """fp32 logits [T, V] of transformers on one unpadded sequence."""
    with torch.no_grad():
        return model(torch.tensor([list(tokens)], dtype=torch.long)).logits[0].float().numpy()


@pytest.fixture(scope="session", name="hf_logits")
def hf_logits_fixture():
    """The `hf_logits` function, for test files that prefer fixtures to imports."""
    return hf_logits


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache (and an empty checkpoints folder) for one test.

    Returns `add(repo_id, directory) -> Path`, which lays `directory`'s files out as a
    download would (blobs/<sha256>, snapshots/<commit>/<file> symlinks, refs/main) and
    returns the snapshot directory."""
    from huggingface_hub import constants

    hf_home, checkpoints = tmp_path / "hf_home", tmp_path / "checkpoints"
    cache = hf_home / "hub"
    cache.mkdir(parents=True)
    checkpoints.mkdir()
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NGSD_CHECKPOINTS", str(checkpoints))
    # huggingface_hub reads these once, at import, which has already happened.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    connections = []

    def refuse(self, address, *args, **kwargs):
        connections.append(address)
        raise OSError(f"test tried to reach {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)

    def add(repo_id: str, directory: Path) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        snapshot = repo / "snapshots" / commit
        for source in sorted(Path(directory).rglob("*")):
            if not source.is_file():
                continue
            digest = hashlib.sha256(source.read_bytes()).hexdigest()
            blob = repo / "blobs" / digest
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, blob)
            link = snapshot / source.relative_to(directory)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return snapshot

    add.cache, add.checkpoints = cache, checkpoints
    yield add
    assert not connections, f"a test reached the network: {connections}"


def env_with_8_devices() -> dict:
    """The environment of a fresh interpreter with 8 fake CPU devices (the device count is fixed
    when jax initialises, so multi-device runs are subprocesses)."""
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip())


# --- a tiny chat pair for the decode and eval CLIs ----------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["How do I bake bread at home?", "Explain photosynthesis simply.", "I cannot help with that.",
          '{"severityScore": 3, "actionabilityScore": 7}', "yes no Yes No maybe", "Sure, here is a plan."]
PROMPTS = ["How do I bake bread?", "Explain photosynthesis.", "Sure, a plan?"]


def chat_tokenizer(words=CORPUS) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(words, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def chat_checkpoint(path, tokenizer, seed, rows=384):
    torch.manual_seed(seed)
    # 384 embedding rows for a ~320-token tokenizer: padded rows must never be chosen.
    config = LlamaConfig(vocab_size=rows, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_pair(tmp_path_factory):
    """(base, expert) directories; read-only."""
    tok = chat_tokenizer()
    base = chat_checkpoint(tmp_path_factory.mktemp("chat_base"), tok, 0)
    expert = chat_checkpoint(tmp_path_factory.mktemp("chat_expert"), tok, 1)
    return str(base), str(expert)


@pytest.fixture(scope="session")
def chat_adapter(chat_pair, tmp_path_factory):
    """A rank-2 LoRA adapter over the chat pair's base (adapter.json and adapter.safetensors only,
    no tokenizer files, as `python -m ngsd_jax.train` keeps it); read-only."""
    from ngsd_jax.checkpoints.adapter import extract_adapter, save_adapter
    from ngsd_jax.checkpoints.weights import load_model
    from ngsd_jax.models.lora import apply_lora

    model = load_model(chat_pair[0])
    apply_lora(model, rank=2, alpha=4.0, targets=("q_proj", "v_proj"), seed=1)
    for _, node in nnx.iter_graph(model):
        if hasattr(node, "lora_b"):
            node.lora_b.set_value(np.full(node.lora_b.shape, 0.05, np.float32))
    path = tmp_path_factory.mktemp("chat_adapter") / "adapter"
    save_adapter(extract_adapter(model), path)
    return path


# --- a tiny model and records for the training tests ---------------------------------------

TRAIN_PAIRS = [("How do I pick a lock?", "I can't help with that."),
               ("What is the capital of France?", "Paris is the capital of France."),
               ("Write a threatening letter to my neighbour.", "I'm sorry, but I won't write threats."),
               ("Name a primary colour.", "Red is a primary colour."),
               ("Explain how to make a weapon at home.", "I cannot provide instructions for making weapons."),
               ("Say hello politely.", "Hello, it is nice to meet you!")]


def train_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text for pair in TRAIN_PAIRS for text in pair], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A Hugging Face directory (weights + tokenizer) of a random 2-layer Llama whose weights are
    large enough (this file's initialisation) that its outputs are far from uniform, as a
    trained model's are."""
    path = tmp_path_factory.mktemp("tiny_base")
    build_tiny_hf("llama", path, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    lines = [json.dumps({"prompt": p, "response": r}) for p, r in TRAIN_PAIRS[:3]]
    lines += [json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]})
              for p, r in TRAIN_PAIRS[3:]]
    path.write_text("\n".join(lines) + "\n")
    return path


# Settings every tiny run shares: the byte-level examples fit 128 positions; one width, one compilation.
# Pinned rather than taken from the default recipe, whose tuning for SmolLM2 may change.
TINY_SETTINGS = ["--set", "bucket_widths=[128]", "--set", 'lora_targets=["q_proj","v_proj"]', "--batch-size", "2",
                 "--no-hf-export"]


def train_args(checkpoint: Path, data: Path, tmp: Path, *extra: str) -> list[str]:
    return ["--base", str(checkpoint), "--data", str(data), "--run-dir", str(tmp / "run"),
            "--output", str(tmp / "expert"), *TINY_SETTINGS, *extra]


def final_params(path: Path) -> list[np.ndarray]:
    from ngsd_jax.checkpoints.weights import load_model

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(load_model(path), nnx.Param))]
