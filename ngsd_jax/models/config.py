"""Decoder configuration read from a Hugging Face `config.json`.

Llama, Mistral, Qwen2 and Qwen3 are one decoder that differs by a few flags: qkv bias,
q/k RMSNorm, rope scaling and tied embeddings. Anything else is refused up front, with a
message saying what is supported, rather than run inexactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A checkpoint whose configuration this project cannot run exactly."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def num_params(self) -> int:
        d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attention = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attention + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_layers * per_layer + d + head

    def check_sequence_length(self, length: int, name: str = "this") -> None:
        """Refuses lengths the decoder would run inexactly: past the positions the model was made
        for, or past a sliding window (the decoder has no sliding-window attention)."""
        if length > self.max_position_embeddings:
            raise ConfigError(
                f"a sequence of {length} tokens (prompt + new tokens) exceeds the {name} model's "
                f"max_position_embeddings of {self.max_position_embeddings}; shorten the prompt or lower "
                f"the new-token budget (--max-new-tokens)"
            )
        if self.sliding_window is not None and length > self.sliding_window:
            raise ConfigError(
                f"a sequence of {length} tokens exceeds the {name} model's sliding window of "
                f"{self.sliding_window}; ngsd-jax runs full attention only, so keep prompt + "
                f"new tokens <= {self.sliding_window}"
            )

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` that transformers reads back into the same architecture."""
        architecture = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }[self.model_type]
        rope: dict[str, Any] = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type != "default":
            rope["factor"] = self.rope_scaling.factor
        if self.rope_scaling.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_scaling.low_freq_factor,
                high_freq_factor=self.rope_scaling.high_freq_factor,
                original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings,
            )
        out: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
        return out


def _rope_from_hf(raw: dict[str, Any], source: str) -> tuple[float, RopeScaling]:
    # transformers >= 5 keeps theta and scaling together in `rope_parameters`; older
    # checkpoints have `rope_theta` plus an optional `rope_scaling` dict.
    params = dict(raw.get("rope_parameters") or {})
    legacy = raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = {**legacy, **params}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope scaling '{rope_type}' is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    kwargs = {k: scaling[k] for k in fields if scaling.get(k) is not None}
    if rope_type == "llama3" and "original_max_position_embeddings" not in kwargs:
        kwargs["original_max_position_embeddings"] = raw.get("max_position_embeddings", 8192)
    return theta, RopeScaling(rope_type=rope_type, **kwargs)


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Builds a ModelConfig from a parsed HF config dict, refusing what cannot run exactly."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type '{model_type}' is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act '{act}' is not supported; only 'silu' (SwiGLU)")
    if raw.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")
    if model_type != "qwen2" and raw.get("attention_bias"):
        # HF Llama's attention_bias also puts a bias on o_proj, which the decoder lacks (the
        # loader would silently drop it and run a different model).
        raise ConfigError(f"{source}: attention_bias=true (biased q/k/v/o projections) is not supported "
                          f"for {model_type}; only Qwen2's q/k/v bias is")
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        theta, rope = _rope_from_hf(raw, source)
        if model_type in ("qwen2", "qwen3"):
            window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
        else:
            window = raw.get("sliding_window")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return ModelConfig(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=None if window is None else int(window),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
    except KeyError as missing:
        raise ConfigError(f"{source}: required field {missing} is missing") from None


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a checkpoint directory needs config.json next to its weights")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    return config_from_hf(raw, str(path))


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies in float32, with linear or llama3 scaling, as HF computes them."""
    dim = config.head_dim
    inv = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    scaling = config.rope_scaling
    if scaling.rope_type == "linear":
        return (inv / np.float32(scaling.factor)).astype(np.float32)
    if scaling.rope_type == "llama3":
        old_context = scaling.original_max_position_embeddings
        low_wavelen = old_context / scaling.low_freq_factor
        high_wavelen = old_context / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv.astype(np.float32)
