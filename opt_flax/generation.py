"""`generate` for the Flax backend, following opt_spec.generation's semantics.

The fast path is one jitted function: the prompt fills a preallocated KVCache (`init_cache`), then a
`lax.while_loop` feeds one token per step into fixed-size buffers (the cache, a (rows, P + N) attention
mask over the cache slots, a (rows, N) output, N = the length limit, P the prompt's positions) until every
row finished or N steps were taken; the output is trimmed to the steps taken outside jit. Nothing is
traced or allocated per token.

inputs_embeds (B, P, E) (opt_spec.generation's meaning) go through the prompt pass instead of the ids'
embeddings, an extra argument of programs of their own (`_Static.embeds`; the ids path's are unchanged).
The cache, its mask and the positions count the P embedded positions; the rules see the rows, which hold
input_ids (T = P) or start empty (T = 0) and then the new tokens: the rows' position i is cache slot
i + P - T (`_Static.offset`).

generate(past_key_values=cache) re-uses the model's KVCache of the rows' first C prompt tokens (opt_spec.generation,
"Re-using a prompt's cache"): its written slots' keys and values (B, nh, C, hs) per layer (`past`) are another
argument of the programs of their own (`_Static.past` = C, so a cache of another C compiles anew and one of the
same shapes does not); the prompt pass writes them into the preallocated cache and feeds the last T - C ids.
The rules, the rows and the record's later steps are as without it; the record's step 0 covers the positions fed.

One jitted function is kept per model and static setting (batch, prompt length, N, num_beams, sampling
or not, top_k, whether top-p / repetition penalty apply, how many EOS ids, the n-gram size, how many
sequences to return, and `_Rules`). The numbers (temperature, top_p, repetition_penalty, length_penalty,
min_new_tokens and min_length, the EOS and pad ids, the seed) are arguments, so changing them does not
recompile. The other rules of opt_spec.generation (sequence_bias and bad_words_ids, forced BOS/EOS,
remove_invalid_values, exponential_decay_length_penalty, suppress/begin_suppress_tokens, the sampling
filters min_p / typical_p / epsilon_cutoff / eta_cutoff, renormalize_logits, early_stopping=True) are
static (`_Rules`, from the Decoding): each is traced into the loop only when a call sets it (and can
apply), so a call without them runs the same program as before they existed.

return_dict_in_generate=True returns opt_spec.outputs' records. output_scores / output_logits each add an
(N, rows, V) float32 buffer to the loop's carry (only when asked: static), written at each step and cut
to the steps taken outside jit; beam search carries the beam index of every running beam's and finished
hypothesis's tokens (Hugging Face's beam_indices) when a record is asked for. compute_transition_scores
is opt_spec.generation.transition_scores on NumPy copies.

Logits processors (Python callables on jax.Arrays), stop strings, stopping criteria,
prefix_allowed_tokens_fn and streamers need the host between steps, which one while_loop cannot give. A
call with any of them runs the same pieces one step at a time from Python instead: the prompt pass, the
step's scores, the choice and the next forward are each a jitted function (kept like the fast path's),
with the processors, the stop-string and criteria checks and the streamer's put in between; the allowed
tokens of prefix_allowed_tokens_fn are asked before each step and enter the scores piece as an (R, V)
bool mask (an argument: the pieces without it trace no mask). A call without them keeps the single
compiled loop. Streamers receive NumPy arrays (transformers.TextStreamer reads them with .tolist()). Beam
search asked for hidden states or attentions takes that loop too: it keeps each step's running beams, which
one forward per step over them after decoding turns into Hugging Face's per-step states.

Assisted decoding (prompt_lookup_num_tokens, assistant_model: opt_spec.generation, "Assisted decoding") takes
that step-by-step loop (`_host_decode` with a drafter): after the first step, one jitted forward
(`_check_candidates`) feeds the last chosen token and the candidates at the cache's write position and returns
the logits of every position; the steps then choose from them one at a time through the same jitted scores
and pick as without candidates (same rules, same float32 math: greedy breaks ties alike, and sampling draws
position s with step s's key), until a step chooses another token than the candidate. The next check puts
the cache's write position back to the last chosen token's slot and clears the slots written beyond it, so
what was written for candidates not taken is invisible. The check is jitted once per number of candidates k
(at most prompt_lookup_num_tokens, or the assistant's draft length and the tokens left). Padding every check
to a power of two of tokens, masked, was measured against this (the tests' tiny model, greedy and sampling,
the four kinds of candidates: 8 widths compiled exactly, 9 padded, as the padding must stop at the cache's
capacity near the end; 28-30 vs 31 CPU s) and not kept. An assistant (`_Assistant`, a FlaxOPTForCausalLM of
the same vocabulary) drafts greedily with a preallocated cache of its own that keeps what it has read across
drafts: each draft is one jitted while_loop (`_draft`) over its one-token step. A model or assistant laid out
on a device mesh is refused in words (assisted decoding runs on one device).

Sampling draws with `jax.random.categorical` from `jax.random.key(seed)` folded with the step index:
reproducible within JAX, not across backends. Beam sampling draws each step's candidates from the same
folded key (`draw_without_replacement`: Gumbel-top-k) and runs on with the best-scored of them; plain beam
search's program is the same as without it. Greedy and beam search give the same tokens as opt_torch
(same rules, same tie breaks: lowest index first).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from opt_spec.cache import check_reused_cache, pad_slots, reused_prompt_positions
from opt_spec.generation import (AssistantDrafts, Decoding, GenerationDefaults, StopStrings, allowed_tokens,
                                 apply_processors, as_streamer, best_length, check_assisted, check_extras,
                                 check_host_rules, check_prompt, criteria_hits, decay_growth, length_norms,
                                 longer_sequences, needs_host, prompt_inputs, PromptLookup, replayed_step_outputs,
                                 beam_step_rows, single_token_bias, step_forward_mask, step_outputs, transition_scores)
from opt_spec.outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from .fast_paths import loop_cache, model_cache
from .modeling import KVCache, OPTModule


# ------------------------------------------------------------------------- one step's rules (B, V)
def _is_eos(x: jax.Array, eos_token_id) -> jax.Array:
    """x (...) int -> bool: x is one of the EOS ids (a scalar or an (E,) array)."""
    return jnp.any(x[..., None] == jnp.atleast_1d(eos_token_id), axis=-1)


def process_logits(logits: jax.Array, seen: Optional[jax.Array], step, repetition_penalty, eos_token_id,
                   min_new_tokens) -> jax.Array:
    """Rules 1 and 3 of opt_spec.generation on float32 scores (B, V): the repetition penalty on the
    tokens `seen` (B, V) bool (skipped when seen is None), then every EOS id (a scalar or an (E,)
    array; None skips it) blocked while step < min_new_tokens."""
    if seen is not None:
        p = repetition_penalty
        logits = jnp.where(seen, jnp.where(logits > 0, logits / p, logits * p), logits)
    if eos_token_id is not None:
        V = logits.shape[-1]
        blocked = _is_eos(jnp.arange(V, dtype=jnp.int32), eos_token_id) & (step < min_new_tokens)  # (V,)
        logits = jnp.where(blocked, -jnp.inf, logits)
    return logits


def ngram_bans(seq: jax.Array, real: jax.Array, now, n: int, V: int) -> jax.Array:
    """Rule 2: (R, V) bool, the tokens that would repeat an n-gram. seq / real (R, L): the rows' tokens
    and which positions are real; only positions before `now` (traced) are history."""
    R, L = seq.shape
    W = L - n + 1  # n-gram start positions
    real = real.astype(bool) & (jnp.arange(L) < now)[None, :]
    grams = jnp.stack([seq[:, j:j + W] for j in range(n)], axis=-1)                   # (R, W, n)
    whole = jnp.all(jnp.stack([real[:, j:j + W] for j in range(n)], axis=-1), -1)   # (R, W)
    before = jnp.maximum(now - (n - 1) + jnp.arange(n - 1), 0)                      # the last n - 1
    tail_real = jnp.all(real[:, before], -1) & (now >= n - 1)                       # (R,)
    match = jnp.all(grams[:, :, :n - 1] == seq[:, None, before], -1) & whole & tail_real[:, None]
    flags = jnp.zeros((R, V), jnp.int32).at[jnp.arange(R)[:, None], grams[:, :, n - 1]].max(match.astype(jnp.int32))
    return flags > 0


def filter_for_sampling(logits: jax.Array, temperature=1.0, top_k: int = 0, top_p=None, cutoffs=None,
                        keep: int = 1) -> jax.Array:
    """Rule 5's sampling filters in order on logits (B, V): / temperature, top-k (k a Python int; 0 keeps all),
    top-p (a float or a traced scalar; None skips it, as top_p >= 1 must: float32 rounding of the cumulative
    sum could otherwise drop the tail), then the filters `cutoffs` sets (anything with min_p, typical_p,
    epsilon_cutoff and eta_cutoff as Python numbers: a Decoding, or _Rules; None: none), each traced only
    when it is on. Each keeps at least the `keep` (static) most probable tokens of a row (beam sampling
    keeps Decoding.filter_keep); dropped tokens get -inf. NumPy references: opt_spec.generation's
    sampling_filters and the filters it calls."""
    B, V = logits.shape
    rows = jnp.arange(B)[:, None]
    logits = logits / temperature
    top_k = max(top_k, keep) if top_k > 0 else 0
    if 0 < top_k < V:
        kth = lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1, stable=True)  # (B, V) most probable first, ties by id
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        drop_sorted = ((jnp.cumsum(probs, axis=-1) - probs) >= top_p).at[:, :keep].set(False)  # mass before >= p
        logits = jnp.where(jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted), -jnp.inf, logits)
    if cutoffs is None:
        return logits
    x = logits
    if cutoffs.min_p is not None:
        probs = jax.nn.softmax(x, axis=-1)
        drop = probs < jnp.float32(cutoffs.min_p) * probs.max(-1, keepdims=True)
        if keep > 1:  # (the most probable is never dropped) the `keep` best, ties by id (lax.top_k's order)
            drop = drop.at[rows, lax.top_k(x, keep)[1]].set(False)
        x = jnp.where(drop, -jnp.inf, x)
    if cutoffs.typical_p < 1.0:
        logp = jax.nn.log_softmax(x, axis=-1)
        p = jnp.exp(logp)
        entropy = -(jnp.where(p > 0, logp, 0.0) * p).sum(-1, keepdims=True)
        shifted = jnp.abs(-logp - entropy)                        # (B, V) distance from the entropy
        order = jnp.argsort(shifted, axis=-1, stable=True)        # closest first, ties by id
        sorted_shifted = jnp.take_along_axis(shifted, order, axis=-1)
        mass = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1), axis=-1)
        last = jnp.minimum((mass < cutoffs.typical_p).sum(-1), V - 1)  # (B,) the token that reaches the mass
        drop_sorted = (sorted_shifted > jnp.take_along_axis(sorted_shifted, last[:, None], -1)).at[:, :keep].set(False)
        x = jnp.where(jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted), -jnp.inf, x)
    if cutoffs.epsilon_cutoff > 0:
        probs = jax.nn.softmax(x, axis=-1)
        x = jnp.where((probs < jnp.float32(cutoffs.epsilon_cutoff)) & _below_kth(x, keep), -jnp.inf, x)
    if cutoffs.eta_cutoff > 0:
        logp = jax.nn.log_softmax(x, axis=-1)
        p = jnp.exp(logp)
        entropy = -(jnp.maximum(logp, jnp.finfo(jnp.float32).min) * p).sum(-1, keepdims=True)
        eta = jnp.minimum(jnp.float32(cutoffs.eta_cutoff),
                          jnp.float32(np.sqrt(cutoffs.eta_cutoff)) * jnp.exp(-entropy))  # (B, 1)
        x = jnp.where((p < eta) & _below_kth(x, keep), -jnp.inf, x)
    return x


def _below_kth(x: jax.Array, keep: int) -> jax.Array:
    """(B, V) bool: scores below each row's keep-th best (never the `keep` best; ties kept)."""
    return x < lax.top_k(x, min(keep, x.shape[-1]))[0][:, -1:]


