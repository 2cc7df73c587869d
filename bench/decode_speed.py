"""Decode throughput, side by side in one run: the engine's base alone, NGSD with a LoRA
expert as an adapter over the base's weights (one weight stream), NGSD with the same
adapter merged into a separate expert model (two weight streams), and transformers
`generate` of the base alone.

    python bench/decode_speed.py [--model PATH] [--new-tokens 128] [--repeats 3] [--batches 1,8]

The adapter has the default recipe's shapes (rank 16, alpha 64, all linear projections of
the top 10 layers) with random values: speed does not depend on them, and the merged
expert is the same adapter merged. fp32, no stop tokens, so every run generates exactly
--new-tokens. Prompts: a ~40-token chat prompt and a ~1,000-token one. Cases are
interleaved round-robin and the median of --repeats is reported, because these machines
are noisy; the load average is printed before and after.

Two more cases price what the light touch and the risk cost: the adapter engine's `--mode
base` (run in the paired layout, so its base rows are NGSD's) and NGSD with `--reflect
expert`'s risk read inside the program.

An engine-level benchmark: it builds its engines by hand over the loaded base (no trained
expert, no stop tokens, the distribution over the tokenizer's tokens as decode's default);
the synthetic adapter, the short prompt and the round-robin timing are bench/common.py's.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import SHORT_PROMPT, synthetic_adapter, time_round_robin  # noqa: E402
from flax import nnx  # noqa: E402

from ngsd_jax.checkpoints.weights import load_model  # noqa: E402
from ngsd_jax.decoding.batching import bucket_length  # noqa: E402
from ngsd_jax.decoding.engine import Engine  # noqa: E402
from ngsd_jax.decoding.risk import ExpertRisk, opening_token_sequences, opening_trie  # noqa: E402
from ngsd_jax.decoding.settings import DecodeSettings  # noqa: E402

LONG_SENTENCE = ("The history of the printing press shows how a single technical change can reshape the way "
                 "knowledge spreads, who controls it, and how quickly new ideas reach ordinary people. ")
LONG_TOKENS = 1000


def long_prompt(tokenizer, encode_chat) -> list[int]:
    text = LONG_SENTENCE
    while len(encode_chat(tokenizer, text)) < LONG_TOKENS:
        text += LONG_SENTENCE
    return encode_chat(tokenizer, text)


def bytes_per_step(config, params: int, rows_per_layer: list[int], cache_len: int, weight_copies: int) -> float:
    """Weights plus the KV cache read by one decode step (the attention reads the whole cache)."""
    kv_per_row_layer = 2 * config.num_kv_heads * config.head_dim * cache_len * 4
    return weight_copies * params * 4 + kv_per_row_layer * sum(rows_per_layer)


def measured_bandwidth() -> float:
    x = jax.numpy.ones((1 << 28,), jax.numpy.float32)  # 1 GiB
    total = jax.jit(lambda a: a.sum())
    total(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        total(x).block_until_ready()
    return 5 * x.nbytes / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: the embedded SmolLM2-135M)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompts", default="short,long", help="short (~40 tokens), long (~1,000 tokens)")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                        help="transformers' threads (on a loaded machine 1 avoids spinning on busy cores)")
    args = parser.parse_args()

    from ngsd_jax.checkpoints.default_model import default_base_path
    from ngsd_jax.checkpoints.tokenizer import encode_chat, load_tokenizer

    path = args.model or str(default_base_path())
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    adapter, merged = synthetic_adapter(model)
    vocab = len(tokenizer)
    base_engine = Engine(model, None, vocab, stop_ids=[], pad_id=0)
    adapter_engine = Engine(model, None, vocab, stop_ids=[], pad_id=0, adapter=adapter)
    merged_engine = Engine(model, merged, vocab, stop_ids=[], pad_id=0)
    prompts = {"short": encode_chat(tokenizer, SHORT_PROMPT), "long": long_prompt(tokenizer, encode_chat)}
    batches = [int(b) for b in args.batches.split(",")]
    n = args.new_tokens

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.torch_threads)
    hf = _load_transformers(path, AutoModelForCausalLM)

    # --reflect expert: the expert's risk read inside the program (one teacher-forced pass over the
    # refusal openings' trie, from copies of the prefill cache), as the default pair decodes.
    expert_risk = ExpertRisk(opening_trie(opening_token_sequences(tokenizer), vocab))

    def engine_case(engine, mode, prompt, batch, risk=None):
        def run():
            result = engine.decode([prompt] * batch, None, DecodeSettings(mode=mode, max_new_tokens=n), alpha=0.9,
                                   expert_risk=risk)
            assert result.tokens.shape == (batch, n)
        return run

    def transformers_case(prompt, batch):
        tensor = torch.tensor([prompt] * batch)

        def run():
            with torch.no_grad():
                out = hf.generate(tensor, attention_mask=torch.ones_like(tensor), do_sample=False,
                                  max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
            assert out.shape == (batch, len(prompt) + n)
        return run

    cases = {}
    for prompt_name in args.prompts.split(","):
        prompt = prompts[prompt_name]
        for batch in batches:
            tag = f"{prompt_name} prompt, batch {batch}"
            cases[("engine base", tag)] = engine_case(base_engine, "base", prompt, batch)
            cases[("ngsd, adapter expert", tag)] = engine_case(adapter_engine, "ngsd", prompt, batch)
            cases[("ngsd, adapter expert, risk in program", tag)] = engine_case(adapter_engine, "ngsd", prompt, batch,
                                                                                expert_risk)
            cases[("base rows, adapter engine", tag)] = engine_case(adapter_engine, "base", prompt, batch)
            cases[("ngsd, merged expert", tag)] = engine_case(merged_engine, "ngsd", prompt, batch)
            cases[("transformers generate, base", tag)] = transformers_case(prompt, batch)

    load_before = os.getloadavg()
    bandwidth = measured_bandwidth()
    # First calls: compilation (engine) or warm-up (torch); every call's line survives a timeout.
    first_call, _, timings = time_round_robin(cases, args.repeats, echo_first=True, echo_each=True)
    load_after = os.getloadavg()

    config = model.config
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
          f"on {jax.devices()[0].platform}, torch {torch.__version__} ({args.torch_threads} threads); load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"model: {path} ({params / 1e6:.1f}M parameters, {config.num_layers} layers), fp32, {n} new tokens, "
          f"median of {args.repeats}; adapter: rank {adapter.rank}, layers {adapter.layers[0]}-"
          f"{adapter.layers[-1]}, {', '.join(adapter.targets)}; prompts: "
          + ", ".join(f"{k} {len(v)} tokens (bucket {bucket_length(len(v))})" for k, v in prompts.items()) + "\n")
    print("| case | prompt, batch | first call (s) | later call (s) | tokens/s | bytes read per step (weights + KV) "
          "| roofline ms/step at the measured bandwidth |")
    print("|---|---|---|---|---|---|---|")
    rates = {}
    first = min(adapter.layers)
    for (name, tag), times in timings.items():
        batch = int(tag.rsplit(" ", 1)[1])
        prompt = prompts[tag.split(" ", 1)[0]]
        median = statistics.median(times)
        rates[(name, tag)] = batch * n / median
        cache_len = bucket_length(len(prompt)) + n
        if name == "engine base":
            step = bytes_per_step(config, params, [batch] * config.num_layers, cache_len, 1)
        elif name in ("ngsd, adapter expert", "ngsd, adapter expert, risk in program", "base rows, adapter engine"):
            rows = [batch] * first + [2 * batch] * (config.num_layers - first)
            step = bytes_per_step(config, params, rows, cache_len, 1)
        elif name == "ngsd, merged expert":
            step = bytes_per_step(config, params, [2 * batch] * config.num_layers, cache_len, 2)
        else:  # transformers' cache grows with the sequence: its mean length over the run
            step = bytes_per_step(config, params, [batch] * config.num_layers, len(prompt) + n // 2, 1)
        print(f"| {name} | {tag} | {first_call[(name, tag)]:.2f} | {median:.3f} | {rates[(name, tag)]:.1f} "
              f"| {step / 1e6:.0f} MB | {1e3 * step / bandwidth:.1f} |")
    print()
    print("| ratio | " + " | ".join(sorted({tag for _, tag in rates})) + " |")
    print("|---|" + "---|" * len({tag for _, tag in rates}))
    tags = sorted({tag for _, tag in rates})
    for label, numerator, denominator in (
            ("ngsd adapter / engine base", "ngsd, adapter expert", "engine base"),
            ("ngsd adapter, risk in program / ngsd adapter", "ngsd, adapter expert, risk in program",
             "ngsd, adapter expert"),
            ("base rows of the adapter engine / engine base", "base rows, adapter engine", "engine base"),
            ("ngsd adapter / transformers base", "ngsd, adapter expert", "transformers generate, base"),
            ("ngsd adapter / ngsd merged", "ngsd, adapter expert", "ngsd, merged expert"),
            ("ngsd merged / engine base", "ngsd, merged expert", "engine base"),
            ("engine base / transformers base", "engine base", "transformers generate, base")):
        print(f"| {label} | " + " | ".join(f"{rates[(numerator, t)] / rates[(denominator, t)]:.2f}x" for t in tags)
              + " |")
    for prompt_name in args.prompts.split(","):
        if len(batches) > 1:
            small, large = f"{prompt_name} prompt, batch {batches[0]}", f"{prompt_name} prompt, batch {batches[-1]}"
            print(f"\nngsd adapter, {prompt_name} prompt: batch {batches[-1]} / batch {batches[0]} aggregate "
                  f"{rates[('ngsd, adapter expert', large)] / rates[('ngsd, adapter expert', small)]:.2f}x")


def _load_transformers(path, auto_class):
    """transformers' own model on the same weights: from the GGUF for the embedded default."""
    from pathlib import Path

    import torch

    from ngsd_jax.checkpoints.weights import export_hf

    source = Path(path)
    if source.suffix == ".gguf":
        return auto_class.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    if (source / "model.safetensors").exists() or (source / "model.safetensors.index.json").exists():
        return auto_class.from_pretrained(source, dtype=torch.float32).eval()
    exported = Path("/tmp") / f"ngsd-bench-export-{source.name}"
    if not (exported / "model.safetensors").exists():
        export_hf(load_model(source), exported)
    return auto_class.from_pretrained(exported, dtype=torch.float32).eval()


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
