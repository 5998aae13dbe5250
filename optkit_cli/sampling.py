"""FALLBACK generation loop, used until the backends have their own `generate` (issue 6).

`optkit generate` calls the backend model's `generate(...)` when it has one. Without it, this loop
runs instead: each step re-runs the full forward over prompt + tokens so far (no KV cache: simple and
backend-neutral, fine for short continuations) and picks the next token from the last position's
logits in NumPy, by the rules of opt_spec.generation. It does greedy search and sampling
(temperature, top-k, top-p, repetition penalty, min_new_tokens), stops each row at eos (finished rows
then emit pad), and is reproducible for a given seed. Beam search is left to the backends' generate.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def next_token_scores(logits: np.ndarray, sequences: np.ndarray, seen: np.ndarray, *, temperature: float,
                      top_k: int, top_p: float, repetition_penalty: float) -> np.ndarray:
    """(B, V) last-position logits -> (B, V) float64 scores to pick from (-inf = excluded).

    Order: repetition penalty (over the tokens each row holds), temperature, top-k, top-p.
    """
    scores = logits.astype(np.float64)
    if repetition_penalty != 1.0:
        for b in range(scores.shape[0]):
            ids = np.unique(sequences[b][seen[b]])
            s = scores[b, ids]
            scores[b, ids] = np.where(s < 0, s * repetition_penalty, s / repetition_penalty)
    if temperature != 1.0:
        scores = scores / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = np.sort(scores, axis=-1)[:, -top_k][:, None]   # (B, 1) the k-th largest score
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(-scores, axis=-1, kind="stable")  # (B, V) best first
        ranked = np.take_along_axis(scores, order, -1)
        probs = np.exp(ranked - ranked[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        mass_before = np.cumsum(probs, -1) - probs            # keep a token while the mass above it < top_p
        drop_ranked = mass_before >= top_p
        drop = np.zeros_like(drop_ranked)
        np.put_along_axis(drop, order, drop_ranked, -1)
        scores = np.where(drop, -np.inf, scores)
    return scores


def sample(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row drawn from softmax(scores)."""
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    u = rng.random((scores.shape[0], 1))
    return np.minimum((np.cumsum(probs, -1) < u).sum(-1), scores.shape[-1] - 1)


def generate_loop(forward: Callable[[np.ndarray, np.ndarray], np.ndarray], input_ids: np.ndarray,
                  attention_mask: np.ndarray, *, max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = False,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  repetition_penalty: float = 1.0, eos_token_id: int | None = None,
                  pad_token_id: int = 1, seed: int | None = None,
                  on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> np.ndarray:
    """(B, T) left-padded prompts -> (B, T + new) ids; rows finished at eos are padded with pad_token_id.

    forward(ids, mask) -> (B, T', V) logits. on_token(step, tokens (B,), finished (B,)) after each step.
    """
    rng = np.random.default_rng(seed)
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(attention_mask, dtype=np.int64)
    B = ids.shape[0]
    finished = np.zeros(B, dtype=bool)
    for step in range(max_new_tokens):
        logits = forward(ids, mask)[:, -1, :]  # (B, V)
        if step < min_new_tokens and eos_token_id is not None:
            logits = logits.copy()
            logits[:, eos_token_id] = -np.inf
        if do_sample or repetition_penalty != 1.0:
            scores = next_token_scores(logits, ids, mask.astype(bool), temperature=temperature if do_sample else 1.0,
                                       top_k=top_k if do_sample else 0, top_p=top_p if do_sample else 1.0,
                                       repetition_penalty=repetition_penalty)
        else:
            scores = logits
        tokens = sample(scores, rng) if do_sample else scores.argmax(-1)
        tokens = np.where(finished, pad_token_id, tokens).astype(np.int64)
        ids = np.concatenate([ids, tokens[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
        if eos_token_id is not None:
            finished |= tokens == eos_token_id
        if on_token is not None:
            on_token(step, tokens, finished)
        if finished.all():
            break
    return ids
