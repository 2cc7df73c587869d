"""Weights in and out: HF export and orbax round trips, GGUF files written here with gguf-py
(llama.cpp's q/k permutation applied independently of the loader), and every bad input a
user can cause failing with a one-line CheckpointError/ConfigError naming the file and fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import chex
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_logits
from flax import nnx
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from ngsd_jax.checkpoints.weights import CheckpointError, check_parameters, export_hf, load_model, save_params
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.settings import DecodeSettings
from ngsd_jax.models.config import ConfigError
from ngsd_jax.models.lora import apply_lora

TOKENS = [1, 17, 200, 45, 3, 99, 128, 7, 250, 31, 64, 12]


def _ours_logits(model, tokens=TOKENS) -> np.ndarray:
    t = jnp.asarray([tokens], jnp.int32)
    hidden, _ = model(t, jnp.arange(len(tokens), dtype=jnp.int32)[None])
    return np.asarray(model.logits(hidden))[0]


def _params(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def _copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _assert_one_line(err: Exception, *fragments: str) -> str:
    message = str(err)
    assert "\n" not in message.strip(), f"message is not one line: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------- round trips

EXPORT_CASES = {
    "llama-untied": ("llama", {}),
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "llama-rope-llama3": ("llama", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("mistral", dict(num_key_value_heads=1)),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_hf_round_trip(case, make_tiny_hf, hf_model, tmp_path):
    family, overrides = EXPORT_CASES[case]
    source = make_tiny_hf(family, **overrides)
    original = hf_model(source)
    exported = export_hf(load_model(source), tmp_path / "export")
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors"} <= names and not any(p.is_dir() for p in exported.iterdir())

    reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert type(reloaded) is type(original)
    assert reloaded.config.tie_word_embeddings == original.config.tie_word_embeddings
    assert reloaded.config.rope_parameters["rope_type"] == original.config.rope_parameters["rope_type"]
    expected, got = hf_logits(original, TOKENS), hf_logits(reloaded, TOKENS)
    diff = float(np.abs(got - expected).max())
    print(f"\n{case}: export round trip max|diff| {diff:.2e}")
    assert diff <= 1e-5
    # And it reads back into the same parameters.
    again = _params(load_model(exported))
    for key, value in _params(load_model(source)).items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_orbax_round_trip_is_exact(make_tiny_hf, tmp_path):
    model = load_model(make_tiny_hf("qwen2", tie_word_embeddings=False))
    directory = tmp_path / "converted"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    save_params(model, directory)
    assert (directory / "params").is_dir() and not (directory / "params.tmp").exists()
    save_params(model, directory)  # overwriting an existing conversion works too

    restored = load_model(directory)
    before, after = _pure(model), _pure(restored)
    assert len(jax.tree.leaves(before)) > 10
    chex.assert_trees_all_equal_shapes_and_dtypes(after, before)
    chex.assert_trees_all_equal(after, before)
    np.testing.assert_array_equal(_ours_logits(restored), _ours_logits(model))


def _pure(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_loaded_and_saved_parameters_must_form_the_configured_model(make_tiny_hf, tmp_path):
    source = make_tiny_hf("llama")
    half = load_model(source, jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(_pure(half))} == {jnp.dtype(jnp.bfloat16)}

    model = load_model(source)
    kernel = model.layers[1].mlp.up_proj.kernel
    kernel.set_value(kernel[...].astype(jnp.bfloat16))  # one tensor in another dtype
    with pytest.raises(CheckpointError, match=r"^x: parameters do not form a 2-layer llama model in float32 .*"
                                              r"'layers/1/mlp/up_proj/kernel'.*bfloat16 != float32"):
        check_parameters(model, "x")
    kernel.set_value(kernel[...].astype(jnp.float32)[:, :-1])  # a column short of config.json
    with pytest.raises(CheckpointError, match=r"'layers/1/mlp/up_proj/kernel'.*shapes"):
        check_parameters(model, "x")

    adapted = load_model(source)
    apply_lora(adapted, rank=2, alpha=4.0)  # not merged: must not be saved as a plain model
    with pytest.raises(CheckpointError, match=r"saving to .*: parameters do not form .* unexpected, e\.g\. "
                                              r"\['layers'\]\[0\]\['attn'\]\['q_proj'\]\['base'\]\['kernel'\]"):
        save_params(adapted, tmp_path)
    assert not (tmp_path / "params").exists()


def test_sharded_checkpoint_loads(make_tiny_hf, hf_model, tmp_path):
    original = hf_model(make_tiny_hf("llama"))
    original.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 3
    diff = np.abs(_ours_logits(load_model(tmp_path)) - hf_logits(original, TOKENS)).max()
    assert diff <= 1e-4


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_precision_checkpoint_loads(stored, make_tiny_hf, tmp_path):
    """Most HF checkpoints store bf16, which numpy (and safetensors' numpy backend) cannot name."""
    directory = tmp_path / stored
    AutoModelForCausalLM.from_pretrained(make_tiny_hf("qwen2"), dtype=getattr(torch, stored)).save_pretrained(directory)
    oracle = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()  # upcast on load
    diff = float(np.abs(_ours_logits(load_model(directory)) - hf_logits(oracle, TOKENS)).max())
    assert diff <= 1e-4

    native = load_model(directory, dtype=getattr(jnp, stored))
    stored_q = oracle.model.layers[1].self_attn.q_proj.weight.detach().numpy()  # exact: up-cast is lossless
    kernel = native.layers[1].attn.q_proj.kernel[...]
    assert kernel.dtype == getattr(jnp, stored)
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), stored_q.T)