def draw_without_replacement(scores: jax.Array, n: int, key: jax.Array) -> jax.Array:
    """(R, n) int32 indices drawn without replacement from softmax(scores) (R, M), in the order drawn: the n
    largest of scores + Gumbel noise from `key` (opt_spec.generation.draw_without_replacement; lax.top_k puts
    impossible (-inf) entries last)."""
    return lax.top_k(scores + jax.random.gumbel(key, scores.shape, jnp.float32), n)[1]


def bias_sequences(scores: jax.Array, seq: jax.Array, now, entries) -> jax.Array:
    """Rule 0 on scores (R, V): `entries` ((token ids, bias), ...) (static; bad words included as -inf).
    The one-token entries' bias is a constant vector (opt_spec's single_token_bias); a longer one's is added
    to its last token where the row's tokens before position `now` (traced) end with the rest of it
    (opt_spec's longer_sequences, packed for one match). seq (R, L): the rows, pads included (Hugging Face
    matches them). Reference: opt_spec.generation.sequence_bias_table."""
    R, V = scores.shape
    bias = jnp.broadcast_to(jnp.asarray(single_token_bias(entries, V)), (R, V))
    longer = longer_sequences(entries, seq.shape[1])
    if longer is not None:
        P = longer.rest.shape[1]
        tail = jnp.take(seq, jnp.maximum(now - P + jnp.arange(P), 0), axis=1)          # (R, P) the last P
        match = jnp.all((tail[:, None, :] == longer.rest) | (longer.rest < 0), -1)    # (R, M)
        match &= now >= jnp.asarray(longer.length)                                      # the row holds them all
        bias = bias.at[:, longer.last].add(jnp.where(match, jnp.asarray(longer.bias), jnp.float32(0)))
    return scores + bias


def token_rules(scores: jax.Array, step, rules: "_Rules", eos_token_ids, max_new_tokens: int) -> jax.Array:
    """Rule 3's forced and suppressed tokens on float32 scores (R, V), in the spec's order, each traced
    only when `rules` (static) sets it: forced BOS (at the step where L == 1: `rules` holds it only for
    rows that start with one token or none), forced EOS at the last step, invalid values made finite, the
    exponential EOS boost (eos_token_ids (E,), traced), suppressed tokens, and begin-suppressed ones at
    their step."""
    V, x = scores.shape[-1], scores

    def only(ids, value=0.0):  # (V,) float32: `value` at ids, -inf elsewhere
        row = np.full(V, -np.inf, np.float32)
        row[list(ids)] = value
        return jnp.asarray(row)

    def among(ids):  # (V,) bool
        row = np.zeros(V, bool)
        row[list(ids)] = True
        return jnp.asarray(row)

    if rules.forced_bos_token_id is not None:
        x = jnp.where(step == rules.forced_bos_step, only([rules.forced_bos_token_id]), x)
    if rules.forced_eos_token_ids:
        x = jnp.where(step == max_new_tokens - 1, only(rules.forced_eos_token_ids), x)
    if rules.remove_invalid_values:
        big = np.finfo(np.float32).max
        x = jnp.where(jnp.isnan(x), 0.0, jnp.where(x == jnp.inf, big, jnp.where(x == -jnp.inf, -big, x)))
    if rules.exponential_decay is not None and eos_token_ids is not None:
        start = rules.exponential_decay[0]
        boosted = x + jnp.abs(x) * jnp.asarray(decay_growth(rules.exponential_decay, max_new_tokens))[step]
        eos = _is_eos(jnp.arange(V, dtype=jnp.int32), eos_token_ids)
        banned = x <= np.finfo(np.float32).min  # -inf, or what remove_invalid_values made of it
        x = jnp.where(eos & (step > start) & ~banned, boosted, x)  # a banned EOS stays banned
    if rules.suppress_tokens:
        x = jnp.where(among(rules.suppress_tokens), -jnp.inf, x)
    if rules.begin_suppress_tokens:
        x = jnp.where(among(rules.begin_suppress_tokens) & (step == rules.begin_suppress_step), -jnp.inf, x)
    return x


def _keep(buffer: Optional[jax.Array], step, x: jax.Array) -> Optional[jax.Array]:
    """buffer (N, R, V) with x (R, V) written at `step`; None (not asked for) stays None."""
    return None if buffer is None else lax.dynamic_update_slice(buffer, x[None].astype(buffer.dtype), (step, 0, 0))


# ----------------------------------------------------------------------- a re-used prompt's cache
def _past_length(past) -> int:
    """C: the positions per layer (keys, values) (B, nh, C, hs) hold (0 for None)."""
    return 0 if past is None else past[0][0].shape[2]


def _repeat_rows(x, n: int):
    """Each row n times over (num_return_sequences, beams): of an array (B, ...) or of a pytree of them (per
    layer (keys, values)); None stays None."""
    return jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), x)


def _holding(cache: KVCache, past) -> KVCache:
    """A copy of an empty cache with `past` (per layer (keys, values) (B, nh, C, hs)) written at its slots
    [0, C), its write position C."""
    cache = cache.copy()
    for layer, (k, v) in enumerate(past):
        cache.update(layer, k, v)
    cache.advance(_past_length(past))
    return cache


def _start_inputs(static: "_Static", embeds=None, past=None) -> dict:
    """What the prompt pass takes besides the ids, as the decode functions' keywords: inputs_embeds (`embeds`)
    or a re-used cache's keys and values (`past`); {} for neither. Their order is the compiled decode's extra
    positional arguments' (_generation_fn)."""
    return {name: x for name, x, on in (("embeds", embeds, static.embeds), ("past", past, static.past)) if on}


