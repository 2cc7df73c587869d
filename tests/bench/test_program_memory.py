"""What the compiled decode program holds besides its arguments, from `memory_analysis()`.

Weights are abstract (`nnx.eval_shape`): only the shapes are compiled, nothing is allocated.
XLA's CPU backend has no bf16 matmul and converts the weights to fp32; if those conversions
are hoisted out of the decode loop, or all scheduled before the first matmul, the program
keeps an fp32 copy of every weight (twice a bf16 model's size) in its temporaries.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.settings import DecodeSettings
from ngsd_jax.models.config import ModelConfig
from ngsd_jax.models.decoder import abstract_decoder


def _config(layers: int, hidden: int, mlp: int, tie: bool) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=1024, hidden_size=hidden, intermediate_size=mlp,
                       num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=hidden // 4, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=tie)


def _layer_params(config: ModelConfig) -> int:
    d, h = config.hidden_size, config.head_dim
    return d * h * (2 * config.num_heads + 2 * config.num_kv_heads) + 3 * d * config.intermediate_size


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bf16_decode_program_keeps_no_fp32_copy_of_the_weights(scan_layers):
    # Deep and wide enough that the weights dwarf the KV caches and activations, so a copy of
    # them cannot hide under the bound; one model with an untied head, one with a tied one.
    # Scanned: the layers' stacks must not be converted whole either.
    base, expert = _config(4, 256, 1024, tie=False), _config(3, 128, 512, tie=True)
    engine = Engine(abstract_decoder(base, jnp.bfloat16, scan_layers), abstract_decoder(expert, jnp.bfloat16,
                                                                                         scan_layers),
                    vocab_size=1024, stop_ids=[], pad_id=0)
    prompt, new_tokens = 16, 16
    stats = engine.lower([[1] * prompt], DecodeSettings(mode="ngsd", max_new_tokens=new_tokens)).compile()
    stats = stats.memory_analysis()

    weights = 2 * (base.num_params + expert.num_params)
    assert stats.argument_size_in_bytes >= weights  # the weights are arguments, in bf16
    kv_caches = sum(2 * c.num_layers * c.num_kv_heads * (prompt + new_tokens) * c.head_dim * 2 for c in (base, expert))
    # At most one matrix is converted at a time: the largest of a layer or a head, in fp32.
    largest_fp32 = 4 * max(_layer_params(base), base.vocab_size * base.hidden_size)
    bound = 2 * (kv_caches + largest_fp32)
    print(f"\nweights {weights / 1e6:.1f} MB, temporaries {stats.temp_size_in_bytes / 1e6:.1f} MB, "
          f"bound {bound / 1e6:.1f} MB")
    assert bound < weights  # else the check would not notice a copy of the weights
    assert stats.temp_size_in_bytes <= bound
