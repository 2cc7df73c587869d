"""Weights in and out: HF safetensors and GGUF into the NNX decoder, orbax, HF export.

Each source tensor is mapped to a parameter path by a short table of regex rules, read,
converted and placed on the device one at a time, so peak host memory stays near one
copy of the model. Every failure a user can cause (a missing file, a truncated
download, a shape that disagrees with config.json) is a `CheckpointError` whose one-line
message names the file and the fix.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from gguf import GGMLQuantizationType, GGUFReader, quants
from safetensors.numpy import save_file

from ngsd_jax.files import replace_path
from ngsd_jax.models.config import ConfigError, ModelConfig, config_from_hf, load_config
from ngsd_jax.models.decoder import Decoder, abstract_decoder
from ngsd_jax.parallel import sharding
from ngsd_jax.parallel.distributed import barrier, is_primary
from ngsd_jax.parallel.sharding import fetch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the fix."""


# (HF key pattern, parameter path template, transpose?). HF stores Linear weights [out, in].
HF_RULES: tuple[tuple[str, str, bool], ...] = (
    (r"model\.embed_tokens\.weight", "embedding", False),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"layers.\1.attn.\2_proj.kernel", True),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.bias", r"layers.\1.attn.\2_proj.bias", False),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", r"layers.\1.attn.\2_norm.scale", False),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2_proj.kernel", True),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.input_norm.scale", False),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.post_attn_norm.scale", False),
    (r"model\.norm\.weight", "final_norm.scale", False),
    (r"lm_head\.weight", "lm_head.kernel", True),
)

# llama.cpp names; its tensors come out of gguf-py in the same [out, in] order as HF's.
GGUF_RULES: tuple[tuple[str, str, bool], ...] = (
    (r"token_embd\.weight", "embedding", False),
    (r"blk\.(\d+)\.attn_([qkv])\.weight", r"layers.\1.attn.\2_proj.kernel", True),
    (r"blk\.(\d+)\.attn_output\.weight", r"layers.\1.attn.o_proj.kernel", True),
    (r"blk\.(\d+)\.attn_([qkv])\.bias", r"layers.\1.attn.\2_proj.bias", False),
    (r"blk\.(\d+)\.attn_([qk])_norm\.weight", r"layers.\1.attn.\2_norm.scale", False),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", r"layers.\1.mlp.\2_proj.kernel", True),
    (r"blk\.(\d+)\.attn_norm\.weight", r"layers.\1.input_norm.scale", False),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"layers.\1.post_attn_norm.scale", False),
    (r"output_norm\.weight", "final_norm.scale", False),
    (r"output\.weight", "lm_head.kernel", True),
)


def map_key(key: str, rules) -> tuple[str, bool] | None:
    for pattern, template, transpose in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key), transpose
    return None


def _param_leaves(module: Decoder) -> dict[str, nnx.Variable]:
    """Parameter variables of a module keyed by dotted path ("layers.3.attn.q_proj.kernel")."""
    return {".".join(str(p) for p in path): var for path, var in nnx.iter_graph(module) if isinstance(var, nnx.Param)}


def check_parameters(model: Decoder, source: str, dtype=None) -> None:
    """The model's parameters are exactly the tree and shapes its config defines, in `dtype`
    (default: the embedding's).

    The contract between every loader or writer and the engine, which compiles against
    `abstract_decoder(config)`: checked after each load and before each save, so a loader
    that leaves a tensor out, a restore that pads or casts, or a model still wrapped in LoRA
    adapters fails here with one line instead of inside XLA or in the next run's restore."""
    dtype = model.dtype if dtype is None else dtype
    expected = nnx.to_pure_dict(nnx.state(abstract_decoder(model.config, dtype), nnx.Param))
    actual = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    paths = lambda tree: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}  # noqa: E731
    extra, missing = sorted(paths(actual) - paths(expected)), sorted(paths(expected) - paths(actual))
    what = f"a {model.config.num_layers}-layer {model.config.model_type} model in {jnp.dtype(dtype).name}"
    if extra or missing:
        raise CheckpointError(f"{source}: parameters do not form {what} ({len(extra)} unexpected, e.g. "
                              f"{(extra or ['none'])[0]}; {len(missing)} missing, e.g. {(missing or ['none'])[0]})")
    try:
        chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)
    except AssertionError as err:
        detail = re.sub(r"^\[Chex\] Assertion \w+ failed:\s*", "", " ".join(str(err).split()))
        raise CheckpointError(f"{source}: parameters do not form {what} as config.json defines it ({detail})") from None


