"""Random, varied checkpoints and the OPT variants, for tests, parity checks and demos.

Weights are drawn per tensor with different scales and offsets (never constant), LayerNorm scales
around 1 and biases non-zero, so that a transposed, swapped or dropped tensor shows up in outputs.
"""

from __future__ import annotations

import zlib

import numpy as np

from .config import OPTConfig
from .weights import Head, WeightKind, tied_source, weight_table

# Small configs covering every structural variant of OPT (each differs from "pre_ln" in one way).
_TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
             max_position_embeddings=40, dropout=0.0, num_labels=3)
VARIANTS: dict[str, OPTConfig] = {
    "pre_ln": OPTConfig(**_TINY),
    "post_ln_proj": OPTConfig(**_TINY, do_layer_norm_before=False, word_embed_proj_dim=24),  # 350m-like
    "no_bias": OPTConfig(**_TINY, enable_bias=False),
    "no_ln_affine": OPTConfig(**_TINY, layer_norm_elementwise_affine=False),
    "no_final_ln": OPTConfig(**_TINY, _remove_final_layer_norm=True),
    "untied_head": OPTConfig(**_TINY, tie_word_embeddings=False),
    "proj_pre_ln_gelu": OPTConfig(**_TINY, word_embed_proj_dim=16, activation_function="gelu"),
}


def random_weights(config: OPTConfig, head: Head | str = Head.CAUSAL_LM, seed: int = 0,
                   dtype=np.float32) -> dict[str, np.ndarray]:
    """{canonical name: array} for every weight of the table (a tied head is left out).

    Deterministic in (config shapes, head, seed, name), and each tensor depends only on its own
    name, so one tensor can be made without the others (useful for large presets).
    """
    tied = tied_source(config, head)
    return {spec.name: random_weight(spec, config, seed, dtype)
            for spec in weight_table(config, head) if spec.name not in tied}


def random_weight(spec, config: OPTConfig, seed: int = 0, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    scale = rng.uniform(0.5, 1.5)
    if spec.kind is WeightKind.NORM_SCALE:
        x = 1.0 + 0.2 * scale * rng.standard_normal(spec.shape)
    elif spec.kind in (WeightKind.NORM_BIAS, WeightKind.LINEAR_BIAS):
        x = 0.1 * scale * rng.standard_normal(spec.shape)
    elif spec.kind is WeightKind.EMBEDDING:
        x = 0.5 * scale * rng.standard_normal(spec.shape)
    else:  # linear weight (out, in): variance ~ 1 / in keeps activations O(1) through the layers
        x = scale * rng.standard_normal(spec.shape) / np.sqrt(spec.shape[1])
    return x.astype(dtype)


def random_batch(config: OPTConfig, batch: int = 3, length: int = 9, seed: int = 0, left_pad=(0, 3, 5)):
    """(input_ids, attention_mask) int32 arrays: a left-padded batch (row i has left_pad[i] pads)."""
    rng = np.random.default_rng(seed)
    low = 3 if config.vocab_size > 3 else 0
    ids = rng.integers(low, config.vocab_size, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), dtype=np.int32)
    for row, pads in enumerate(tuple(left_pad)[:batch]):
        ids[row, :pads] = config.pad_token_id if config.pad_token_id is not None else 0
        mask[row, :pads] = 0
    return ids, mask


def synthetic_batch(task: str, config: OPTConfig, batch: int = 8, length: int = 12, seed: int = 0) -> dict:
    """A small task each head can learn in a few dozen steps (left-padded like opt_spec.data):
    causal_lm: every row counts up by 7 (mod V) from a random start; sequence_classification:
    the label is the last token mod num_labels; question_answering: the answer span runs from
    token 5 to token 6, placed at random."""
    rng = np.random.default_rng(seed)
    V = config.vocab_size
    pads = rng.integers(0, 3, size=batch)
    if task == "causal_lm":
        ids = (rng.integers(0, V - 3, size=(batch, 1)) + 7 * np.arange(length)[None]) % (V - 3) + 3
    else:
        ids = rng.integers(7, V, size=(batch, length))
    mask = (np.arange(length)[None] >= pads[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, config.pad_token_id).astype(np.int64)
    out = {"input_ids": ids, "attention_mask": mask}
    if task == "causal_lm":
        out["labels"] = np.where(mask == 1, ids, -100)
    elif task == "sequence_classification":
        out["labels"] = (ids[:, -1] % config.num_labels).astype(np.int64)
    else:
        start = np.array([rng.integers(p, length - 1) for p in pads])
        end = np.array([rng.integers(s + 1, length) for s in start])
        rows = np.arange(batch)
        ids[rows, start], ids[rows, end] = 5, 6
        out["start_positions"], out["end_positions"] = start.astype(np.int64), end.astype(np.int64)
    return out
