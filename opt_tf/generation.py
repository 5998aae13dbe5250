"""`generate` for the TensorFlow backend, following opt_spec.generation's semantics.

The whole decode (prompt pass, then one token per step) runs inside one `tf.function(jit_compile=True)`:
a `tf.while_loop` with fixed shapes over a preallocated KVCache (the model's `init_cache`), writing
each step's tokens into a (B, max_new_tokens) buffer that is trimmed to the steps actually taken
outside the compiled function. One compiled function is kept per (batch, prompt length, generation
settings other than the seed), so a second call with the same shapes neither retraces nor recompiles;
the seed is an input of the function.

Greedy and beam search follow the PyTorch backend step for step (same tie rules, same output length),
so on the same weights they give the same tokens. Sampling draws with the Gumbel-max trick on
`tf.random.stateless_uniform` keyed by (seed, step): reproducible within TensorFlow for a given seed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np
import tensorflow as tf

from opt_spec.generation import GenerationConfig, check_prompt

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------- one step's rules
def _process(logits: tf.Tensor, seen: Optional[tf.Tensor], step: tf.Tensor, cfg: GenerationConfig) -> tf.Tensor:
    """Rules 1-2 of opt_spec.generation on float32 logits (B, V); step is the int32 step number."""
    if seen is not None:
        penalized = tf.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = tf.where(seen, penalized, logits)
    if cfg.min_new_tokens > 0 and cfg.eos_token_id is not None:
        V = logits.shape[-1]
        hold = (step < cfg.min_new_tokens) & tf.equal(tf.range(V), cfg.eos_token_id)  # (V,)
        logits = tf.where(hold[None, :], NEG_INF, logits)
    return logits


def filter_for_sampling(logits: tf.Tensor, cfg: GenerationConfig) -> tf.Tensor:
    """logits / temperature, then top-k, then top-p (opt_spec.generation's rule 3); dropped -> -inf."""
    logits = logits / cfg.temperature
    B, V = logits.shape
    if 0 < cfg.top_k < V:
        kth = tf.math.top_k(logits, cfg.top_k).values[:, -1:]  # (B, 1)
        logits = tf.where(logits < kth, NEG_INF, logits)
    if cfg.top_p < 1.0:
        sorted_logits, order = tf.math.top_k(logits, V)  # descending, lower index first on ties
        probs = tf.nn.softmax(sorted_logits, axis=-1)
        drop_sorted = (tf.cumsum(probs, axis=-1) - probs) >= cfg.top_p  # mass strictly before each token
        rows = tf.broadcast_to(tf.range(B)[:, None], (B, V))
        drop = tf.scatter_nd(tf.stack([rows, order], axis=-1), drop_sorted, (B, V))  # back to token order
        logits = tf.where(drop, NEG_INF, logits)
    return logits


def _argmax(x: tf.Tensor) -> tf.Tensor:
    """argmax over the last axis, the lowest index on ties (int32)."""
    V = x.shape[-1]
    top = tf.reduce_max(x, axis=-1, keepdims=True)
    index = tf.reduce_min(tf.where(tf.equal(x, top), tf.range(V), V), axis=-1)
    return tf.minimum(index, V - 1)


def _sample(logits: tf.Tensor, seed: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    """One draw per row from softmax(logits) (Gumbel-max), keyed by (seed, step)."""
    key = tf.random.experimental.stateless_fold_in(seed, step)
    u = tf.random.stateless_uniform(tf.shape(logits), seed=key, minval=np.finfo(np.float32).tiny, maxval=1.0)
    return _argmax(logits - tf.math.log(-tf.math.log(u)))


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


def _reorder(cache, index: tf.Tensor):
    """Keeps cache rows `index` (each beam continues from its parent's keys and values)."""
    return type(cache)(tuple(tf.gather(k, index) for k in cache.keys),
                       tuple(tf.gather(v, index) for v in cache.values), cache.index)


# --------------------------------------------------------------------------------------- the mixin
class TFGenerationMixin:
    """Adds `generate` to TFOPTForCausalLM (which provides init_cache, model and lm_logits)."""

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 num_beams: int = 1, length_penalty: float = 1.0, repetition_penalty: float = 1.0,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 seed: Optional[int] = None) -> tf.Tensor:
        """The prompts followed by the new tokens, (B, T + N), as a tf.Tensor of the prompt's integer
        dtype (int32 unless the prompt was int64); see opt_spec.generation."""
        config = self.config
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                               temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
                               length_penalty=length_penalty, repetition_penalty=repetition_penalty,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed)
        cfg = cfg.with_model_defaults(config.eos_token_id, config.pad_token_id, config.vocab_size)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"seed={seed!r}: must be an int or None")
        ids, mask, out_dtype = self._check_generation_inputs(input_ids, attention_mask, cfg)
        B, T = ids.shape
        fn = self._generation_function(B, T, dataclasses.replace(cfg, seed=None))
        if cfg.seed is None:
            seed_pair = np.random.default_rng().integers(0, 2**31, size=2)
        else:
            seed_pair = np.array([int(cfg.seed) // 2**31 % 2**31, int(cfg.seed) % 2**31])
        new, n = fn(tf.constant(ids), tf.constant(mask), tf.constant(seed_pair, tf.int32))
        new = new[:, :int(n)]
        return tf.concat([tf.constant(ids, out_dtype), tf.cast(new, out_dtype)], axis=1)

    def _check_generation_inputs(self, input_ids, attention_mask, cfg: GenerationConfig):
        ids = np.asarray(input_ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"input_ids must be integers, got {ids.dtype}")
        check_prompt(ids.shape, cfg.max_new_tokens, self.config.max_position_embeddings)
        bad = np.argwhere((ids < 0) | (ids >= self.config.vocab_size))
        if bad.size:
            b, t = (int(i) for i in bad[0])
            raise ValueError(f"token id {int(ids[b, t])} at batch row {b}, position {t} is outside the "
                             f"vocabulary [0, {self.config.vocab_size})")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        out_dtype = tf.int64 if ids.dtype == np.int64 else tf.int32
        return ids.astype(np.int32), (mask != 0).astype(np.int32), out_dtype

    def _generation_function(self, B: int, T: int, cfg: GenerationConfig):
        """The compiled decode for these shapes and settings, made once and kept."""
        fns = self.__dict__.get("_generation_fns")
        if fns is None:
            fns = {}
            object.__setattr__(self, "_generation_fns", fns)  # plain dict, outside Keras tracking
            object.__setattr__(self, "generation_traces", 0)
        key = (B, T, cfg)
        if key not in fns:
            spec = (tf.TensorSpec((B, T), tf.int32), tf.TensorSpec((B, T), tf.int32), tf.TensorSpec((2,), tf.int32))
            # a partial (not a closure) so that TensorFlow's retracing warning counts each function apart
            fns[key] = tf.function(functools.partial(self._traced_generation, cfg=cfg), input_signature=spec,
                                   jit_compile=True)
        return fns[key]

    def _traced_generation(self, ids, mask, seed, cfg: GenerationConfig):
        object.__setattr__(self, "generation_traces", self.generation_traces + 1)  # runs at trace time only
        body = self._beam_search if cfg.is_beam_search else self._decode
        return body(ids, mask, seed, cfg)

    def _last_logits(self, ids, slots, cache):
        """float32 logits (B, V) of the last new position and the cache with the new tokens written."""
        out = self.model(ids, attention_mask=slots, past_key_values=cache, use_cache=True)
        h = out.last_hidden_state[:, -1]  # (B, E)
        return tf.cast(self.lm_logits(h), tf.float32), out.past_key_values

    # ------------------------------------------------------------------------ greedy and sampling
    def _decode(self, ids, mask, seed, cfg: GenerationConfig):
        """(B, N) new tokens (pad after a row finished) and the number of steps taken."""
        B, T = ids.shape
        N, V = cfg.max_new_tokens, self.config.vocab_size
        L = T + N
        slots = tf.concat([mask, tf.zeros((B, N), tf.int32)], axis=1)  # (B, L) over every cache slot
        seen = _prompt_seen(ids, mask, V) if cfg.repetition_penalty != 1.0 else None

        def choose(logits, seen, finished, step):
            logits = _process(logits, seen, step, cfg)
            if cfg.do_sample:
                tokens = _sample(filter_for_sampling(logits, cfg), seed, step)
            else:
                tokens = _argmax(logits)
            tokens = tf.where(finished, cfg.pad_token_id, tokens)
            if cfg.eos_token_id is not None:
                finished = finished | tf.equal(tokens, cfg.eos_token_id)
            return tokens, finished

        logits, cache = self._last_logits(ids, slots, self.init_cache(B, L))
        step = tf.constant(0, tf.int32)
        tokens, finished = choose(logits, seen, tf.zeros((B,), tf.bool), step)
        out = _put_column(tf.fill((B, N), cfg.pad_token_id), step, tokens)
        state = dict(step=step + 1, tokens=tokens, finished=finished, out=out, cache=cache, slots=slots)
        if seen is not None:
            state["seen"] = _mark(seen, tokens)

        def more(s):
            return (s["step"] < N) & ~tf.reduce_all(s["finished"])

        def advance(s):
            step = s["step"]
            slots = tf.where(tf.equal(tf.range(L), T + step - 1)[None, :], 1, s["slots"])  # the last token's slot
            logits, cache = self._last_logits(s["tokens"][:, None], slots, s["cache"])
            seen = s.get("seen")
            tokens, finished = choose(logits, seen, s["finished"], step)
            new = dict(step=step + 1, tokens=tokens, finished=finished, out=_put_column(s["out"], step, tokens),
                       cache=cache, slots=slots)
            if seen is not None:
                new["seen"] = _mark(seen, tokens)
            return (new,)

        (state,) = tf.while_loop(more, advance, (state,), maximum_iterations=N - 1)
        return state["out"], state["step"]

    # ---------------------------------------------------------------------------------- beam search
    def _beam_search(self, ids, mask, seed, cfg: GenerationConfig):
        """(B, N) best hypotheses (pad-filled) and the length of the longest chosen one."""
        del seed  # beam search is deterministic
        B, T = ids.shape
        K, N, V = cfg.num_beams, cfg.max_new_tokens, self.config.vocab_size
        L = T + N
        eos = cfg.eos_token_id
        norms = tf.constant([np.float32(float(n) ** cfg.length_penalty) for n in range(1, N + 1)], tf.float32)
        rows = tf.range(B)
        rank = tf.range(2 * K)[None, :]  # (1, 2K)
        slots = tf.concat([tf.repeat(mask, K, axis=0), tf.zeros((B * K, N), tf.int32)], axis=1)  # (BK, L)
        seen = _prompt_seen(tf.repeat(ids, K, axis=0), tf.repeat(mask, K, axis=0), V) \
            if cfg.repetition_penalty != 1.0 else None

        def beam_step(logits, seen, s, step):
            """Scores every continuation and updates running beams and finished hypotheses."""
            norm = norms[step]
            logprobs = tf.reshape(tf.nn.log_softmax(_process(logits, seen, step, cfg), axis=-1), (B, K, V))
            cand = tf.reshape(s["scores"][..., None] + logprobs, (B, K * V))
            cand_scores, cand_index = tf.math.top_k(cand, 2 * K)  # (B, 2K), best first, lower index on ties
            parent, token = cand_index // V, cand_index % V
            is_eos = tf.equal(token, eos) if eos is not None else tf.zeros_like(token, tf.bool)
            row_done = s["row_done"]
            finishing = is_eos & (rank < K) & ~row_done[:, None] & tf.math.is_finite(cand_scores)
            normalized = tf.where(finishing, cand_scores / norm, NEG_INF)
            history = _put_column(tf.gather(s["beams"], parent, batch_dims=1), step, token)  # (B, 2K, N)
            pool_scores = tf.concat([s["done_scores"], normalized], axis=1)  # (B, 3K)
            pool_tokens = tf.concat([s["done_tokens"], history], axis=1)    # (B, 3K, N)
            pool_length = tf.concat([s["done_length"], tf.fill((B, 2 * K), step + 1)], axis=1)
            best = tf.math.top_k(pool_scores, K).indices
            done_scores = tf.gather(pool_scores, best, batch_dims=1)
            # running beams: the first K candidates that do not end in EOS
            order = tf.math.top_k(-tf.where(is_eos, rank + 2 * K, rank), K).indices  # (B, K)
            scores = tf.where(row_done[:, None], s["scores"], tf.gather(cand_scores, order, batch_dims=1))
            # a row is done when K hypotheses are finished and no running beam can beat the worst
            full = tf.reduce_all(tf.math.is_finite(done_scores), axis=-1)
            best_running = tf.reduce_max(scores, axis=-1) / norm
            new = dict(scores=scores, beams=tf.gather(history, order, batch_dims=1), done_scores=done_scores,
                       done_tokens=tf.gather(pool_tokens, best, batch_dims=1),
                       done_length=tf.gather(pool_length, best, batch_dims=1),
                       row_done=row_done | (full & (tf.reduce_min(done_scores, axis=-1) >= best_running)),
                       parent=tf.gather(parent, order, batch_dims=1), tokens=tf.gather(token, order, batch_dims=1))
            return new

        logits, cache = self._last_logits(tf.repeat(ids, K, axis=0), slots, self.init_cache(B * K, L))
        start = dict(scores=tf.concat([tf.zeros((B, 1)), tf.fill((B, K - 1), NEG_INF)], axis=1),  # one live beam
                     beams=tf.fill((B, K, N), cfg.pad_token_id),
                     done_scores=tf.fill((B, K), NEG_INF), done_tokens=tf.fill((B, K, N), cfg.pad_token_id),
                     done_length=tf.zeros((B, K), tf.int32), row_done=tf.zeros((B,), tf.bool))
        step = tf.constant(0, tf.int32)
        state = beam_step(logits, seen, start, step)
        state.update(step=step + 1, cache=cache, slots=slots)
        if seen is not None:
            state["seen"] = seen

        def more(s):
            return (s["step"] < N) & ~tf.reduce_all(s["row_done"])

        def advance(s):
            step = s["step"]
            flat_parent = tf.reshape(rows[:, None] * K + s["parent"], [-1])  # (BK,)
            tokens = tf.reshape(s["tokens"], [-1])                           # (BK,)
            seen = s.get("seen")
            if seen is not None:
                seen = _mark(tf.gather(seen, flat_parent), tokens)
            slots = tf.where(tf.equal(tf.range(L), T + step - 1)[None, :], 1, s["slots"])
            logits, cache = self._last_logits(tokens[:, None], slots, _reorder(s["cache"], flat_parent))
            new = beam_step(logits, seen, s, step)
            new.update(step=step + 1, cache=cache, slots=slots)
            if seen is not None:
                new["seen"] = seen
            return (new,)

        (state,) = tf.while_loop(more, advance, (state,), maximum_iterations=N - 1)
        last = state["step"] - 1
        # rows still running at the end: their beams compete as hypotheses of length last + 1
        final = tf.where(state["row_done"][:, None], NEG_INF, state["scores"] / norms[last])
        pool_scores = tf.concat([state["done_scores"], final], axis=1)   # (B, 2K)
        pool_tokens = tf.concat([state["done_tokens"], state["beams"]], axis=1)
        pool_length = tf.concat([state["done_length"], tf.fill((B, K), last + 1)], axis=1)
        pick = _argmax(pool_scores)  # (B,)
        chosen = tf.gather(pool_tokens, pick, batch_dims=1)  # (B, N)
        return chosen, tf.reduce_max(tf.gather(pool_length, pick, batch_dims=1))