def test_unreadable_tensor_dtype(make_tiny_hf, tmp_path):
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    directory = _copy(make_tiny_hf("llama"), tmp_path)
    weights = directory / "model.safetensors"
    tensors = load_torch(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e4m3fn)
    save_torch(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_model(directory)
    _assert_one_line(err.value, str(weights), "model.norm.weight", "F8_E4M3", "convert the checkpoint")


# ----------------------------------------------------------------------------- GGUF

GGUF_NAMES = [
    (r"model.embed_tokens.weight", "token_embd.weight"),
    (r"model.norm.weight", "output_norm.weight"),
    (r"lm_head.weight", "output.weight"),
]
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF half-split rotary rows -> interleaved pairs."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_tensors(hf) -> dict[str, np.ndarray]:
    """HF llama weights under llama.cpp names, q/k permuted as llama.cpp's converter does."""
    cfg = hf.config
    out = {}
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for key, array in state.items():
        name = dict(GGUF_NAMES).get(key)
        if name is None:
            _, _, layer, rest = key.split(".", 3)
            name = f"blk.{layer}.{LAYER_NAMES[rest]}"
            if rest == "self_attn.q_proj.weight":
                array = _llama_cpp_permute(array, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj.weight":
                array = _llama_cpp_permute(array, cfg.num_key_value_heads)
        out[name] = np.ascontiguousarray(array, dtype=np.float32)
    return out


def write_llama_gguf(hf, path: Path, quantize: QT | None = None, raw: dict | None = None) -> Path:
    """A llama GGUF of `hf`'s weights: F32, or 2-D weights quantised to `quantize`; `raw` maps
    names to (bytes array, type) written verbatim instead."""
    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    for name, array in _gguf_tensors(hf).items():
        if raw and name in raw:
            data, qtype = raw[name]
            writer.add_tensor(name, data, raw_dtype=qtype)
        elif quantize is not None and array.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(array, quantize), raw_dtype=quantize)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_f32_llama_matches_transformers(tied, make_tiny_hf, hf_model, tmp_path):
    # GQA (4 heads, 2 kv heads): q and k are permuted with different head counts.
    hf = hf_model(make_tiny_hf("llama", tie_word_embeddings=tied))
    model = load_model(write_llama_gguf(hf, tmp_path / "tiny.gguf"))
    assert model.config.tie_word_embeddings == tied
    assert (model.config.num_heads, model.config.num_kv_heads) == (4, 2)
    diff = float(np.abs(_ours_logits(model) - hf_logits(hf, TOKENS)).max())
    print(f"\ngguf f32 {'tied' if tied else 'untied'}: max|diff| {diff:.2e}")
    assert diff <= 1e-4


def test_gguf_q8_0_llama_matches_dequantised_transformers(make_tiny_hf, hf_model, tmp_path):
    hf = hf_model(make_tiny_hf("llama"))
    model = load_model(write_llama_gguf(hf, tmp_path / "q8.gguf", quantize=QT.Q8_0))

    # The oracle: transformers with every 2-D weight replaced by its Q8_0 round trip. Q8_0
    # blocks lie within a row, so quantising before or after llama.cpp's row permutation is
    # the same, and the oracle needs no permutation at all.
    w = hf.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    q8 = lambda a: gguf.quants.dequantize(gguf.quants.quantize(a, QT.Q8_0), QT.Q8_0)  # noqa: E731
    np.testing.assert_array_equal(_llama_cpp_permute(q8(w), 4), q8(_llama_cpp_permute(w, 4)))
    dequantised = AutoModelForCausalLM.from_config(hf.config).eval()
    dequantised.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for name, param in dequantised.named_parameters():
            if param.ndim == 2:
                param.copy_(torch.from_numpy(q8(param.numpy().copy())))

    ours = _ours_logits(model)
    diff = float(np.abs(ours - hf_logits(dequantised, TOKENS)).max())
    quantisation_effect = float(np.abs(ours - hf_logits(hf, TOKENS)).max())
    print(f"\ngguf q8_0: max|diff| vs dequantised HF {diff:.2e} (vs fp32 HF {quantisation_effect:.2e})")
    assert quantisation_effect > 1e-3  # the file really is quantised...
    assert diff <= 1e-4  # ...and read exactly as gguf-py dequantises it


# ----------------------------------------------------------------------------- bad input

def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError) as err:
        load_model(missing)
    _assert_one_line(err.value, str(missing), "no such checkpoint directory", ".gguf")


