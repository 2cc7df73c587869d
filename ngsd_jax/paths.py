"""Where the project's files live: the decode presets, training recipes, training data and trained
adapters shipped inside the package (read through importlib.resources, so an installed wheel has them too), and the
checkpoints directory.

In a source checkout `ngsd_jax/presets`, `ngsd_jax/recipes` and `ngsd_jax/data` are links to the
top-level `decode/`, `train/recipes/` and `train/data/` folders, which stay the sources; a wheel
holds copies of them.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

ENV_CHECKPOINTS = "NGSD_CHECKPOINTS"
ENV_COMPILATION_CACHE = "NGSD_COMPILATION_CACHE"  # a directory, or "off"


def _shipped(folder: str) -> Path:
    return Path(str(resources.files("ngsd_jax") / folder))


PRESETS_DIR = _shipped("presets")
RECIPES_DIR = _shipped("recipes")
EXPERTS_DIR = _shipped("experts")  # trained adapters shipped with the package
DATA_DIR = _shipped("data")


def source_checkout() -> Path | None:
    """The repository root when the package runs from a source checkout (an editable install), else None."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "ngsd-jax"' in pyproject.read_text(encoding="utf-8", errors="replace"):
        return root
    return None


def checkpoints_dir() -> Path:
    """$NGSD_CHECKPOINTS, else `checkpoints/` of a source checkout, else ~/.cache/ngsd-jax/checkpoints."""
    env = os.environ.get(ENV_CHECKPOINTS)
    if env:
        return Path(env).expanduser().absolute()
    root = source_checkout()
    if root is not None:
        return root / "checkpoints"
    return Path.home() / ".cache" / "ngsd-jax" / "checkpoints"


def compilation_cache_dir() -> Path | None:
    """JAX's persistent compilation cache: $NGSD_COMPILATION_CACHE ("off": none), else
    $XDG_CACHE_HOME/ngsd-jax/xla (default ~/.cache/ngsd-jax/xla)."""
    env = os.environ.get(ENV_COMPILATION_CACHE)
    if env:
        return None if env == "off" else Path(env).expanduser().absolute()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ngsd-jax" / "xla"
