"""The package as a wheel installs it (as from PyPI or on a TPU VM): built from this checkout,
installed into a folder of its own and run from outside the checkout, it has its presets,
recipes and training data, and trains from them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The environment that runs the installed wheel: PYTHONPATH puts it before the editable
    checkout; the dependencies come from this environment."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "dist"), str(REPO)], check=True)
    wheel, = (root / "dist").glob("ngsd_jax-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                    str(root / "site"), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(root / "site"), "NGSD_CHECKPOINTS": str(root / "checkpoints"),
           "JAX_PLATFORMS": "cpu"}
    return {"env": env, "cwd": root, "site": root / "site"}


def run(installed, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=installed["env"], cwd=installed["cwd"], capture_output=True,
                          text=True, timeout=600)


def test_the_installed_package_is_the_wheel_not_the_checkout(installed):
    done = run(installed, "-c", "import ngsd_jax.paths as p; print(p.__file__); print(p.source_checkout())")
    where, checkout = done.stdout.split()
    assert Path(where).is_relative_to(installed["site"]) and checkout == "None"


def test_installed_wheel_lists_recipes_and_decodes_with_a_preset(installed, chat_pair):
    listed = run(installed, "-m", "ngsd_jax.train", "--list-recipes")
    assert listed.returncode == 0, listed.stderr
    assert {line.split()[0] for line in listed.stdout.splitlines()} >= {"smollm2-135m", "tinyllama-for-llama2"}
    base, expert = chat_pair
    decoded = run(installed, "-m", "ngsd_jax.decode", "--preset", "llama3.1-8b+llama3.2-1b", "--base", base,
                  "--expert", expert, "--prompt", "How do I bake bread?", "--max-new-tokens", "4", "--json")
    assert decoded.returncode == 0, decoded.stderr
    assert '"mode": "ngsd"' in decoded.stdout


def test_installed_wheel_trains_on_its_shipped_data(installed, tiny_checkpoint):
    out = installed["cwd"] / "expert"
    done = run(installed, "-m", "ngsd_jax.train", "--base", str(tiny_checkpoint), "--output", str(out),
               "--run-dir", str(installed["cwd"] / "run"), "--no-hf-export", "--max-steps", "1", "--batch-size", "2",
               "--set", "bucket_widths=[256]", "--set", "refusal_prompts=2", "--set", "recovery_prompts=1",
               "--set", "distill_prompts=1", "--set", "ordinary_prompts=0", "--set", "distill_max_new_tokens=4",
               # the short prompts of benign.jsonl: the tiny model has 256 positions, and the draws over the
               # other benign files and the everyday instructions may pick a long pasted text
               "--set", "benign_data=benign.jsonl")
    assert done.returncode == 0, done.stderr
    assert (out / "config.json").is_file() and (installed["cwd"] / "run" / "recipe.json").is_file()


def test_installed_wheel_ships_the_default_experts_adapter(installed):
    """With nothing trained (an empty checkpoints folder), the default expert is the adapter inside
    the installed package."""
    done = run(installed, "-c", "from ngsd_jax.checkpoints.default_model import default_expert; "
                                "e = default_expert(); print(e.path, e.trained_here)")
    assert done.returncode == 0, done.stderr
    path, trained_here = done.stdout.split()
    assert Path(path).is_relative_to(installed["site"]) and trained_here == "False"
    assert {p.name for p in Path(path).iterdir()} >= {"adapter.json", "adapter.safetensors", "recipe.json",
                                                      "heldout.json"}
