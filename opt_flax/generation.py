"""`generate` for the Flax backend, following opt_spec.generation's semantics.

The fast path is one jitted function: the prompt fills a preallocated KVCache (`init_cache`), then a
`lax.while_loop` feeds one token per step into fixed-size buffers (the cache, a (rows, T + N) attention
mask over the cache slots, a (rows, N) output, N = the length limit) until every row finished or N steps
were taken; the output is trimmed to the steps taken outside jit. Nothing is traced or allocated per
token.

One jitted function is kept per model and static setting (batch, prompt length, N, num_beams, sampling
or not, top_k, whether top-p / repetition penalty apply, how many EOS ids, the n-gram size, how many
sequences to return). The numbers (temperature, top_p, repetition_penalty, length_penalty,
min_new_tokens, the EOS and pad ids, the seed) are arguments, so changing them does not recompile.

Logits processors (Python callables on jax.Arrays), stop strings and streamers need the host between
steps, which one while_loop cannot give. A call with any of them runs the same pieces one step at a
time from Python instead: the prompt pass, the step's scores, the choice and the next forward are each a
jitted function (kept like the fast path's), with the processors, the stop-string check and the
streamer's put in between. A call without them keeps the single compiled loop. Streamers receive NumPy
arrays (transformers.TextStreamer reads them with .tolist()).

Sampling draws with `jax.random.categorical` from `jax.random.key(seed)` folded with the step index:
reproducible within JAX, not across backends. Greedy and beam search give the same tokens as
opt_torch (same rules, same tie breaks: lowest index first).
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

from opt_spec.generation import (Decoding, GenerationDefaults, StopStrings, apply_processors, as_streamer,
                                 check_extras, check_prompt, length_norms, needs_host,
                                 prompt_inputs)

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


# --------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class _Static:
    """What shapes the traced program (one jitted function per distinct value)."""

    batch: int          # decoding rows: prompts x num_return_sequences (sampling), or prompts (beams)
    prompt: int
    max_new_tokens: int
    num_beams: int
    do_sample: bool
    top_k: int          # 0 when it keeps everything
    top_p: bool         # top_p < 1
    repetition: bool    # repetition_penalty != 1
    eos: int            # how many EOS ids
    no_repeat: int = 0  # no_repeat_ngram_size
    returned: int = 1   # num_return_sequences (beams)

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
    min_new_tokens: jax.Array      # int32 ()
    length_norm: jax.Array         # float32 (N,): generated_length ** length_penalty for lengths 1..N


def _knobs(d: Decoding) -> _Knobs:
    """The call's numbers as traced arguments (length normalizers: opt_spec.generation.length_norms)."""
    return _Knobs(temperature=jnp.float32(d.temperature), top_p=jnp.float32(d.top_p),
                  repetition_penalty=jnp.float32(d.repetition_penalty),
                  eos_token_ids=jnp.asarray(np.array(d.eos_token_ids, np.int32).reshape(-1)),
                  pad_token_id=jnp.int32(d.pad_token_id), min_new_tokens=jnp.int32(d.min_new_tokens),
                  length_norm=jnp.asarray(length_norms(d.max_new_tokens, d.length_penalty)))


class _Beams(NamedTuple):
    scores: jax.Array       # (B, K) float32: running beams' summed log-probabilities
    tokens: jax.Array       # (B, K, N) int32: running beams' generated tokens (pad beyond)
    done_scores: jax.Array  # (B, K) float32: finished hypotheses, length-normalized (-inf: none)
    done_tokens: jax.Array  # (B, K, N) int32
    done_length: jax.Array  # (B, K) int32
    row_done: jax.Array     # (B,) bool


class _State(NamedTuple):
    """The decode loop's carry (greedy and sampling)."""

    step: jax.Array             # int32 (): tokens chosen so far
    tokens: jax.Array           # (B,) the last step's tokens
    cache: KVCache              # as the loop carries it (opt_flax.fast_paths.loop_cache)
    slots: jax.Array            # (B, T + N) int32: real tokens among the cache slots
    seen: Optional[jax.Array]   # (B, V) bool, with a repetition penalty
    finished: jax.Array         # (B,) bool
    out: jax.Array              # (B, N) int32: the new tokens (pad beyond)


