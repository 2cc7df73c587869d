"""Decode throughput, side by side in one run: this engine's modes against transformers.

    python bench/decode_speed.py [--model PATH] [--new-tokens 64] [--repeats 3]

Base and expert are the same checkpoint (the embedded SmolLM2-135M by default), fp32, a
~40-token chat prompt, no stop tokens so every run generates exactly --new-tokens. Runs
are interleaved round-robin and the median of --repeats is reported, because this
machine is noisy; ratios taken within the run are the figures to compare.
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

from ngsd_jax.engine import DecodeSettings, Engine  # noqa: E402
from ngsd_jax.loading import load_model  # noqa: E402

# With SmolLM2's default system prompt this is a ~40-token chat prompt, as the issue asks.
PROMPT = "Why is the sky blue?"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: the embedded SmolLM2-135M)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="the larger batch measured besides batch 1")
    args = parser.parse_args()

    from ngsd_jax.default_model import default_base_path
    from ngsd_jax.tokenizer import encode_chat, load_tokenizer

    path = args.model or str(default_base_path())
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    prompt = encode_chat(tokenizer, PROMPT)
    engine = Engine(model, model, vocab_size=len(tokenizer), stop_ids=[], pad_id=0)
    n = args.new_tokens

    def run_engine(mode, batch):
        result = engine.decode([prompt] * batch, None, DecodeSettings(mode=mode, max_new_tokens=n))
        assert result.tokens.shape == (batch, n)

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    hf = _load_transformers(path, AutoModelForCausalLM)
    hf_prompt = torch.tensor([prompt])

    def run_transformers():
        with torch.no_grad():
            out = hf.generate(hf_prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        assert out.shape[1] == len(prompt) + n

    cases = {
        "engine base, batch 1": (lambda: run_engine("base", 1), 1),
        "engine ngsd, batch 1": (lambda: run_engine("ngsd", 1), 1),
        f"engine ngsd, batch {args.batch}": (lambda: run_engine("ngsd", args.batch), args.batch),
        "transformers generate (base alone), batch 1": (run_transformers, 1),
    }
    compile_times = {}
    for name, (fn, _) in cases.items():  # first calls: compilation (engine) or warm-up (torch)
        start = time.perf_counter()
        fn()
        compile_times[name] = time.perf_counter() - start
    timings = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (fn, _) in cases.items():
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
          f"on {jax.devices()[0].platform}, torch {torch.__version__}")
    print(f"model: {path}, prompt {len(prompt)} tokens, {n} new tokens, median of {args.repeats}\n")
    print("| case | first call (s) | later call (s) | tokens/s |")
    print("|---|---|---|---|")
    rates = {}
    for name, (_, batch) in cases.items():
        median = statistics.median(timings[name])
        rates[name] = batch * n / median
        print(f"| {name} | {compile_times[name]:.2f} | {median:.3f} | {rates[name]:.1f} |")
    ngsd1, base1 = rates["engine ngsd, batch 1"], rates["engine base, batch 1"]
    torch1 = rates["transformers generate (base alone), batch 1"]
    print()
    print(f"ngsd / engine base (batch 1): {ngsd1 / base1:.2f}x   (target >= 0.45, ceiling 0.5)")
    print(f"ngsd / transformers base alone (batch 1): {ngsd1 / torch1:.2f}x   (target >= 0.8)")
    print(f"ngsd batch {args.batch} / batch 1 aggregate: {rates[f'engine ngsd, batch {args.batch}'] / ngsd1:.2f}x"
          f"   (target >= 4)")


def _load_transformers(path, auto_class):
    """transformers' own model on the same weights: from the GGUF for the embedded default."""
    import torch
    from pathlib import Path

    from ngsd_jax.loading import export_hf

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
