"""What the decode and train CLIs share to run on many devices and hosts: the `--mesh`,
`--device-memory` and `--multi-host` flags, starting `jax.distributed` on a multi-host
slice, choosing the mesh against the memory plan, and which process speaks.

Every process of a multi-host slice runs the same command on the same inputs (the JAX SPMD
model); each places only its own devices' slices of the weights and its own rows of each
batch (`process_rows`), and only process 0 prints, shows progress and writes files
(`is_primary`), other processes waiting where they read back what it wrote (`barrier`).
"""

from __future__ import annotations

import os
import sys

def add_arguments(parser) -> None:
    group = parser.add_argument_group("devices")
    group.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T",
                       help="how the devices split the work (any subset of the axes; their product is the "
                            "device count). Default: every device on data if the models fit one device, else "
                            "the smallest tensor split that fits")
    group.add_argument("--device-memory", default=None, metavar="SIZE",
                       help="memory of one device for the memory plan (e.g. 16GiB); default: what the device "
                            "reports (TPU, GPU), unchecked on CPU")
    group.add_argument("--multi-host", action="store_true", default=None,
                       help="call jax.distributed.initialize(), so that the mesh spans every host's devices: needed "
                            "on a multi-host Cloud TPU VM slice (jax finds the workers in the VM's metadata); "
                            "automatic where TPU_WORKER_HOSTNAMES lists several hosts (GKE) or "
                            "JAX_COORDINATOR_ADDRESS is set")


def is_multi_host_launch(environ=os.environ) -> bool:
    """A TPU slice of several workers as GKE describes it (TPU_WORKER_HOSTNAMES), or a coordinator
    the user started. A Cloud TPU VM sets neither: there --multi-host says so."""
    hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1 or bool(environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(multi_host: bool | None) -> None:
    """Starts jax.distributed when asked or detected; must run before any other jax call."""
    if multi_host or (multi_host is None and is_multi_host_launch()):
        import jax

        jax.distributed.initialize()


def is_primary() -> bool:
    """Whether this process prints and writes files: process 0 of a multi-host run, or the only one."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op in a single-process run): where one
    reads a file that process 0 writes, or process 0 moves what all have written."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_shared_directory(directory, flag: str) -> None:
    """On several processes, refuses (on every one) a `directory` that they do not all see as one:
    process 0 writes a token there that every process must read back. Orbax writes each
    process's shards of a training state into one directory, and the other processes read
    what process 0 alone writes (the generated data, the state's metadata)."""
    import jax

    if jax.process_count() == 1:
        return
    import secrets
    from pathlib import Path

    import numpy as np
    from jax.experimental import multihost_utils

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
    import jax

    here = jax.process_index()
    spans = [index[0].indices(global_shape[0])[:2] for device, index in
             sharding.devices_indices_map(tuple(global_shape)).items() if _process_of(device) == here]
    return slice(min(start for start, _ in spans), max(stop for _, stop in spans))


def say(message: str) -> None:
    """A status line on stderr, from process 0 only."""
    if is_primary():
        print(message, file=sys.stderr, flush=True)


def choose_mesh(mesh_flag: str | None, plan_for, capacity: int | None):
    """The MeshShape to run on: --mesh as given, or the default for the devices present.
    `plan_for(mesh)` gives the memory plan on a mesh (for the default's fit test)."""
    import jax

    from ngsd_jax.memory import default_mesh
    from ngsd_jax.sharding import MeshError, parse_mesh

    if mesh_flag:
        try:
            return parse_mesh(mesh_flag, jax.device_count())
        except MeshError as err:
            if jax.process_count() == 1 and parse_mesh(mesh_flag).size > jax.device_count():
                raise MeshError(f"{err}; on a multi-host slice add --multi-host, so that the mesh spans every "
                                f"host's devices") from None
            raise
    return default_mesh(jax.device_count(), plan_for, capacity)