# --------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class _Rules:
    """The rules of opt_spec.generation beyond the basics that a call sets (from its Decoding), static:
    each traces into the program only when set, so a call without them keeps the plain program. Those
    that cannot apply are left off: forced BOS unless the rows start with one token or none (L == 1 only
    then: at step 0 or 1), the sampling filters unless sampling (beam sampling too), early stopping unless
    beam searching."""

    sequence_bias: tuple = ()            # ((token ids, bias), ...), bad words included as -inf
    forced_bos_token_id: Optional[int] = None
    forced_bos_step: int = 0             # where the rows hold one token: 1 - T
    forced_eos_token_ids: tuple = ()
    remove_invalid_values: bool = False
    exponential_decay: Optional[tuple] = None  # (start, factor)
    suppress_tokens: tuple = ()
    begin_suppress_tokens: tuple = ()
    begin_suppress_step: int = 0
    min_p: Optional[float] = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    renormalize_logits: bool = False
    early_stopping: bool = False         # beam search: a row is done as soon as it has K hypotheses

    @classmethod
    def of(cls, d: Decoding, row_length: int) -> "_Rules":
        """row_length: the prompt ids the rows start with (T; 0 for inputs_embeds alone)."""
        sampling = d.do_sample  # beam sampling filters too
        forced_bos = d.forced_bos_token_id if row_length <= 1 else None
        return cls(sequence_bias=d.sequence_bias, forced_bos_token_id=forced_bos,
                   forced_bos_step=1 - row_length if forced_bos is not None else 0,
                   forced_eos_token_ids=d.forced_eos_token_ids, remove_invalid_values=d.remove_invalid_values,
                   exponential_decay=d.exponential_decay if d.eos_token_ids else None,
                   suppress_tokens=d.suppress_tokens, begin_suppress_tokens=d.begin_suppress_tokens,
                   begin_suppress_step=d.begin_suppress_step if d.begin_suppress_tokens else 0,
                   min_p=d.min_p if sampling else None, typical_p=d.typical_p if sampling else 1.0,
                   epsilon_cutoff=d.epsilon_cutoff if sampling else 0.0,
                   eta_cutoff=d.eta_cutoff if sampling else 0.0, renormalize_logits=d.renormalize_logits,
                   early_stopping=d.is_beam_search and d.early_stopping is True)

@dataclasses.dataclass(frozen=True)
class _Static:
    """What shapes the traced program (one jitted function per distinct value)."""

    batch: int          # decoding rows: prompts x num_return_sequences (sampling), or prompts (beams)
    prompt: int         # P: the positions the prompt pass fills (cache slots before the first new token)
    max_new_tokens: int
    num_beams: int
    do_sample: bool
    top_k: int          # 0 when it keeps everything
    top_p: bool         # top_p < 1
    repetition: bool    # repetition_penalty != 1
    eos: int            # how many EOS ids
    no_repeat: int = 0  # no_repeat_ngram_size
    returned: int = 1   # num_return_sequences (beams)
    rules: _Rules = _Rules()
    keep_scores: bool = False   # output_scores: an (N, rows, V) buffer of each step's chosen-from scores
    keep_logits: bool = False   # output_logits: the same of the raw logits
    keep_indices: bool = False  # beam search's return_dict: each hypothesis's beam indices
    embeds: bool = False        # the prompt pass takes inputs_embeds (B, P, E) instead of the ids' embeddings
    offset: int = 0             # P - T: the embedded positions the rows lack (inputs_embeds without input_ids)
    past: int = 0               # C: the prompt's first positions a re-used cache holds (generate(past_key_values=)),
                                # given as keys and values (an argument, `past`) instead of fed
    filter_keep: int = 1        # tokens each sampling filter keeps at least (Decoding.filter_keep when sampling)

    @property
    def row_prompt(self) -> int:
        """T: the prompt ids the rows start with (what the rules see and generate returns); the cache slot
        of the rows' position i is i + offset."""
        return self.prompt - self.offset

    @property
    def candidates(self) -> int:
        return max(2, 1 + self.eos) * self.num_beams


class _Knobs(NamedTuple):
    """The numbers of a Decoding, as traced arguments (changing them does not recompile)."""

    temperature: jax.Array         # float32 ()
    top_p: jax.Array               # float32 ()
    repetition_penalty: jax.Array  # float32 ()
    eos_token_ids: jax.Array       # int32 (E,)
    pad_token_id: jax.Array        # int32 ()
    min_new_tokens: jax.Array      # int32 (): EOS ids are blocked while step < this (min_length folded in)
    length_norm: jax.Array         # float32 (N,): generated_length ** length_penalty for lengths 1..N
    best_norm: jax.Array           # float32 (N,): at each step, the norm a running beam is compared at


def _knobs(d: Decoding) -> _Knobs:
    """The call's numbers as traced arguments (length normalizers: opt_spec.generation.length_norms; the
    bound of beam search's stop: best_length)."""
    norms = length_norms(d.max_new_tokens, d.length_penalty)
    best = norms[[best_length(step, d) - 1 for step in range(d.max_new_tokens)]]
    return _Knobs(temperature=jnp.float32(d.temperature), top_p=jnp.float32(d.top_p),
                  repetition_penalty=jnp.float32(d.repetition_penalty),
                  eos_token_ids=jnp.asarray(np.array(d.eos_token_ids, np.int32).reshape(-1)),
                  pad_token_id=jnp.int32(d.pad_token_id),
                  min_new_tokens=jnp.int32(d.min_new_tokens),
                  length_norm=jnp.asarray(norms), best_norm=jnp.asarray(best))


class _Beams(NamedTuple):
    scores: jax.Array       # (B, K) float32: running beams' summed log-probabilities
    tokens: jax.Array       # (B, K, N) int32: running beams' generated tokens (pad beyond)
    done_scores: jax.Array  # (B, K) float32: finished hypotheses, length-normalized (-inf: none)
    done_tokens: jax.Array  # (B, K, N) int32
    done_length: jax.Array  # (B, K) int32
    row_done: jax.Array     # (B,) bool
    indices: Optional[jax.Array] = None       # (B, K, N) int32: the running beam each token extended (-1 beyond)
    done_indices: Optional[jax.Array] = None  # (B, K, N) int32: the same of the finished hypotheses


class _State(NamedTuple):
    """The decode loop's carry (greedy and sampling)."""

    step: jax.Array             # int32 (): tokens chosen so far
    tokens: jax.Array           # (B,) the last step's tokens
    cache: KVCache              # as the loop carries it (opt_flax.fast_paths.loop_cache)
    slots: jax.Array            # (B, T + N) int32: real tokens among the cache slots
    seen: Optional[jax.Array]   # (B, V) bool, with a repetition penalty
    finished: jax.Array         # (B,) bool
    out: jax.Array              # (B, N) int32: the new tokens (pad beyond)
    kept_scores: Optional[jax.Array] = None  # (N, B, V) float32 (output_scores)
    kept_logits: Optional[jax.Array] = None  # (N, B, V) float32 (output_logits)


class _BeamState(NamedTuple):
    step: jax.Array
    tokens: jax.Array           # (B*K,) the running beams' last tokens
    flat_parent: jax.Array      # (B*K,) their parents' rows
    cache: KVCache
    slots: jax.Array            # (B*K, T + N)
    beams: _Beams
    seen: Optional[jax.Array]
    kept_scores: Optional[jax.Array] = None  # (N, B*K, V) float32: the running beams' processed log-probs
    kept_logits: Optional[jax.Array] = None  # (N, B*K, V) float32


class _Candidates(NamedTuple):
    scores: jax.Array   # (B, C) best first
    parent: jax.Array   # (B, C) beam index
    token: jax.Array    # (B, C)
    history: jax.Array  # (B, C, N) the parent's tokens with this one written
    indices: Optional[jax.Array] = None  # (B, C, N) the parent's beam indices with b * K + parent written


class _Extras(NamedTuple):
    """What a decode returns besides the tokens, for return_dict_in_generate (None: not asked for)."""

    steps: jax.Array                              # int32 (): steps taken (one score array each)
    scores: Optional[jax.Array] = None            # (N, rows, V) float32
    logits: Optional[jax.Array] = None            # (N, rows, V) float32
    beam_indices: Optional[jax.Array] = None      # (B * n, N) int32
    sequences_scores: Optional[jax.Array] = None  # (B * n,) float32