def test_missing_gguf_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(CheckpointError) as err:
        load_model(missing)
    _assert_one_line(err.value, str(missing), "no such GGUF file")


def test_directory_without_weights(make_tiny_hf, tmp_path):
    directory = tmp_path / "config_only"
    directory.mkdir()
    shutil.copy(make_tiny_hf("llama") / "config.json", directory)
    with pytest.raises(CheckpointError) as err:
        load_model(directory)
    _assert_one_line(err.value, str(directory), "no model.safetensors", "point at")


def test_directory_without_config(make_tiny_hf, tmp_path):
    directory = _copy(make_tiny_hf("llama"), tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(ConfigError) as err:
        load_model(directory)
    _assert_one_line(err.value, str(directory / "config.json"), "not found", "needs config.json")


def test_config_not_json(make_tiny_hf, tmp_path):
    directory = _copy(make_tiny_hf("llama"), tmp_path)
    (directory / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ConfigError) as err:
        load_model(directory)
    _assert_one_line(err.value, str(directory / "config.json"), "not valid JSON")


@pytest.fixture
def sharded(make_tiny_hf, hf_model, tmp_path) -> Path:
    directory = tmp_path / "sharded"
    hf_model(make_tiny_hf("llama")).save_pretrained(directory, max_shard_size="100KB")
    return directory


def test_index_names_absent_shard(sharded):
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError) as err:
        load_model(sharded)
    _assert_one_line(err.value, str(sharded / "model.safetensors.index.json"), shards[1].name, "partial",
                     "fetch the missing shards")


