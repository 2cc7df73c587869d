"""A training run's state on disk: the run directory's checks (resume or overwrite, the same
recipe), the orbax training-state checkpoints (trainable state, optimizer state, step), the
metrics log, atomic file writes, and stopping on Ctrl-C with the state saved.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from ngsd_jax.errors import UsageError
from ngsd_jax.files import write_text_atomic
from ngsd_jax.parallel.distributed import barrier, is_primary
from ngsd_jax.training.recipe import RESUMABLE_CHANGES, Recipe


def write_atomic(path: Path, text: str) -> None:
    """Replaces `path` by `text` in one step, from process 0 only (a multi-host run's other
    processes share its run directory, see distributed.check_shared_directory)."""
    if is_primary():
        write_text_atomic(path, text)


def check_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Refuses to mix runs: a run directory with state needs --resume (same recipe) or --overwrite."""
    state, saved_recipe = run_dir / "state", run_dir / "recipe.json"
    has_state = state.is_dir() and any(state.iterdir())
    if overwrite:
        if is_primary():
            shutil.rmtree(state, ignore_errors=True)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    elif has_state and not resume:
        raise UsageError(f"{run_dir} already holds a training run; pass --resume to continue it or "
                         f"--overwrite to start over")
    elif resume and not has_state:
        raise UsageError(f"{run_dir}: nothing to resume (no training state); run without --resume")
    current = dataclasses.asdict(recipe)
    if resume and saved_recipe.is_file():
        saved = json.loads(saved_recipe.read_text())
        changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
        if changed:
            raise UsageError(f"--resume with different settings ({', '.join(changed)}) than {saved_recipe}; "
                             f"resume with the same ones or start a new --run-dir")
    write_atomic(saved_recipe, json.dumps(current, indent=2) + "\n")
    barrier("run directory checked")  # no process opens the state before process 0 has cleared it


def truncate_metrics(path: Path, step: int) -> None:
    """Drops log lines past the restored step (written by the run that was killed)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines(keepends=True) if json.loads(ln)["step"] <= step]
        write_atomic(path, "".join(lines))


class StopRequest:
    """First Ctrl-C (or SIGTERM) asks the loop to save and stop after the current step; a second
    Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nngsd-jax train: stopping after this step and saving the training state "
              "(Ctrl-C again to abandon it)", file=sys.stderr, flush=True)


def checkpoint_manager(run_dir: Path):
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager((run_dir / "state").absolute(), options=options)


def save_state(manager, step: int, trainable, opt_state, meta: dict) -> None:
    manager.save(step, args=ocp.args.Composite(
        train=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}),
        meta=ocp.args.JsonSave({**meta, "step": step})), force=True)
    manager.wait_until_finished()


def restore_state(manager, trainable, opt_state):
    step = manager.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"trainable": trainable, "opt_state": opt_state})
    restored = manager.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore(abstract),
                                                             meta=ocp.args.JsonRestore()))
    return restored["train"]["trainable"], restored["train"]["opt_state"], restored["meta"]
