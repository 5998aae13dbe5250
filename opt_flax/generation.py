"""`generate` for the Flax backend, following opt_spec.generation's semantics.

The whole decode is one jitted function: the prompt fills a preallocated KVCache (`init_cache`), then
a `lax.while_loop` feeds one token per step into fixed-size buffers (the cache, a (B, T + N) attention
mask over the cache slots, a (B, N) output, N = max_new_tokens) until every row finished or N steps
were taken; the output is trimmed to the steps taken outside jit. Nothing is traced or allocated per
token.

One jitted function is kept per model and static setting (batch, prompt length, max_new_tokens,
num_beams, sampling or not, top_k, whether top-p / repetition penalty / EOS apply). The numbers
(temperature, top_p, repetition_penalty, length_penalty, min_new_tokens, the EOS and pad ids, the
seed) are arguments, so changing them does not recompile.

Sampling draws with `jax.random.categorical` from `jax.random.key(seed)` folded with the step index:
reproducible within JAX, not across backends. Greedy and beam search give the same tokens as
opt_torch (same rules, same tie breaks: lowest index first).
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from opt_spec.generation import GenerationConfig, check_prompt

from .modeling import KVCache, OPTModule


# ------------------------------------------------------------------------- one step's rules (B, V)
def process_logits(logits: jax.Array, seen: Optional[jax.Array], step, repetition_penalty, eos_token_id,
                   min_new_tokens) -> jax.Array:
    """Rules 1-2 of opt_spec.generation on float32 logits (B, V): the repetition penalty on the
    tokens `seen` (B, V) bool (skipped when seen is None), then EOS blocked while step < min_new_tokens
    (skipped when eos_token_id is None)."""
    if seen is not None:
        p = repetition_penalty
        logits = jnp.where(seen, jnp.where(logits > 0, logits / p, logits * p), logits)
    if eos_token_id is not None:
        V = logits.shape[-1]
        blocked = (jnp.arange(V, dtype=jnp.int32) == eos_token_id) & (step < min_new_tokens)  # (V,)
        logits = jnp.where(blocked, -jnp.inf, logits)
    return logits


def filter_for_sampling(logits: jax.Array, temperature=1.0, top_k: int = 0, top_p=None) -> jax.Array:
    """logits (B, V) / temperature, then top-k (k a Python int; 0 keeps all), then top-p (a float or a
    traced scalar; None skips it, as top_p >= 1 must: float32 rounding of the cumulative sum could
    otherwise drop the tail). Dropped tokens get -inf; opt_spec.generation has the NumPy reference."""
    B, V = logits.shape
    logits = logits / temperature
    if 0 < top_k < V:
        kth = lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1, stable=True)  # (B, V) most probable first, ties by id
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) >= top_p  # mass strictly before reaches p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(B)[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


# ------------------------------------------------------------------------------ the loop's cache
def _squeeze(cache: KVCache, B: int) -> KVCache:
    """The cache as the decode loop carries it: at batch 1 without the batch axis, (nh, S, hs).
    XLA's CPU compiler drops a size-1 axis from the attention products' operands, so a (1, nh, S, hs)
    carry gives the cache update two consumers of different shapes, and XLA then copied every buffer
    four times per step (~2 ms of a 125m step). Carried in the products' shape, one copy per buffer
    remains, onto its own storage (the loop's copy time fell from 124 to 2 ms per 64 tokens).
    At batch > 1 nothing is copied and the carry keeps the model's shape."""
    if B != 1:
        return cache
    return cache.replace(keys=tuple(k[0] for k in cache.keys), values=tuple(v[0] for v in cache.values))


def _unsqueeze(cache: KVCache, B: int) -> KVCache:
    """The inverse of _squeeze: the model's (B, nh, S, hs) buffers."""
    if B != 1:
        return cache
    return cache.replace(keys=tuple(k[None] for k in cache.keys), values=tuple(v[None] for v in cache.values))


# --------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class _Static:
    """What shapes the traced program (one jitted function per distinct value)."""

    batch: int
    prompt: int
    max_new_tokens: int
    num_beams: int
    do_sample: bool
    top_k: int          # 0 when it keeps everything
    top_p: bool         # top_p < 1
    repetition: bool    # repetition_penalty != 1
    eos: bool           # an EOS id is set


class _Knobs(NamedTuple):
    """The numbers of a GenerationConfig, as traced arguments (changing them does not recompile)."""

    temperature: jax.Array         # float32 ()
    top_p: jax.Array               # float32 ()
    repetition_penalty: jax.Array  # float32 ()
    eos_token_id: jax.Array        # int32 () (-1 when unset)
    pad_token_id: jax.Array        # int32 ()
    min_new_tokens: jax.Array      # int32 ()
    length_norm: jax.Array         # float32 (N,): generated_length ** length_penalty for lengths 1..N


def _knobs(cfg: GenerationConfig) -> _Knobs:
    """The length normalizers are computed in float64 and rounded once, as torch's Python floats are."""
    lengths = np.arange(1, cfg.max_new_tokens + 1, dtype=np.float64)
    return _Knobs(temperature=jnp.float32(cfg.temperature), top_p=jnp.float32(cfg.top_p),
                  repetition_penalty=jnp.float32(cfg.repetition_penalty),
                  eos_token_id=jnp.int32(-1 if cfg.eos_token_id is None else cfg.eos_token_id),
                  pad_token_id=jnp.int32(cfg.pad_token_id), min_new_tokens=jnp.int32(cfg.min_new_tokens),
                  length_norm=jnp.asarray((lengths ** cfg.length_penalty).astype(np.float32)))


class _Beams(NamedTuple):
    scores: jax.Array       # (B, K) float32: running beams' summed log-probabilities
    tokens: jax.Array       # (B, K, N) int32: running beams' generated tokens (pad beyond)
    done_scores: jax.Array  # (B, K) float32: finished hypotheses, length-normalized (-inf: none)
    done_tokens: jax.Array  # (B, K, N) int32
    done_length: jax.Array  # (B, K) int32
    row_done: jax.Array     # (B,) bool


# ------------------------------------------------------------------------------------ the mixin
class GenerationMixin:
    """Adds `generate` to FlaxOPTForCausalLM (which provides config, params, dtype, init_cache)."""

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 num_beams: int = 1, length_penalty: float = 1.0, repetition_penalty: float = 1.0,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None, seed: Optional[int] = None,
                 params=None) -> jax.Array:
        """The prompts followed by the new tokens, int32 (B, T + N); see opt_spec.generation.

        input_ids (B, T) is a left-padded batch, attention_mask (B, T) 1 for real tokens (default all
        ones); eos/pad default to the config's. params overrides the model's parameters.
        """
        config = self.config
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                               temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
                               length_penalty=length_penalty, repetition_penalty=repetition_penalty,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed)
        cfg = cfg.with_model_defaults(config.eos_token_id, config.pad_token_id, config.vocab_size)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                 or not 0 <= seed < 2**32):
            raise ValueError(f"seed={seed!r}: must be an int in [0, 2**32)")
        ids, mask = self._generation_inputs(input_ids, attention_mask, cfg)
        if params is None:
            params = self.params
        elif params is not self.params:
            from .pretrained import check_params  # a lazy import: pretrained imports this module

            check_params(params, config, self.head)

        B, T = ids.shape
        static = _Static(batch=B, prompt=T, max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams,
                         do_sample=cfg.do_sample,
                         top_k=cfg.top_k if cfg.do_sample and 0 < cfg.top_k < config.vocab_size else 0,
                         top_p=cfg.do_sample and cfg.top_p < 1.0, repetition=cfg.repetition_penalty != 1.0,
                         eos=cfg.eos_token_id is not None)
        if cfg.seed is not None:
            seed = cfg.seed
        else:  # a fresh draw per call, as torch.seed() does
            seed = int.from_bytes(os.urandom(4), "little") if cfg.do_sample else 0
        ids = jnp.asarray(ids)
        new, length = self._generation_fn(static)(params, ids, jnp.asarray(mask), _knobs(cfg), jax.random.key(seed))
        n = int(length)  # steps taken (greedy, sampling) or the longest chosen hypothesis (beams)
        if self.sharding is not None:  # new tokens are split over the mesh (and perhaps over processes)
            return jnp.asarray(np.concatenate([np.asarray(ids), self.sharding.gather(new)[:, :n]], axis=1))
        return jnp.concatenate([ids, new[:, :n]], axis=1)

    def _generation_inputs(self, input_ids, attention_mask, cfg: GenerationConfig) -> tuple[np.ndarray, np.ndarray]:
        """int32 NumPy (input_ids, attention_mask), checked with messages naming the problem."""
        ids = np.asarray(input_ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"input_ids must be integers, got {ids.dtype}")
        check_prompt(ids.shape, cfg.max_new_tokens, self.config.max_position_embeddings)
        if attention_mask is None:
            mask = np.ones(ids.shape, np.int32)
        else:
            mask = np.asarray(attention_mask)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
            if not np.isin(mask, (0, 1)).all():
                raise ValueError("attention_mask must hold only 0 (pad) and 1 (token)")
        self._check_inputs(ids, mask, None, None)  # token ids in the vocabulary
        return ids.astype(np.int32), mask.astype(np.int32)

    def _generation_fn(self, static: _Static):
        """The jitted decode for these static settings, built once per model."""
        fns = self.__dict__.setdefault("_generation_fns", {})
        if static not in fns:
            decode = self._beam_search if static.num_beams > 1 else self._decode

            def fn(params, ids, mask, knobs, key):
                return decode(static, params, ids, mask, knobs, key)

            if self.sharding is None:
                fns[static] = jax.jit(fn)
            else:  # explicit shardings, batch on fsdp, the cache on (batch, heads) (opt_flax.distributed)
                from .distributed import generation_fn

                fns[static] = generation_fn(self, fn, static.batch)
        return fns[static]

    def _count_trace(self) -> None:
        """Counts how often a decode loop is traced (runs at trace time only; read by tests)."""
        self._generation_traces = getattr(self, "_generation_traces", 0) + 1

    # ----------------------------------------------------------------------------------- model
    def _last_logits(self, params, ids, slots, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """float32 logits (B, V) of the last of the new tokens `ids` (B, T); the cache filled with them.
        slots (B, S) is the attention mask over every cache slot."""
        config = self.config
        base = OPTModule(config, self.dtype, self.param_dtype, self.precision)
        out = base.apply({"params": params["model"]}, ids, slots, None, cache)
        x = out.last_hidden_state[:, -1]  # (B, E)
        if config.tie_word_embeddings:
            embedding = params["model"]["decoder"]["embed_tokens"]["embedding"]  # (V, E)
            logits = jnp.einsum("be,ve->bv", x, embedding.astype(self.dtype), precision=self.precision)
        else:
            kernel = params["lm_head"]["kernel"]  # (E, V)
            logits = jnp.einsum("be,ev->bv", x, kernel.astype(self.dtype), precision=self.precision)
        return logits.astype(jnp.float32), out.past_key_values  # (B, V)

    def _prefill(self, params, ids, mask, L: int):
        """Runs the prompt (B, T) into a fresh cache of L slots: (logits, cache, slot mask (B, L), seen)."""
        B, T = ids.shape
        cache = self.init_cache(B, L)
        slots = jnp.zeros((B, L), jnp.int32).at[:, :T].set(mask)  # (B, L) over every cache slot
        logits, cache = self._last_logits(params, ids, slots, cache)
        return logits, cache, slots

    @staticmethod
    def _seen(ids, mask, V: int) -> jax.Array:
        """(B, V) bool: token ids among each row's real prompt tokens."""
        B = ids.shape[0]
        counts = jnp.zeros((B, V), jnp.int32).at[jnp.arange(B)[:, None], ids].add(mask)
        return counts > 0

    # ---------------------------------------------------------------------- greedy and sampling
    def _decode(self, static: _Static, params, ids, mask, knobs: _Knobs, key):
        """(new tokens (B, N) int32 padded with pad_token_id, steps taken int32 ())."""
        self._count_trace()
        B, T, N, V = static.batch, static.prompt, static.max_new_tokens, self.config.vocab_size
        rows = jnp.arange(B)
        logits, cache, slots = self._prefill(params, ids, mask, T + N)
        seen = self._seen(ids, mask, V) if static.repetition else None

        def choose(step, logits, seen, finished, out):
            logits = process_logits(logits, seen, step, knobs.repetition_penalty,
                                    knobs.eos_token_id if static.eos else None, knobs.min_new_tokens)
            if static.do_sample:
                filtered = filter_for_sampling(logits, knobs.temperature, static.top_k,
                                               knobs.top_p if static.top_p else None)
                tokens = jax.random.categorical(jax.random.fold_in(key, step), filtered, axis=-1)
            else:
                tokens = jnp.argmax(logits, axis=-1)  # lowest id on ties
            tokens = jnp.where(finished, knobs.pad_token_id, tokens.astype(jnp.int32))  # (B,)
            out = lax.dynamic_update_slice(out, tokens[:, None], (0, step))
            if static.eos:
                finished = finished | (tokens == knobs.eos_token_id)
            if seen is not None:
                seen = seen.at[rows, tokens].set(True)
            return tokens, seen, finished, out

        step = jnp.int32(0)
        out = jnp.full((B, N), knobs.pad_token_id, jnp.int32)
        tokens, seen, finished, out = choose(step, logits, seen, jnp.zeros((B,), bool), out)

        def keep_going(state):
            step, _, _, _, _, finished, _ = state
            return (step < N) & ~jnp.all(finished)

        def next_token(state):
            step, tokens, cache, slots, seen, finished, out = state
            slots = lax.dynamic_update_slice(slots, jnp.ones((B, 1), jnp.int32), (0, T + step - 1))
            logits, cache = self._last_logits(params, tokens[:, None], slots, _unsqueeze(cache, B))
            tokens, seen, finished, out = choose(step, logits, seen, finished, out)
            return step + 1, tokens, _squeeze(cache, B), slots, seen, finished, out

        state = lax.while_loop(keep_going, next_token,
                               (step + 1, tokens, _squeeze(cache, B), slots, seen, finished, out))
        return state[-1], state[0]

    # ------------------------------------------------------------------------------ beam search
    def _beam_search(self, static: _Static, params, ids, mask, knobs: _Knobs, key):
        """(best hypothesis per row (B, N) int32 padded with pad_token_id, longest chosen length)."""
        del key
        self._count_trace()
        B, T, N, K, V = static.batch, static.prompt, static.max_new_tokens, static.num_beams, self.config.vocab_size
        rows = jnp.arange(B)
        ids_k, mask_k = jnp.repeat(ids, K, axis=0), jnp.repeat(mask, K, axis=0)  # (B*K, T)
        logits, cache, slots = self._prefill(params, ids_k, mask_k, T + N)
        seen = self._seen(ids_k, mask_k, V) if static.repetition else None
        pad = knobs.pad_token_id
        rank = jnp.arange(2 * K, dtype=jnp.int32)

        def beam_step(step, logits, seen, beams: _Beams):
            """Scores every continuation, updates finished hypotheses and running beams:
            (beams, tokens (B*K,) of the new running beams, their parents' flat rows (B*K,))."""
            logits = process_logits(logits, seen, step, knobs.repetition_penalty,
                                    knobs.eos_token_id if static.eos else None, knobs.min_new_tokens)
            logprobs = jax.nn.log_softmax(logits, axis=-1).reshape(B, K, V)
            candidates = (beams.scores[..., None] + logprobs).reshape(B, K * V)
            cand_scores, cand_index = lax.top_k(candidates, 2 * K)  # (B, 2K), best first, lower index on ties
            parent, token = cand_index // V, cand_index % V
            if static.eos:
                is_eos = token == knobs.eos_token_id
            else:
                is_eos = jnp.zeros(token.shape, bool)
            norm = knobs.length_norm[step]
            # finished candidates: EOS among the first K, scored by their length-normalized sum
            finishing = is_eos & (rank < K) & ~beams.row_done[:, None] & jnp.isfinite(cand_scores)
            normalized = jnp.where(finishing, cand_scores / norm, -jnp.inf)
            history = jnp.take_along_axis(beams.tokens, parent[..., None], axis=1)  # (B, 2K, N)
            history = lax.dynamic_update_slice(history, token[..., None], (0, 0, step))
            pool_scores = jnp.concatenate([beams.done_scores, normalized], axis=1)  # (B, 3K)
            pool_tokens = jnp.concatenate([beams.done_tokens, history], axis=1)    # (B, 3K, N)
            pool_length = jnp.concatenate([beams.done_length, jnp.full(token.shape, step + 1, jnp.int32)], axis=1)
            best = lax.top_k(pool_scores, K)[1]  # (B, K)
            done_scores = jnp.take_along_axis(pool_scores, best, axis=1)
            done_length = jnp.take_along_axis(pool_length, best, axis=1)
            done_tokens = jnp.take_along_axis(pool_tokens, best[..., None], axis=1)
            # running beams: the first K candidates that do not end in EOS
            order = jnp.argsort(jnp.where(is_eos, rank + 2 * K, rank), axis=-1)[:, :K]  # (B, K)
            scores = jnp.where(beams.row_done[:, None], beams.scores, jnp.take_along_axis(cand_scores, order, axis=1))
            parent_next = jnp.take_along_axis(parent, order, axis=1)
            running = jnp.take_along_axis(history, order[..., None], axis=1)  # (B, K, N)
            # a row is done when K hypotheses are finished and no running beam can beat the worst
            full = jnp.all(jnp.isfinite(done_scores), axis=-1)
            best_running = scores.max(-1) / norm
            row_done = beams.row_done | (full & (done_scores.min(-1) >= best_running))
            tokens = jnp.take_along_axis(token, order, axis=1).reshape(B * K)
            flat_parent = (rows[:, None] * K + parent_next).reshape(B * K)
            return _Beams(scores, running, done_scores, done_tokens, done_length, row_done), tokens, flat_parent

        beams = _Beams(scores=jnp.full((B, K), -jnp.inf, jnp.float32).at[:, 0].set(0.0),  # one live beam
                       tokens=jnp.full((B, K, N), pad, jnp.int32),
                       done_scores=jnp.full((B, K), -jnp.inf, jnp.float32),
                       done_tokens=jnp.full((B, K, N), pad, jnp.int32),
                       done_length=jnp.zeros((B, K), jnp.int32), row_done=jnp.zeros((B,), bool))
        step = jnp.int32(0)
        beams, tokens, flat_parent = beam_step(step, logits, seen, beams)

        def keep_going(state):
            step, beams = state[0], state[5]
            return (step < N) & ~jnp.all(beams.row_done)

        def next_step(state):
            step, tokens, flat_parent, cache, slots, beams, seen = state
            cache = cache.replace(keys=tuple(jnp.take(k, flat_parent, axis=0) for k in cache.keys),
                                  values=tuple(jnp.take(v, flat_parent, axis=0) for v in cache.values))
            if seen is not None:
                seen = seen[flat_parent].at[jnp.arange(B * K), tokens].set(True)
            slots = lax.dynamic_update_slice(slots, jnp.ones((B * K, 1), jnp.int32), (0, T + step - 1))
            logits, cache = self._last_logits(params, tokens[:, None], slots, cache)
            beams, tokens, flat_parent = beam_step(step, logits, seen, beams)
            return step + 1, tokens, flat_parent, cache, slots, beams, seen

        state = lax.while_loop(keep_going, next_step, (step + 1, tokens, flat_parent, cache, slots, beams, seen))
        steps, beams = state[0], state[5]
        # rows still running at the end: their beams compete as hypotheses of length `steps`
        final = jnp.where(beams.row_done[:, None], -jnp.inf, beams.scores / knobs.length_norm[steps - 1])
        pool_scores = jnp.concatenate([beams.done_scores, final], axis=1)  # (B, 2K)
        pool_tokens = jnp.concatenate([beams.done_tokens, beams.tokens], axis=1)  # (B, 2K, N)
        pool_length = jnp.concatenate([beams.done_length, jnp.full((B, K), steps, jnp.int32)], axis=1)
        pick = jnp.argmax(pool_scores, axis=-1)  # (B,) first best
        chosen = pool_tokens[rows, pick]  # (B, N)
        return chosen, pool_length[rows, pick].max()


__all__ = ["GenerationMixin", "filter_for_sampling", "process_logits"]
