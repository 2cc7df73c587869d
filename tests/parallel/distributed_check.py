"""Run by tests/test_distributed.py in a fresh interpreter with 8 fake CPU devices: which rows
of a batch `distributed.process_rows` gives each process of a pretended multi-host run (the
devices dealt out to processes in order, as a slice lists them), and the rows a batch placed
with `sharding.place_rows` holds on each device. Prints JSON."""

from __future__ import annotations

import json

import jax
import numpy as np

from ngsd_jax.parallel import distributed
from ngsd_jax.parallel import sharding as sh

ROWS = 16
out = {}
for mesh_text, processes in (("data=8", 2), ("data=4,tensor=2", 4), ("tensor=8", 2), ("data=2,fsdp=2,tensor=2", 2),
                             ("data=2,fsdp=2,tensor=2", 4), ("fsdp=8", 8)):
    mesh = sh.make_mesh(sh.parse_mesh(mesh_text))
    sharding = sh.batch_sharding(mesh, 2)
    per_process = len(jax.devices()) // processes
    distributed._process_of = lambda device, n=per_process: device.id // n
    spans = []
    for process in range(processes):
        jax.process_index = lambda p=process: p
        rows = distributed.process_rows(sharding, (ROWS, 3))
        spans.append([rows.start, rows.stop])
    out[f"{mesh_text} over {processes}"] = spans
jax.process_index = lambda: 0
distributed._process_of = lambda device: device.process_index
batch = np.arange(ROWS * 3).reshape(ROWS, 3)
placed = sh.place_rows(batch, sh.batch_sharding(sh.make_mesh(sh.parse_mesh("data=4,tensor=2")), 2))
out["placed equal"] = bool((np.asarray(placed) == batch).all())
out["placed rows per device"] = sorted({(s.index[0].start, s.index[0].stop) for s in placed.addressable_shards})
print(json.dumps(out))