# ------------------------------------------------------------------------------------ assisted decoding
class _Assistant(AssistantDrafts):
    """Assisted decoding's candidates from a smaller FlaxOPTForCausalLM, drafted greedily (each token the most
    probable; the draft ends after one given less than assistant_confidence_threshold) with a preallocated cache
    of its own, whose slots are the row's positions: it keeps those it has read across drafts, and a draft reads
    only the row's tokens after them, then drafts in one jitted while_loop (`_draft`: one program per number
    of tokens read, which is the prompt's, 1 or 2)."""

    def __init__(self, model, d: Decoding, prompt_mask: np.ndarray, capacity: int):
        T = prompt_mask.shape[0]
        config = model.config
        super().__init__(d)
        self.model = model
        self.cache = model.init_cache(1, capacity, pad_slots(T, capacity - T, config.max_position_embeddings))
        slots = np.ones((1, capacity), np.int32)  # the row's mask over every slot: the prompt's, then real tokens
        slots[0, :T] = prompt_mask
        self.slots = jnp.asarray(slots)
        self.fn = model.__dict__.setdefault("_assistant_draft_fn", jax.jit(functools.partial(_draft, model)))

    def propose(self, row: np.ndarray, room: int) -> list:
        k = min(room, self.draft)
        upto = self.upto = self.written = len(row)
        if k == 0:
            return []
        unread = jnp.asarray(row[None, self.valid:upto], jnp.int32)
        drafted, n, self.cache = self.fn(self.model.params, self.cache, self.slots, unread, jnp.int32(self.valid),
                                         jnp.int32(upto), jnp.int32(k),
                                         jnp.float32(self.d.assistant_confidence_threshold))
        n = int(n)
        self.written = upto + n - 1  # the last drafted token was never read
        return np.asarray(drafted)[:n].tolist()


def _draft(model, params, cache: KVCache, row_slots, unread, valid, upto, k, threshold):
    """An assistant's greedy draft (_Assistant): the row's tokens `unread` (1, n) at slots [valid, upto) of its
    cache (which holds the row before them), then up to k tokens, each read in turn but the last, stopping
    after one of probability below `threshold`. row_slots (1, S): the row's mask over every cache slot. (The
    drafted tokens (S,) int32 (the first `count` of them), count, the cache.)"""
    S = row_slots.shape[1]
    slots = jnp.where(jnp.arange(S) < upto, row_slots, 0)

    def most_probable(logits):  # float32 (1, V) -> (token, its probability)
        probs = jax.nn.softmax(logits[0], axis=-1)
        token = jnp.argmax(probs).astype(jnp.int32)
        return token, probs[token]

    logits, cache = model._last_logits(params, unread, slots, KVCache(cache.keys, cache.values, valid))
    token, p = most_probable(logits)
    start = (jnp.int32(1), jnp.zeros((S,), jnp.int32).at[0].set(token), loop_cache(cache), slots,
             (k == 1) | (p < threshold))

    def read(carry):  # the last drafted token through the assistant, then the next drafted
        count, drafted, cache, slots, _ = carry
        slots = slots.at[0, upto + count - 1].set(1)
        logits, cache = model._last_logits(params, drafted[count - 1][None, None], slots, model_cache(cache))
        token, p = most_probable(logits)
        return count + 1, drafted.at[count].set(token), loop_cache(cache), slots, (count + 1 == k) | (p < threshold)

    count, drafted, cache, _, _ = lax.while_loop(lambda carry: ~carry[4], read, start)
    return drafted, count, model_cache(cache)


