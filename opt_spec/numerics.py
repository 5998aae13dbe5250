"""The numeric rules every backend follows, as constants and small NumPy reference functions.

Backends implement these natively in their own framework (inside their graphs, under jit and XLA);
the NumPy versions here are the definitions, and tests/test_conformance.py checks every backend against
them. What runs on the host they call directly: mask_value, problem_type.

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

    A query sees the keys at or before its own position (causal) that the mask keeps, a padded query
    too (as in Hugging Face: a pad after real tokens, or after PEFT's learned prompt, attends to them).
    A query with no such key (a pad before any real token) sees itself alone instead of nothing, so no
    softmax row is ever empty and no dtype or attention kernel can turn it into NaN. Real tokens never
    see pads.
    """
    mask = np.asarray(attention_mask).astype(bool)
    S = mask.shape[1]
    start = S - query_length if query_start is None else query_start
    q_pos = np.arange(start, start + query_length)[:, None]  # (T, 1)
    k_pos = np.arange(S)[None, :]                      # (1, S)
    allowed = (k_pos <= q_pos)[None] & mask[:, None, :]  # (B, T, S)
    alone = ~allowed.any(-1, keepdims=True)              # (B, T, 1): queries that would see nothing
    return allowed | (alone & (k_pos == q_pos)[None])


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


# -------------------------------------------------------------------------------------------- losses
# Every loss is a mean (or a sum of means) over the positions, examples or elements that count. A mean
# over nothing is 0, with zero gradients: a batch whose labels are all IGNORE_INDEX (or whose QA positions
# all fall outside the sequence) trains nothing rather than turning the step into NaN.

def cross_entropy(logits: np.ndarray, target: np.ndarray, keep: np.ndarray) -> float:
    """Mean of -log softmax(logits)[target] over the rows where keep; 0 when no row is kept.
    logits (N, C), target and keep (N,)."""
    logits = np.asarray(logits, dtype=np.float64)
    keep = np.asarray(keep, dtype=bool)
    top = logits.max(-1)
    logz = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
    picked = np.take_along_axis(logits, np.where(keep, target, 0)[:, None], -1)[:, 0]
    return float(((logz - picked) * keep).sum() / max(int(keep.sum()), 1))


def causal_lm_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross entropy of logits[:, t] against labels[:, t + 1] over labels != IGNORE_INDEX."""
    logits = np.asarray(logits)[:, :-1]
    target = np.asarray(labels)[:, 1:].reshape(-1)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), target, target != IGNORE_INDEX)


def infer_problem_type(num_labels: int, integer_labels: bool) -> str:
    """Hugging Face's rule for the sequence-classification loss when config.problem_type is None; it
    reads only num_labels and whether the labels have an integer dtype (a bool dtype is not one)."""
    if num_labels == 1:
        return "regression"
    return "single_label_classification" if integer_labels else "multi_label_classification"


def problem_type(config, integer_labels: bool) -> str:
    """config.problem_type when set, else `infer_problem_type`."""
    if config.problem_type is not None:
        return config.problem_type
    return infer_problem_type(config.num_labels, integer_labels)


def sequence_classification_loss(pooled: np.ndarray, labels: np.ndarray, config) -> float:
    """pooled (B, num_labels) logits of the pooled tokens: mean squared error (regression; with one label
    over the B values), mean cross entropy over the examples whose label is not IGNORE_INDEX (single
    label, as Hugging Face's CrossEntropyLoss) or mean binary cross entropy over the elements (multi label)."""
    pooled, labels = np.asarray(pooled, dtype=np.float64), np.asarray(labels)
    problem = problem_type(config, np.issubdtype(labels.dtype, np.integer))
    if problem == "regression":
        if config.num_labels == 1:
            pooled, labels = pooled.reshape(-1), labels.reshape(-1)
        return float(((pooled - labels.astype(np.float64)) ** 2).mean())
    if problem == "single_label_classification":
        target = labels.reshape(-1).astype(np.int64)
        return cross_entropy(pooled.reshape(-1, config.num_labels), target, target != IGNORE_INDEX)
    y = labels.astype(np.float64)
    return float((np.maximum(pooled, 0) - pooled * y + np.log1p(np.exp(-np.abs(pooled)))).mean())


def question_answering_loss(start_logits: np.ndarray, end_logits: np.ndarray, start_positions: np.ndarray,
                            end_positions: np.ndarray) -> float:
    """(start + end) / 2, each the mean cross entropy over the examples whose position is inside [0, T)
    (positions outside are clamped to T and left out, as Hugging Face does)."""
    T = np.shape(start_logits)[1]

    def one(logits, positions):
        positions = np.clip(np.asarray(positions).reshape(-1), 0, T)
        return cross_entropy(logits, positions, positions != T)

    return (one(start_logits, start_positions) + one(end_logits, end_positions)) / 2
