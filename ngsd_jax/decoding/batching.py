"""The padded shapes decode programs compile for: prompts right-padded to a few length buckets,
the batch to a power of two, real lengths passed as arrays, so that a new prompt of an
already-seen bucket reuses the compiled program."""

from __future__ import annotations

import numpy as np

# Powers of two and the 1.5x steps between them: a prompt pads by at most a third, since
# prefill FLOPs grow with the padded width (batch 8 x 128 tokens is most of a CPU decode).
PROMPT_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def bucket_length(n: int, buckets=PROMPT_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"a sequence of {n} tokens is longer than the largest bucket ({buckets[-1]})")


def bucket_batch(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pack_prompts(prompts: list[list[int]], batch: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads prompts into a [batch, bucket] array; rows past len(prompts) are dummies of length 1."""
    array = np.full((batch, bucket_length(max(map(len, prompts)))), pad_id, np.int32)
    lengths = np.ones((batch,), np.int32)
    for i, p in enumerate(prompts):
        array[i, : len(p)] = p
        lengths[i] = len(p)
    return array, lengths
