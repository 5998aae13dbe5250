"""The numeric rules every backend follows, as constants and small NumPy reference functions.

Backends implement these natively in their own framework; the NumPy versions here are the
definitions, and the tests check each backend against them.

Order of computation:
1. x = embed_tokens(ids); x = project_in(x) when word_embed_proj_dim != hidden_size.
2. Positions from the attention mask: pos = cumsum(mask) * mask - 1 (pads get -1); with `past`
   cached tokens keep the last T; x += embed_positions[pos + POSITION_OFFSET]. Explicit position_ids
   override this.
3. Each layer, pre-LN (do_layer_norm_before) or post-LN (350m):
   h = x; [LN]; q = q_proj(h) * head_dim**-0.5; softmax(q k^T masked) v; out_proj; dropout; x = h + .; [LN]
   and the same around fc2(act(fc1(.))).
4. Final LN (when present), project_out (when present), the head.
"""

from __future__ import annotations

import numpy as np

POSITION_OFFSET = 2        # position p reads row p + 2 of embed_positions (fairseq's padding legacy)
LAYER_NORM_EPS = 1e-5
IGNORE_INDEX = -100        # causal-LM labels equal to this are left out of the loss
SOFTMAX_DTYPE = "float32"  # attention softmax runs in float32 whatever the compute dtype


def attention_scale(head_dim: int) -> float:
    """q is multiplied by this after q_proj (bias included), before q k^T."""
    return head_dim ** -0.5


def mask_value(dtype) -> float:
    """The value a masked attention score takes: the dtype's most negative finite number.

    Backends *replace* masked scores with it (where(allowed, scores, value)) in float32; they never
    add it to scores, so it cannot overflow to -inf.
    """
    return float(np.finfo(np.dtype(dtype)).min)


def position_ids_from_mask(attention_mask: np.ndarray, past_length: int = 0) -> np.ndarray:
    """(B, S) mask over past + current tokens -> (B, S - past_length) positions; pads get -1."""
    mask = np.asarray(attention_mask).astype(np.int64)
    pos = np.cumsum(mask, axis=1) * mask - 1
    return pos[:, past_length:]


def attention_allowed(attention_mask: np.ndarray, query_length: int, query_start: int | None = None) -> np.ndarray:
    """(B, S) key mask -> (B, T, S) booleans: may query t (at position query_start + t; by default the last T
    of the S positions, else a preallocated cache's write position) see key s?

    A query sees the keys at or before its own position (causal) that the mask keeps, and always
    itself: a padded query then attends to itself alone instead of to nothing, so no softmax row is
    ever empty and no dtype or attention kernel can turn it into NaN. Real tokens never see pads.
    """
    mask = np.asarray(attention_mask).astype(bool)
    S = mask.shape[1]
    start = S - query_length if query_start is None else query_start
    q_pos = np.arange(start, start + query_length)[:, None]  # (T, 1)
    k_pos = np.arange(S)[None, :]                      # (1, S)
    causal = k_pos <= q_pos                            # (T, S)
    return (causal[None] & mask[:, None, :]) | (k_pos == q_pos)[None]


def pooled_token_index(input_ids: np.ndarray | None, pad_token_id: int | None, seq_len: int,
                       batch: int) -> np.ndarray:
    """Sequence classification pools the rightmost token that is not `pad_token_id` in each row
    (works for left and right padding); a row of only pads pools index 0. Without input_ids (inputs
    given as embeddings) or without a pad id, the last position."""
    if input_ids is None or pad_token_id is None:
        return np.full((batch,), seq_len - 1, dtype=np.int64)
    not_pad = np.asarray(input_ids) != pad_token_id
    return (np.arange(seq_len)[None, :] * not_pad).argmax(-1)


def layer_norm(x: np.ndarray, scale: np.ndarray | None, bias: np.ndarray | None) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + LAYER_NORM_EPS)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


def causal_lm_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross entropy of logits[:, t] against labels[:, t + 1] over labels != IGNORE_INDEX."""
    logits = np.asarray(logits, dtype=np.float64)[:, :-1]
    target = np.asarray(labels)[:, 1:]
    keep = target != IGNORE_INDEX
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.where(keep, target, 0)[..., None], -1)[..., 0]
    return float(((logz - picked) * keep).sum() / max(keep.sum(), 1))


def infer_problem_type(num_labels: int, labels: np.ndarray) -> str:
    """Hugging Face's rule for the sequence-classification loss when config.problem_type is None."""
    if num_labels == 1:
        return "regression"
    if np.issubdtype(np.asarray(labels).dtype, np.integer):
        return "single_label_classification"
    return "multi_label_classification"
