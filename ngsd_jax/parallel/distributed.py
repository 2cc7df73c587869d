"""The JAX runtime of a run: starting `jax.distributed` on a multi-host slice, the persistent
compilation cache, which process speaks and writes, waiting for each other, and which rows of a
batch each process places.

Every process of a multi-host slice runs the same command on the same inputs (the JAX SPMD
model); each places only its own devices' slices of the weights and its own rows of each
batch (`process_rows`), and only process 0 prints, shows progress and writes files
(`is_primary`), other processes waiting where they read back what it wrote (`barrier`).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_multi_host_launch(environ=os.environ) -> bool:
    """A TPU slice of several workers as GKE describes it (TPU_WORKER_HOSTNAMES), or a coordinator
    the user started. A Cloud TPU VM sets neither: there --multi-host says so."""
    hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1 or bool(environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(multi_host: bool | None) -> None:
    """Starts jax.distributed when asked or detected; must run before any other jax call."""
    if multi_host or (multi_host is None and is_multi_host_launch()):
        jax.distributed.initialize()


def enable_compilation_cache(directory: str | Path | None) -> None:
    """JAX's persistent compilation cache in `directory` (None: off). Every program is kept, however
    quick to compile, so that a second start of decode, eval or serve compiles nothing."""
    if directory is None:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def is_primary() -> bool:
    """Whether this process prints and writes files: process 0 of a multi-host run, or the only one."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op in a single-process run): where one
    reads a file that process 0 writes, or process 0 moves what all have written."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_shared_directory(directory, flag: str) -> None:
    """On several processes, refuses (on every one) a `directory` that they do not all see as one:
    process 0 writes a token there that every process must read back. Orbax writes each
    process's shards of a training state into one directory, and the other processes read
    what process 0 alone writes (the generated data, the state's metadata)."""
    if jax.process_count() == 1:
        return
    marker = Path(directory) / ".ngsd-shared"
    token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbelow(2**31))))
    if is_primary():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(token))
    barrier("ngsd-shared-written")
    seen = marker.is_file() and marker.read_text().strip() == str(token)
    if not multihost_utils.process_allgather(np.array(seen)).all():
        raise OSError(f"{directory} is not one directory shared by every host; give {flag} a path on a "
                      f"filesystem all workers mount (NFS, Filestore, gcsfuse)")


def _process_of(device) -> int:
    return device.process_index


def process_rows(sharding, global_shape: tuple[int, ...]) -> slice:
    """The rows of an array of `global_shape` split over its leading dimension by `sharding` that
    this process's devices hold: the span from the first to the last row any of them holds, the
    same process-local block `jax.make_array_from_process_local_data` expects. One process holds
    every row."""
    here = jax.process_index()
    spans = [index[0].indices(global_shape[0])[:2] for device, index in
             sharding.devices_indices_map(tuple(global_shape)).items() if _process_of(device) == here]
    return slice(min(start for start, _ in spans), max(stop for _, stop in spans))


def say(message: str) -> None:
    """A status line on stderr, from process 0 only."""
    if is_primary():
        print(message, file=sys.stderr, flush=True)