def test_shard_missing_a_tensor(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    dropped = "model.layers.1.mlp.up_proj.weight"
    shard = sharded / index[dropped]
    tensors = load_file(shard)
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_model(sharded)
    _assert_one_line(err.value, str(sharded), "layers.1.mlp.up_proj.kernel", "partial", "download it again")


def test_unsupported_architecture(make_tiny_hf, tmp_path):
    directory = _copy(make_tiny_hf("llama"), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        load_model(directory)
    _assert_one_line(err.value, str(directory / "config.json"), "'gpt2' is not supported",
                     "supported: llama, mistral, qwen2, qwen3")


def test_llama_attention_bias_is_refused(make_tiny_hf):
    # HF Llama's attention_bias biases o_proj too, which the decoder has no place for.
    directory = make_tiny_hf("llama", attention_bias=True)
    with pytest.raises(ConfigError) as err:
        load_model(directory)
    _assert_one_line(err.value, str(directory / "config.json"), "attention_bias", "not supported")


@pytest.mark.parametrize(
    "field,value,fragments",
    [
        ("hidden_size", 128, ["has shape (256, 64)", "implies (256, 128)", "disagree"]),
        ("intermediate_size", 96, ["mlp.down_proj.weight has shape (64, 128)", "implies (64, 96)", "disagree"]),
        ("num_hidden_layers", 1, ["model.layers.1.", "1-layer", "disagree"]),
        ("num_hidden_layers", 3, ["parameters missing", "layers.2.", "partial"]),
    ],
)
def test_config_and_weights_disagree(field, value, fragments, make_tiny_hf, tmp_path):
    directory = _copy(make_tiny_hf("llama"), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config[field] = value
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_model(directory)
    _assert_one_line(err.value, str(directory), *fragments)


def test_truncated_safetensors(make_tiny_hf, tmp_path):
    directory = _copy(make_tiny_hf("llama"), tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_model(directory)
    _assert_one_line(err.value, str(weights), "truncated", f"{len(data) // 2} bytes", "download it again")


@pytest.mark.parametrize("damage", ["garbage_json", "huge_length", "tiny_file"])
def test_corrupt_safetensors_header(damage, make_tiny_hf, tmp_path):
    directory = _copy(make_tiny_hf("llama"), tmp_path)
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "garbage_json":
        data[8:40] = b"\xff\xfe#!garbage-not-json-at-all!#\x00\x01\x02"
    elif damage == "huge_length":
        data[:8] = (2**40).to_bytes(8, "little")
    else:
        data = data[:5]
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_model(directory)
    _assert_one_line(err.value, str(weights), "download it again")


def test_gguf_unsupported_tensor_type(make_tiny_hf, hf_model, tmp_path):
    # gguf-py has no dequantiser for Q8_1 (block of 32 values in 40 bytes).
    with pytest.raises(NotImplementedError):
        gguf.quants.dequantize(np.zeros((1, 40), np.uint8), QT.Q8_1)
    hf = hf_model(make_tiny_hf("llama"))
    rows, cols = hf.model.layers[0].mlp.down_proj.weight.shape
    block, size = gguf.GGML_QUANT_SIZES[QT.Q8_1]
    junk = np.random.default_rng(0).integers(0, 255, (rows, cols // block * size), dtype=np.uint8)
    path = write_llama_gguf(hf, tmp_path / "q8_1.gguf", raw={"blk.0.ffn_down.weight": (junk, QT.Q8_1)})
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    _assert_one_line(err.value, str(path), "blk.0.ffn_down.weight", "Q8_1", "cannot dequantise", "convert")


def test_gguf_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((16, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError) as err:
        load_model(path)
    _assert_one_line(err.value, str(path), "'gpt2' is not supported", "supported: llama")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"<html>404 Not Found</html>" * 8)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    _assert_one_line(err.value, str(path), "not a readable GGUF file", "download it again")


def test_sliding_window_checks_real_lengths_of_the_models_in_use(make_tiny_hf):
    # A 3,100-token prompt pads to the 4,096 bucket; with 128 new tokens the real sequence is
    # 3,228 tokens, inside a 4,096-token window, though the bucket plus the budget is not.
    small = dict(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192)
    base = load_model(make_tiny_hf("mistral", sliding_window=4096, **small))
    expert = load_model(make_tiny_hf("mistral", seed=1, sliding_window=64, **small))
    assert base.config.sliding_window == 4096
    engine = Engine(base, expert, vocab_size=256, stop_ids=[])
    prompt = np.random.RandomState(0).randint(3, 256, size=3100).tolist()
    result = engine.decode([prompt], settings=DecodeSettings(mode="base", max_new_tokens=128))
    assert result.lengths[0] == 128  # the expert's 64-token window does not matter: base mode never runs it
    with pytest.raises(ConfigError) as err:
        engine.decode([prompt], settings=DecodeSettings(mode="ngsd", max_new_tokens=128))
    _assert_one_line(err.value, "3228 tokens", "the expert model's sliding window of 64", "<= 64")
    with pytest.raises(ConfigError) as err:
        engine.decode([prompt + [5] * 869], settings=DecodeSettings(mode="base", max_new_tokens=128))
    _assert_one_line(err.value, "4097 tokens", "the base model's sliding window of 4096")
