"""The default expert's adapter shipped inside the package: it loads, it adapts the embedded
SmolLM2-135M-Instruct base, and the recipe beside it is the default recipe, so that
`python -m ngsd_jax.train` with no arguments trains it again."""

from __future__ import annotations

import dataclasses
import json

from ngsd_jax.checkpoints.adapter import is_adapter, load_adapter
from ngsd_jax.checkpoints.default_model import SHIPPED_EXPERT
from ngsd_jax.training.recipe import DEFAULT_RECIPE, Recipe, load_recipe


def test_the_shipped_adapter_adapts_the_default_base():
    assert is_adapter(SHIPPED_EXPERT)
    adapter = load_adapter(SHIPPED_EXPERT)
    config = adapter.base_config
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        "llama", 576, 30, 49152)
    assert len(adapter.base_fingerprint) == 32


def test_the_shipped_adapter_was_trained_by_the_default_recipe():
    shipped = json.loads((SHIPPED_EXPERT / "recipe.json").read_text())
    default = dataclasses.asdict(Recipe(**load_recipe(DEFAULT_RECIPE)))
    for field in ("harmful_data", "benign_data", "ordinary_data"):  # resolved paths when trained, names here
        shipped[field] = [p.rsplit("/", 1)[-1] for p in ([shipped[field]] if isinstance(shipped[field], str)
                                                        else shipped[field])]
        default[field] = [default[field]] if isinstance(default[field], str) else default[field]
    assert shipped == default


def test_the_held_out_figures_sit_beside_it():
    figures = json.loads((SHIPPED_EXPERT / "heldout.json").read_text())
    assert {"harmful", "benign", "ordinary"} <= set(figures["sets"])