# ------------------------------------------------------------------------------------ the mixin
class GenerationMixin(GenerationDefaults):
    """Adds `generate` to FlaxOPTForCausalLM (which provides config, params, dtype, init_cache);
    generation_config from opt_spec.GenerationDefaults."""

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, logits_processor=None,
                 streamer=None, tokenizer=None, params=None, stopping_criteria=None, prefix_allowed_tokens_fn=None,
                 inputs_embeds=None, assistant_model=None, **kwargs):
        """The prompts followed by the new tokens, int32 (B * num_return_sequences, T + N); settings by
        Hugging Face's names as keywords or in generation_config, defaults from model.generation_config;
        see opt_spec.generation. With return_dict_in_generate=True, the record of opt_spec.outputs
        (GenerateDecoderOnlyOutput, or GenerateBeamDecoderOnlyOutput for beam search) holding them.

        input_ids (B, T) is a left-padded batch, attention_mask (B, T) 1 for real tokens (default all
        ones). inputs_embeds (B, P, word_embed_proj_dim) floats are what the model sees at the prompt's P
        positions instead (attention_mask (B, P)); the rows then start with input_ids (B, P) when given,
        else empty (T = 0: only the new tokens are returned), as in Hugging Face. params overrides the
        model's parameters. past_key_values: the model's KVCache of the rows' first C < T prompt tokens (a
        forward over input_ids[:, :C] with attention_mask[:, :C] fills it) to re-use: the prompt pass feeds the
        last T - C only, and the cache is left as it is (opt_spec.generation, "Re-using a prompt's cache").
        assistant_model (a smaller FlaxOPTForCausalLM of the same vocabulary) or prompt_lookup_num_tokens: assisted
        decoding (opt_spec.generation, "Assisted decoding"; one row, greedy or sampling), on the host loop; an
        assistant reads the whole prompt itself (with its own params), the checks use `params`.
        """
        config = self.config
        reused = kwargs.pop("past_key_values", None)
        ids, mask, embeds = self._generation_inputs(input_ids, attention_mask, inputs_embeds)
        (B, P), T = mask.shape, ids.shape[1]  # the model's prompt positions; the rows' prompt ids (T = P or 0)
        d = self._decoding(generation_config, kwargs, P, T)
        past = None  # per layer (keys, values) (B, nh, C, hs) of the prompt's first C positions
        if reused is not None:
            past = self._reused_past(reused, ids, embeds is not None)
        assisted = check_assisted(d, assistant_model, B, embeds is not None, config.vocab_size, "flax")
        check_prompt(mask, d.max_new_tokens, config.max_position_embeddings)
        processors = check_extras(d, logits_processor, streamer, tokenizer)
        criteria = check_host_rules(stopping_criteria, prefix_allowed_tokens_fn, d.max_time)
        if params is None:
            params = self.params
        elif params is not self.params:
            from .pretrained import check_params  # a lazy import: pretrained imports this module

            check_params(params, config, self.head)
        if not d.is_beam_search:  # each prompt repeated num_return_sequences times, each row sampled apart
            ids, mask = np.repeat(ids, d.num_return_sequences, 0), np.repeat(mask, d.num_return_sequences, 0)
            embeds, past = _repeat_rows(embeds, d.num_return_sequences), _repeat_rows(past, d.num_return_sequences)
        B = ids.shape[0]
        static = _Static(batch=B, prompt=P, max_new_tokens=d.max_new_tokens, num_beams=d.num_beams,
                         do_sample=d.do_sample, top_k=d.top_k if d.do_sample and 0 < d.top_k < config.vocab_size else 0,
                         top_p=d.do_sample and d.top_p < 1.0, repetition=d.repetition_penalty != 1.0,
                         eos=len(d.eos_token_ids), no_repeat=d.no_repeat_ngram_size,
                         returned=d.num_return_sequences if d.is_beam_search else 1, rules=_Rules.of(d, T),
                         keep_scores=d.return_dict_in_generate and d.output_scores,
                         keep_logits=d.return_dict_in_generate and d.output_logits,
                         keep_indices=d.return_dict_in_generate and d.is_beam_search,
                         embeds=embeds is not None, offset=P - T, past=_past_length(past),
                         filter_keep=d.filter_keep if d.do_sample else 1)
        if d.seed is not None:
            seed = d.seed
        else:  # a fresh draw per call, as torch.seed() does
            seed = int.from_bytes(os.urandom(4), "little") if d.do_sample else 0
        args = (params, jnp.asarray(ids), jnp.asarray(mask), _knobs(d), jax.random.key(seed))
        starts = _start_inputs(static, embeds, past)  # what the prompt pass takes besides the ids ({} mostly)
        beam_rows = [] if beam_step_rows(d) else None  # beam search: each step's running beams' new tokens
        if assisted or needs_host(d, processors, streamer, criteria, prefix_allowed_tokens_fn):
            stops = StopStrings(d.stop_strings, tokenizer) if d.stop_strings else None
            if d.is_beam_search:
                loop = functools.partial(self._host_beam_search, rows=beam_rows)
            else:
                drafter = self._drafter(d, assistant_model, mask) if assisted else None
                loop = functools.partial(self._host_decode, drafter=drafter)
            new, length, extras = loop(static, *args, **starts, processors=processors, streamer=as_streamer(streamer),
                                       stops=stops, mask_np=mask[:, P - T:], criteria=criteria,
                                       prefix=prefix_allowed_tokens_fn)
        else:  # the ids path's programs take no more arguments than they did
            new, length, extras = self._generation_fn(static)(*args, *starts.values())
        n = int(length)  # steps taken (greedy, sampling) or the longest chosen hypothesis (beams)
        prompts = np.repeat(ids, d.num_return_sequences, 0) if d.is_beam_search else ids
        if self.sharding is not None:  # new tokens are split over the mesh (and perhaps over processes)
            sequences = jnp.asarray(np.concatenate([prompts, self.sharding.gather(new)[:, :n]], axis=1))
        else:
            sequences = jnp.concatenate([jnp.asarray(prompts), new[:, :n]], axis=1)
        if not d.return_dict_in_generate:
            return sequences
        steps = int(extras.steps)

        def per_step(buffer):  # (N, rows, V) -> a tuple of the steps taken, as Hugging Face returns them
            return None if buffer is None else tuple(buffer[s] for s in range(steps))

        scores, logits = per_step(extras.scores), per_step(extras.logits)
        hidden_states, attentions = None, None
        if d.is_beam_search:
            if beam_rows is not None:  # one forward per step over its running beams
                K, C = d.num_beams, static.past
                beams = (np.repeat(ids, K, 0), np.repeat(mask, K, 0))
                embeds, past = _repeat_rows(embeds, K), _repeat_rows(past, K)
                hidden_states, attentions = replayed_step_outputs(P - C, len(beam_rows), lambda s: self._replay(
                    params, *beams, beam_rows[s], s + 1, d, embeds, past), C)
            return GenerateBeamDecoderOnlyOutput(sequences=sequences, sequences_scores=extras.sequences_scores,
                                                 scores=scores, logits=logits, beam_indices=extras.beam_indices[:, :n],
                                                 hidden_states=hidden_states, attentions=attentions)
        if d.output_hidden_states or d.output_attentions:  # one forward over the rows, cut per step
            hidden_states, attentions = step_outputs(
                P - static.past, n, *self._replay(params, ids, mask, sequences[:, T:], n, d, embeds, past), static.past)
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=logits,
                                         hidden_states=hidden_states, attentions=attentions)

    def _drafter(self, d: Decoding, assistant, mask: np.ndarray):
        """Where an assisted call's candidates come from (opt_spec.generation.check_assisted said it is one):
        an _Assistant (of the row's prompt mask, mask (1, P)), or a _PromptLookup."""
        if self.sharding is not None or getattr(assistant, "sharding", None) is not None:
            raise ValueError("assisted decoding (prompt_lookup_num_tokens, assistant_model) runs on one device: "
                             "the model or the assistant is laid out on a device mesh (opt_flax.distributed); "
                             "generate without assistance there")
        if assistant is None:
            return PromptLookup(d)
        N = d.max_new_tokens
        check_prompt(mask, N, assistant.config.max_position_embeddings)
        return _Assistant(assistant, d, mask[0], mask.shape[1] + N)

    def _replay(self, params, ids, mask, new, steps: int, d: Decoding, embeds=None, past=None) -> tuple:
        """(hidden_states, attentions) of one forward over rows' first positions, for `steps` steps of generate's
        record (opt_spec.generation.step_outputs): the prompt ids (R, T) seen through mask (R, P) (the
        embeddings `embeds` (R, P, E) instead, when the call had them; the first C ids' keys and values `past`
        in a cache instead, when the call re-used a cache: the forward then covers the last T - C), then the new
        tokens `new` (R, >= steps - 1) but the last step's."""
        new, cache, C = new[:, :steps - 1], None, _past_length(past)
        forward_mask = jnp.asarray(step_forward_mask(mask, steps))
        if past is not None:  # a cache of exactly the forward's keys, holding the past
            width = forward_mask.shape[1]
            cache = _holding(self.init_cache(len(ids), width, pad_slots(width, 0, self.config.max_position_embeddings)),
                             past)
        if embeds is None:
            inputs = dict(input_ids=jnp.concatenate([jnp.asarray(ids)[:, C:], new], axis=1))
        else:  # the given embeddings, then the model's own of the new tokens fed back
            table, dtype = params["model"]["decoder"]["embed_tokens"]["embedding"], self.module.numerics.dtype
            fed = jnp.take(table, new, axis=0)  # (R, steps - 1, E)
            inputs = dict(inputs_embeds=jnp.concatenate([embeds.astype(dtype), fed.astype(dtype)], axis=1))
        out = self(**inputs, attention_mask=forward_mask, params=params, past_key_values=cache,
                   output_hidden_states=d.output_hidden_states, output_attentions=d.output_attentions)
        return out.hidden_states, out.attentions

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits=False) -> jax.Array:
        """Each generated token's score (rows, steps) float32 from generate's record (sequences, scores,
        and beam_indices for beam search; normalize_logits: log_softmax of each step's scores first),
        Hugging Face's method: opt_spec.generation.transition_scores on NumPy copies."""
        return jnp.asarray(transition_scores(sequences, scores, beam_indices, normalize_logits))

    def _generation_inputs(self, input_ids, attention_mask, inputs_embeds=None):
        """int32 NumPy (input_ids (B, T), attention_mask (B, P)) and inputs_embeds as a jax.Array (or None),
        checked with messages naming the problem (opt_spec.generation.prompt_inputs)."""
        ids, mask = prompt_inputs(input_ids, attention_mask, self.config.vocab_size, inputs_embeds=inputs_embeds,
                                  width=self.config.word_embed_proj_dim)
        embeds = None if inputs_embeds is None else jnp.asarray(inputs_embeds)
        return ids.astype(np.int32), mask.astype(np.int32), embeds

    def _generation_fn(self, static: _Static):
        """The jitted decode for these static settings, built once per model."""
        fns = self.__dict__.setdefault("_generation_fns", {})
        if static not in fns:
            decode = self._beam_search if static.num_beams > 1 else self._decode
            names = tuple(_start_inputs(static, embeds=True, past=True))

            def fn(params, ids, mask, knobs, key, *starts):  # starts: (inputs_embeds,), (past,) or ()
                return decode(static, params, ids, mask, knobs, key, **dict(zip(names, starts, strict=True)))

            if self.sharding is None:
                fns[static] = jax.jit(fn)
            else:  # explicit shardings, batch on fsdp, the cache on (batch, heads) (opt_flax.distributed)
                from .distributed import generation_fn

                fns[static] = generation_fn(self, fn, static.batch, static.embeds, static.past > 0)
        return fns[static]

    def _reused_past(self, cache, ids, beside_embeds: bool = False) -> tuple:
        """generate's past_key_values: the model's KVCache of the rows' first C < T prompt tokens, as per layer
        (keys, values) (B, nh, C, hs) in the model's dtype (the slots it has written). The cache is left as it is;
        with inputs_embeds it is refused."""
        check_reused_cache(cache, isinstance(cache, KVCache), "the model's KVCache (opt_flax.modeling.KVCache, from "
                           "a forward over the prompt's first tokens)", "inputs_embeds" if beside_embeds else None)
        C = int(cache.length)
        past = tuple((k[:, :, :C].astype(self.dtype), v[:, :, :C].astype(self.dtype))
                     for k, v in zip(cache.keys, cache.values))
        config = self.config
        reused_prompt_positions(past, config.num_hidden_layers, len(ids),
                                config.num_attention_heads, config.head_dim, ids.shape[1])
        return past

    def _host_piece(self, static: _Static, name, fn):
        """A jitted piece of the step-by-step loop (static settings bound), built once per model."""
        fns = self.__dict__.setdefault("_host_generation_fns", {})
        if (static, name) not in fns:
            fns[static, name] = jax.jit(functools.partial(fn, static))
        return fns[static, name]

    def _count_trace(self) -> None:
        """Counts how often a decode loop is traced (runs at trace time only; read by tests)."""
        self._generation_traces = getattr(self, "_generation_traces", 0) + 1

    # ----------------------------------------------------------------------------------- model
    def _last_logits(self, params, x, slots, cache: KVCache, every: bool = False) -> tuple[jax.Array, KVCache]:
        """float32 logits (B, V) of the last of the new positions x: token ids (B, T), or their embeddings
        (B, T, E) (inputs_embeds); the cache filled with them. slots (B, S) is the attention mask over every
        cache slot. every=True: the logits (B, T, V) of every new position (assisted decoding's check)."""
        config, numerics = self.config, self.module.numerics
        base = OPTModule(config, numerics)
        inputs = dict(inputs_embeds=x) if x.ndim == 3 else dict(input_ids=x)
        out = base.apply({"params": params["model"]}, attention_mask=slots, past_key_values=cache, **inputs)
        x = out.last_hidden_state if every else out.last_hidden_state[:, -1]  # (B, E): mostly the last position
        if config.tie_word_embeddings:
            embedding = params["model"]["decoder"]["embed_tokens"]["embedding"]  # (V, E)
            logits = jnp.einsum("...e,ve->...v", x, embedding.astype(numerics.dtype), precision=numerics.precision)
        else:
            kernel = params["lm_head"]["kernel"]  # (E, V)
            logits = jnp.einsum("...e,ev->...v", x, kernel.astype(numerics.dtype), precision=numerics.precision)
        return logits.astype(jnp.float32), out.past_key_values  # (B, V), or (B, T, V)

    def _prefill(self, params, ids, mask, L: int, embeds=None, past=None):
        """Runs the prompt into a fresh cache of L slots: (logits, cache, slot mask (B, L)). The model sees
        embeds (B, P, E) when given, else the ids (B, P); mask (B, P). past (per layer (keys, values)
        (B, nh, C, hs), or None): the first C positions' keys and values, written into the cache instead of
        fed (the ids' last P - C are)."""
        B, P = mask.shape
        cache = self.init_cache(B, L, pad_slots(P, L - P, self.config.max_position_embeddings))
        if past is not None:
            cache, ids = _holding(cache, past), ids[:, _past_length(past):]
        slots = jnp.zeros((B, L), jnp.int32).at[:, :P].set(mask)  # (B, L) over every cache slot
        logits, cache = self._last_logits(params, ids if embeds is None else embeds, slots, cache)
        return logits, cache, slots

    @staticmethod
    def _prompt_seen(ids, mask, V: int) -> jax.Array:
        """(B, V) bool: token ids among each row's real prompt tokens."""
        B = ids.shape[0]
        counts = jnp.zeros((B, V), jnp.int32).at[jnp.arange(B)[:, None], ids].add(mask)
        return counts > 0

    def _rules(self, static: _Static, scores, seen, seq, slots, now, step, knobs: _Knobs, allowed=None):
        """Rules 0-3 of opt_spec.generation on float32 scores (R, V) (rule 2's bans and rule 3's EOS block
        commute: both set -inf; prefix_allowed_tokens_fn's mask `allowed` (R, V) bool, when given, follows
        them and the rest of rule 3 follows it)."""
        rules, eos = static.rules, knobs.eos_token_ids if static.eos else None
        if rules.sequence_bias:
            scores = bias_sequences(scores, seq, now, rules.sequence_bias)
        scores = process_logits(scores, seen, step, knobs.repetition_penalty, eos, knobs.min_new_tokens)
        if static.no_repeat and seq.shape[1] >= static.no_repeat:
            scores = jnp.where(ngram_bans(seq, slots, now, static.no_repeat, scores.shape[-1]), -jnp.inf, scores)
        if allowed is not None:  # added, as Hugging Face adds its -inf mask
            scores = scores + jnp.where(allowed, jnp.float32(0), jnp.float32(-jnp.inf))
        return token_rules(scores, step, rules, eos, static.max_new_tokens)

    def _buffers(self, static: _Static, rows: int) -> dict:
        """The carry's output buffers (N, rows, V) float32, each only when asked for."""
        shape = (static.max_new_tokens, rows, self.config.vocab_size)
        return dict(kept_scores=jnp.zeros(shape, jnp.float32) if static.keep_scores else None,
                    kept_logits=jnp.zeros(shape, jnp.float32) if static.keep_logits else None)

    # ---------------------------------------------------------------------- greedy and sampling
    # One step is scores (rules 1-3) -> [host: logits processors] -> pick (rules 5-6) -> [host: stop
    # strings, streamer] -> feed (the chosen tokens through the model). The fast path traces the same
    # pieces into one while_loop.
    def _start(self, static: _Static, params, ids, mask, knobs: _Knobs, embeds=None, past=None):
        """The prompt pass (ids (B, T) the rows' prompt, mask (B, P), embeds (B, P, E) or None, past: a re-used
        cache's keys and values of the first C positions or None): (logits (B, V), the state before the first
        step)."""
        B, P, N, V = static.batch, static.prompt, static.max_new_tokens, self.config.vocab_size
        logits, cache, slots = self._prefill(params, ids, mask, P + N, embeds, past)
        seen = self._prompt_seen(ids, mask[:, static.offset:], V) if static.repetition else None
        state = _State(step=jnp.int32(0), tokens=jnp.zeros((B,), jnp.int32), cache=loop_cache(cache), slots=slots,
                       seen=seen, finished=jnp.zeros((B,), bool), out=jnp.full((B, N), knobs.pad_token_id, jnp.int32),
                       **self._buffers(static, B))
        return logits, state

    def _scores(self, static: _Static, state: _State, logits, ids, knobs: _Knobs, allowed=None):
        """Rules 0-3 on this step's logits (B, V): (scores, the state with the logits kept if asked for)."""
        seq = jnp.concatenate([ids, state.out], axis=1)  # (B, T + N): the rows (position i: cache slot i + offset)
        scores = self._rules(static, logits, state.seen, seq, state.slots[:, static.offset:],
                             static.row_prompt + state.step, state.step, knobs, allowed)
        return scores, state._replace(kept_logits=_keep(state.kept_logits, state.step, logits))

    def _pick(self, static: _Static, state: _State, scores, knobs: _Knobs, key) -> _State:
        """Rules 5-6: the sampling filters, renormalization, this step's tokens written out (and the scores
        they were chosen from, if asked for); the state after the step."""
        step = state.step
        scores = self._sampling_filters(static, scores, knobs)
        if static.do_sample:
            tokens = jax.random.categorical(jax.random.fold_in(key, step), scores, axis=-1)
        else:
            tokens = jnp.argmax(scores, axis=-1)  # lowest id on ties
        tokens = jnp.where(state.finished, knobs.pad_token_id, tokens.astype(jnp.int32))  # (B,)
        finished = state.finished
        if static.eos:
            finished = finished | _is_eos(tokens, knobs.eos_token_ids)
        seen = state.seen
        if seen is not None:
            seen = seen.at[jnp.arange(static.batch), tokens].set(True)
        return state._replace(step=step + 1, tokens=tokens, seen=seen, finished=finished,
                              out=lax.dynamic_update_slice(state.out, tokens[:, None], (0, step)),
                              kept_scores=_keep(state.kept_scores, step, scores))

    @staticmethod
    def _sampling_filters(static: _Static, scores, knobs: _Knobs):
        """Rule 5's sampling filters when sampling (beams too), then renormalize_logits when asked."""
        if static.do_sample:
            scores = filter_for_sampling(scores, knobs.temperature, static.top_k, knobs.top_p if static.top_p else None,
                                         static.rules, static.filter_keep)
        if static.rules.renormalize_logits:
            scores = jax.nn.log_softmax(scores, axis=-1)
        return scores

    def _feed(self, static: _Static, params, state: _State):
        """The last tokens through the model: (next logits, state)."""
        B = static.batch
        slots = lax.dynamic_update_slice(state.slots, jnp.ones((B, 1), jnp.int32), (0, static.prompt + state.step - 1))
        logits, cache = self._last_logits(params, state.tokens[:, None], slots, model_cache(state.cache))
        return logits, state._replace(cache=loop_cache(cache), slots=slots)

    def _check_candidates(self, static: _Static, params, state: _State, candidates):
        """Assisted decoding's forward pass (one row): the last chosen token at its slot, which becomes the
        cache's write position again (what an earlier check wrote from there, for candidates not taken, is
        dropped: its slots cleared), then the candidates (k,) after it. (The float32 logits (1, V) of the k + 1
        positions, a tuple; the state with the cache and slots holding them.) Jitted once per k."""
        L = state.slots.shape[1]
        at = static.prompt + state.step - 1  # the last token's slot
        tokens = jnp.concatenate([state.tokens[:, None], candidates[None, :].astype(jnp.int32)], axis=1)  # (1, k + 1)
        index = jnp.arange(L)
        slots = jnp.where(index < at, state.slots, (index < at + tokens.shape[1]).astype(jnp.int32))
        cache = model_cache(state.cache)
        logits, cache = self._last_logits(params, tokens, slots, KVCache(cache.keys, cache.values, at), every=True)
        ahead = tuple(logits[:, i] for i in range(tokens.shape[1]))
        return ahead, state._replace(cache=loop_cache(cache), slots=slots)

    def _decode(self, static: _Static, params, ids, mask, knobs: _Knobs, key, embeds=None, past=None):
        """(new tokens (B, N) int32 padded with pad_token_id, steps taken int32 (), _Extras)."""
        self._count_trace()
        def choose(logits, state: _State):
            scores, state = self._scores(static, state, logits, ids, knobs)
            return self._pick(static, state, scores, knobs, key)

        state = choose(*self._start(static, params, ids, mask, knobs, embeds, past))

        def keep_going(state: _State):
            return (state.step < static.max_new_tokens) & ~jnp.all(state.finished)

        def next_token(state: _State):
            return choose(*self._feed(static, params, state))

        state = lax.while_loop(keep_going, next_token, state)
        return state.out, state.step, self._extras(state)

    @staticmethod
    def _extras(state: _State) -> _Extras:
        return _Extras(state.step, state.kept_scores, state.kept_logits)

    def _host_decode(self, static: _Static, params, ids, mask, knobs: _Knobs, key, embeds=None, past=None, *,
                     processors, streamer, stops, mask_np, criteria=(), prefix=None, drafter=None):
        """The fast path's pieces one step at a time, with the host's extras between them: per step one
        jitted call (the forward, the scores and the choice), two with logits processors between.
        prefix_allowed_tokens_fn is asked for each row's tokens before the step; the stopping criteria are
        asked after it, and a row they stop is finished as an EOS row is. mask_np: the rows' prompt mask (B, T).
        drafter (_drafter's; one row): assisted decoding. After the first step the forward is a check of
        the drafter's candidates (_check_candidates) whose logits the next steps choose from, one jitted call
        per step each (the same scores and pick as without it), while the chosen tokens are the candidates."""
        def first(static, params, ids, mask, embeds, past, knobs, allowed):
            logits, state = self._start(static, params, ids, mask, knobs, embeds, past)
            return self._scores(static, state, logits, ids, knobs, allowed)

        def later(static, params, state, ids, knobs, allowed):
            logits, state = self._feed(static, params, state)
            return self._scores(static, state, logits, ids, knobs, allowed)

        def first_pick(static, params, ids, mask, embeds, past, knobs, allowed, key):  # no processors: nothing between
            scores, state = first(static, params, ids, mask, embeds, past, knobs, allowed)
            return self._pick(static, state, scores, knobs, key)

        def later_pick(static, params, state, ids, knobs, allowed, key):
            scores, state = later(static, params, state, ids, knobs, allowed)
            return self._pick(static, state, scores, knobs, key)

        def ahead_pick(static, state, logits, ids, knobs, allowed, key):  # assisted: logits a check computed
            scores, state = self._scores(static, state, logits, ids, knobs, allowed)
            return self._pick(static, state, scores, knobs, key)

        if processors:
            pieces = dict(first=first, later=later, ahead=self._scores, pick=self._pick)
        else:
            pieces = dict(first=first_pick, later=later_pick, ahead=ahead_pick)
        if drafter is not None:
            pieces["check"] = self._check_candidates
        fn = {name: self._host_piece(static, (name, bool(processors)), piece) for name, piece in pieces.items()}
        B, V, N = static.batch, self.config.vocab_size, static.max_new_tokens
        if streamer is not None:
            streamer.put(np.asarray(ids))
        seq, finished = [np.asarray(ids)], np.zeros(B, bool)  # the rows so far, on the host
        state = ahead = candidates = None  # assisted: the last check's logits and candidates
        used = 0                           # assisted: the candidates the steps since that check chose
        for step in range(N):
            allowed = None
            if prefix is not None:  # each row so far (T + step,) as a jax.Array, its batch_id its index
                rows = np.concatenate(seq, axis=1)
                allowed = jnp.asarray(allowed_tokens(prefix, [jnp.asarray(r) for r in rows], 1, V))
            if step == 0:
                name, args = "first", (params, ids, mask, embeds, past, knobs, allowed)
            elif drafter is None:
                name, args = "later", (params, state, ids, knobs, allowed)
            else:
                name, args = "ahead", (state, ahead[used], ids, knobs, allowed)
            if processors:
                scores, state = fn[name](*args)
                scores = apply_processors(processors, jnp.concatenate([ids, state.out[:, :step]], axis=1), scores)
                state = fn["pick"](state, jnp.asarray(scores, jnp.float32), knobs, key)
            else:
                state = fn[name](*args, key)
            tokens, live = np.asarray(state.tokens), ~finished
            seq.append(tokens[:, None])
            if streamer is not None:
                streamer.put(tokens)
            finished = np.asarray(state.finished)
            if stops is not None:
                real = np.concatenate([mask_np, np.ones((B, step + 1), np.int32)], axis=1)
                finished = finished | stops.hits(np.concatenate(seq, axis=1), real, live)
            if criteria:  # the rows including this step's token, and the scores so far when kept
                so_far = jnp.concatenate([ids, state.out[:, :step + 1]], axis=1)
                finished = finished | criteria_hits(criteria, so_far, self._scores_so_far(state.kept_scores, step),
                                                    B, np.asarray)
            if stops is not None or criteria:
                state = state._replace(finished=jnp.asarray(finished))
            if finished.all():
                break
            if drafter is None or step + 1 == N:
                continue
            if candidates is not None and used < len(candidates) and int(tokens[0]) == candidates[used]:
                used += 1  # the step chose the candidate: the next one's logits are ready
                continue
            if candidates is not None:  # a mismatch, or every candidate taken: check new ones
                drafter.taken(used, len(candidates))
            candidates, used = drafter.propose(np.concatenate(seq, axis=1)[0], N - step - 2), 0
            ahead, state = fn["check"](params, state, jnp.asarray(candidates, jnp.int32))
        if streamer is not None:
            streamer.end()
        return state.out, state.step, self._extras(state)

    @staticmethod
    def _scores_so_far(kept: Optional[jax.Array], step: int) -> Optional[tuple]:
        """What a stopping criterion gets as scores: the steps' kept scores (N, R, V) up to `step` as a tuple
        of (R, V), or None when output_scores did not ask for them (Hugging Face's convention)."""
        return None if kept is None else tuple(kept[s] for s in range(step + 1))

    # ------------------------------------------------------------------------------ beam search
    # One step is scores (log_softmax, rules 0-3) -> [host: logits processors] -> candidates (the sampling
    # filters when sampling, renormalized if asked; drawn when sampling) -> [host: stop strings on the
    # candidates] -> update (finished hypotheses, running beams) -> feed.
    def _beam_start(self, static: _Static, params, ids, mask, knobs: _Knobs, embeds=None, past=None):
        B, P, N, K, V = static.batch, static.prompt, static.max_new_tokens, static.num_beams, self.config.vocab_size
        ids_k, mask_k = jnp.repeat(ids, K, axis=0), jnp.repeat(mask, K, axis=0)  # (B*K, T), (B*K, P)
        embeds_k, past_k = _repeat_rows(embeds, K), _repeat_rows(past, K)        # (B*K, P, E), (B*K, nh, C, hs)
        logits, cache, slots = self._prefill(params, ids_k, mask_k, P + N, embeds_k, past_k)
        pad = knobs.pad_token_id
        no_index = jnp.full((B, K, N), -1, jnp.int32) if static.keep_indices else None
        beams = _Beams(scores=jnp.full((B, K), -jnp.inf, jnp.float32).at[:, 0].set(0.0),  # one live beam
                       tokens=jnp.full((B, K, N), pad, jnp.int32),
                       done_scores=jnp.full((B, K), -jnp.inf, jnp.float32),
                       done_tokens=jnp.full((B, K, N), pad, jnp.int32),
                       done_length=jnp.zeros((B, K), jnp.int32), row_done=jnp.zeros((B,), bool),
                       indices=no_index, done_indices=no_index)
        seen = self._prompt_seen(ids_k, mask_k[:, static.offset:], V) if static.repetition else None
        zeros = jnp.zeros((B * K,), jnp.int32)
        return logits, _BeamState(jnp.int32(0), zeros, zeros, cache, slots, beams, seen,
                                  **self._buffers(static, B * K))

    def _beam_scores(self, static: _Static, state: _BeamState, logits, ids, knobs: _Knobs, allowed=None):
        """log_softmax of the logits, then rules 0-3 (as Hugging Face orders them for beams): (log-probs
        (B*K, V), the state with the logits kept if asked for)."""
        B, K, N = state.beams.tokens.shape
        seq = jnp.concatenate([jnp.repeat(ids, K, axis=0), state.beams.tokens.reshape(B * K, N)], axis=1)  # rows
        scores = self._rules(static, jax.nn.log_softmax(logits, axis=-1), state.seen, seq,
                             state.slots[:, static.offset:], static.row_prompt + state.step, state.step, knobs, allowed)
        return scores, state._replace(kept_logits=_keep(state.kept_logits, state.step, logits))

    def _beam_candidates(self, static: _Static, state: _BeamState, logprobs, knobs: _Knobs,
                         key) -> tuple[_Candidates, _BeamState]:
        """The C continuations per row, best first (beam sampling: the sampling filters first, then drawn
        without replacement with `key` folded with the step, in the order drawn): scores, parents, tokens and
        histories (and beam indices, if kept); the state with the processed log-probs (renormalized if asked)
        kept if asked for."""
        B, K, N = state.beams.tokens.shape
        V = logprobs.shape[-1]
        logprobs = self._sampling_filters(static, logprobs, knobs)
        state = state._replace(kept_scores=_keep(state.kept_scores, state.step, logprobs))
        candidates = (state.beams.scores[..., None] + logprobs.reshape(B, K, V)).reshape(B, K * V)
        if static.do_sample:
            cand_index = draw_without_replacement(candidates, static.candidates, jax.random.fold_in(key, state.step))
            cand_scores = jnp.take_along_axis(candidates, cand_index, axis=1)  # (B, C) in the order drawn
        else:
            cand_scores, cand_index = lax.top_k(candidates, static.candidates)  # (B, C) best first, lower index on ties
        parent, token = cand_index // V, cand_index % V
        history = jnp.take_along_axis(state.beams.tokens, parent[..., None], axis=1)  # (B, C, N)
        history = lax.dynamic_update_slice(history, token[..., None], (0, 0, state.step))
        indices = state.beams.indices
        if indices is not None:  # Hugging Face's beam index: b * K + k of the running beam extended
            indices = jnp.take_along_axis(indices, parent[..., None], axis=1)
            flat = (jnp.arange(B, dtype=jnp.int32)[:, None] * K + parent).astype(jnp.int32)  # (B, C)
            indices = lax.dynamic_update_slice(indices, flat[..., None], (0, 0, state.step))
        return _Candidates(cand_scores, parent, token, history, indices), state

    def _beam_update(self, static: _Static, state: _BeamState, c: _Candidates, stopped, knobs: _Knobs):
        """Finished hypotheses and running beams after this step's candidates; `stopped` (B, C) marks
        candidates that ended a stop string (the host's check; all False otherwise)."""
        B, K, C, step, beams = static.batch, static.num_beams, static.candidates, state.step, state.beams
        rank = jnp.arange(C, dtype=jnp.int32)
        if static.eos:
            stopped = stopped | _is_eos(c.token, knobs.eos_token_ids)
        stopped = stopped | (step == static.max_new_tokens - 1)  # at the length limit every candidate stops
        norm = knobs.length_norm[step]
        # finished candidates: stopped among the first K, scored by their length-normalized sum
        finishing = stopped & (rank < K) & ~beams.row_done[:, None] & jnp.isfinite(c.scores)
        normalized = jnp.where(finishing, c.scores / norm, -jnp.inf)
        pool_scores = jnp.concatenate([beams.done_scores, normalized], axis=1)  # (B, K + C)
        pool_tokens = jnp.concatenate([beams.done_tokens, c.history], axis=1)   # (B, K + C, N)
        pool_length = jnp.concatenate([beams.done_length, jnp.full(c.token.shape, step + 1, jnp.int32)], axis=1)
        best = lax.top_k(pool_scores, K)[1]  # (B, K)
        done_scores = jnp.take_along_axis(pool_scores, best, axis=1)
        done_length = jnp.take_along_axis(pool_length, best, axis=1)
        done_tokens = jnp.take_along_axis(pool_tokens, best[..., None], axis=1)
        done_indices = indices = None
        if c.indices is not None:
            pool_indices = jnp.concatenate([beams.done_indices, c.indices], axis=1)
            done_indices = jnp.take_along_axis(pool_indices, best[..., None], axis=1)
        # running beams: the first K candidates that did not stop (then stopped ones, lowered by 1e9)
        order = jnp.argsort(jnp.where(stopped, rank + C, rank), axis=-1)[:, :K]  # (B, K)
        lowered = c.scores - jnp.float32(1e9) * stopped.astype(jnp.float32)
        if static.do_sample:  # drawn candidates come in no order of score: the K best-scored of them instead
            order = lax.top_k(lowered, K)[1]  # best first, the earlier drawn on ties
        scores = jnp.where(beams.row_done[:, None], beams.scores, jnp.take_along_axis(lowered, order, axis=1))
        parent_next = jnp.take_along_axis(c.parent, order, axis=1)
        running = jnp.take_along_axis(c.history, order[..., None], axis=1)  # (B, K, N)
        if c.indices is not None:
            indices = jnp.take_along_axis(c.indices, order[..., None], axis=1)
        # a row is done when K hypotheses are finished and (early_stopping=True) at once, or else when no
        # running beam, normalized at opt_spec.generation.best_length, can beat the worst of them
        full = jnp.all(jnp.isfinite(done_scores), axis=-1)
        if static.rules.early_stopping:
            row_done = beams.row_done | full
        else:
            best_running = scores.max(-1) / knobs.best_norm[step]
            row_done = beams.row_done | (full & (done_scores.min(-1) >= best_running))
        tokens = jnp.take_along_axis(c.token, order, axis=1).reshape(B * K)
        flat_parent = (jnp.arange(B)[:, None] * K + parent_next).reshape(B * K)
        beams = _Beams(scores, running, done_scores, done_tokens, done_length, row_done, indices, done_indices)
        return state._replace(step=step + 1, tokens=tokens, flat_parent=flat_parent, beams=beams)

    def _beam_feed(self, static: _Static, params, state: _BeamState):
        """Each running beam continues from its parent's cache with its new token."""
        B, K = static.batch, static.num_beams
        cache, parent = state.cache, state.flat_parent
        cache = KVCache([jnp.take(k, parent, axis=0) for k in cache.keys],
                        [jnp.take(v, parent, axis=0) for v in cache.values], cache.length)
        seen = state.seen
        if seen is not None:
            seen = seen[parent].at[jnp.arange(B * K), state.tokens].set(True)
        slots = lax.dynamic_update_slice(state.slots, jnp.ones((B * K, 1), jnp.int32),
                                         (0, static.prompt + state.step - 1))
        logits, cache = self._last_logits(params, state.tokens[:, None], slots, cache)
        return logits, state._replace(cache=cache, slots=slots, seen=seen)

    def _beam_finish(self, static: _Static, state: _BeamState):
        """(the n best hypotheses per row (B * n, N) int32 padded with pad_token_id, longest length,
        _Extras: their scores and beam indices when asked for)."""
        B, N, n, beams, steps = static.batch, static.max_new_tokens, static.returned, state.beams, state.step
        # the finished hypotheses (at the length limit a running row's first K candidates finished)
        chosen_scores, pick = lax.top_k(beams.done_scores, n)  # (B, n) best first, lower index on ties
        chosen = jnp.take_along_axis(beams.done_tokens, pick[..., None], axis=1).reshape(B * n, N)
        extras = _Extras(steps, state.kept_scores, state.kept_logits,
                         sequences_scores=chosen_scores.reshape(B * n) if static.keep_scores else None)
        if static.keep_indices:
            chosen_indices = jnp.take_along_axis(beams.done_indices, pick[..., None], axis=1).reshape(B * n, N)
            extras = extras._replace(beam_indices=chosen_indices)
        return chosen, jnp.take_along_axis(beams.done_length, pick, axis=1).max(), extras

    def _beam_search(self, static: _Static, params, ids, mask, knobs: _Knobs, key, embeds=None, past=None):
        """(best hypotheses (B * n, N) int32 padded with pad_token_id, longest chosen length, _Extras)."""
        self._count_trace()
        none = jnp.zeros((static.batch, static.candidates), bool)

        def step(logits, state):
            scores, state = self._beam_scores(static, state, logits, ids, knobs)
            c, state = self._beam_candidates(static, state, scores, knobs, key)
            return self._beam_update(static, state, c, none, knobs)

        state = step(*self._beam_start(static, params, ids, mask, knobs, embeds, past))

        def keep_going(state: _BeamState):
            return (state.step < static.max_new_tokens) & ~jnp.all(state.beams.row_done)

        state = lax.while_loop(keep_going, lambda s: step(*self._beam_feed(static, params, s)), state)
        return self._beam_finish(static, state)

    def _host_beam_search(self, static: _Static, params, ids, mask, knobs: _Knobs, key, embeds=None, past=None, *,
                          processors, streamer, stops, mask_np, criteria=(), prefix=None, rows=None):
        """Beam search's pieces one step at a time, with the host's extras between them (as _host_decode);
        `rows`, when a list, gets each step's running beams' new tokens (B * K, step) (beam_step_rows)."""
        del streamer  # check_extras refuses a streamer
        start, scores_fn, candidates, update, feed, finish = (self._host_piece(static, name, fn) for name, fn in (
            ("beam_start", self._beam_start), ("beam_scores", self._beam_scores),
            ("beam_candidates", self._beam_candidates), ("beam_update", self._beam_update),
            ("beam_feed", self._beam_feed), ("beam_finish", self._beam_finish)))
        B, K, C, V = static.batch, static.num_beams, static.candidates, self.config.vocab_size
        ids_np = np.asarray(ids)
        logits, state = start(params, ids, mask, knobs, embeds, past)
        for step in range(static.max_new_tokens):
            if step:
                logits, state = feed(params, state)
            running = state.beams.tokens.reshape(B * K, -1)[:, :step]  # (B*K, step): the running beams' new tokens
            if rows is not None:
                rows.append(running)
            seq = jnp.concatenate([jnp.repeat(ids, K, axis=0), running], 1)
            allowed = None
            if prefix is not None:  # every running beam (B*K rows, batch_id r // K), as Hugging Face asks
                allowed = jnp.asarray(allowed_tokens(prefix, [jnp.asarray(r) for r in np.asarray(seq)], K, V))
            scores, state = scores_fn(state, logits, ids, knobs, allowed)
            processed = jnp.asarray(apply_processors(processors, seq, scores), jnp.float32)
            c, state = candidates(state, processed, knobs, key)
            stopped = np.zeros((B, C), bool)
            if stops is not None or criteria:  # each candidate: the row's prompt, its parent's tokens, its new token
                prompt, real = np.repeat(ids_np[:, None], C, 1), np.repeat(mask_np[:, None], C, 1)
                cand = np.concatenate([prompt, np.asarray(c.history)[:, :, :step + 1]], 2).reshape(B * C, -1)
            if stops is not None:
                cand_real = np.concatenate([real, np.ones((B, C, step + 1), np.int32)], 2).reshape(B * C, -1)
                stopped = stops.hits(cand, cand_real).reshape(B, C)
            if criteria:  # a candidate they stop finishes as one ending in an EOS id does
                hits = criteria_hits(criteria, jnp.asarray(cand), self._scores_so_far(state.kept_scores, step),
                                     B * C, np.asarray)
                stopped = stopped | hits.reshape(B, C)
            state = update(state, c, jnp.asarray(stopped), knobs)
            if bool(jnp.all(state.beams.row_done)):
                break
        return finish(state)


__all__ = ["GenerationMixin", "draw_without_replacement", "filter_for_sampling", "ngram_bans", "process_logits"]
