"""`generate` for the TensorFlow backend, following opt_spec.generation's semantics.

The fast path runs the whole decode (prompt pass, then one token per step) inside one
`tf.function(jit_compile=True)`: a `tf.while_loop` with fixed shapes over a preallocated KVCache (the
model's `init_cache`), writing each step's tokens into a (rows, max_new_tokens) buffer that is trimmed to
the steps actually taken outside the compiled function. One compiled function is kept per (batch, prompt
length, settings other than the seed), so a second call with the same shapes neither retraces nor
recompiles; the seed is an input of the function.

Every rule of a step (sequence bias and bad words, repetition penalty, n-grams, the length and token rules,
the sampling filters, renormalize_logits; opt_spec.generation's order) is traced only when the call's
Decoding sets it, so a rule that is off costs nothing. return_dict_in_generate returns
opt_tf.outputs' records: with output_scores / output_logits the compiled loop also writes each step's
(rows, V) scores / raw logits into (max_new_tokens, rows, V) buffers (kept only when asked), split
into a tuple of the steps actually taken outside; beam search keeps each beam's running-beam indices
alongside its tokens (beam_indices) and returns its hypotheses' scores (sequences_scores).
`compute_transition_scores` turns a record's scores into each chosen token's score.

Logits processors (Python callables on tf.Tensors), stop strings, stopping_criteria,
prefix_allowed_tokens_fn and streamers need the host between steps. A call with any of them runs the same
pieces one step at a time from Python instead: the prompt pass, the step's scores, the choice and the next
forward are each an XLA-compiled function (kept like the fast path's), with the processors, the stop-string
and criteria checks and the streamer's put in between; prefix_allowed_tokens_fn's mask, made on the host
from the rows so far before each step, is an input of the step's scores. Streamers
receive NumPy arrays (transformers.TextStreamer reads them with .tolist()). Beam search asked for hidden
states or attentions takes this loop too: it keeps each step's running beams, and generate runs one forward
per step over them after decoding (opt_spec.generation.replayed_step_outputs).

inputs_embeds (B, P, E) are one more input of the same pieces, compiled apart from the ids path's
(`_input_key`): the prompt pass (and the record's one forward for hidden states and attentions, then with
the new tokens' embeddings) reads them instead of ids; the cache, its slot mask and the positions count
their P positions, while the rules see the rows (input_ids (B, P), or none: T = 0), the last T + step
columns of the slot mask (`_row_columns`).

Assisted decoding (prompt_lookup_num_tokens, or generate(assistant_model=a smaller TFOPTForCausalLM); one row;
opt_spec.generation, "Assisted decoding") takes the host loop too: after a step, the candidates are drafted on the
host (prompt lookup over the row; the assistant greedily, from its own compiled prompt pass and one-token feed over
a preallocated cache of its own), then one compiled forward (`_check_candidates`) writes the last chosen token and
the k candidates into the cache at its write position and gives the logits after each; each position's logits take
the same compiled scores and choice pieces as a one-token step's ("given"; sampling keyed by the step), with the
host's extras between steps, while the token chosen is the candidate read. At the first mismatch the cache's write
position is set back and the slot mask cleared beyond it (`_cropped`), so what was written for candidates not taken
is invisible and overwritten next. The checking pass is compiled once per k (at most max(prompt_lookup_num_tokens,
the longest draft, <= max_new_tokens - 1) programs per prompt shape and length limit), not padded to one width: padding
needs slots past the cache's end near the last steps, which the position table may not allow (the cache is P + N
slots). On the tests' model (2 layers, hidden 32, CPU) a k-token check compiles in about 0.75 s and then runs in
about 1.5 ms, as a one-token step does.

past_key_values (the model's KVCache of the prompt's first C tokens; opt_spec.generation, "Re-using a
prompt's cache") becomes a prefix: its keys and values up to its write position, per layer (B, nh, C, hs),
written into the first C slots of generate's own cache before the prompt pass, which feeds the last T - C
ids. The prefix is an input of the compiled functions (their keys carry C), so another cache of the same
shapes runs the same program; the record's forward for hidden states and attentions reads it from a cache
too. The cache given is never written.

Greedy and beam search follow the PyTorch backend step for step (same tie rules, same output length),
so on the same weights they give the same tokens. Sampling draws with the Gumbel-max trick on
`tf.random.stateless_uniform` keyed by (seed, step): reproducible within TensorFlow for a given seed. Beam
sampling (do_sample with num_beams) draws its candidates without replacement from the same keyed noise
(Gumbel-top-k, `draw_without_replacement`) and keeps the best-scored as running beams (opt_spec's rules).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import numpy as np
import tensorflow as tf

from opt_spec.cache import check_reused_cache, pad_slots, reused_prompt_positions
from opt_spec.generation import (AssistantDrafts, Decoding, GenerationDefaults, StopStrings, allowed_tokens,
                                 apply_processors, as_streamer, best_length, check_assisted, check_extras,
                                 check_host_rules, check_prompt, criteria_hits, decay_growth, length_norms,
                                 longer_sequences, needs_host, prompt_inputs, PromptLookup, replayed_step_outputs,
                                 beam_step_rows, single_token_bias, softmax, step_forward_mask, step_outputs,
                                 transition_scores)

from .outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

NEG_INF = float("-inf")
FLOAT32_MAX = float(np.finfo(np.float32).max)


# ------------------------------------------------------------------------------- one step's rules
def _isin(tokens: tf.Tensor, ids: tuple) -> tf.Tensor:
    """tokens (...) int32 -> bool: the token is one of `ids` (a static tuple)."""
    if not ids:
        return tf.zeros_like(tokens, tf.bool)
    return tf.reduce_any(tf.equal(tokens[..., None], tf.constant(ids, tf.int32)), axis=-1)


def _vocab_mask(ids: tuple, V: int) -> tf.Tensor:
    """(V,) bool constant: the token ids `ids`."""
    mask = np.zeros(V, bool)
    mask[list(ids)] = True
    return tf.constant(mask)


def ngram_bans(seq: tf.Tensor, real: tf.Tensor, now: tf.Tensor, n: int) -> tf.Tensor:
    """Rule 2 as an update list: (R * W, 2) [row, token] indices and (R * W,) int32 flags of the tokens
    that would repeat an n-gram. seq / real (R, L): the rows' tokens and which positions are real; only
    positions before `now` (traced) are history."""
    R, L = seq.shape
    W = L - n + 1  # n-gram start positions
    real = tf.cast(real, tf.bool) & (tf.range(L) < now)[None, :]
    grams = tf.stack([seq[:, j:j + W] for j in range(n)], axis=-1)                       # (R, W, n)
    whole = tf.reduce_all(tf.stack([real[:, j:j + W] for j in range(n)], axis=-1), -1)  # (R, W)
    before = now - (n - 1) + tf.range(n - 1)                                             # the last n - 1
    tail = tf.gather(seq, tf.maximum(before, 0), axis=1)                                 # (R, n - 1)
    tail_real = tf.reduce_all(tf.gather(real, tf.maximum(before, 0), axis=1), -1) & (now >= n - 1)
    match = tf.reduce_all(tf.equal(grams[:, :, :n - 1], tail[:, None, :]), -1) & whole & tail_real[:, None]
    rows = tf.broadcast_to(tf.range(R)[:, None], (R, W))
    index = tf.reshape(tf.stack([rows, grams[:, :, n - 1]], axis=-1), (R * W, 2))
    return index, tf.reshape(tf.cast(match, tf.int32), [-1])


def sequence_bias(seq: tf.Tensor, now: tf.Tensor, d: Decoding, V: int) -> tf.Tensor:
    """Rule 0 as the (R, V) float32 bias to add: the one-token entries' vector (opt_spec's
    single_token_bias), plus each longer entry's bias on its last token where the row's last tokens before
    `now` (pads included) are the rest of it (opt_spec's longer_sequences, packed for one match)."""
    R, L = seq.shape
    bias = tf.broadcast_to(tf.constant(single_token_bias(d.sequence_bias, V)), (R, V))
    longer = longer_sequences(d.sequence_bias, L)
    if longer is None:
        return bias
    M, P = longer.rest.shape
    tail = tf.gather(seq, tf.maximum(now - P + tf.range(P), 0), axis=1)                 # (R, P) the last P
    match = tf.reduce_all(tf.equal(tail[:, None, :], longer.rest) | (longer.rest < 0), -1)  # (R, M)
    match &= now >= tf.constant(longer.length)  # the row holds at least the entry's length
    values = tf.where(match, tf.constant(longer.bias), 0.0)
    rows = tf.broadcast_to(tf.range(R)[:, None], (R, M))
    last = tf.broadcast_to(tf.constant(longer.last)[None, :], (R, M))
    index = tf.reshape(tf.stack([rows, last], axis=-1), (R * M, 2))
    return tf.tensor_scatter_nd_add(bias, index, tf.reshape(values, [-1]))


def token_rules(scores: tf.Tensor, now: tf.Tensor, step: tf.Tensor, d: Decoding,
                allowed: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Rule 3 (opt_spec.generation), each traced only when set: EOS held back (min_new_tokens, min_length
    folded in), forced BOS / EOS, remove_invalid_values, the exponential length penalty, suppressed
    tokens. now: the row length L (traced), step: the step number (traced); allowed (R, V) bool: the
    host's prefix_allowed_tokens_fn mask, added as -inf between the EOS rule and forced BOS, or None."""
    V = scores.shape[-1]
    eos = _vocab_mask(d.eos_token_ids, V) if d.eos_token_ids else None
    if eos is not None and d.min_new_tokens > 0:
        scores = tf.where((step < d.min_new_tokens) & eos[None, :], NEG_INF, scores)
    if allowed is not None:  # added, not replaced, as Hugging Face does (+inf + -inf is NaN there too)
        scores = scores + tf.where(allowed, 0.0, NEG_INF)
    if d.forced_bos_token_id is not None:
        forced = tf.where(_vocab_mask((d.forced_bos_token_id,), V), 0.0, NEG_INF)
        scores = tf.where(tf.equal(now, 1), forced[None, :], scores)
    if d.forced_eos_token_ids:
        forced = tf.where(_vocab_mask(d.forced_eos_token_ids, V), 0.0, NEG_INF)
        scores = tf.where(tf.equal(step, d.max_new_tokens - 1), forced[None, :], scores)
    if d.remove_invalid_values:
        scores = tf.where(tf.math.is_nan(scores), 0.0, tf.clip_by_value(scores, -FLOAT32_MAX, FLOAT32_MAX))
    if d.exponential_decay is not None and eos is not None:
        growth = tf.gather(tf.constant(decay_growth(d.exponential_decay, d.max_new_tokens)), step)
        boosted = scores + tf.abs(scores) * growth
        # a banned EOS stays banned (-inf, or what remove_invalid_values made of it)
        decays = (step > d.exponential_decay[0]) & eos[None, :] & (scores > -FLOAT32_MAX)
        scores = tf.where(decays, boosted, scores)
    if d.suppress_tokens:
        scores = tf.where(_vocab_mask(d.suppress_tokens, V)[None, :], NEG_INF, scores)
    if d.begin_suppress_tokens:
        begin = tf.equal(step, d.begin_suppress_step) & _vocab_mask(d.begin_suppress_tokens, V)
        scores = tf.where(begin[None, :], NEG_INF, scores)
    return scores


def process_logits(scores: tf.Tensor, seen: Optional[tf.Tensor], seq: tf.Tensor, real: tf.Tensor, now: tf.Tensor,
                   step: tf.Tensor, d: Decoding, allowed: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Rules 0-3 of opt_spec.generation on float32 scores (R, V) (logits, or log-probabilities in beam
    search); step is the int32 step number, seq / real (R, L) the rows with positions < now filled;
    allowed: prefix_allowed_tokens_fn's (R, V) mask from the host, or None."""
    V = scores.shape[-1]
    if d.sequence_bias:
        scores = scores + sequence_bias(seq, now, d, V)
    if seen is not None:
        penalized = tf.where(scores > 0, scores / d.repetition_penalty, scores * d.repetition_penalty)
        scores = tf.where(seen, penalized, scores)
    if d.no_repeat_ngram_size and seq.shape[1] >= d.no_repeat_ngram_size:
        index, flags = ngram_bans(seq, real, now, d.no_repeat_ngram_size)
        banned = tf.tensor_scatter_nd_max(tf.zeros(tf.shape(scores), tf.int32), index, flags) > 0
        scores = tf.where(banned, NEG_INF, scores)
    return token_rules(scores, now, step, d, allowed)


def _below_kth(logits: tf.Tensor, keep: int) -> tf.Tensor:
    """(R, V) bool: tokens scored below each row's keep-th best logit (never the `keep` best, ties kept)."""
    return logits < tf.math.top_k(logits, min(keep, logits.shape[-1])).values[:, -1:]


def _drop_less_probable(logits: tf.Tensor, probs: tf.Tensor, least: tf.Tensor, keep: int = 1) -> tf.Tensor:
    """-inf where the probability is below `least`, never a row's `keep` most probable tokens (min_p, epsilon,
    eta; said on the logits, as XLA may recompute `probs` in two places a rounding apart)."""
    return tf.where((probs < least) & _below_kth(logits, keep), NEG_INF, logits)


def min_p_filter(logits: tf.Tensor, min_p: float, keep: int = 1) -> tf.Tensor:
    """opt_spec.generation.min_p_filter: its `keep` best are counted by rank (ties: lower id first), so past the
    most probable one (always kept) they are spared by index."""
    probs = tf.nn.softmax(logits, axis=-1)
    least = min_p * tf.reduce_max(probs, axis=-1, keepdims=True)
    if keep > 1:
        best = tf.math.top_k(logits, min(keep, logits.shape[-1])).indices                       # (R, keep)
        spared = tf.reduce_any(tf.equal(best[:, :, None], tf.range(logits.shape[-1])), axis=1)  # (R, V)
        least = tf.where(spared, 0.0, least)
    return _drop_less_probable(logits, probs, least)


def typical_filter(logits: tf.Tensor, mass: float, keep: int = 1) -> tf.Tensor:
    """opt_spec.generation.typical_filter: the tokens whose surprisal is closest to the entropy, in that
    order (lower id first on ties), until their probability reaches `mass`; at least the `keep` closest."""
    V = logits.shape[-1]
    logp = tf.nn.log_softmax(logits, axis=-1)
    p = tf.exp(logp)
    entropy = -tf.reduce_sum(tf.where(p > 0, logp, 0.0) * p, axis=-1, keepdims=True)
    shifted = tf.abs(-logp - entropy)                                        # (R, V)
    neg_sorted, order = tf.math.top_k(-shifted, V)                           # closest first
    cumulative = tf.cumsum(tf.gather(p, order, batch_dims=1), axis=-1)
    last = tf.minimum(tf.reduce_sum(tf.cast(cumulative < mass, tf.int32), axis=-1), V - 1)
    threshold = tf.gather(neg_sorted, last[:, None], batch_dims=1)           # (R, 1): minus the last kept's distance
    # decided on the sorted values themselves (XLA may recompute `shifted` elsewhere a rounding apart)
    drop_sorted = (neg_sorted < threshold) & (tf.range(V) >= keep)           # never the `keep` closest
    rows = tf.broadcast_to(tf.range(tf.shape(logits)[0])[:, None], tf.shape(order))
    drop = tf.scatter_nd(tf.stack([rows, order], axis=-1), drop_sorted, tf.shape(logits))  # back to token order
    return tf.where(drop, NEG_INF, logits)


def epsilon_filter(logits: tf.Tensor, epsilon: float, keep: int = 1) -> tf.Tensor:
    """opt_spec.generation.epsilon_filter."""
    return _drop_less_probable(logits, tf.nn.softmax(logits, axis=-1), epsilon, keep)


def eta_filter(logits: tf.Tensor, epsilon: float, keep: int = 1) -> tf.Tensor:
    """opt_spec.generation.eta_filter."""
    logp = tf.nn.log_softmax(logits, axis=-1)
    p = tf.exp(logp)
    entropy = -tf.reduce_sum(tf.maximum(logp, -FLOAT32_MAX) * p, axis=-1, keepdims=True)
    eta = tf.minimum(epsilon, math.sqrt(epsilon) * tf.exp(-entropy))
    return _drop_less_probable(logits, p, eta, keep)


def filter_for_sampling(logits: tf.Tensor, cfg, keep: int = 1) -> tf.Tensor:
    """logits / temperature, then top-k, top-p, min_p, typical_p, epsilon and eta (opt_spec.generation's
    rule 5, each only when set), each keeping at least the `keep` most probable tokens of a row (beam
    sampling's Decoding.filter_keep); dropped -> -inf. cfg: a Decoding (or a GenerationConfig)."""
    logits = logits / cfg.temperature
    B, V = logits.shape
    top_k = max(cfg.top_k, keep) if cfg.top_k > 0 else 0
    if 0 < top_k < V:
        logits = tf.where(_below_kth(logits, top_k), NEG_INF, logits)
    if cfg.top_p < 1.0:
        sorted_logits, order = tf.math.top_k(logits, V)  # descending, lower index first on ties
        probs = tf.nn.softmax(sorted_logits, axis=-1)
        drop_sorted = (tf.cumsum(probs, axis=-1) - probs) >= cfg.top_p  # mass strictly before each token
        drop_sorted &= tf.range(V) >= keep
        rows = tf.broadcast_to(tf.range(B)[:, None], (B, V))
        drop = tf.scatter_nd(tf.stack([rows, order], axis=-1), drop_sorted, (B, V))  # back to token order
        logits = tf.where(drop, NEG_INF, logits)
    if getattr(cfg, "min_p", None) is not None:
        logits = min_p_filter(logits, cfg.min_p, keep)
    if getattr(cfg, "typical_p", 1.0) < 1.0:
        logits = typical_filter(logits, cfg.typical_p, keep)
    if getattr(cfg, "epsilon_cutoff", 0.0) > 0:
        logits = epsilon_filter(logits, cfg.epsilon_cutoff, keep)
    if getattr(cfg, "eta_cutoff", 0.0) > 0:
        logits = eta_filter(logits, cfg.eta_cutoff, keep)
    return logits


def choice_scores(scores: tf.Tensor, d: Decoding) -> tf.Tensor:
    """The scores a greedy or sampling step chooses from (and output_scores holds): the sampling filters
    when sampling, then renormalize_logits's log_softmax."""
    if d.do_sample:
        scores = filter_for_sampling(scores, d)
    return tf.nn.log_softmax(scores, axis=-1) if d.renormalize_logits else scores


def _argmax(x: tf.Tensor) -> tf.Tensor:
    """argmax over the last axis, the lowest index on ties (int32)."""
    V = x.shape[-1]
    top = tf.reduce_max(x, axis=-1, keepdims=True)
    index = tf.reduce_min(tf.where(tf.equal(x, top), tf.range(V), V), axis=-1)
    return tf.minimum(index, V - 1)


def seed_key(seed: Optional[int]) -> tf.Tensor:
    """(2,) int32: the stateless random key of a call's seed; a fresh random one for None."""
    if seed is None:
        return tf.constant(np.random.default_rng().integers(0, 2**31, size=2), tf.int32)
    return tf.constant([seed // 2**31 % 2**31, seed % 2**31], tf.int32)


def gumbel_noise(shape, seed: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    """Standard Gumbel noise -log(-log(u)) of `shape`, u uniform keyed by (seed (2,) int32, step). XLA draws
    other numbers from a key than eager TensorFlow does: generate's are XLA's (the same in any XLA program)."""
    key = tf.random.experimental.stateless_fold_in(seed, step)
    u = tf.random.stateless_uniform(shape, seed=key, minval=np.finfo(np.float32).tiny, maxval=1.0)
    return -tf.math.log(-tf.math.log(u))


def _sample(logits: tf.Tensor, seed: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    """One draw per row from softmax(logits) (Gumbel-max), keyed by (seed, step)."""
    return _argmax(logits + gumbel_noise(tf.shape(logits), seed, step))


def draw_without_replacement(scores: tf.Tensor, n: int, seed: tf.Tensor, step: tf.Tensor = 0) -> tf.Tensor:
    """(R, n) int32 indices drawn without replacement from softmax(scores) (R, M), in the order drawn: the n
    largest of scores + Gumbel noise keyed by (seed, step) (opt_spec.generation.draw_without_replacement);
    impossible (-inf) entries come last, lower index first."""
    return tf.math.top_k(scores + gumbel_noise(tf.shape(scores), seed, step), n).indices


def _prompt_seen(ids: tf.Tensor, mask: tf.Tensor, V: int) -> tf.Tensor:
    """(B, V) bool: token occurs among the row's real prompt tokens."""
    B, T = ids.shape
    rows = tf.broadcast_to(tf.range(B)[:, None], (B, T))
    index = tf.reshape(tf.stack([rows, ids], axis=-1), (B * T, 2))
    return tf.tensor_scatter_nd_max(tf.zeros((B, V), tf.int32), index, tf.reshape(mask, [-1])) > 0


def _mark(seen: tf.Tensor, tokens: tf.Tensor) -> tf.Tensor:
    V = seen.shape[-1]
    return seen | tf.equal(tf.range(V)[None, :], tokens[:, None])


def _put_column(buffer: tf.Tensor, column: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """buffer (B, ..., N) with [..., column] replaced by values (B, ...)."""
    N = buffer.shape[-1]
    return tf.where(tf.equal(tf.range(N), column), values[..., None], buffer)


def _set_slot(slots: tf.Tensor, slot: tf.Tensor) -> tf.Tensor:
    """The slot mask (R, L) with column `slot` set: the token written there is real."""
    return tf.where(tf.equal(tf.range(slots.shape[1]), slot)[None, :], 1, slots)


def _row_columns(x, L: int):
    """The last L columns of x (R, P + ...) (NumPy or TensorFlow): those of the rows, which start after the
    positions of inputs_embeds given without input_ids (none otherwise)."""
    return x[:, x.shape[1] - L:]


def _input_key(ids, embeds, prefix=None) -> tuple:
    """The start of the compiled functions' keys: (B, T), and with inputs_embeds its P (B, P, E) too, since
    the embeds path takes other inputs than the ids path, even at the same shapes; with a re-used cache's
    prefix, its C (the prefix's keys and values are inputs too)."""
    B, T = ids.shape
    key = (B, T) if embeds is None else (B, T, "inputs_embeds", embeds.shape[1])
    return key if prefix is None else (*key, "past_key_values", _held(prefix))


def _held(prefix) -> int:
    """C: the prompt positions a re-used cache's prefix (per layer keys and values (R, nh, C, hs)) holds; 0
    without one."""
    return 0 if prefix is None else int(prefix[0][0].shape[2])


def _fed(ids, prefix):
    """The prompt's ids (B, T) the prompt pass feeds: all of them, or the last T - C after a prefix of C."""
    return ids[:, _held(prefix):]


def _repeat_prefix(prefix, n: int):
    """Each row of a prefix n times over (num_return_sequences, beams); None stays None."""
    if prefix is None:
        return None
    return tuple((tf.repeat(k, n, axis=0), tf.repeat(v, n, axis=0)) for k, v in prefix)


def _length_norms(d: Decoding) -> tf.Tensor:
    """(N,) float32 generated_length ** length_penalty (opt_spec.generation.length_norms)."""
    return tf.constant(length_norms(d.max_new_tokens, d.length_penalty))


def _reorder(cache, index: tf.Tensor):
    """Keeps cache rows `index` (each beam continues from its parent's keys and values)."""
    return type(cache)(tuple(tf.gather(k, index) for k in cache.keys),
                       tuple(tf.gather(v, index) for v in cache.values), cache.length, cache.capacity)


# ------------------------------------------------------------------------------------------ outputs
# A step's entries of the output record ("scores": what it chose from, "logits": the raw logits), each
# (rows, V) float32 and present only when the call asked for it. The fast path writes them into
# (N, rows, V) buffers in its state ("all_scores", "all_logits"); the host loops keep them in lists.
def _step_outputs(d: Decoding, logits: Optional[tf.Tensor] = None, scores: Optional[tf.Tensor] = None) -> dict:
    out = {}
    if d.output_logits and logits is not None:
        out["logits"] = logits
    if d.output_scores and scores is not None:
        out["scores"] = scores
    return out


def _output_buffers(d: Decoding, rows: int, V: int) -> dict:
    names = [name for name, asked in (("scores", d.output_scores), ("logits", d.output_logits)) if asked]
    return {f"all_{name}": tf.zeros((d.max_new_tokens, rows, V)) for name in names}


def _record(s: dict, step: tf.Tensor, outputs: dict) -> dict:
    """The state with this step's outputs written into its buffers at `step`."""
    s = dict(s)
    for name, x in outputs.items():
        s[f"all_{name}"] = tf.tensor_scatter_nd_update(s[f"all_{name}"], step[None, None], x[None])
    return s


def _so_far(kept: dict, name: str) -> Optional[tuple]:
    """A host loop's steps' outputs `name` so far as a tuple, or None when the call did not ask for them."""
    return tuple(kept[name]) if name in kept else None


def _buffered_outputs(s: dict) -> dict:
    return {name[4:]: s[name] for name in ("all_scores", "all_logits") if name in s}


def _output_key(d: Decoding) -> Decoding:
    """The settings the compiled functions depend on: without those only the host reads
    (Decoding.without_host_settings), output_scores / output_logits only with return_dict_in_generate, which
    only beam search's compiled code needs (for beam_indices)."""
    record = d.return_dict_in_generate
    return dataclasses.replace(d.without_host_settings(), return_dict_in_generate=record and d.is_beam_search,
                               output_scores=record and d.output_scores, output_logits=record and d.output_logits)


# ------------------------------------------------------------------------------- the host's rules
@dataclasses.dataclass(frozen=True)
class HostRules:
    """A call's stopping_criteria (a list, maybe empty) and prefix_allowed_tokens_fn (or None): both run on
    the host between the compiled pieces, on tf.Tensors, through opt_spec's allowed_tokens / criteria_hits."""
    criteria: list
    prefix: Optional[object] = None

    def allowed(self, rows: tf.Tensor, num_beams: int, V: int) -> Optional[tf.Tensor]:
        """(R, V) bool: the tokens each of the rows so far (R, L) may take next; None without a prefix fn."""
        if self.prefix is None:
            return None
        return tf.constant(allowed_tokens(self.prefix, tf.unstack(rows), num_beams, V))

    def stopped(self, rows: tf.Tensor, scores: Optional[tuple]) -> np.ndarray:
        """(R,) bool: the rows (R, L), new token included, that a criterion says are done."""
        return criteria_hits(self.criteria, rows, scores, rows.shape[0], _to_host)


def _to_host(x):
    return x.numpy() if hasattr(x, "numpy") else x


def _then_pick(scored, pick, *args):
    """A host step's scores piece, then its choice (without logits processors nothing runs between them): one
    compiled call of the scores piece's args and the seed -> (state, the step's outputs)."""
    *args, seed = args
    scores, s, outputs = scored(*args)
    s, chosen = pick(s, scores, seed)
    return s, {**outputs, **chosen}


# ------------------------------------------------------------------------------ assisted decoding
def _cropped(s: dict, length: int) -> dict:
    """The state with its cache's write position set back to `length` and its slot mask cleared from there: what
    was written past it (for candidates not taken) is invisible, and the next writes overwrite it."""
    cache, slots = s["cache"], s["slots"]
    kept = tf.range(slots.shape[1])[None, :] < length
    return dict(s, cache=type(cache)(cache.keys, cache.values, tf.constant(length, tf.int32), cache.capacity),
                slots=tf.where(kept, slots, 0))


class _Assistant(AssistantDrafts):
    """Assisted decoding's candidates from a smaller TFOPTForCausalLM drafting greedily (opt_spec.generation,
    "Assisted decoding"), from its own compiled pieces: a prompt pass (_draft_start, once, at the start) and plain
    decoding's one-token feed (compiled once), over a preallocated cache of its own that keeps the row's slots it
    has read across drafts (the row's slots are the cache's: an assistant reads input_ids, never embeddings or a
    prefix)."""

    def __init__(self, model, ids: np.ndarray, mask: np.ndarray, d: Decoding):
        key, store, N = (*_input_key(ids, None), d.max_new_tokens), "_host_generation_fns", d.max_new_tokens
        start = model._compiled((*key, "draft prompt"), functools.partial(model._draft_start, N=N), store=store)
        self.feed = model._compiled((*key, "draft feed"), functools.partial(model._feed), store=store)
        self.state = start(tf.constant(ids), tf.constant(mask))
        super().__init__(d, valid=mask.shape[1])  # the prompt read

    def propose(self, row: np.ndarray, room: int) -> list:
        """Up to min(room, the draft length) tokens drafted greedily after the row so far (1-D), stopping after
        one the assistant gives less than assistant_confidence_threshold."""
        k = min(room, self.draft)
        self.upto = self.written = len(row)
        if k < 1:
            return []
        state = _cropped(self.state, self.valid)
        for slot in range(self.valid, len(row)):  # the row's slots it has not read (at least the new token)
            logits, state = self.feed(dict(state, tokens=tf.constant(row[slot:slot + 1], tf.int32)))
        drafted = []
        while True:
            probs = softmax(logits.numpy()[0])
            drafted.append(int(np.argmax(probs)))
            if len(drafted) == k or probs[drafted[-1]] < self.d.assistant_confidence_threshold:
                break
            logits, state = self.feed(dict(state, tokens=tf.constant(drafted[-1:], tf.int32)))
        self.state, self.written = state, len(row) + len(drafted) - 1  # the last one drafted was never read
        return drafted


# --------------------------------------------------------------------------------------- the mixin
class TFGenerationMixin(GenerationDefaults):
    """Adds `generate` and `compute_transition_scores` to TFOPTForCausalLM (which provides init_cache,
    model and lm_logits); generation_config from opt_spec.GenerationDefaults."""

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, logits_processor=None,
                 streamer=None, tokenizer=None, stopping_criteria=None, prefix_allowed_tokens_fn=None,
                 inputs_embeds=None, assistant_model=None, **kwargs):
        """The prompts followed by the new tokens, (B * num_return_sequences, T + N), as a tf.Tensor of
        the prompt's integer dtype (int32 unless the prompt was int64); with return_dict_in_generate, an
        opt_tf.outputs record holding it. Settings by Hugging Face's names as keywords or in
        generation_config, defaults from model.generation_config; see opt_spec.generation. inputs_embeds
        (B, P, word_embed_proj_dim): what the model sees at the first P positions; the rows are then
        input_ids (B, P) if given, else empty (T = 0). past_key_values: the model's KVCache of the prompt's
        first C < T tokens, to re-use (opt_spec.generation, "Re-using a prompt's cache"; left as it is).
        assistant_model (a smaller TFOPTForCausalLM of the same vocabulary) or prompt_lookup_num_tokens:
        assisted decoding (opt_spec.generation), on the host loop."""
        reused = kwargs.pop("past_key_values", None)
        ids, mask, embeds, out_dtype = self._check_generation_inputs(input_ids, attention_mask, inputs_embeds)
        d = self._decoding(generation_config, kwargs, mask.shape[1], ids.shape[1])
        prefix = None if reused is None else self._reused_prefix(reused, ids, embeds)
        assisted = check_assisted(d, assistant_model, ids.shape[0], embeds is not None, self.config.vocab_size, "tf")
        check_prompt(mask, d.max_new_tokens, self.config.max_position_embeddings)
        processors = check_extras(d, logits_processor, streamer, tokenizer)
        rules = HostRules(check_host_rules(stopping_criteria, prefix_allowed_tokens_fn, d.max_time),
                          prefix_allowed_tokens_fn)
        seed = seed_key(d.seed)
        if not d.is_beam_search:  # each prompt repeated num_return_sequences times, each row sampled apart
            ids, mask = np.repeat(ids, d.num_return_sequences, 0), np.repeat(mask, d.num_return_sequences, 0)
            embeds = None if embeds is None else tf.repeat(embeds, d.num_return_sequences, axis=0)
            prefix = _repeat_prefix(prefix, d.num_return_sequences)
        key = _output_key(d)
        if assisted or needs_host(d, processors, streamer, rules.criteria, rules.prefix):
            stops = StopStrings(d.stop_strings, tokenizer) if d.stop_strings else None
            drafter = self._drafter(d, assistant_model, ids, mask) if assisted else None
            loop = self._host_beam_search if d.is_beam_search else functools.partial(self._host_decode, drafter=drafter)
            new, n, steps, outputs = loop(ids, mask, seed, key, processors, as_streamer(streamer), stops, out_dtype,
                                          rules, embeds, prefix)
        else:
            inputs = (tf.constant(ids), tf.constant(mask), seed) + tuple(x for x in (embeds, prefix) if x is not None)
            new, n, steps, outputs = self._generation_function(ids, embeds, key, prefix)(*inputs)
            outputs = {name: tuple(tf.unstack(x[:int(steps)])) if name in ("scores", "logits") else x
                       for name, x in outputs.items()}  # the (N, rows, V) buffers as the steps taken
        n = int(n)
        new = tf.cast(new[:, :n], out_dtype)
        rows = np.repeat(ids, d.num_return_sequences, 0) if d.is_beam_search else ids
        sequences = tf.concat([tf.constant(rows, out_dtype), new], axis=1)
        if not d.return_dict_in_generate:
            return sequences
        C = _held(prefix)  # step 0 of the record covers the P - C positions fed
        if not d.is_beam_search:
            hidden_states, attentions = None, None
            if d.output_hidden_states or d.output_attentions:  # one forward over the rows, cut per step
                hidden_states, attentions = step_outputs(mask.shape[1] - C, n,
                                                         *self._replay(ids, mask, new, n, d, embeds, prefix), C)
            return GenerateDecoderOnlyOutput(sequences=sequences, scores=outputs.get("scores"),
                                             logits=outputs.get("logits"), hidden_states=hidden_states,
                                             attentions=attentions)
        hidden_states, attentions = None, None
        if beam_step_rows(d):  # one forward per step over its running beams, kept by the host loop
            K, beam_rows = d.num_beams, outputs["beam_rows"]
            beams = (np.repeat(ids, K, 0), np.repeat(mask, K, 0))
            embeds = None if embeds is None else tf.repeat(embeds, K, axis=0)
            prefix = _repeat_prefix(prefix, K)
            hidden_states, attentions = replayed_step_outputs(mask.shape[1] - C, len(beam_rows), lambda s: self._replay(
                *beams, beam_rows[s], s + 1, d, embeds, prefix), C)
        return GenerateBeamDecoderOnlyOutput(sequences=sequences, sequences_scores=outputs.get("sequences_scores"),
                                             scores=outputs.get("scores"), logits=outputs.get("logits"),
                                             beam_indices=outputs["beam_indices"][:, :n], hidden_states=hidden_states,
                                             attentions=attentions)

    def _drafter(self, d: Decoding, assistant, ids: np.ndarray, mask: np.ndarray):
        """Where an assisted call's candidates come from (check_assisted said it is one): the row itself
        (prompt lookup) or the assistant, which reads the whole prompt itself (a re-used cache is the model's)."""
        if assistant is None:
            return PromptLookup(d)
        check_prompt(mask, d.max_new_tokens, assistant.config.max_position_embeddings)
        return _Assistant(assistant, ids, mask, d)

    def _replay(self, ids, mask, new, steps: int, d: Decoding, embeds=None, prefix=None) -> tuple:
        """(hidden_states, attentions) of one forward over rows' first positions, for `steps` steps of generate's
        record (opt_spec.generation.step_outputs): the prompt ids (R, T) (NumPy) seen through mask (R, P) (after
        the embeddings `embeds` (R, P, E), when the call had them; the prompt's first C in a cache holding the
        prefix, when a cache was re-used), then the new tokens `new` (R, >= steps - 1) but the last step's."""
        if embeds is None:
            inputs, embedded = tf.concat([tf.constant(_fed(ids, prefix), new.dtype), new[:, :steps - 1]], 1), None
        else:  # the embedded positions, then the new tokens' embeddings
            inputs, embedded = None, tf.concat([embeds, self.get_input_embeddings()(new[:, :steps - 1])], 1)
        cache = None if prefix is None else self._prefix_cache(prefix)
        out = self._base(inputs, inputs_embeds=embedded, attention_mask=tf.constant(step_forward_mask(mask, steps)),
                         past_key_values=cache, use_cache=cache is not None, training=False,
                         output_hidden_states=d.output_hidden_states, output_attentions=d.output_attentions)
        return out.hidden_states, out.attentions

    def _reused_prefix(self, cache, ids, embeds) -> tuple:
        """generate's past_key_values: the model's KVCache of the rows' first C < T prompt tokens (from a forward
        over ids[:, :C] with the mask's first C columns), as per layer keys and values (B, nh, C, hs) in the
        model's dtype; the cache itself is left as it is."""
        from .modeling import KVCache

        check_reused_cache(cache, isinstance(cache, KVCache), "the model's KVCache (a forward's past_key_values over "
                           "the prompt's first tokens)", "inputs_embeds" if embeds is not None else None)
        C = cache.written()
        layers = tuple((None, None) if k is None or C is None else
                       (tf.cast(k[:, :, :C], self.compute_dtype), tf.cast(v[:, :, :C], self.compute_dtype))
                       for k, v in zip(cache.keys, cache.values))
        config = self.config
        reused_prompt_positions(layers, config.num_hidden_layers, ids.shape[0], config.num_attention_heads,
                                config.head_dim, ids.shape[1])
        return layers

    def _prefix_cache(self, prefix):
        """A dynamic KVCache holding a prefix's keys and values (its C positions written)."""
        from .modeling import KVCache

        return KVCache([k for k, _ in prefix], [v for _, v in prefix], _held(prefix))

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits=False) -> tf.Tensor:
        """(rows, steps) float32: each generated token's score in the step's scores of a
        return_dict_in_generate record (Hugging Face's method; opt_spec.generation.transition_scores)."""
        return tf.constant(transition_scores(sequences, scores, beam_indices, normalize_logits))

    def _check_generation_inputs(self, input_ids, attention_mask, inputs_embeds=None):
        """NumPy int32 ids (B, T) and mask (B, P) (opt_spec's prompt_inputs), inputs_embeds as a tf.Tensor of the
        model's compute dtype (or None) and the output dtype (int64 for int64 input_ids, else int32)."""
        ids, mask = prompt_inputs(input_ids, attention_mask, self.config.vocab_size, inputs_embeds=inputs_embeds,
                                  width=self.config.word_embed_proj_dim)
        out_dtype = tf.int64 if input_ids is not None and ids.dtype == np.int64 else tf.int32
        embeds = None if inputs_embeds is None else tf.cast(inputs_embeds, self.compute_dtype)
        return ids.astype(np.int32), (mask != 0).astype(np.int32), embeds, out_dtype

    def _compiled(self, key, fn, input_signature=None, store: str = "_generation_fns"):
        """The XLA-compiled function kept under `key` in the dict `store` (made once; a plain dict outside
        Keras tracking): the fast path's in _generation_fns, the step-by-step pieces in _host_generation_fns."""
        if "_generation_fns" not in self.__dict__:
            object.__setattr__(self, "_generation_fns", {})
            object.__setattr__(self, "_host_generation_fns", {})
            object.__setattr__(self, "generation_traces", 0)
        fns = self.__dict__[store]
        if key not in fns:
            # a partial (not a closure) so that TensorFlow's retracing warning counts each function apart
            fns[key] = tf.function(fn, input_signature=input_signature, jit_compile=True)
        return fns[key]

    def _generation_function(self, ids, embeds, d: Decoding, prefix=None):
        """The compiled decode for these inputs' shapes and settings, made once and kept: it takes the ids
        (B, T), the mask (B, P), the seed and, with inputs_embeds, the embeddings (B, P, E), or, with a re-used
        cache, its prefix (per layer keys and values (B, nh, C, hs): inputs, so that another cache of the same
        shapes runs the same program)."""
        B, T = ids.shape
        P = T if embeds is None else embeds.shape[1]
        spec = [tf.TensorSpec((B, T), tf.int32), tf.TensorSpec((B, P), tf.int32), tf.TensorSpec((2,), tf.int32)]
        traced = self._traced_generation
        if embeds is not None:
            spec.append(tf.TensorSpec(embeds.shape, embeds.dtype))
        if prefix is not None:
            spec.append(tuple(tuple(tf.TensorSpec(x.shape, x.dtype) for x in kv) for kv in prefix))
            traced = self._traced_reuse
        return self._compiled((*_input_key(ids, embeds, prefix), d), functools.partial(traced, d=d), spec)

    def _exportable_generate(self, batch_size: int, prompt_length: int, **settings) -> tuple:
        """(fn, input_signature) of generate for prompts of exactly (batch_size, prompt_length), left-padded, with
        the settings fixed now (opt_tf.export's `generate` endpoint): fn(input_ids, attention_mask, seed) ->
        {"sequences": the prompts and the new tokens, as generate returns them}. seed: (2,) int32, the
        stateless key that generate(seed=s) uses, [0, s] for s < 2**31; it matters only when sampling. Settings
        that need the host between steps, max_time and return_dict_in_generate are refused."""
        d = self._decoding(None, settings, prompt_length, prompt_length)
        check_assisted(d, None, batch_size, False, self.config.vocab_size, "tf")
        check_prompt(np.ones((batch_size, prompt_length), np.int32), d.max_new_tokens,
                     self.config.max_position_embeddings)  # prompts without pads: the longest it can be given
        host = [k for k, on in (("stop_strings", d.stop_strings), ("max_time", d.max_time is not None),
                                ("return_dict_in_generate", d.return_dict_in_generate)) if on]
        if host:
            raise ValueError(f"an exported generate runs whole in the graph: {', '.join(host)} cannot be exported")
        key, n = _output_key(d), d.num_return_sequences
        spec = [tf.TensorSpec((batch_size, prompt_length), tf.int32, name="input_ids"),
                tf.TensorSpec((batch_size, prompt_length), tf.int32, name="attention_mask"),
                tf.TensorSpec((2,), tf.int32, name="seed")]
        rows = batch_size if d.is_beam_search else batch_size * n
        decode = self._generation_function(np.zeros((rows, prompt_length), np.int32), None, key)  # generate's own

        def generate(input_ids, attention_mask, seed):
            ids, mask = (input_ids, attention_mask) if d.is_beam_search else \
                (tf.repeat(input_ids, n, 0), tf.repeat(attention_mask, n, 0))
            new, steps, _, _ = decode(ids, mask, seed)
            return {"sequences": tf.concat([tf.repeat(input_ids, n, 0), tf.cast(new[:, :steps], tf.int32)], 1)}
        return generate, spec

    def _traced_generation(self, ids, mask, seed, embeds=None, *, d: Decoding, prefix=None):
        object.__setattr__(self, "generation_traces", self.generation_traces + 1)  # runs at trace time only
        body = self._beam_search if d.is_beam_search else self._decode
        return body(ids, mask, seed, d, embeds, prefix)

    def _traced_reuse(self, ids, mask, seed, prefix, *, d: Decoding):
        """_traced_generation with a re-used cache's prefix as its fourth input."""
        return self._traced_generation(ids, mask, seed, d=d, prefix=prefix)

    def _last_logits(self, ids, slots, cache, embeds=None):
        """float32 logits (B, V) of the last new position and the cache with the new tokens written; embeds:
        the prompt pass's inputs_embeds (B, P, E), read instead of ids."""
        out = self.model(ids if embeds is None else None, inputs_embeds=embeds, attention_mask=slots,
                         past_key_values=cache, use_cache=True)
        h = out.last_hidden_state[:, -1]  # (B, E)
        return tf.cast(self.lm_logits(h), tf.float32), out.past_key_values

    # ------------------------------------------------------------------------ greedy and sampling
    # One step is scores (rules 0-3) -> [host: logits processors] -> pick (rules 5-6) -> [host: stop
    # strings, stopping criteria, streamer] -> feed (the chosen tokens through the model). The fast path traces the same
    # pieces into one while_loop. Each returns (new tokens (B, N), tokens kept, steps taken, outputs).
    def _prefill(self, ids, mask, d: Decoding, buffers: bool = False, embeds=None, prefix=None):
        """The prompt pass over mask's P positions (of ids, or of embeds (B, P, E) with inputs_embeds; after a
        re-used cache's prefix of the first C, the last P - C ids): (logits (B, V), state before the first
        step); buffers: the state also holds the output buffers the call asked for (the fast path's)."""
        (B, P), T = mask.shape, ids.shape[1]
        N, V = d.max_new_tokens, self.config.vocab_size
        slots = tf.concat([mask, tf.zeros((B, N), tf.int32)], axis=1)  # (B, L) over every cache slot
        logits, cache = self._last_logits(_fed(ids, prefix), slots, self._generation_cache(B, P, N, prefix), embeds)
        state = dict(step=tf.constant(0, tf.int32), tokens=tf.zeros((B,), tf.int32), finished=tf.zeros((B,), tf.bool),
                     out=tf.fill((B, N), d.pad_token_id), cache=cache, slots=slots)
        if d.repetition_penalty != 1.0:
            state["seen"] = _prompt_seen(ids, _row_columns(mask, T), V)
        if buffers:
            state.update(_output_buffers(d, B, V))
        return logits, state

    def _scores(self, ids, s, logits, d: Decoding, allowed=None):
        """Rules 0-3 on this step's logits (allowed: prefix_allowed_tokens_fn's mask, from the host)."""
        T, seq = ids.shape[1], tf.concat([ids, s["out"]], 1)
        return process_logits(logits, s.get("seen"), seq, _row_columns(s["slots"], seq.shape[1]), T + s["step"],
                              s["step"], d, allowed)

    def _pick(self, s, scores, seed, d: Decoding):
        """Rules 5-6: (the scores chosen from, the state after the step with its tokens written out)."""
        step = s["step"]
        scores = choice_scores(scores, d)
        tokens = _sample(scores, seed, step) if d.do_sample else _argmax(scores)
        tokens = tf.where(s["finished"], d.pad_token_id, tokens)
        new = dict(s, step=step + 1, tokens=tokens, finished=s["finished"] | _isin(tokens, d.eos_token_ids),
                   out=_put_column(s["out"], step, tokens))
        if "seen" in s:
            new["seen"] = _mark(s["seen"], tokens)
        return scores, new

    def _feed(self, s):
        """The last tokens through the model: (next logits, state)."""
        slots = _set_slot(s["slots"], s["cache"].length)  # the last token's slot: the cache's write position
        logits, cache = self._last_logits(s["tokens"][:, None], slots, s["cache"])
        return logits, dict(s, cache=cache, slots=slots)

    def _decode(self, ids, mask, seed, d: Decoding, embeds=None, prefix=None):
        """(B, N) new tokens (pad after a row finished), the steps taken (twice) and the output buffers."""
        logits, state = self._prefill(ids, mask, d, buffers=True, embeds=embeds, prefix=prefix)

        def step(s, logits):
            scores, new = self._pick(s, self._scores(ids, s, logits, d), seed, d)
            return _record(new, s["step"], _step_outputs(d, logits, scores))

        state = step(state, logits)

        def more(s):
            return (s["step"] < d.max_new_tokens) & ~tf.reduce_all(s["finished"])

        def advance(s):
            logits, s = self._feed(s)
            return (step(s, logits),)

        (state,) = tf.while_loop(more, advance, (state,), maximum_iterations=d.max_new_tokens - 1)
        return state["out"], state["step"], state["step"], _buffered_outputs(state)

    def _host_decode(self, ids, mask, seed, d: Decoding, processors, streamer, stops, out_dtype, rules: HostRules,
                     embeds=None, prefix=None, drafter=None):
        """The fast path's pieces one step at a time, with the host's extras between them: per step one
        compiled call (the forward, the scores and the choice), two with logits processors between.
        prefix_allowed_tokens_fn's mask is computed before the step (from the rows so far) and passed in.
        drafter (_drafter's, one row): assisted decoding's candidates, checked a forward pass at a time
        (_check_candidates); each position's logits then take the step's scores and choice ("given") as the
        logits of a one-token pass do, until the token chosen is not the candidate that was read."""
        B, T = ids.shape
        P, V = mask.shape[1], self.config.vocab_size

        def first(ids, mask, allowed, embeds, prefix):
            logits, s = self._prefill(ids, mask, d, embeds=embeds, prefix=prefix)
            return self._scores(ids, s, logits, d, allowed), s, _step_outputs(d, logits=logits)

        def later(ids, s, allowed):
            logits, s = self._feed(s)
            return self._scores(ids, s, logits, d, allowed), s, _step_outputs(d, logits=logits)

        def given(ids, s, logits, allowed):  # a checking pass's logits for this step (the state without its cache)
            return self._scores(ids, s, logits, d, allowed), s, _step_outputs(d, logits=logits)

        def pick(s, scores, seed):
            scores, s = self._pick(s, scores, seed, d)
            return s, _step_outputs(d, scores=scores)

        pieces = dict(first=first, later=later, given=given)
        if processors:
            pieces["pick"] = pick
        else:  # nothing runs between scores and choice: one compiled call
            pieces = {name: functools.partial(_then_pick, scored, pick) for name, scored in pieces.items()}
        masked = rules.prefix is not None
        key = (*_input_key(ids, embeds, prefix), d)
        fn = {name: self._compiled((*key, name, bool(processors), masked), piece, store="_host_generation_fns")
              for name, piece in pieces.items()}
        ids_t, mask_t = tf.constant(ids), tf.constant(mask)
        if streamer is not None:
            streamer.put(ids.astype(out_dtype.as_numpy_dtype))
        seq, finished = [ids], np.zeros(B, bool)  # the rows so far, on the host
        state, kept = None, {}
        ahead, candidates, matched = None, [], 0  # assisted: a checking pass's logits for the next steps
        for step in range(d.max_new_tokens):
            allowed = rules.allowed(tf.constant(np.concatenate(seq, 1)), 1, V)  # (B, V) or None
            cache = None
            if step == 0:
                piece, args = "first", (ids_t, mask_t, allowed, embeds, prefix)
            elif ahead is None:
                piece, args = "later", (ids_t, state, allowed)
            else:  # the step's logits were computed with the candidates; its pieces do not read the cache
                cache = state.pop("cache")
                piece, args = "given", (ids_t, state, ahead[matched], allowed)
            if processors:
                scores, state, outputs = fn[piece](*args)
                scores = apply_processors(processors, tf.concat([ids_t, state["out"][:, :step]], 1), scores)
                state, chosen = fn["pick"](state, scores, seed)
                outputs = {**outputs, **chosen}
            else:
                state, outputs = fn[piece](*args, seed)
            if cache is not None:
                state = dict(state, cache=cache)
            for name, x in outputs.items():
                kept.setdefault(name, []).append(x)
            tokens, live = state["tokens"].numpy(), ~finished
            seq.append(tokens[:, None])
            if streamer is not None:
                streamer.put(tokens.astype(out_dtype.as_numpy_dtype))
            finished = state["finished"].numpy()
            if stops is not None:
                real = np.concatenate([_row_columns(mask, T), np.ones((B, step + 1), np.int32)], 1)
                finished = finished | stops.hits(np.concatenate(seq, 1), real, live)
            if rules.criteria:  # the rows with the new token; the steps' scores so far when output_scores
                finished = finished | rules.stopped(tf.constant(np.concatenate(seq, 1)), _so_far(kept, "scores"))
            if stops is not None or rules.criteria:
                state["finished"] = tf.constant(finished)
            if finished.all():
                break
            if drafter is None or step + 1 == d.max_new_tokens:
                continue
            if ahead is not None and matched < len(candidates) and int(tokens[0]) == candidates[matched]:
                matched += 1  # the next logits were computed after this very token
                continue
            if ahead is not None:
                drafter.taken(matched, len(candidates))
                state = _cropped(state, P + step)  # what was written for candidates not taken goes
            candidates = drafter.propose(np.concatenate(seq, 1)[0], d.max_new_tokens - step - 2)
            ahead, matched = None, 0
            if candidates:  # compiled per number of candidates (module docstring), for the state's shapes
                shapes = (*_input_key(ids, embeds, prefix), d.max_new_tokens, "seen" in state, "check", len(candidates))
                check = self._compiled(shapes, functools.partial(self._check_candidates), store="_host_generation_fns")
                logits, state = check(state, tf.constant(candidates, tf.int32))
                ahead = tf.unstack(logits)  # (1, V) each
        if streamer is not None:
            streamer.end()
        return state["out"], state["step"], state["step"], {name: tuple(xs) for name, xs in kept.items()}

    def _draft_start(self, ids, mask, N: int) -> dict:
        """An assistant's prompt pass (_Assistant): its cache and slot mask (B, P + N) after reading the prompt."""
        B, P = mask.shape
        slots = tf.concat([mask, tf.zeros((B, N), tf.int32)], axis=1)
        _, cache = self._last_logits(ids, slots, self._generation_cache(B, P, N))
        return dict(cache=cache, slots=slots)

    def _check_candidates(self, s, candidates):
        """Assisted decoding's forward pass: the last chosen token (s["tokens"], one row) at the cache's write
        position and the candidates (k,) after it, their slots set; -> (float32 logits (k + 1, 1, V) of the
        positions that follow each of them, the state with their keys and values written)."""
        cache, L, k = s["cache"], s["slots"].shape[1], candidates.shape[0]
        slot = tf.range(L)[None, :]
        slots = tf.where((slot >= cache.length) & (slot <= cache.length + k), 1, s["slots"])
        out = self.model(tf.concat([s["tokens"], candidates], 0)[None], attention_mask=slots, past_key_values=cache,
                         use_cache=True)
        logits = tf.cast(self.lm_logits(out.last_hidden_state[0]), tf.float32)  # (k + 1, V)
        return logits[:, None], dict(s, cache=out.past_key_values, slots=slots)

    # ---------------------------------------------------------------------------------- beam search
    # One step is scores (log_softmax, rules 0-3) -> [host: logits processors] -> candidates (after
    # renormalize_logits) -> [host: stop strings and stopping criteria on the candidates] -> update
    # (finished hypotheses, running beams) -> feed. With return_dict_in_generate every running beam and
    # finished hypothesis also carries the running beam (b * K + k) each of its tokens extended
    # ("beam_index", "done_index", (B, K, N), -1 past its end).
    def _generation_cache(self, rows: int, P: int, N: int, prefix=None):
        """generate's cache: P prompt slots (pads past the position table allowed) and N new ones; holding a
        re-used cache's prefix (per layer keys and values (rows, nh, C, hs)) in its first C when given."""
        cache = self.init_cache(rows, P + N, pad_slots(P, N, self.config.max_position_embeddings))
        if prefix is not None:
            for layer, (k, v) in enumerate(prefix):
                cache.update(layer, k, v)
            cache.advance(_held(prefix))
        return cache

    def _beam_prefill(self, ids, mask, d: Decoding, buffers: bool = False, embeds=None, prefix=None):
        (B, P), T = mask.shape, ids.shape[1]
        K, N, V = d.num_beams, d.max_new_tokens, self.config.vocab_size
        slots = tf.concat([tf.repeat(mask, K, axis=0), tf.zeros((B * K, N), tf.int32)], axis=1)  # (BK, L)
        embeds = None if embeds is None else tf.repeat(embeds, K, axis=0)
        cache = self._generation_cache(B * K, P, N, _repeat_prefix(prefix, K))
        logits, cache = self._last_logits(_fed(tf.repeat(ids, K, axis=0), prefix), slots, cache, embeds)
        state = dict(step=tf.constant(0, tf.int32), cache=cache, slots=slots,
                     scores=tf.concat([tf.zeros((B, 1)), tf.fill((B, K - 1), NEG_INF)], axis=1),  # one live beam
                     beams=tf.fill((B, K, N), d.pad_token_id),
                     done_scores=tf.fill((B, K), NEG_INF), done_tokens=tf.fill((B, K, N), d.pad_token_id),
                     done_length=tf.zeros((B, K), tf.int32), row_done=tf.zeros((B,), tf.bool),
                     parent=tf.zeros((B, K), tf.int32), tokens=tf.zeros((B, K), tf.int32))
        if d.repetition_penalty != 1.0:
            state["seen"] = _prompt_seen(tf.repeat(ids, K, axis=0), tf.repeat(_row_columns(mask, T), K, axis=0), V)
        if d.return_dict_in_generate:
            state["beam_index"] = state["done_index"] = tf.fill((B, K, N), -1)
        if buffers:
            state.update(_output_buffers(d, B * K, V))
        return logits, state

    def _beam_seq(self, ids, s, d: Decoding):
        """(BK, L): each beam's prompt and tokens so far."""
        B, K, N = s["beams"].shape
        return tf.concat([tf.repeat(ids, K, axis=0), tf.reshape(s["beams"], (B * K, N))], 1)

    def _beam_scores(self, ids, s, logits, d: Decoding, allowed=None):
        """log_softmax of the logits, then rules 0-3 (as Hugging Face orders them for beams); allowed (BK, V):
        prefix_allowed_tokens_fn's mask from the host, or None."""
        T, seq = ids.shape[1], self._beam_seq(ids, s, d)
        return process_logits(tf.nn.log_softmax(logits, axis=-1), s.get("seen"), seq,
                              _row_columns(s["slots"], seq.shape[1]), T + s["step"], s["step"], d, allowed)

    def _beam_candidates(self, s, logprobs, seed, d: Decoding):
        """The best C continuations per row (beam sampling: C drawn, in the order drawn, by the Gumbel noise
        keyed by (seed, step)): scores, parents, tokens and histories (B, C, N); "logprobs", the step's scores
        after the sampling filters (when sampling) and renormalize_logits, with output_scores."""
        B, K, N = s["beams"].shape
        V = logprobs.shape[-1]
        if d.do_sample:  # after the logits processors, as opt_spec's reference_scores orders them
            logprobs = filter_for_sampling(logprobs, d, d.filter_keep)
        if d.renormalize_logits:
            logprobs = tf.nn.log_softmax(logprobs, axis=-1)
        cand = tf.reshape(s["scores"][..., None] + tf.reshape(logprobs, (B, K, V)), (B, K * V))
        if d.do_sample:
            cand_index = draw_without_replacement(cand, d.candidates, seed, s["step"])  # (B, C), in the order drawn
            cand_scores = tf.gather(cand, cand_index, batch_dims=1)
        else:
            cand_scores, cand_index = tf.math.top_k(cand, d.candidates)  # (B, C), best first, lower index on ties
        parent, token = cand_index // V, cand_index % V
        history = _put_column(tf.gather(s["beams"], parent, batch_dims=1), s["step"], token)  # (B, C, N)
        c = dict(scores=cand_scores, parent=parent, token=token, history=history)
        if "beam_index" in s:
            extended = tf.range(B)[:, None] * K + parent                                     # (B, C)
            c["history_index"] = _put_column(tf.gather(s["beam_index"], parent, batch_dims=1), s["step"], extended)
        if d.output_scores:
            c["logprobs"] = logprobs
        return c

    def _beam_update(self, s, c, stopped, d: Decoding):
        """Finished hypotheses and running beams after this step's candidates; `stopped` (B, C) marks
        candidates that ended a stop string or that a stopping criterion stopped (the host's checks; all
        False otherwise)."""
        K, C = d.num_beams, d.candidates
        step = s["step"]
        norms = _length_norms(d)
        norm = norms[step]
        rank = tf.range(C)[None, :]
        stopped = stopped | _isin(c["token"], d.eos_token_ids) | (step == d.max_new_tokens - 1)  # the length limit
        row_done = s["row_done"]
        finishing = stopped & (rank < K) & ~row_done[:, None] & tf.math.is_finite(c["scores"])
        normalized = tf.where(finishing, c["scores"] / norm, NEG_INF)
        pool_scores = tf.concat([s["done_scores"], normalized], axis=1)  # (B, K + C)
        pool_tokens = tf.concat([s["done_tokens"], c["history"]], axis=1)
        pool_length = tf.concat([s["done_length"], tf.fill(tf.shape(c["token"]), step + 1)], axis=1)
        best = tf.math.top_k(pool_scores, K).indices
        done_scores = tf.gather(pool_scores, best, batch_dims=1)
        # running beams: the first (best; drawn: best-scored) K candidates that did not stop, then stopped
        # ones, lowered by 1e9
        lowered = c["scores"] - 1e9 * tf.cast(stopped, tf.float32)
        if d.do_sample:
            order = tf.math.top_k(lowered, K).indices  # (B, K), lower index (drawn first) on ties
        else:
            order = tf.math.top_k(-tf.where(stopped, rank + C, rank), K).indices  # (B, K)
        scores = tf.where(row_done[:, None], s["scores"], tf.gather(lowered, order, batch_dims=1))
        # a row is done when K hypotheses are finished and (unless early_stopping=True) no running beam,
        # normalized at opt_spec's best_length, can beat the worst of them
        done_now = tf.reduce_all(tf.math.is_finite(done_scores), axis=-1)
        if d.early_stopping is not True:
            best_running = tf.reduce_max(scores, axis=-1) / tf.gather(norms, best_length(step, d) - 1)
            done_now &= tf.reduce_min(done_scores, axis=-1) >= best_running
        new = dict(s, step=step + 1, scores=scores, beams=tf.gather(c["history"], order, batch_dims=1),
                   done_scores=done_scores, done_tokens=tf.gather(pool_tokens, best, batch_dims=1),
                   done_length=tf.gather(pool_length, best, batch_dims=1), row_done=row_done | done_now,
                   parent=tf.gather(c["parent"], order, batch_dims=1),
                   tokens=tf.gather(c["token"], order, batch_dims=1))
        if "beam_index" in s:
            pool_index = tf.concat([s["done_index"], c["history_index"]], axis=1)
            new["done_index"] = tf.gather(pool_index, best, batch_dims=1)
            new["beam_index"] = tf.gather(c["history_index"], order, batch_dims=1)
        return new

    def _beam_feed(self, s):
        """Each running beam continues from its parent's cache with its new token."""
        B, K = s["parent"].shape
        flat_parent = tf.reshape(tf.range(B)[:, None] * K + s["parent"], [-1])  # (BK,)
        tokens = tf.reshape(s["tokens"], [-1])                                 # (BK,)
        slots = _set_slot(s["slots"], s["cache"].length)                       # the cache's write position
        logits, cache = self._last_logits(tokens[:, None], slots, _reorder(s["cache"], flat_parent))
        new = dict(s, cache=cache, slots=slots)
        if "seen" in s:
            new["seen"] = _mark(tf.gather(s["seen"], flat_parent), tokens)
        return logits, new

    def _beam_finish(self, s, d: Decoding):
        """(B * n, N) the n best hypotheses per row (pad-filled), the longest one's length, the steps taken
        and the outputs: their beam_indices (B * n, N) with return_dict_in_generate, their scores
        (sequences_scores) with output_scores, the fast path's buffers."""
        B, K, N = s["beams"].shape
        # the finished hypotheses (at the length limit a running row's first K candidates finished)
        pool_scores, pool_tokens, pool_length = s["done_scores"], s["done_tokens"], s["done_length"]
        n = d.num_return_sequences
        pick = tf.math.top_k(pool_scores, n).indices  # (B, n), best first, lower index on ties
        chosen = tf.reshape(tf.gather(pool_tokens, pick, batch_dims=1), (B * n, N))
        outputs = _buffered_outputs(s)
        if "beam_index" in s:
            outputs["beam_indices"] = tf.reshape(tf.gather(s["done_index"], pick, batch_dims=1), (B * n, N))
        if d.output_scores:
            outputs["sequences_scores"] = tf.reshape(tf.gather(pool_scores, pick, batch_dims=1), [-1])
        return chosen, tf.reduce_max(tf.gather(pool_length, pick, batch_dims=1)), s["step"], outputs

    def _beam_search(self, ids, mask, seed, d: Decoding, embeds=None, prefix=None):
        """The best hypotheses as _beam_finish returns them (the seed keys beam sampling's draws)."""
        B, C = ids.shape[0], d.candidates
        none = tf.zeros((B, C), tf.bool)
        logits, state = self._beam_prefill(ids, mask, d, buffers=True, embeds=embeds, prefix=prefix)

        def step(logits, s):
            c = self._beam_candidates(s, self._beam_scores(ids, s, logits, d), seed, d)
            outputs = _step_outputs(d, logits, c.pop("logprobs", None))
            return _record(self._beam_update(s, c, none, d), s["step"], outputs)

        state = step(logits, state)

        def more(s):
            return (s["step"] < d.max_new_tokens) & ~tf.reduce_all(s["row_done"])

        def advance(s):
            return (step(*self._beam_feed(s)),)

        (state,) = tf.while_loop(more, advance, (state,), maximum_iterations=d.max_new_tokens - 1)
        return self._beam_finish(state, d)

    def _host_beam_search(self, ids, mask, seed, d: Decoding, processors, streamer, stops, out_dtype,
                          rules: HostRules, embeds=None, prefix=None):
        del streamer, out_dtype  # check_extras refuses a streamer
        B, T = ids.shape
        K, C, V = d.num_beams, d.candidates, self.config.vocab_size
        key = (*_input_key(ids, embeds, prefix), d)
        pieces = {name: self._compiled((*key, name), functools.partial(fn, d=d), store="_host_generation_fns")
                  for name, fn in (("prefill", self._beam_prefill), ("candidates", self._beam_candidates),
                                   ("update", self._beam_update), ("finish", self._beam_finish))}
        feed = self._compiled((*key, "feed"), self._beam_feed, store="_host_generation_fns")
        masked = rules.prefix is not None  # the scores taking prefix_allowed_tokens_fn's mask are kept apart
        pieces["scores"] = self._compiled((*key, "scores", masked), functools.partial(self._beam_scores, d=d),
                                          store="_host_generation_fns")
        ids_t = tf.constant(ids)
        logits, state = pieces["prefill"](ids_t, tf.constant(mask), embeds=embeds, prefix=prefix)
        kept = {}
        for step in range(d.max_new_tokens):
            if step:
                logits, state = feed(state)
            seq = tf.concat([tf.repeat(ids_t, K, axis=0), tf.reshape(state["beams"], (B * K, -1))[:, :step]], 1)
            if beam_step_rows(d):  # the running beams' new tokens (BK, step), for generate's replayed_step_outputs
                kept.setdefault("beam_rows", []).append(seq[:, T:])
            allowed = rules.allowed(seq, K, V)  # (BK, V): the running beams', batch_id = r // K
            scores = pieces["scores"](ids_t, state, logits, allowed=allowed)
            c = pieces["candidates"](state, apply_processors(processors, seq, scores), seed)
            for name, x in _step_outputs(d, logits, c.pop("logprobs", None)).items():
                kept.setdefault(name, []).append(x)
            stopped = np.zeros((B, C), bool)
            if stops is not None or rules.criteria:  # each candidate: the prompt, its parent's tokens, its new one
                prompt, real = np.repeat(ids[:, None], C, 1), np.repeat(_row_columns(mask, T)[:, None], C, 1)
                cand = np.concatenate([prompt, c["history"].numpy()[:, :, :step + 1]], 2).reshape(B * C, -1)
            if stops is not None:
                cand_real = np.concatenate([real, np.ones((B, C, step + 1), np.int32)], 2).reshape(B * C, -1)
                stopped = stops.hits(cand, cand_real).reshape(B, C)
            if rules.criteria:  # a stopped candidate finishes as an EOS one does (_beam_update)
                stopped = stopped | rules.stopped(tf.constant(cand), _so_far(kept, "scores")).reshape(B, C)
            state = pieces["update"](state, c, tf.constant(stopped))
            if bool(tf.reduce_all(state["row_done"])):
                break
        new, n, steps, outputs = pieces["finish"](state)
        return new, n, steps, {**outputs, **{name: tuple(xs) for name, xs in kept.items()}}
