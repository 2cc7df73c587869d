"""What the decode and train CLIs share to run on many devices and hosts: the `--mesh`,
`--device-memory` and `--multi-host` flags, starting `jax.distributed` on a multi-host
slice, choosing the mesh against the memory plan, and which process speaks.

Every process of a multi-host slice runs the same command on the same inputs (the JAX SPMD
model); each places only its own devices' slices of the weights and the batch, and only
process 0 prints, shows progress and writes files.
"""

from __future__ import annotations

import os
import sys

# Set by the Cloud TPU runtime on every worker of a slice (comma-separated host names), and
# by a user who starts the coordinator themselves.
_MULTI_HOST_ENV = ("TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS")


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
                       help="call jax.distributed.initialize() (automatic when a multi-host TPU slice is detected)")


def is_multi_host_launch(environ=os.environ) -> bool:
    """A TPU slice of several workers, or an explicitly given coordinator."""
    hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1 or bool(environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(multi_host: bool | None) -> None:
    """Starts jax.distributed when asked or detected; must run before any other jax call."""
    if multi_host or (multi_host is None and is_multi_host_launch()):
        import jax

        jax.distributed.initialize()


def is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def say(message: str) -> None:
    """A status line on stderr, from process 0 only."""
    if is_primary():
        print(message, file=sys.stderr, flush=True)


def choose_mesh(mesh_flag: str | None, plan_for, capacity: int | None):
    """The MeshShape to run on: --mesh as given, or the default for the devices present.
    `plan_for(mesh)` gives the memory plan on a mesh (for the default's fit test)."""
    import jax

    from ngsd_jax.memory import default_mesh
    from ngsd_jax.sharding import parse_mesh

    if mesh_flag:
        return parse_mesh(mesh_flag, jax.device_count())
    return default_mesh(jax.device_count(), plan_for, capacity)
