"""Where a named checkpoint lives: a local path, a name under the checkpoints folder, or a
Hugging Face Hub id.

`resolve_checkpoint` is the one resolver behind every place a model is named (`--base`,
`--expert`, decode presets, training recipes' `base` and `expert_init`). Local wins: a path
that exists, then `<checkpoints>/<name>`; only then is an `ORG/NAME` id fetched through
`huggingface_hub` into its standard cache (HF_HOME / HF_HUB_CACHE), with its progress bars,
HF_TOKEN for gated or private repositories, and HF_HUB_OFFLINE=1 to use the cache alone.
Only the files a checkpoint needs are fetched (config, safetensors weights, tokenizer), never
the other weight formats many repositories carry beside them.
"""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from ngsd_jax.checkpoints.weights import CheckpointError
from ngsd_jax.paths import checkpoints_dir

# What loading.load_hf and tokenizer.load_tokenizer read. `model*.safetensors` rather than
# `*.safetensors`: Mistral repositories also carry consolidated.safetensors, a second copy.
HUB_FILES = (
    "config.json", "generation_config.json",
    "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
# The Hub's own rule for repository ids: ORG/NAME, letters, digits, '-', '_', '.'.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name and not name.endswith(".gguf")


def resolve_checkpoint(name: str) -> Path:
    """A local path as given, else `<checkpoints>/<name>`, else the snapshot of Hub id `name`."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    under = checkpoints_dir() / name
    if under.exists():
        return under
    if is_hub_id(name):
        return hub_snapshot(name, f"no local {name} or {under}")
    raise CheckpointError(f"{name}: no such checkpoint here or under {checkpoints_dir()}; give an existing path, "
                          f"a name under that folder, or a Hugging Face Hub id (ORG/NAME)")


def hub_snapshot(repo_id: str, local_miss: str = "") -> Path:
    """The cached snapshot of a Hub model repository, downloading what is missing unless offline."""
    where = f"{local_miss}; " if local_miss else ""
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=list(HUB_FILES)))
    except GatedRepoError:
        raise CheckpointError(f"{repo_id}: gated on the Hugging Face Hub; accept its licence on the model's Hub "
                              f"page with your account, then set HF_TOKEN (or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: {where}no such Hugging Face Hub model (or it is private: set HF_TOKEN); "
                              f"check the spelling, or point at a local directory") from None
    except LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise CheckpointError(f"{repo_id}: {where}not in the Hugging Face cache {constants.HF_HUB_CACHE} and "
                              f"{reason}; download it once online (HF_HUB_OFFLINE unset) or point at a local "
                              f"directory") from None
    except (HfHubHTTPError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{repo_id}: download from the Hugging Face Hub failed ({first}); retry, or set "
                              f"HF_HUB_OFFLINE=1 to use what is cached") from None