def fill_decoder(config: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]], rules, source: str, dtype,
                 mesh=None, placement: str = "sharded") -> Decoder:
    """Builds a decoder from (source key, array) pairs, checking every shape and that nothing is missing.
    With a `mesh`, each tensor goes straight from the host onto its devices, each device
    receiving only its slice (ngsd_jax.parallel.sharding's rules, or a copy everywhere if `placement`
    is "replicated"), so no device ever holds the whole model."""
    model = abstract_decoder(config, dtype)
    targets = _param_leaves(model)
    filled: set[str] = set()
    for key, array in tensors:
        mapped = map_key(key, rules)
        if mapped is None:
            continue
        path, transpose = mapped
        if path == "lm_head.kernel" and config.tie_word_embeddings:
            continue  # some tied checkpoints store the head too; the embedding is the source of truth
        if path not in targets:
            raise CheckpointError(f"{source}: tensor {key} has no place in a {config.num_layers}-layer "
                                  f"{config.model_type} model; config.json and the weights disagree")
        # Compare in the source's own layout, so the message shows the shapes stored in the file.
        expected = tuple(targets[path].shape)[::-1] if transpose else tuple(targets[path].shape)
        if tuple(array.shape) != expected:
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(array.shape)} but config.json implies "
                                  f"{expected}; config.json and the weights disagree")
        array = array.T if transpose else array
        if mesh is None:
            targets[path].set_value(jnp.asarray(array, dtype=dtype))
        else:
            target_sharding = sharding.parameter_sharding(config, targets[path], mesh, placement)
            targets[path].set_value(sharding.place(array.astype(dtype), target_sharding))
        filled.add(path)
    missing = sorted(set(targets) - filled)
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} parameters missing (e.g. {missing[0]}); the checkpoint "
                              f"is partial — download it again or point at a complete one")
    return model


# ----------------------------------------------------------------------------- safetensors

def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index}: not a valid safetensors index; download it again") from None
        files = [directory / s for s in shards]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index}: shard {absent[0]} is missing ({len(absent)} of {len(files)}); "
                                  f"the download is partial — fetch the missing shards")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json; "
                          f"point at a Hugging Face checkpoint directory or a .gguf file")


