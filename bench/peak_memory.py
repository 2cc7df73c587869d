"""Peak host memory of `load_model` on a synthetic >= 1B-parameter Llama checkpoint.

Writes random fp32 weights as a sharded HF safetensors checkpoint (4 shards + index) into a
temporary directory, loads it with `ngsd_jax.checkpoints.weights.load_model` in a fresh subprocess, and
compares that process's peak RSS (`ru_maxrss`) with the bytes of the loaded parameters:

    python bench/peak_memory.py                       # fp32, 1.1B params (4.4 GB)
    python bench/peak_memory.py --dtype bfloat16      # same file, loaded as bf16
    python bench/peak_memory.py --layers 4            # a smaller, quicker run

prints e.g. `params 4.40 GB (1.10B, float32), peak RSS 4.65 GB (1.06x); 0.18 GB before
loading, ...`. The files are deleted afterwards unless --keep is given.

The checkpoint is written by one subprocess and loaded by another, and this parent process
stays small: on Linux a child's ru_maxrss starts from its parent's RSS at fork, so writing
the weights here would inflate the figure. VmHWM from /proc is reported as a cross-check.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9


def llama_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:

    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, d),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        })
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (v, d)
    return shapes


def write_checkpoint(directory: Path, layers: int, shards: int = 4) -> int:
    """Writes config.json, `shards` safetensors files and the index; returns the parameter count."""
    import numpy as np
    from safetensors.numpy import save_file

    cfg = llama_config(layers)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    shapes = tensor_shapes(cfg)
    total = sum(int(np.prod(s)) for s in shapes.values())
    budget, groups, current, size = total / shards, [], [], 0
    for name, shape in shapes.items():
        current.append(name)
        size += int(np.prod(shape))
        if size >= budget * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(current)
            current = []
    groups.append(current)
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, names in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = np.ones(shapes[name], np.float32)
            else:
                tensors[name] = rng.standard_normal(shapes[name], dtype=np.float32)
                tensors[name] *= np.float32(0.02)
            weight_map[name] = filename
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": 4 * total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def child(directory: str, dtype_name: str) -> None:
    """Runs in a fresh process: load, wait for the arrays, report RSS figures as JSON."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ngsd_jax.checkpoints.weights import load_model

    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model = load_model(directory, dtype=getattr(jnp, dtype_name))
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_kb = None
    if os.path.exists("/proc/self/status"):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                hwm_kb = int(line.split()[1])
    print(json.dumps({
        "vm_hwm": None if hwm_kb is None else hwm_kb * 1024,
        "param_bytes": sum(x.nbytes for x in leaves),
        "num_params": sum(x.size for x in leaves),
        "baseline_rss": baseline_kb * 1024,
        "peak_rss": peak_kb * 1024,
        "seconds": seconds,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=22, help="22 (TinyLlama's shape) gives 1.1B parameters")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint files")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dtype)
        return
    if args.write:
        print(write_checkpoint(Path(args.write), args.layers, args.shards))
        return

    directory = Path(tempfile.mkdtemp(prefix="ngsd-peak-mem-", dir=args.dir))
    try:
        start = time.perf_counter()
        writer = subprocess.run([sys.executable, __file__, "--write", str(directory), "--layers", str(args.layers),
                                 "--shards", str(args.shards)],
                                capture_output=True, text=True)
        if writer.returncode != 0:
            sys.exit(f"writing the checkpoint failed (exit {writer.returncode}):\n{writer.stderr[-4000:]}")
        n = int(writer.stdout.strip().splitlines()[-1])
        print(f"wrote {n / 1e9:.2f}B-parameter fp32 checkpoint ({4 * n / GB:.1f} GB, {args.shards} shards) "
              f"in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        proc = subprocess.run([sys.executable, __file__, "--child", str(directory), "--dtype", args.dtype],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"loading failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if args.keep:
            print(f"kept {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    params, peak, base = result["param_bytes"], result["peak_rss"], result["baseline_rss"]
    print(f"params {params / GB:.2f} GB ({result['num_params'] / 1e9:.2f}B, {args.dtype}), "
          f"peak RSS {peak / GB:.2f} GB ({peak / params:.2f}x); {base / GB:.2f} GB before loading, "
          f"load took {result['seconds']:.0f} s"
          + ("" if result["vm_hwm"] is None else f"; VmHWM {result['vm_hwm'] / GB:.2f} GB"))


if __name__ == "__main__":
    main()
