"""What a decode call is asked for (`DecodeSettings`: everything that shapes the compiled
program) and what it returns (`DecodeResult`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ngsd_jax.decoding import early_stop as es
from ngsd_jax.decoding.gate import GateConfig

MODES = ("ngsd", "base", "expert", "always", "safedecoding")


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Everything that shapes the compiled program; a change here means a new compilation."""

    mode: str = "ngsd"
    max_new_tokens: int = 128
    gate: GateConfig = GateConfig()
    sampling: bool = False  # set by Engine.decode from the temperature; greedy skips the vocabulary sort
    sampling_top_k: int = 0
    safedecoding_first_m: int = 2
    safedecoding_alpha: float = 3.0
    safedecoding_min_common: int = 5
    early_stop: bool = False  # the authors' early stop (spec §5), ngsd mode only; off: not traced at all
    early_stop_rule: es.EarlyStopRule = es.EarlyStopRule()
    shared_prompts: bool = False  # set by Engine.decode: an adapter expert whose prompts are the base's
    alpha_from_expert: bool = False  # set by Engine.decode when given an expert_risk

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode '{self.mode}'; choose one of {', '.join(MODES)}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")

    @property
    def uses_base(self) -> bool:
        return self.mode != "expert"

    @property
    def uses_expert(self) -> bool:
        return self.mode != "base"


@dataclasses.dataclass
class DecodeResult:
    tokens: np.ndarray  # [B, N]; entries past `lengths` are padding
    lengths: np.ndarray  # [B] generated tokens per sequence, stop token included
    divergence: np.ndarray  # [B, N]
    potential: np.ndarray
    spike: np.ndarray
    alpha_in_force: np.ndarray
    alpha: np.ndarray  # [B] the alpha each sequence decoded with
    risk: np.ndarray | None = None  # [B] r from the expert's prefill, when alpha came from it

    def sequence(self, i: int) -> list[int]:
        return self.tokens[i, : self.lengths[i]].tolist()