def _check_safetensors_file(path: Path) -> tuple[dict, int]:
    """Rejects a truncated or corrupt file before any tensor is read; returns (header, data start)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated (only {size} bytes); download it again")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: corrupt or truncated header; download it again")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt header (not JSON); download it again") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, header promises {8 + header_len + end}); "
                              f"download it again")
    return header, 8 + header_len


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8}


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    # Plain reads into fresh arrays, one tensor at a time, rather than safetensors' safe_open:
    # its numpy backend cannot return bfloat16 (most HF checkpoints), and its mmap keeps every
    # page read of a file resident until the file is closed, so a single-file checkpoint
    # peaked at about twice the model in RSS.
    for path in files:
        header, start = _check_safetensors_file(path)
        with open(path, "rb", buffering=0) as f:
            for key in sorted(k for k in header if k != "__metadata__"):
                info = header[key]
                dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
                if dtype is None:
                    raise CheckpointError(f"{path}: tensor {key} has dtype {info.get('dtype')}, which ngsd-jax "
                                          f"cannot read; convert the checkpoint to F32, F16 or BF16")
                begin, end = info["data_offsets"]
                array = np.empty([int(d) for d in info["shape"]], dtype)
                if array.nbytes != end - begin:
                    raise CheckpointError(f"{path}: corrupt header (tensor {key} has {end - begin} bytes for shape "
                                          f"{tuple(array.shape)}); download it again")
                buffer, done = memoryview(array.reshape(-1).view(np.uint8)), 0
                f.seek(start + begin)
                while done < len(buffer):
                    read = f.readinto(buffer[done:])
                    if not read:
                        raise CheckpointError(f"{path}: truncated inside tensor {key}; download it again")
                    done += read
                yield key, array


# ----------------------------------------------------------------------------- GGUF

def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader, source: str) -> dict:
    """An HF-style config dict from GGUF metadata."""
    arch = _gguf_field(reader, "general.architecture")
    model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(arch)
    if model_type is None:
        raise ConfigError(f"{source}: GGUF architecture '{arch}' is not supported; supported: llama, qwen2, qwen3")
    get = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    raw = {
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling_type = get("rope.scaling.type")
    if scaling_type == "linear":
        raw["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ConfigError(f"{source}: GGUF rope scaling '{scaling_type}' is not supported; supported: linear")
    return raw


def _unpermute_llama_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp reorders llama q/k rows from HF's half-split rotary layout to interleaved pairs.
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def iter_gguf(reader, config: ModelConfig, source: str) -> Iterator[tuple[str, np.ndarray]]:
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            array = np.asarray(quants.dequantize(tensor.data, qtype) if qtype == GGMLQuantizationType.BF16
                               else tensor.data, dtype=np.float32)
        else:
            try:
                array = quants.dequantize(tensor.data, qtype)
            except NotImplementedError:
                raise CheckpointError(f"{source}: tensor {tensor.name} has GGUF type {qtype.name}, which gguf-py "
                                      f"cannot dequantise; convert the model with a supported type (e.g. Q8_0, F16)") from None
        array = array.reshape([int(d) for d in reversed(tensor.shape)])
        if config.model_type == "llama":
            if re.fullmatch(r"blk\.\d+\.attn_q\.weight", tensor.name):
                array = _unpermute_llama_qk(array, config.num_heads)
            elif re.fullmatch(r"blk\.\d+\.attn_k\.weight", tensor.name):
                array = _unpermute_llama_qk(array, config.num_kv_heads)
        yield tensor.name, array


def open_gguf(path: Path):
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, struct.error, IndexError) as err:
        raise CheckpointError(f"{path}: not a readable GGUF file ({err}); download it again") from None


def load_gguf(path: str | Path, dtype=jnp.float32, mesh=None, placement: str = "sharded") -> Decoder:
    path = Path(path)
    reader = open_gguf(path)
    config = config_from_hf(gguf_config(reader, str(path)), str(path))
    return fill_decoder(config, iter_gguf(reader, config, str(path)), GGUF_RULES, str(path), dtype, mesh, placement)


# ----------------------------------------------------------------------------- project checkpoints

PARAMS_SUBDIR = "params"


def load_hf(directory: str | Path, dtype=jnp.float32, mesh=None, placement: str = "sharded") -> Decoder:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory; give a Hugging Face directory, "
                              f"a converted ngsd-jax checkpoint or a .gguf file")
    config = load_config(directory)
    files = _safetensors_files(directory)
    return fill_decoder(config, iter_safetensors(files), HF_RULES, str(directory), dtype, mesh, placement)


def save_params(model: Decoder, directory: str | Path) -> None:
    """Writes the parameters as an orbax checkpoint under directory/params, atomically. On several
    processes every one calls it (orbax writes each one's shards; process 0 moves the result)."""
    check_parameters(model, f"saving to {directory}")
    target = Path(directory).absolute() / PARAMS_SUBDIR
    staging = target.with_name(target.name + ".tmp")
    if is_primary():
        shutil.rmtree(staging, ignore_errors=True)
    barrier("params staging cleared")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(staging, nnx.state(model, nnx.Param))
    if is_primary():
        replace_path(staging, target)
    barrier("params saved")


def load_params(directory: str | Path, dtype=jnp.float32, mesh=None, placement: str = "sharded") -> Decoder:
    """Restores a project checkpoint; with a `mesh`, orbax reads each device's slice straight onto
    it (whatever mesh, if any, the checkpoint was saved from)."""
    directory = Path(directory).absolute()
    config = load_config(directory)
    model = abstract_decoder(config, dtype)
    # Always name the target placement: without one, orbax restores onto the mesh the checkpoint
    # was saved from, which may not exist here.
    for var in _param_leaves(model).values():
        target = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None
                  else sharding.parameter_sharding(config, var, mesh, placement))
        var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=target))
    graphdef, abstract_state = nnx.split(model, nnx.Param)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(directory / PARAMS_SUBDIR, abstract_state)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise CheckpointError(f"{directory / PARAMS_SUBDIR}: cannot restore ({str(err).splitlines()[0]}); "
                              f"delete it to convert again") from None
    return nnx.merge(graphdef, restored)


