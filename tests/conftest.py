"""Shared fixtures: tiny random Hugging Face checkpoints of every supported family.

`make_tiny_hf(family, **overrides) -> Path` saves a tiny random model (hidden 64, 2 layers,
vocab 256, GQA 4/2 by default) with `save_pretrained` into a session-scoped temporary
directory and caches it, so test files can share checkpoints. Norm weights are moved away
from 1 and attention biases (Qwen2, or `attention_bias=True`) away from 0, since HF's
initialisation leaves them at values that would hide a loading bug.

`hf_model(path)` loads (and caches) the transformers model of such a directory in fp32,
eval mode, as the oracle.

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

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

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
