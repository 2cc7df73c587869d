"""Writing a trained expert: the project checkpoint (atomically, with its LoRA adapter kept apart
when it has one) and the Hugging Face export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngsd_jax.checkpoints.adapter import ADAPTER_SUBDIR, extract_adapter, save_adapter
from ngsd_jax.checkpoints.weights import export_hf, save_params
from ngsd_jax.errors import UsageError
from ngsd_jax.files import replace_path
from ngsd_jax.models.lora import LoRALinear, merge_lora
from ngsd_jax.parallel.distributed import barrier, is_primary
from ngsd_jax.parallel.sharding import fetch


def write_expert(model, tokenizer, output: Path, hf_output: Path | None, provenance: dict) -> None:
    """The project checkpoint (config.json, tokenizer, params/ with any LoRA merged in,
    ngsd_train.json, and for a LoRA expert its adapter in adapter/), staged next to `output`
    and moved in whole, then the Hugging Face export. Every process takes part (the weights
    are gathered or saved collectively); process 0 alone writes the files and moves them."""
    named = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    finite = fetch(jnp.stack([jnp.isfinite(leaf).all() for _, leaf in named]))
    if not finite.all():  # the training loop stops at the first such step; never write an expert that decodes garbage
        first = jax.tree_util.keystr(named[int(np.argmin(finite))][0])
        raise UsageError(f"the trained expert has non-finite weights ({first}); no expert was written: rerun "
                         f"training with a lower --lr")
    # The adapter, with the identity of the weights it adapts, is read before merging changes them.
    has_lora = any(isinstance(node, LoRALinear) for _, node in nnx.iter_graph(model))
    adapter = extract_adapter(model) if has_lora else None
    model = merge_lora(model)
    output = output.absolute()
    primary = is_primary()
    # One name for every process: orbax saves each one's shards of params/ into the same directory.
    staging = output.with_name(f".{output.name}.partial")
    if primary:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier("expert staging created")
    try:
        if primary:
            (staging / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
            tokenizer.save_pretrained(str(staging))
            (staging / "ngsd_train.json").write_text(json.dumps(provenance, indent=2) + "\n")
            if adapter is not None:
                save_adapter(adapter, staging / ADAPTER_SUBDIR)
        save_params(model, staging)
        if primary:
            replace_path(staging, output)
    finally:
        if primary:
            shutil.rmtree(staging, ignore_errors=True)
    barrier("expert written")
    if hf_output is not None:
        export_hf(model, hf_output, tokenizer)