def is_project_checkpoint(directory: Path) -> bool:
    return (directory / PARAMS_SUBDIR).is_dir() and (directory / "config.json").is_file()


def load_model(source: str | Path, dtype=jnp.float32, mesh=None, placement: str = "sharded") -> Decoder:
    """Loads a .gguf file, a converted ngsd-jax checkpoint or an HF safetensors directory; with a
    `mesh`, straight onto it (see ngsd_jax.parallel.sharding)."""
    source = Path(source)
    if source.suffix == ".gguf":
        if not source.is_file():
            raise CheckpointError(f"{source}: no such GGUF file")
        model = load_gguf(source, dtype, mesh, placement)
    elif source.is_dir() and is_project_checkpoint(source):
        model = load_params(source, dtype, mesh, placement)
    else:
        model = load_hf(source, dtype, mesh, placement)
    check_parameters(model, str(source), dtype)
    return model


def load_model_config(source: str | Path) -> ModelConfig:
    """The architecture of a checkpoint, without reading its weights (for the memory plan)."""
    source = Path(source)
    if source.suffix == ".gguf":
        if not source.is_file():
            raise CheckpointError(f"{source}: no such GGUF file")
        return config_from_hf(gguf_config(open_gguf(source), str(source)), str(source))
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such checkpoint directory; give a Hugging Face directory, "
                              f"a converted ngsd-jax checkpoint or a .gguf file")
    return load_config(source)


def export_hf(model: Decoder, directory: str | Path, tokenizer=None) -> Path:
    """Writes a Hugging Face directory (model.safetensors + config.json [+ tokenizer]). On several
    processes every one gathers the weights and process 0 writes them."""
    directory = Path(directory)
    check_parameters(model, f"exporting to {directory}")
    tensors = {}
    for path, var in _param_leaves(model).items():
        for pattern, template, transpose in HF_RULES:
            hf_key = _invert(path, pattern, template)
            if hf_key is not None:
                array = fetch(var[...]).astype(np.float32)
                tensors[hf_key] = np.ascontiguousarray(array.T if transpose else array)
                break
        else:
            raise AssertionError(f"no HF name for parameter {path}")
    if not is_primary():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / ".model.safetensors.tmp"
    save_file(tensors, str(staging), metadata={"format": "pt"})
    replace_path(staging, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def _invert(path: str, pattern: str, template: str) -> str | None:
    """Maps a parameter path back through one rule: the template's groups become the pattern's."""
    groups = re.findall(r"\(([^)]*)\)", pattern)
    path_regex = re.escape(template)
    for i in range(1, len(groups) + 1):
        path_regex = path_regex.replace(re.escape(f"\\{i}"), f"(?P<g{i}>{groups[i - 1]})")
    match = re.fullmatch(path_regex, path)
    if match is None:
        return None
    key = pattern.replace("\\.", ".")
    for i, group in enumerate(groups, start=1):
        key = key.replace(f"({group})", match.group(f"g{i}"), 1)
    return key
