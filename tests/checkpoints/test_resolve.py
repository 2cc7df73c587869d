"""Checkpoint names: local paths first, then Hugging Face Hub ids from an offline cache built by hand."""

from __future__ import annotations

from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects

from ngsd_jax import train
from ngsd_jax.checkpoints.resolve import HUB_FILES, is_hub_id, resolve_checkpoint
from ngsd_jax.checkpoints.weights import CheckpointError, load_model


def test_hub_id_resolves_to_the_cached_snapshot_and_loads(make_tiny_hf, offline_hub):
    snapshot = offline_hub("tiny-org/Tiny-Llama_0.1", make_tiny_hf("llama"))
    resolved = resolve_checkpoint("tiny-org/Tiny-Llama_0.1")
    assert resolved == snapshot
    assert load_model(resolved).config.num_layers == 2


def test_a_local_checkpoint_of_the_same_name_wins(make_tiny_hf, offline_hub, tmp_path, monkeypatch):
    offline_hub("tiny-org/tiny", make_tiny_hf("llama"))
    under = offline_hub.checkpoints / "tiny-org" / "tiny"
    under.mkdir(parents=True)
    assert resolve_checkpoint("tiny-org/tiny") == under
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-org" / "tiny").mkdir(parents=True)
    assert resolve_checkpoint("tiny-org/tiny").resolve() == (tmp_path / "tiny-org" / "tiny").resolve()


def test_an_uncached_id_offline_is_one_line_naming_the_fix(offline_hub):
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("tiny-org/not-downloaded")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert "HF_HUB_OFFLINE is set" in message and "not in the Hugging Face cache" in message


@pytest.mark.parametrize("error, expected", [
    (GatedRepoError, "gated on the Hugging Face Hub"),
    (RepositoryNotFoundError, "no such Hugging Face Hub model"),
])
def test_gated_and_missing_repositories_name_the_fix(offline_hub, monkeypatch, error, expected):
    def refuse(*args, **kwargs):
        # What the Hub answers online; the error only reads the response's headers and request.
        raise error("401 Client Error", response=SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("meta-llama/Llama-3.1-8B-Instruct")
    message = str(err.value)
    assert expected in message and len(message.splitlines()) == 1
    assert ("HF_TOKEN" in message) and message.startswith("meta-llama/Llama-3.1-8B-Instruct: ")


def test_only_config_safetensors_and_tokenizer_files_are_fetched():
    repo = ["config.json", "generation_config.json", "model.safetensors.index.json",
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "consolidated.safetensors",
            "pytorch_model-00001-of-00002.bin", "original/consolidated.00.pth", "tokenizer.json",
            "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "README.md", "LICENSE",
            "model.gguf", "chat_template.jinja"]
    fetched = sorted(filter_repo_objects(repo, allow_patterns=list(HUB_FILES)))
    assert fetched == ["chat_template.jinja", "config.json", "generation_config.json",
                       "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                       "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json",
                       "tokenizer.model", "tokenizer_config.json"]


@pytest.mark.parametrize("name, expected", [
    ("meta-llama/Llama-3.1-8B-Instruct", True), ("Qwen/Qwen3-1.7B", True), ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", True),
    ("smollm2-135m-instruct", False), ("/abs/dir", False), ("./rel/dir", False), ("a/b/c", False),
    ("org/model.gguf", False), ("../up", False), ("org/..", False), ("~/x", False),
])
def test_hub_ids_are_told_from_paths(name, expected):
    assert is_hub_id(name) is expected


def test_training_resolves_recipe_models_through_the_same_resolver(make_tiny_hf, offline_hub, tmp_path, capsys):
    snapshot = offline_hub("tiny-org/tiny", make_tiny_hf("llama"))
    # The Hub id reaches the tokenizer loader with the snapshot; the tiny model has no tokenizer.
    code = train.main(["--base", "tiny-org/tiny", "--run-dir", str(tmp_path / "run"), "--output",
                       str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {snapshot}: no tokenizer files" in err
