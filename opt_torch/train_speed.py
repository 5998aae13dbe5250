"""Training speed for opt_torch.training: the training forward (and so its backward) compiled by torch.compile.

Why: profiling the 125m bf16 update (bench/bench_train.py, batch 8 x 128, 2-core AVX512-BF16 CPU) put
~2.0 s of 3.8 in the matrix products and ~1.8 s around them: autocast's casts and the float32 <->
bf16 gradient copies (aten::copy_, 0.53 s in 832 calls), dropout's masks (0.14 s), LayerNorm, GELU,
residual adds, the float32 log-softmax of the 1024 x 50272 logits. Inductor fuses those into a few
loops per layer; the products stay on the same oneDNN/MKL kernels. Measured interleaved in one process
(eager and compiled updates of the same trainer taking turns, 10 each, machine load 12-21): median
13.9 -> 12.2 CPU seconds per update (-12%). That run let inductor draw dropout itself; with
fallback_random (below) the eager bernoulli kernel (0.14 s of the eager profile) stays: not timed apart.

What it keeps: the model's math, the optimizer, clipping and accumulation are the trainer's as they
are; dropout draws the same masks as the eager model from torch's global generator
(fallback_random), so a run, its resume and its checkpoints do not depend on whether it compiled.

When: `compile=None` (the trainer's default) compiles a model of at least MIN_PARAMETERS on one
process without gradient checkpointing: compiling takes tens of seconds (minutes on a busy 2-core
machine; inductor caches its kernels on disk for the next run), which only a real model's updates
pay back. If compiling or running the compiled forward fails (no C++ compiler, an unsupported
operation), the trainer warns once, restores the RNG and redoes that update eagerly, for good.
"""

from __future__ import annotations

import time
import warnings

import torch

MIN_PARAMETERS = 20_000_000  # below this a step is too short to pay for compiling (test models, tiny fine-tunes)


def wants_compile(model: torch.nn.Module, setting: bool | None, split: bool, checkpointing: bool) -> bool:
    """compile=True/False as asked; None: a model of at least MIN_PARAMETERS, unsplit, not recomputing."""
    if setting is not None:
        return bool(setting)
    return not split and not checkpointing and sum(p.numel() for p in model.parameters()) >= MIN_PARAMETERS


class CompiledForward:
    """model(**inputs) through torch.compile, until it fails once; `seconds` is the wall time of the first
    compiled update (the compilation of forward and backward with it), None before it."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        # fallback_random: dropout through torch's generator (eager's masks), not inductor's own seeds
        self.fn = torch.compile(model, options={"fallback_random": True})
        self.failed: Exception | None = None
        self.seconds: float | None = None

    @property
    def active(self) -> bool:
        return self.failed is None

    def __call__(self, **inputs):
        return self.fn(**inputs) if self.failed is None else self.model(**inputs)

    def run_first(self, step):
        """step() (one update's forward and backward) with compilation timed; on an exception the RNG is
        restored, the compiled path dropped with a warning, and step() run again eagerly."""
        if self.seconds is not None or self.failed is not None:
            return step()
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        start = time.perf_counter()
        try:
            out = step()
        except Exception as err:  # a compiler missing or refusing: the eager model computes the same
            self.failed = err
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); training uncompiled")
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            return step()
        self.seconds = time.perf_counter() - start
        return out