class _BeamState(NamedTuple):
    step: jax.Array
    tokens: jax.Array           # (B*K,) the running beams' last tokens
    flat_parent: jax.Array      # (B*K,) their parents' rows
    cache: KVCache
    slots: jax.Array            # (B*K, T + N)
    beams: _Beams
    seen: Optional[jax.Array]


class _Candidates(NamedTuple):
    scores: jax.Array   # (B, C) best first
    parent: jax.Array   # (B, C) beam index
    token: jax.Array    # (B, C)
    history: jax.Array  # (B, C, N) the parent's tokens with this one written


# ------------------------------------------------------------------------------------ the mixin
class GenerationMixin(GenerationDefaults):
    """Adds `generate` to FlaxOPTForCausalLM (which provides config, params, dtype, init_cache);
    generation_config from opt_spec.GenerationDefaults."""

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, logits_processor=None,
                 streamer=None, tokenizer=None, params=None, **kwargs) -> jax.Array:
        """The prompts followed by the new tokens, int32 (B * num_return_sequences, T + N); settings by
        Hugging Face's names as keywords or in generation_config, defaults from model.generation_config;
        see opt_spec.generation.

        input_ids (B, T) is a left-padded batch, attention_mask (B, T) 1 for real tokens (default all
        ones). params overrides the model's parameters.
        """
        config = self.config
        ids, mask = self._generation_inputs(input_ids, attention_mask)
        d = self._decoding(generation_config, kwargs, ids.shape[1])
        check_prompt(ids.shape, d.max_new_tokens, config.max_position_embeddings)
        processors = check_extras(d, logits_processor, streamer, tokenizer)
        if params is None:
            params = self.params
        elif params is not self.params:
            from .pretrained import check_params  # a lazy import: pretrained imports this module

            check_params(params, config, self.head)
        if not d.is_beam_search:  # each prompt repeated num_return_sequences times, each row sampled apart
            ids, mask = np.repeat(ids, d.num_return_sequences, 0), np.repeat(mask, d.num_return_sequences, 0)
        B, T = ids.shape
        static = _Static(batch=B, prompt=T, max_new_tokens=d.max_new_tokens, num_beams=d.num_beams,
                         do_sample=d.do_sample, top_k=d.top_k if d.do_sample and 0 < d.top_k < config.vocab_size else 0,
                         top_p=d.do_sample and d.top_p < 1.0, repetition=d.repetition_penalty != 1.0,
                         eos=len(d.eos_token_ids), no_repeat=d.no_repeat_ngram_size,
                         returned=d.num_return_sequences if d.is_beam_search else 1)
        if d.seed is not None:
            seed = d.seed
        else:  # a fresh draw per call, as torch.seed() does
            seed = int.from_bytes(os.urandom(4), "little") if d.do_sample else 0
        args = (params, jnp.asarray(ids), jnp.asarray(mask), _knobs(d), jax.random.key(seed))
        if needs_host(d, processors, streamer):
            stops = StopStrings(d.stop_strings, tokenizer) if d.stop_strings else None
            loop = self._host_beam_search if d.is_beam_search else self._host_decode
            new, length = loop(static, *args, processors=processors, streamer=as_streamer(streamer), stops=stops,
                               mask_np=mask)
        else:
            new, length = self._generation_fn(static)(*args)
        n = int(length)  # steps taken (greedy, sampling) or the longest chosen hypothesis (beams)
        if d.is_beam_search:
            ids = np.repeat(ids, d.num_return_sequences, 0)
        if self.sharding is not None:  # new tokens are split over the mesh (and perhaps over processes)
            return jnp.asarray(np.concatenate([ids, self.sharding.gather(new)[:, :n]], axis=1))
        return jnp.concatenate([jnp.asarray(ids), new[:, :n]], axis=1)

    def _generation_inputs(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        """int32 NumPy (input_ids, attention_mask), checked with messages naming the problem."""
        ids, mask = prompt_inputs(input_ids, attention_mask, self.config.vocab_size)
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
    def _last_logits(self, params, ids, slots, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """float32 logits (B, V) of the last of the new tokens `ids` (B, T); the cache filled with them.
        slots (B, S) is the attention mask over every cache slot."""
        config, numerics = self.config, self.module.numerics
        base = OPTModule(config, numerics)
        out = base.apply({"params": params["model"]}, ids, attention_mask=slots, past_key_values=cache)
        x = out.last_hidden_state[:, -1]  # (B, E): the head on the last position only
        if config.tie_word_embeddings:
            embedding = params["model"]["decoder"]["embed_tokens"]["embedding"]  # (V, E)
            logits = jnp.einsum("be,ve->bv", x, embedding.astype(numerics.dtype), precision=numerics.precision)
        else:
            kernel = params["lm_head"]["kernel"]  # (E, V)
            logits = jnp.einsum("be,ev->bv", x, kernel.astype(numerics.dtype), precision=numerics.precision)
        return logits.astype(jnp.float32), out.past_key_values  # (B, V)

    def _prefill(self, params, ids, mask, L: int):
        """Runs the prompt (B, T) into a fresh cache of L slots: (logits, cache, slot mask (B, L))."""
        B, T = ids.shape
        cache = self.init_cache(B, L)
        slots = jnp.zeros((B, L), jnp.int32).at[:, :T].set(mask)  # (B, L) over every cache slot
        logits, cache = self._last_logits(params, ids, slots, cache)
        return logits, cache, slots

    @staticmethod
    def _prompt_seen(ids, mask, V: int) -> jax.Array:
        """(B, V) bool: token ids among each row's real prompt tokens."""
        B = ids.shape[0]
        counts = jnp.zeros((B, V), jnp.int32).at[jnp.arange(B)[:, None], ids].add(mask)
        return counts > 0

    def _rules(self, static: _Static, scores, seen, seq, slots, now, step, knobs: _Knobs):
        """Rules 1-3 of opt_spec.generation on float32 scores (R, V)."""
        scores = process_logits(scores, seen, step, knobs.repetition_penalty,
                                knobs.eos_token_ids if static.eos else None, knobs.min_new_tokens)
        if static.no_repeat and seq.shape[1] >= static.no_repeat:
            scores = jnp.where(ngram_bans(seq, slots, now, static.no_repeat, scores.shape[-1]), -jnp.inf, scores)
        return scores

    # ---------------------------------------------------------------------- greedy and sampling
    # One step is scores (rules 1-3) -> [host: logits processors] -> pick (rules 5-6) -> [host: stop
    # strings, streamer] -> feed (the chosen tokens through the model). The fast path traces the same
    # pieces into one while_loop.
    def _start(self, static: _Static, params, ids, mask, knobs: _Knobs):
        """The prompt pass: (logits (B, V), the state before the first step)."""
        B, T, N, V = static.batch, static.prompt, static.max_new_tokens, self.config.vocab_size
        logits, cache, slots = self._prefill(params, ids, mask, T + N)
        seen = self._prompt_seen(ids, mask, V) if static.repetition else None
        state = _State(step=jnp.int32(0), tokens=jnp.zeros((B,), jnp.int32), cache=loop_cache(cache), slots=slots,
                       seen=seen, finished=jnp.zeros((B,), bool), out=jnp.full((B, N), knobs.pad_token_id, jnp.int32))
        return logits, state

    def _scores(self, static: _Static, state: _State, logits, ids, knobs: _Knobs):
        seq = jnp.concatenate([ids, state.out], axis=1)
        return self._rules(static, logits, state.seen, seq, state.slots, static.prompt + state.step, state.step, knobs)

    def _pick(self, static: _Static, state: _State, scores, knobs: _Knobs, key) -> _State:
        """Rules 5-6: this step's tokens written out; the state after the step."""
        step = state.step
        if static.do_sample:
            filtered = filter_for_sampling(scores, knobs.temperature, static.top_k,
                                           knobs.top_p if static.top_p else None)
            tokens = jax.random.categorical(jax.random.fold_in(key, step), filtered, axis=-1)
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
                              out=lax.dynamic_update_slice(state.out, tokens[:, None], (0, step)))

    def _feed(self, static: _Static, params, state: _State):
        """The last tokens through the model: (next logits, state)."""
        B = static.batch
        slots = lax.dynamic_update_slice(state.slots, jnp.ones((B, 1), jnp.int32), (0, static.prompt + state.step - 1))
        logits, cache = self._last_logits(params, state.tokens[:, None], slots, model_cache(state.cache))
        return logits, state._replace(cache=loop_cache(cache), slots=slots)

    def _decode(self, static: _Static, params, ids, mask, knobs: _Knobs, key):
        """(new tokens (B, N) int32 padded with pad_token_id, steps taken int32 ())."""
        self._count_trace()
        logits, state = self._start(static, params, ids, mask, knobs)
        state = self._pick(static, state, self._scores(static, state, logits, ids, knobs), knobs, key)

        def keep_going(state: _State):
            return (state.step < static.max_new_tokens) & ~jnp.all(state.finished)

        def next_token(state: _State):
            logits, state = self._feed(static, params, state)
            return self._pick(static, state, self._scores(static, state, logits, ids, knobs), knobs, key)

        state = lax.while_loop(keep_going, next_token, state)
        return state.out, state.step

    def _host_decode(self, static: _Static, params, ids, mask, knobs: _Knobs, key, *, processors, streamer, stops,
                     mask_np):
        """The fast path's pieces one step at a time, with the host's extras between them: per step one
        jitted call (the forward, the scores and the choice), two with logits processors between."""
        def first(static, params, ids, mask, knobs):
            logits, state = self._start(static, params, ids, mask, knobs)
            return self._scores(static, state, logits, ids, knobs), state

        def later(static, params, state, ids, knobs):
            logits, state = self._feed(static, params, state)
            return self._scores(static, state, logits, ids, knobs), state

        def first_pick(static, params, ids, mask, knobs, key):  # without processors nothing runs in between
            scores, state = first(static, params, ids, mask, knobs)
            return self._pick(static, state, scores, knobs, key)

        def later_pick(static, params, state, ids, knobs, key):
            scores, state = later(static, params, state, ids, knobs)
            return self._pick(static, state, scores, knobs, key)

        if processors:
            pieces = dict(first=first, later=later, pick=self._pick)
        else:
            pieces = dict(first=first_pick, later=later_pick)
        fn = {name: self._host_piece(static, (name, bool(processors)), piece) for name, piece in pieces.items()}
        B = static.batch
        if streamer is not None:
            streamer.put(np.asarray(ids))
        seq, finished = [np.asarray(ids)], np.zeros(B, bool)  # the rows so far, on the host
        state = None
        for step in range(static.max_new_tokens):
            args = (params, ids, mask, knobs) if step == 0 else (params, state, ids, knobs)
            if processors:
                scores, state = fn["first" if step == 0 else "later"](*args)
                scores = apply_processors(processors, jnp.concatenate([ids, state.out[:, :step]], axis=1), scores)
                state = fn["pick"](state, jnp.asarray(scores, jnp.float32), knobs, key)
            else:
                state = fn["first" if step == 0 else "later"](*args, key)
            tokens, live = np.asarray(state.tokens), ~finished
            seq.append(tokens[:, None])
            if streamer is not None:
                streamer.put(tokens)
            finished = np.asarray(state.finished)
            if stops is not None:
                real = np.concatenate([mask_np, np.ones((B, step + 1), np.int32)], axis=1)
                finished = finished | stops.hits(np.concatenate(seq, axis=1), real, live)
                state = state._replace(finished=jnp.asarray(finished))
            if finished.all():
                break
        if streamer is not None:
            streamer.end()
        return state.out, state.step

    # ------------------------------------------------------------------------------ beam search
    # One step is scores (log_softmax, rules 1-3) -> [host: logits processors] -> candidates -> [host:
    # stop strings on the candidates] -> update (finished hypotheses, running beams) -> feed.
    def _beam_start(self, static: _Static, params, ids, mask, knobs: _Knobs):
        B, T, N, K, V = static.batch, static.prompt, static.max_new_tokens, static.num_beams, self.config.vocab_size
        ids_k, mask_k = jnp.repeat(ids, K, axis=0), jnp.repeat(mask, K, axis=0)  # (B*K, T)
        logits, cache, slots = self._prefill(params, ids_k, mask_k, T + N)
        pad = knobs.pad_token_id
        beams = _Beams(scores=jnp.full((B, K), -jnp.inf, jnp.float32).at[:, 0].set(0.0),  # one live beam
                       tokens=jnp.full((B, K, N), pad, jnp.int32),
                       done_scores=jnp.full((B, K), -jnp.inf, jnp.float32),
                       done_tokens=jnp.full((B, K, N), pad, jnp.int32),
                       done_length=jnp.zeros((B, K), jnp.int32), row_done=jnp.zeros((B,), bool))
        seen = self._prompt_seen(ids_k, mask_k, V) if static.repetition else None
        zeros = jnp.zeros((B * K,), jnp.int32)
        return logits, _BeamState(jnp.int32(0), zeros, zeros, cache, slots, beams, seen)

    def _beam_scores(self, static: _Static, state: _BeamState, logits, ids, knobs: _Knobs):
        """log_softmax of the logits, then rules 1-3 (as Hugging Face orders them for beams)."""
        B, K, N = state.beams.tokens.shape
        seq = jnp.concatenate([jnp.repeat(ids, K, axis=0), state.beams.tokens.reshape(B * K, N)], axis=1)
        return self._rules(static, jax.nn.log_softmax(logits, axis=-1), state.seen, seq, state.slots,
                           static.prompt + state.step, state.step, knobs)

    def _beam_candidates(self, static: _Static, state: _BeamState, logprobs) -> _Candidates:
        """The best C continuations per row: scores, parents, tokens and histories."""
        B, K, N = state.beams.tokens.shape
        V = logprobs.shape[-1]
        candidates = (state.beams.scores[..., None] + logprobs.reshape(B, K, V)).reshape(B, K * V)
        cand_scores, cand_index = lax.top_k(candidates, static.candidates)  # (B, C), best first, lower index on ties
        parent, token = cand_index // V, cand_index % V
        history = jnp.take_along_axis(state.beams.tokens, parent[..., None], axis=1)  # (B, C, N)
        history = lax.dynamic_update_slice(history, token[..., None], (0, 0, state.step))
        return _Candidates(cand_scores, parent, token, history)

    def _beam_update(self, static: _Static, state: _BeamState, c: _Candidates, stopped, knobs: _Knobs):
        """Finished hypotheses and running beams after this step's candidates; `stopped` (B, C) marks
        candidates that ended a stop string (the host's check; all False otherwise)."""
        B, K, C, step, beams = static.batch, static.num_beams, static.candidates, state.step, state.beams
        rank = jnp.arange(C, dtype=jnp.int32)
        if static.eos:
            stopped = stopped | _is_eos(c.token, knobs.eos_token_ids)
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
        # running beams: the first K candidates that did not stop (then stopped ones, lowered by 1e9)
        order = jnp.argsort(jnp.where(stopped, rank + C, rank), axis=-1)[:, :K]  # (B, K)
        lowered = c.scores - jnp.float32(1e9) * stopped.astype(jnp.float32)
        scores = jnp.where(beams.row_done[:, None], beams.scores, jnp.take_along_axis(lowered, order, axis=1))
        parent_next = jnp.take_along_axis(c.parent, order, axis=1)
        running = jnp.take_along_axis(c.history, order[..., None], axis=1)  # (B, K, N)
        # a row is done when K hypotheses are finished and no running beam can beat the worst
        full = jnp.all(jnp.isfinite(done_scores), axis=-1)
        best_running = scores.max(-1) / norm
        row_done = beams.row_done | (full & (done_scores.min(-1) >= best_running))
        tokens = jnp.take_along_axis(c.token, order, axis=1).reshape(B * K)
        flat_parent = (jnp.arange(B)[:, None] * K + parent_next).reshape(B * K)
        beams = _Beams(scores, running, done_scores, done_tokens, done_length, row_done)
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

    def _beam_finish(self, static: _Static, state: _BeamState, knobs: _Knobs):
        """(the n best hypotheses per row (B * n, N) int32 padded with pad_token_id, longest length)."""
        B, K, N, n, beams, steps = static.batch, static.num_beams, static.max_new_tokens, static.returned, \
            state.beams, state.step
        # rows still running at the end: their beams compete as hypotheses of length `steps`
        final = jnp.where(beams.row_done[:, None], -jnp.inf, beams.scores / knobs.length_norm[steps - 1])
        pool_scores = jnp.concatenate([beams.done_scores, final], axis=1)  # (B, 2K)
        pool_tokens = jnp.concatenate([beams.done_tokens, beams.tokens], axis=1)  # (B, 2K, N)
        pool_length = jnp.concatenate([beams.done_length, jnp.full((B, K), steps, jnp.int32)], axis=1)
        pick = lax.top_k(pool_scores, n)[1]  # (B, n) best first, lower index on ties
        chosen = jnp.take_along_axis(pool_tokens, pick[..., None], axis=1).reshape(B * n, N)
        return chosen, jnp.take_along_axis(pool_length, pick, axis=1).max()

    def _beam_search(self, static: _Static, params, ids, mask, knobs: _Knobs, key):
        """(best hypotheses (B * n, N) int32 padded with pad_token_id, longest chosen length)."""
        del key
        self._count_trace()
        none = jnp.zeros((static.batch, static.candidates), bool)

        def step(logits, state):
            c = self._beam_candidates(static, state, self._beam_scores(static, state, logits, ids, knobs))
            return self._beam_update(static, state, c, none, knobs)

        state = step(*self._beam_start(static, params, ids, mask, knobs))

        def keep_going(state: _BeamState):
            return (state.step < static.max_new_tokens) & ~jnp.all(state.beams.row_done)

        state = lax.while_loop(keep_going, lambda s: step(*self._beam_feed(static, params, s)), state)
        return self._beam_finish(static, state, knobs)

    def _host_beam_search(self, static: _Static, params, ids, mask, knobs: _Knobs, key, *, processors, streamer,
                          stops, mask_np):
        del key, streamer  # deterministic; check_extras refuses a streamer
        start, scores_fn, candidates, update, feed, finish = (self._host_piece(static, name, fn) for name, fn in (
            ("beam_start", self._beam_start), ("beam_scores", self._beam_scores),
            ("beam_candidates", self._beam_candidates), ("beam_update", self._beam_update),
            ("beam_feed", self._beam_feed), ("beam_finish", self._beam_finish)))
        B, K, C = static.batch, static.num_beams, static.candidates
        ids_np = np.asarray(ids)
        logits, state = start(params, ids, mask, knobs)
        for step in range(static.max_new_tokens):
            if step:
                logits, state = feed(params, state)
            seq = jnp.concatenate([jnp.repeat(ids, K, axis=0), state.beams.tokens.reshape(B * K, -1)[:, :step]], 1)
            scores = apply_processors(processors, seq, scores_fn(state, logits, ids, knobs))
            c = candidates(state, jnp.asarray(scores, jnp.float32))
            stopped = np.zeros((B, C), bool)
            if stops is not None:  # each candidate: the row's prompt, its parent's tokens, its new token
                prompt, real = np.repeat(ids_np[:, None], C, 1), np.repeat(mask_np[:, None], C, 1)
                cand = np.concatenate([prompt, np.asarray(c.history)[:, :, :step + 1]], 2).reshape(B * C, -1)
                cand_real = np.concatenate([real, np.ones((B, C, step + 1), np.int32)], 2).reshape(B * C, -1)
                stopped = stops.hits(cand, cand_real).reshape(B, C)
            state = update(state, c, jnp.asarray(stopped), knobs)
            if bool(jnp.all(state.beams.row_done)):
                break
        return finish(state, knobs)


__all__ = ["GenerationMixin", "filter_for_sampling", "ngram_bans", "process_logits"]
