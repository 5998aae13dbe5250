"""`generate` for the PyTorch backend, following opt_spec.generation's semantics.

Decoding writes into a preallocated KVCache (no re-allocation per token); the one-token step has
fixed shapes, so on a GPU `compile=True` lets torch.compile capture it (CUDA graphs); on the CPU the
loop runs eagerly. The loop is on the host anyway, so logits processors, stop strings, stopping
criteria, prefix_allowed_tokens_fn and streamers (Hugging Face's put/end protocol, CPU tensors as
Hugging Face puts them, or a plain callable) cost nothing when they are not used, and PyTorch's fast
path and host loop are one loop. `stream(...)` yields each step's tokens as they are produced.

A step's scores (`step_scores`) take every rule of the spec in its order: sequence bias and bad words
(a precomputed single-token bias vector, plus the longer sequences matched on each row's last
tokens), repetition penalty, n-grams, the length and token rules (`TokenRules` holds their ids as
tensors, made once per call), the logits processors, the sampling filters when sampling, and
renormalize_logits last; a rule that is off is a skipped `if`. With return_dict_in_generate the
record collects copies of each step's scores and raw logits only when asked for; beam search also
tracks the running beam every token extended (beam_indices) and each hypothesis's score.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from opt_spec.cache import check_reused_cache, held_positions, pad_slots, reused_prompt_positions
from opt_spec.generation import (AssistantDrafts, Decoding, GenerationDefaults, StopStrings, allowed_tokens,
                                 apply_processors, as_streamer, best_length, check_assisted, check_extras,
                                 check_host_rules, check_prompt, criteria_hits, decay_growth, length_norms,
                                 longer_sequences, prompt_inputs, PromptLookup, single_token_bias,
                                 replayed_step_outputs, beam_step_rows, step_forward_mask, step_outputs,
                                 transition_scores)
from opt_spec.outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from .cache import KVCache, check_dynamic, hugging_face_cache


NEG_INF = float("-inf")


# ------------------------------------------------------------------------------- one step's rules
class TokenRules:
    """The token ids of rules 0 and 3 as tensors, made once per generate call (a rule that is off is
    None and costs nothing per step). Sequence bias: the single-token biases as one (V,) vector
    (opt_spec's single_token_bias), the longer sequences packed for one match (longer_sequences).
    prefix_fn: the call's prefix_allowed_tokens_fn (a row's batch_id is its index over num_beams)."""

    def __init__(self, d: Decoding, V: int, device, prefix_fn: Optional[Callable] = None):
        def ids(values):
            return torch.tensor(values, dtype=torch.long, device=device) if values else None

        self.single_bias = None
        if any(len(seq) == 1 for seq, _ in d.sequence_bias):
            self.single_bias = torch.from_numpy(single_token_bias(d.sequence_bias, V)).to(device)
        longer = longer_sequences(d.sequence_bias, max((len(seq) for seq, _ in d.sequence_bias), default=0))
        self.longer = None if longer is None else [torch.from_numpy(a).to(device=device) for a in longer]
        self.decay = (decay_growth(d.exponential_decay, d.max_new_tokens).tolist()
                      if d.exponential_decay is not None else None)  # per step, float32 values as Python floats
        self.eos = ids(d.eos_token_ids)
        self.forced_bos = ids([d.forced_bos_token_id] if d.forced_bos_token_id is not None else [])
        self.forced_eos = ids(d.forced_eos_token_ids)
        self.suppress = ids(d.suppress_tokens)
        self.begin_suppress = ids(d.begin_suppress_tokens)
        self.prefix_fn, self.num_beams, self.V = prefix_fn, d.num_beams, V

    def sequence_bias(self, scores: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """Rule 0: scores (R, V) plus each bias whose sequence the row (R, L) would complete."""
        if self.single_bias is not None:
            scores = scores + self.single_bias
        if self.longer is None:
            return scores
        rest, last, values, length = self.longer
        L, P = seq.shape[1], rest.shape[1]
        tail = seq[:, L - P:] if L >= P else torch.nn.functional.pad(seq, (P - L, 0), value=-1)  # (R, P)
        match = ((tail[:, None, :] == rest) | (rest < 0)).all(-1) & (L >= length)           # (R, M)
        bias = torch.zeros_like(scores).index_add_(1, last.long(), torch.where(match, values, 0.0))
        return scores + bias

    def allowed_mask(self, seq: torch.Tensor) -> torch.Tensor:
        """prefix_allowed_tokens_fn's mask (R, V) float32, 0 or -inf (added, as Hugging Face adds it), for the
        rows so far seq (R, L): asked on the host (opt_spec.generation.allowed_tokens), each row a 1-D tensor."""
        allowed = allowed_tokens(self.prefix_fn, seq.unbind(0), self.num_beams, self.V)
        return torch.from_numpy(np.where(allowed, np.float32(0), np.float32(NEG_INF))).to(seq.device)


def process_logits(scores: torch.Tensor, seen: Optional[torch.Tensor], seq: torch.Tensor, real: torch.Tensor,
                   step: int, d: Decoding, rules: Optional[TokenRules] = None) -> torch.Tensor:
    """Rules 0-3 of opt_spec.generation on float32 scores (R, V) (logits, or log-probabilities in beam
    search); seq / real (R, T + step) are the rows so far (prompt pads included) and which of their
    positions are real. `rules`: the call's TokenRules (made here when not given)."""
    V, L = scores.shape[-1], seq.shape[1]
    rules = rules if rules is not None else TokenRules(d, V, scores.device)
    if d.sequence_bias:
        scores = rules.sequence_bias(scores, seq)
    if seen is not None:
        penalized = torch.where(scores > 0, scores / d.repetition_penalty, scores * d.repetition_penalty)
        scores = torch.where(seen, penalized, scores)
    if d.no_repeat_ngram_size:
        scores = scores.masked_fill(ngram_bans(seq, real, d.no_repeat_ngram_size, V), NEG_INF)
    if rules.eos is not None and step < d.min_new_tokens:
        scores = scores.index_fill(1, rules.eos, NEG_INF)
    if rules.prefix_fn is not None:
        scores = scores + rules.allowed_mask(seq)
    if rules.forced_bos is not None and L == 1:
        scores = torch.full_like(scores, NEG_INF).index_fill(1, rules.forced_bos, 0.0)
    if rules.forced_eos is not None and step == d.max_new_tokens - 1:
        scores = torch.full_like(scores, NEG_INF).index_fill(1, rules.forced_eos, 0.0)
    if d.remove_invalid_values:
        big = torch.finfo(scores.dtype).max
        scores = torch.nan_to_num(scores, nan=0.0, posinf=big, neginf=-big)
    if d.exponential_decay is not None and rules.eos is not None and step > d.exponential_decay[0]:
        eos = scores[:, rules.eos]
        boosted = eos + eos.abs() * rules.decay[step]
        banned = eos <= torch.finfo(torch.float32).min  # -inf, or what remove_invalid_values made of it
        scores = scores.index_copy(1, rules.eos, torch.where(banned, eos, boosted))  # a banned EOS stays banned
    if rules.suppress is not None:
        scores = scores.index_fill(1, rules.suppress, NEG_INF)
    if rules.begin_suppress is not None and step == d.begin_suppress_step:
        scores = scores.index_fill(1, rules.begin_suppress, NEG_INF)
    return scores


def step_scores(logits: torch.Tensor, seen: Optional[torch.Tensor], seq: torch.Tensor, real: torch.Tensor, step: int,
                d: Decoding, rules: TokenRules, processors=(), beam: bool = False) -> torch.Tensor:
    """The float32 scores (R, V) one step chooses from, every rule in the module docstring's order
    (opt_spec.generation.reference_scores): beam search's on log-probabilities; the sampling filters when
    sampling (beam sampling too, each keeping d.filter_keep tokens); renormalize_logits last."""
    scores = logits.log_softmax(-1) if beam else logits
    scores = process_logits(scores, seen, seq, real, step, d, rules)
    scores = apply_processors(processors, seq, scores)
    if d.do_sample:
        scores = filter_for_sampling(scores, d, d.filter_keep)
    if d.renormalize_logits:
        scores = scores.log_softmax(-1)
    return scores


def ngram_bans(seq: torch.Tensor, real: torch.Tensor, n: int, V: int) -> torch.Tensor:
    """(R, V) bool: the tokens that would repeat an n-gram of real positions (rule 2)."""
    R, C = seq.shape
    bans = torch.zeros(R, V, dtype=torch.float32, device=seq.device)
    if C < n:
        return bans.bool()
    grams = seq.unfold(1, n, 1)                                       # (R, C - n + 1, n)
    whole = real.bool().unfold(1, n, 1).all(-1)                       # every position of the n-gram is real
    tail_real = real[:, C - n + 1:].bool().all(-1, keepdim=True)      # (R, 1): the last n - 1 are real
    match = (grams[:, :, :n - 1] == seq[:, None, C - n + 1:]).all(-1) & whole & tail_real  # (R, C - n + 1)
    return bans.scatter_add_(1, grams[:, :, n - 1], match.float()) > 0


def filter_for_sampling(logits: torch.Tensor, cfg, keep: int = 1) -> torch.Tensor:
    """Rule 5's sampling filters in order: temperature, top-k, top-p, min_p, typical_p, epsilon, eta; each
    keeps at least the `keep` most probable tokens of a row."""
    logits = logits / cfg.temperature
    V = logits.shape[-1]
    k = max(cfg.top_k, keep) if cfg.top_k > 0 else 0
    if 0 < k < V:
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop_sorted[:, :keep] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, NEG_INF)
    if cfg.min_p is not None:
        probs = logits.softmax(-1)
        drop = probs < cfg.min_p * probs.max(-1, keepdim=True).values
        if keep > 1:  # (one is always kept: the most probable)
            drop = drop.scatter(-1, torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :keep], False)
        logits = logits.masked_fill(drop, NEG_INF)
    if cfg.typical_p < 1.0:
        logits = typical_filter(logits, cfg.typical_p, keep)
    if cfg.epsilon_cutoff > 0:
        logits = logits.masked_fill(_below(logits, cfg.epsilon_cutoff, keep), NEG_INF)
    if cfg.eta_cutoff > 0:
        logp = logits.log_softmax(-1)
        entropy = -(logp.clamp(min=torch.finfo(logp.dtype).min) * logp.exp()).sum(-1, keepdim=True)
        eta = (-entropy).exp().mul(math.sqrt(cfg.eta_cutoff)).clamp(max=cfg.eta_cutoff)  # min(eta, sqrt(eta) e^-H)
        logits = logits.masked_fill(_below(logits, eta, keep), NEG_INF)
    return logits


def _below(logits: torch.Tensor, threshold, keep: int = 1) -> torch.Tensor:
    """(R, V) bool: tokens less probable than `threshold`, never a row's `keep` most probable ones."""
    kth = torch.topk(logits, min(keep, logits.shape[-1]), dim=-1).values[:, -1:]
    return (logits.softmax(-1) < threshold) & (logits < kth)


def typical_filter(logits: torch.Tensor, mass: float, keep: int = 1) -> torch.Tensor:
    """Locally typical sampling (opt_spec.generation.typical_filter): the tokens closest in surprisal to
    the entropy, until their probability reaches `mass` (at least `keep` of them)."""
    logp = logits.log_softmax(-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, logp, 0.0).mul(p).sum(-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shifted, order = torch.sort(shifted, dim=-1, stable=True)
    cumulative = logits.gather(-1, order).softmax(-1).cumsum(-1)
    last = (cumulative < mass).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    drop_sorted = sorted_shifted > sorted_shifted.gather(-1, last)
    drop_sorted[:, :keep] = False
    return logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), NEG_INF)


def draw_without_replacement(scores: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """(R, n) indices drawn without replacement from softmax(scores) (R, M), in the order drawn: the Gumbel-top-k
    trick (opt_spec.generation.draw_without_replacement); impossible (-inf) entries come last."""
    u = torch.rand(scores.shape, generator=generator, device=scores.device).clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.topk(scores - torch.log(-torch.log(u)), n, dim=-1).indices


def _prompt_seen(ids: torch.Tensor, mask: torch.Tensor, V: int) -> torch.Tensor:
    return torch.zeros(ids.shape[0], V, dtype=torch.long, device=ids.device).scatter_add_(1, ids, mask) > 0


def _prefix_length(prefix) -> int:
    """Positions a prefix (per layer keys and values, or None) holds."""
    return 0 if prefix is None else prefix[0][0].shape[2]


def _fed(input_ids: torch.Tensor, positions: int, prefix) -> torch.Tensor:
    """The prompt's ids the prompt pass feeds when the model sees `positions` (P) positions first and the
    prefix holds the first C of them: the last P - C (all T after a wrapper's virtual prefix, C = P - T; the
    last T - C when the prefix is a cache of the prompt's own first C tokens, P = T)."""
    return input_ids[:, input_ids.shape[1] - (positions - _prefix_length(prefix)):]


def _shapes(layers) -> list:
    """The distinct shapes of per layer (keys, values), for an error message."""
    return sorted({tuple(x.shape) for kv in layers for x in kv if x is not None})


def _repeat_rows(x, n: int):
    """Each row n times over (num_return_sequences, beams): of a tensor (B, ...) or of per layer (keys,
    values); None stays None."""
    if x is None or isinstance(x, torch.Tensor):
        return None if x is None else x.repeat_interleave(n, 0)
    return [(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in x]


def _host(x):
    """A tensor as NumPy for the host-side checks (None and other arrays as they are)."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _stop_hits(stops: Optional[StopStrings], seq: torch.Tensor, real: torch.Tensor, live: torch.Tensor,
               criteria=(), scores: Optional[tuple] = None):
    """(R,) bool: live rows whose last token completes a stop string, or rows a stopping criterion says are
    done (asked with the rows seq (R, L) and the steps' scores so far, or None); checked on the host."""
    if stops is None and not criteria:
        return None
    hits = np.zeros(seq.shape[0], dtype=bool)
    if stops is not None:
        hits |= stops.hits(seq.cpu().numpy(), real.cpu().numpy(), live.cpu().numpy())
    if criteria:
        hits |= criteria_hits(criteria, seq, scores, seq.shape[0], _host)
    return torch.from_numpy(hits).to(seq.device)


class _Record:
    """What return_dict_in_generate collects of each step, when asked for: the scores it chose from
    (output_scores) and the model's raw logits (output_logits), float32 copies (a compiled step reuses
    its output buffer); beam search's running beams, for hidden states or attentions."""

    def __init__(self, d: Decoding):
        self.score_steps = [] if d.return_dict_in_generate and d.output_scores else None
        self.logit_steps = [] if d.return_dict_in_generate and d.output_logits else None
        self.beam_rows = [] if beam_step_rows(d) else None  # beam search: each step's running beams' new tokens

    def add(self, scores: torch.Tensor, logits: torch.Tensor) -> None:
        if self.score_steps is not None:
            self.score_steps.append(scores.float().clone())
        if self.logit_steps is not None:
            self.logit_steps.append(logits.float().clone())

    @property
    def scores(self) -> Optional[tuple]:
        return None if self.score_steps is None else tuple(self.score_steps)

    @property
    def logits(self) -> Optional[tuple]:
        return None if self.logit_steps is None else tuple(self.logit_steps)


class _PromptLookup(PromptLookup):
    """opt_spec.generation.PromptLookup over the call's cache slots."""

    def __init__(self, d: Decoding, S: int):
        super().__init__(d)
        self.S = S

    def propose(self, seq: torch.Tensor, mask: torch.Tensor, upto: int, room: int) -> torch.Tensor:
        """Up to `room` candidates (k,) for the slots after the row's first `upto` (seq (1, L) by cache slot)."""
        found = super().propose(seq[0, self.S:upto].cpu().numpy(), room)
        return torch.tensor(found, dtype=torch.long, device=seq.device)


class _Assistant(AssistantDrafts):
    """Assisted decoding's candidates from a smaller model, drafted greedily with a cache of its own that
    keeps the row's slots it has read, across drafts (opt_spec.generation, "Assisted decoding")."""

    def __init__(self, model, d: Decoding, capacity: int, pads: int):
        super().__init__(d)
        self.model = model
        self.cache = model.init_cache(1, capacity, pads)
        self.mask = torch.zeros(1, capacity, dtype=torch.long, device=model.device)  # (1, L) its own slots
        self.step = model._step_fn(compile=False)  # its fused one-token step (opt_torch.fast_paths)

    def propose(self, seq: torch.Tensor, mask: torch.Tensor, upto: int, room: int) -> torch.Tensor:
        k = min(room, self.draft)
        self.upto = self.written = upto
        if k == 0:
            return seq.new_zeros(0)
        self.cache.crop(self.valid)
        self.mask.zero_()
        self.mask[:, :upto] = mask[:, :upto]
        logits = self.model._last_logits(seq[:, self.valid:upto], self.mask[:, :upto], self.cache)  # unread slots
        drafted = []
        while True:
            probs = logits.softmax(-1)
            token = probs.argmax(-1)  # (1,)
            drafted.append(token)
            if len(drafted) == k or float(probs[0, token]) < self.d.assistant_confidence_threshold:
                break
            slot = upto + len(drafted) - 1
            self.mask[:, slot] = 1
            logits = self.step(token, self.mask, self.cache, slot)
        self.written = upto + len(drafted) - 1  # the last drafted token was never read
        return torch.cat(drafted)


class GenerationMixin(GenerationDefaults):
    """Adds generate / stream to OPTForCausalLM (generation_config from opt_spec.GenerationDefaults)."""

    def _last_logits(self, ids, mask, cache, embeds=None) -> torch.Tensor:
        """float32 logits (B, V) of the last new position, filling the cache: of the token ids, or of the
        embeddings `embeds` instead (generate's inputs_embeds) when given."""
        inputs = dict(input_ids=ids) if embeds is None else dict(inputs_embeds=embeds)
        out = self.model(**inputs, attention_mask=mask, past_key_values=cache, use_cache=True)
        return self.lm_head(out.last_hidden_state[:, -1]).float()

    def _sampling_generator(self, d: Decoding, device) -> Optional[torch.Generator]:
        """The call's random stream when it samples (seeded by d.seed, else freshly), else None."""
        if not d.do_sample:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(d.seed if d.seed is not None else self._fresh_seed())
        return generator

    def _fresh_seed(self) -> int:
        """A new random seed for sampling; one rank's, shared by all, for a model split over processes
        (opt_torch.distributed): every rank must draw the same tokens."""
        if getattr(self, "device_mesh", None) is not None:
            from .distributed import shared_seed

            return shared_seed()
        return torch.seed()

    def _step_fn(self, compile: bool) -> Callable:
        """step(tokens (B,), mask (B, L), cache, slot: int) -> float32 logits (B, V) of one new token per
        row, written to the cache at its write position, `slot`. Eager: opt_torch.fast_paths.DecodeStep
        over tensors gathered now (no module calls per step), attending over the slots written so far.
        compile=True: the model's forward over the whole buffer (fixed shapes), captured by torch.compile
        (CUDA graphs). A decoder whose layers are swapped or hooked (LoRA, probes) takes that forward
        uncompiled, so that every module runs (DecodeStep reads weights and would skip them)."""
        from .fast_paths import DecodeStep, modules_are_stock

        if compile or not modules_are_stock(self.model.decoder):
            forward = self._last_logits
            if compile:
                forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
            return lambda tokens, mask, cache, slot: forward(tokens[:, None], mask, cache)
        decode = DecodeStep(self.model.decoder, self.attn_implementation)

        def step(tokens, mask, cache, slot):  # the new token's position: the real tokens before it
            allowed = mask[:, :slot + 1].bool()[:, None, None, :]  # (B, 1, 1, slot + 1)
            return self.lm_head(decode(tokens, mask.sum(1) - 1, allowed, cache)).float()
        return step

    def _prepare(self, input_ids, attention_mask, generation_config, kwargs, inputs_embeds=None) -> tuple:
        """The rows' prompt ids (B, T) and the attention mask (B, P) as long tensors on the model's device,
        the embeddings (B, P, E) in the model's dtype or None, the prefix or None, and the call's Decoding.
        Without inputs_embeds or a wrapper's prefix P = T; with embeddings T = P (their ids given) or 0 (rows
        that start empty). The prefix: per layer keys and values (B, nh, C, hs) of the first C positions,
        which the prompt pass does not feed again: a wrapper's C = P - T virtual positions (_wrapped_prompt),
        or the cache of the prompt's own first C tokens passed as past_key_values (_reused_prefix)."""
        config = self.config
        ids, mask = prompt_inputs(_host(input_ids), _host(attention_mask), config.vocab_size, inputs_embeds,
                                  config.word_embed_proj_dim)
        T, P = ids.shape[1], mask.shape[1]
        reused = kwargs.pop("past_key_values", None)
        d = self._decoding(generation_config, kwargs, P, T)
        device = self.device
        input_ids = torch.as_tensor(input_ids if input_ids is not None else ids).to(device=device, dtype=torch.long)
        attention_mask = torch.as_tensor(attention_mask if attention_mask is not None else mask)
        hook = self.__dict__.get("prepare_inputs_for_generation")  # set on the instance: a wrapper's (PEFT's)
        prefix = None
        if hook is not None and inputs_embeds is None:
            attention_mask, inputs_embeds, prefix = self._wrapped_prompt(hook, input_ids, attention_mask.to(device))
            mask = _host(attention_mask)
        if reused is not None:
            beside = inputs_embeds is not None or prefix is not None
            prefix = self._reused_prefix(reused, input_ids, beside)
        check_prompt(mask, d.max_new_tokens, config.max_position_embeddings)
        if inputs_embeds is not None:
            inputs_embeds = torch.as_tensor(inputs_embeds).to(device=device,
                                                              dtype=self.get_input_embeddings().weight.dtype)
        return input_ids, attention_mask.to(device=device, dtype=torch.long), inputs_embeds, prefix, d

    def _wrapped_prompt(self, hook, input_ids, attention_mask) -> tuple:
        """The prompt as a wrapper that replaced prepare_inputs_for_generation makes it for the first step
        of Hugging Face's loop: (attention_mask (B, P), inputs_embeds (B, P, E) or None when the wrapper keeps
        the ids, prefix or None). PEFT's prompt tuning and P-tuning put learned embeddings before the
        prompt's; its prefix tuning puts learned keys and values in the cache (a DynamicCache of P - T
        positions: the prefix, per layer (keys, values) (B, nh, P - T, hs)). Either widens the mask to match.
        The rows stay input_ids (B, T), and the lengths count T, as Hugging Face's generate counts them;
        the model sees the P positions."""
        (B, T), E = input_ids.shape, self.config.word_embed_proj_dim
        step = hook(input_ids, past_key_values=None, attention_mask=attention_mask, use_cache=True,
                    cache_position=torch.arange(T, device=input_ids.device))
        embeds, mask, cache = step.get("inputs_embeds"), step.get("attention_mask"), step.get("past_key_values")
        if cache is not None:
            return self._wrapped_prefix(cache, embeds, mask, input_ids)
        if embeds is None:
            return attention_mask, None, None
        P = embeds.shape[1] if embeds.dim() == 3 else -1
        if tuple(embeds.shape) != (B, P, E) or P < T or mask is None or tuple(mask.shape) != (B, P):
            raise ValueError(f"prepare_inputs_for_generation returned inputs_embeds {tuple(embeds.shape)} and "
                             f"attention_mask {None if mask is None else tuple(mask.shape)}; expected (B, P, {E}) "
                             f"and (B, P) with P >= the prompt's {T} tokens, for B = {B}")
        return mask.long(), embeds.detach(), None

    def _wrapped_prefix(self, cache, embeds, mask, input_ids) -> tuple:
        """_wrapped_prompt's (attention_mask (B, P), None, prefix) from the cache a wrapper's first step holds
        (PEFT's prefix tuning): its per layer (keys, values), (B, nh, P - T, hs) in the model's dtype."""
        (B, T), L, hs = input_ids.shape, self.config.num_hidden_layers, self.config.head_dim
        prefix, S = self._cache_layers(cache, B)
        if embeds is not None or mask is None or S is None or S < 1 or tuple(mask.shape) != (B, S + T):
            given = None if mask is None else tuple(mask.shape)
            raise ValueError(f"prepare_inputs_for_generation returned a cache of {len(prefix)} layers of keys and "
                             f"values {_shapes(prefix)} and attention_mask {given}"
                             f"{' with inputs_embeds' if embeds is not None else ''}; expected, for a prefix of S "
                             f"positions, {L} layers of (B, {self.kv_heads}, S, {hs}) and a mask (B, S + {T}) over "
                             f"the prefix and the prompt, for B = {B}, and no inputs_embeds")
        return mask.long(), None, prefix

    def _reused_prefix(self, cache, input_ids, beside: bool = False) -> list:
        """generate's past_key_values: a cache of the rows' first C < T prompt tokens (the model's KVCache, from a
        forward over input_ids[:, :C] with attention_mask[:, :C], or a Hugging Face DynamicCache filled alike),
        as per layer keys and values (B, nh, C, hs) in the model's dtype. The cache itself is left as it is.
        beside: the call also has inputs_embeds or a wrapper's prompt (refused)."""
        check_reused_cache(cache, isinstance(cache, KVCache) or hugging_face_cache(cache),
                           "the model's KVCache or a Hugging Face DynamicCache",
                           "inputs_embeds or a wrapper's prompt (PEFT's prompt learning)" if beside else None)
        if hugging_face_cache(cache):
            check_dynamic(cache)
        prefix, _ = self._cache_layers(cache.written() if isinstance(cache, KVCache) else cache, len(input_ids))
        reused_prompt_positions(prefix, self.config.num_hidden_layers, len(input_ids), self.kv_heads,
                                self.config.head_dim, input_ids.shape[1])
        return prefix

    def _cache_layers(self, cache, B: int) -> tuple[list, Optional[int]]:
        """A cache's per layer (keys, values), detached in the model's dtype, and the positions S they hold when
        every layer's are (B, kv_heads, S, head_dim) (else None)."""
        dtype = self.get_input_embeddings().weight.dtype
        layers = [(k, v) if k is None else (k.detach().to(dtype), v.detach().to(dtype)) for k, v in cache]
        config = self.config
        return layers, held_positions(layers, config.num_hidden_layers, B, self.kv_heads, config.head_dim)

    def _start_cache(self, batch_size: int, max_length: Optional[int] = None, pads: int = 0,
                     prefix: Optional[list] = None):
        """init_cache's cache, holding the prefix (per layer keys and values: _prepare's) when given."""
        cache = self.init_cache(batch_size, max_length, pads)
        if prefix is not None:
            for layer, (k, v) in enumerate(prefix):
                cache.update(layer, k, v)
            cache.advance(prefix[0][0].shape[2])
        return cache

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, generation_config=None, logits_processor=None,
                 streamer=None, tokenizer=None, stopping_criteria=None, prefix_allowed_tokens_fn=None,
                 compile: bool = False, inputs_embeds=None, assistant_model=None, **kwargs):
        """The prompts followed by the new tokens, (B * num_return_sequences, T + N); settings by Hugging
        Face's names as keywords (max_new_tokens, do_sample, num_beams, eos_token_id, ...) or in
        generation_config, defaults from model.generation_config; see opt_spec.generation. With
        return_dict_in_generate=True, the output record (GenerateDecoderOnlyOutput, or
        GenerateBeamDecoderOnlyOutput for beam search) with the scores / logits asked for. stopping_criteria
        and prefix_allowed_tokens_fn: Hugging Face's, called on the host each step (opt_spec.generation).
        inputs_embeds (B, P, E): what the model sees first instead of the prompt's token embeddings; without
        input_ids the rows hold only the new tokens (opt_spec.generation). assistant_model (a smaller
        OPTForCausalLM) or prompt_lookup_num_tokens: assisted decoding (opt_spec.generation). past_key_values:
        a cache of the prompt's first tokens to re-use (the model's KVCache or a Hugging Face DynamicCache;
        left as it is)."""
        input_ids, attention_mask, embeds, prefix, d = self._prepare(input_ids, attention_mask, generation_config,
                                                                     kwargs, inputs_embeds)
        processors = check_extras(d, logits_processor, streamer, tokenizer)
        host = dict(criteria=check_host_rules(stopping_criteria, prefix_allowed_tokens_fn, d.max_time),
                    prefix_fn=prefix_allowed_tokens_fn)
        drafter = self._drafter(d, assistant_model, input_ids, attention_mask, embeds, prefix)
        stops = StopStrings(d.stop_strings, tokenizer) if d.stop_strings else None
        record = _Record(d)
        if d.is_beam_search:
            new, beam_scores, beam_indices = self._beam_search(input_ids, attention_mask, d, processors, stops,
                                                               record, embeds=embeds, prefix=prefix, **host)
            sequences = torch.cat([input_ids.repeat_interleave(d.num_return_sequences, 0), new], dim=1)
            if not d.return_dict_in_generate:
                return sequences
            hidden_states, attentions = None, None
            if record.beam_rows is not None:  # one forward per step over its running beams
                K, past = d.num_beams, _prefix_length(prefix)
                beams = (input_ids.repeat_interleave(K, 0), attention_mask.repeat_interleave(K, 0))
                embeds, prefix = _repeat_rows(embeds, K), _repeat_rows(prefix, K)
                hidden_states, attentions = replayed_step_outputs(
                    attention_mask.shape[1] - past, len(record.beam_rows),
                    lambda s: self._replay(*beams, record.beam_rows[s], s + 1, d, embeds, prefix), past)
            return GenerateBeamDecoderOnlyOutput(
                sequences=sequences, sequences_scores=beam_scores if d.output_scores else None, scores=record.scores,
                logits=record.logits, beam_indices=beam_indices, hidden_states=hidden_states, attentions=attentions)
        n = d.num_return_sequences
        input_ids, attention_mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
        embeds, prefix = _repeat_rows(embeds, n), _repeat_rows(prefix, n)
        streamer = as_streamer(streamer)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        steps = []
        for tokens in self._decode(input_ids, attention_mask, d, compile, processors, stops, record, embeds=embeds,
                                   prefix=prefix, drafter=drafter, **host):
            steps.append(tokens)
            if streamer is not None:
                streamer.put(tokens.cpu())
        if streamer is not None:
            streamer.end()
        sequences = torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)
        if not d.return_dict_in_generate:
            return sequences
        hidden_states, attentions = None, None
        if d.output_hidden_states or d.output_attentions:  # one forward over the rows, cut per step
            past = _prefix_length(prefix)
            new = sequences[:, input_ids.shape[1]:]
            hidden_states, attentions = step_outputs(
                attention_mask.shape[1] - past, len(steps),
                *self._replay(input_ids, attention_mask, new, len(steps), d, embeds, prefix), past)
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=record.scores, logits=record.logits,
                                         hidden_states=hidden_states, attentions=attentions)

    def _replay(self, input_ids, attention_mask, new, steps: int, d: Decoding, embeds=None, prefix=None) -> tuple:
        """(hidden_states, attentions) of one forward over rows' first positions, for `steps` steps of generate's
        record (opt_spec.generation.step_outputs): the prompt input_ids (R, T) seen through attention_mask
        (R, P) (after the embeddings `embeds` or a prefix in the cache, when the call had them), then the
        new tokens `new` (R, >= steps - 1) but the last step's."""
        mask = torch.from_numpy(step_forward_mask(_host(attention_mask), steps)).to(attention_mask.device)
        cache = None if prefix is None else self._start_cache(len(input_ids), prefix=prefix)  # not in the input
        if embeds is None:
            inputs = dict(input_ids=torch.cat([_fed(input_ids, attention_mask.shape[1], prefix), new[:, :steps - 1]],
                                              dim=1))
        else:  # the embedded positions, then the new tokens' embeddings
            inputs = dict(inputs_embeds=torch.cat([embeds, self.get_input_embeddings()(new[:, :steps - 1])], dim=1))
        out = self._base(**inputs, attention_mask=mask, past_key_values=cache, use_cache=cache is not None,
                         output_hidden_states=d.output_hidden_states, output_attentions=d.output_attentions)
        return out.hidden_states, out.attentions

    def compute_transition_scores(self, sequences, scores, beam_indices=None,
                                  normalize_logits: bool = False) -> torch.Tensor:
        """(rows, steps) float32: each generated token's score in its step's scores (output_scores),
        Hugging Face's compute_transition_scores (opt_spec.generation.transition_scores)."""
        out = transition_scores(_host(sequences), [_host(s) for s in scores], _host(beam_indices), normalize_logits)
        return torch.from_numpy(out).to(sequences.device if isinstance(sequences, torch.Tensor) else "cpu")

    def stream(self, input_ids=None, attention_mask=None, generation_config=None, logits_processor=None,
               tokenizer=None, stopping_criteria=None, prefix_allowed_tokens_fn=None, compile: bool = False,
               inputs_embeds=None, assistant_model=None, **kwargs) -> Iterator[torch.Tensor]:
        """Yields the (B * num_return_sequences,) tokens of each step as soon as they are chosen (greedy
        or sampling)."""
        input_ids, attention_mask, embeds, prefix, d = self._prepare(input_ids, attention_mask, generation_config,
                                                                     kwargs, inputs_embeds)
        if d.is_beam_search:
            raise ValueError("beam search cannot stream: the best beam is known only at the end (use num_beams=1)")
        processors = check_extras(d, logits_processor, None, tokenizer)
        criteria = check_host_rules(stopping_criteria, prefix_allowed_tokens_fn, d.max_time)
        stops = StopStrings(d.stop_strings, tokenizer) if d.stop_strings else None
        n = d.num_return_sequences
        drafter = self._drafter(d, assistant_model, input_ids, attention_mask, embeds, prefix)
        with torch.no_grad():
            yield from self._decode(input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0), d,
                                    compile, processors, stops, criteria=criteria, prefix_fn=prefix_allowed_tokens_fn,
                                    embeds=_repeat_rows(embeds, n), prefix=_repeat_rows(prefix, n), drafter=drafter)

    def _drafter(self, d: Decoding, assistant, input_ids, attention_mask, embeds, prefix=None):
        """Where an assisted call's candidates come from (opt_spec.generation.check_assisted): an _Assistant or
        a _PromptLookup over the call's cache slots; None for plain decoding."""
        if not check_assisted(d, assistant, input_ids.shape[0], embeds is not None, self.config.vocab_size, "torch"):
            return None
        if prefix is not None and assistant is not None and attention_mask.shape[1] > input_ids.shape[1]:
            raise ValueError("assistant_model: the assistant cannot read the prefix keys and values that "
                             "prepare_inputs_for_generation put in the cache (PEFT's prefix tuning); use "
                             "prompt_lookup_num_tokens")
        (_, T), P, N = input_ids.shape, attention_mask.shape[1], d.max_new_tokens
        if assistant is None:
            return _PromptLookup(d, P - T)
        if assistant.device != self.device:
            raise ValueError(f"assistant_model is on {assistant.device}, the model on {self.device}")
        check_prompt(_host(attention_mask), N, assistant.config.max_position_embeddings)
        return _Assistant(assistant, d, P + N, pad_slots(P, N, assistant.config.max_position_embeddings))

    # ------------------------------------------------------------------------ greedy and sampling
    def _decode(self, input_ids, attention_mask, d: Decoding, compile: bool, processors=(),
                stops: Optional[StopStrings] = None, record: Optional[_Record] = None, criteria=(),
                prefix_fn: Optional[Callable] = None, embeds=None, prefix=None,
                drafter=None) -> Iterator[torch.Tensor]:
        """input_ids (B, T): the rows' prompt; attention_mask (B, P) over the positions the model sees first
        (the prompt's, or the P embeddings `embeds` with T = P or 0); the first of them may be a prefix of keys
        and values put in the cache instead of fed (_prepare's). Every rule reads the rows, seq[:, S:]: the
        cache's slots from S = P - T on. drafter (_drafter's): candidates to check a forward pass at a time
        (opt_spec.generation, "Assisted decoding"; B = 1)."""
        (B, T), P = input_ids.shape, attention_mask.shape[1]
        N, V = d.max_new_tokens, self.config.vocab_size
        L, S, device = P + N, P - T, input_ids.device
        cache = self._start_cache(B, L, pad_slots(P, N, self.config.max_position_embeddings), prefix)
        mask = torch.zeros(B, L, dtype=torch.long, device=device)  # (B, L) over every cache slot
        mask[:, :P] = attention_mask
        seq = torch.full((B, L), d.pad_token_id, dtype=torch.long, device=device)  # the rows so far, from S
        seq[:, S:P] = input_ids
        generator = self._sampling_generator(d, device)
        seen = _prompt_seen(input_ids, mask[:, S:P], V) if d.repetition_penalty != 1.0 else None
        eos = torch.tensor(d.eos_token_ids, dtype=torch.long, device=device)
        rules = TokenRules(d, V, device, prefix_fn)
        step_fn = self._step_fn(compile)
        ahead, candidates = [self._last_logits(_fed(input_ids, P, prefix), mask, cache, embeds)], None  # next logits
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        step = 0
        while True:
            for i, logits in enumerate(ahead):  # one step per logits: rules, choice, stop
                now = P + step
                scores = step_scores(logits, seen, seq[:, S:now], mask[:, S:now], step, d, rules, processors)
                if record is not None:
                    record.add(scores, logits)
                if d.do_sample:
                    tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]
                else:
                    tokens = scores.argmax(-1)
                tokens = torch.where(finished, d.pad_token_id, tokens)
                seq[:, now] = tokens
                mask[:, now] = 1
                yield tokens
                hits = _stop_hits(stops, seq[:, S:now + 1], mask[:, S:now + 1], ~finished, criteria,
                                  record.scores if record is not None else None)
                finished |= torch.isin(tokens, eos)
                if hits is not None:
                    finished |= hits
                step += 1
                if step == N or bool(finished.all()):
                    return
                if seen is not None:
                    seen[torch.arange(B, device=device), tokens] = True
                if candidates is None or i == len(candidates) or int(tokens[0]) != int(candidates[i]):
                    break  # the next logits were computed for a candidate the step did not choose
            if drafter is not None:
                if candidates is not None:
                    drafter.taken(i, len(candidates))
                candidates = drafter.propose(seq, mask, now + 1, N - step - 1)
                cache.crop(now)  # what was written for candidates not taken goes
            if drafter is None or not len(candidates):
                ahead = [step_fn(tokens, mask, cache, now)]
            else:  # the chosen token and the next candidates in one forward pass
                ahead = self._check_candidates(tokens, candidates, mask, cache, now)

    def _check_candidates(self, last, candidates, mask, cache, slot: int) -> list:
        """Assisted decoding's forward pass: the chosen token `last` (1,) at cache slot `slot` (the cache's write
        position) and the candidates (k,) after it; the logits (1, V) of the k + 1 positions that follow, float32.
        The candidates' slots of `mask` are cleared again (a step sets each one it takes)."""
        tokens = torch.cat([last, candidates])[None]  # (1, k + 1)
        width = slot + tokens.shape[1]
        mask[:, slot:width] = 1
        out = self.model(input_ids=tokens, attention_mask=mask[:, :width], past_key_values=cache, use_cache=True)
        mask[:, slot + 1:width] = 0
        return list(self.lm_head(out.last_hidden_state[0]).float()[:, None].unbind(0))

    # ---------------------------------------------------------------------------------- beam search
    def _beam_search(self, input_ids, attention_mask, d: Decoding, processors=(), stops: Optional[StopStrings] = None,
                     record: Optional[_Record] = None, criteria=(), prefix_fn: Optional[Callable] = None,
                     embeds=None, prefix=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's num_return_sequences best hypotheses, best first: their new tokens (B * n, M), their
        normalized scores (B * n,) and their beam indices (B * n, M): the running beam, b * K + k, that
        each token extended at its step (-1 past the hypothesis's end; Hugging Face's beam_indices)."""
        (B, T), P = input_ids.shape, attention_mask.shape[1]    # the rows' prompt, the positions seen first
        K, N, V, C = d.num_beams, d.max_new_tokens, self.config.vocab_size, d.candidates
        L, S, device = P + N, P - T, input_ids.device
        rows = torch.arange(B, device=device)
        cache = self._start_cache(B * K, L, pad_slots(P, N, self.config.max_position_embeddings),
                                  _repeat_rows(prefix, K))
        mask = torch.zeros(B * K, L, dtype=torch.long, device=device)
        mask[:, :P] = attention_mask.repeat_interleave(K, 0)
        prompt = input_ids.repeat_interleave(K, 0)                           # (BK, T)
        seen = _prompt_seen(prompt, mask[:, S:P], V) if d.repetition_penalty != 1.0 else None
        logits = self._last_logits(_fed(prompt, P, prefix), mask, cache, _repeat_rows(embeds, K))
        step_fn = self._step_fn(compile=False)
        eos = torch.tensor(d.eos_token_ids, dtype=torch.long, device=device)
        rules = TokenRules(d, V, device, prefix_fn)
        norms = length_norms(N, d.length_penalty).tolist()  # float32 values as Python floats
        generator = self._sampling_generator(d, device)  # beam sampling: candidates drawn, not the best taken

        scores = torch.full((B, K), NEG_INF, device=device)
        scores[:, 0] = 0.0                                                  # one live beam to start
        beams = torch.full((B, K, N), d.pad_token_id, dtype=torch.long, device=device)
        origin = torch.full((B, K, N), -1, dtype=torch.long, device=device)  # the beam index of each token
        done_scores = torch.full((B, K), NEG_INF, device=device)           # finished hypotheses
        done_tokens = torch.full((B, K, N), d.pad_token_id, dtype=torch.long, device=device)
        done_origin = torch.full((B, K, N), -1, dtype=torch.long, device=device)
        done_length = torch.zeros((B, K), dtype=torch.long, device=device)
        row_done = torch.zeros(B, dtype=torch.bool, device=device)
        rank = torch.arange(C, device=device)
        for step in range(N):
            seq = torch.cat([prompt, beams.view(B * K, N)[:, :step]], 1)   # (BK, T + step)
            if record is not None and record.beam_rows is not None:
                record.beam_rows.append(beams.view(B * K, N)[:, :step].clone())
            logprobs = step_scores(logits, seen, seq, mask[:, S:P + step], step, d, rules, processors, beam=True)
            if record is not None:
                record.add(logprobs, logits)
            cand = (scores[..., None] + logprobs.view(B, K, V)).view(B, K * V)
            if generator is None:
                cand_scores, cand_index = torch.topk(cand, C, dim=-1)       # (B, C), best first
            else:
                cand_index = draw_without_replacement(cand, C, generator)   # (B, C), in the order drawn
                cand_scores = cand.gather(1, cand_index)
            parent, token = cand_index // V, cand_index % V
            history = torch.gather(beams, 1, parent[..., None].expand(B, C, N)).clone()  # (B, C, N)
            history[:, :, step] = token
            lineage = torch.gather(origin, 1, parent[..., None].expand(B, C, N)).clone()
            lineage[:, :, step] = rows[:, None] * K + parent
            stopped = torch.isin(token, eos) | (step == N - 1)  # at the length limit every candidate stops
            if stops is not None or criteria:  # asked of every candidate: the beams extended by their token
                cand_seq = torch.cat([prompt.view(B, K, T).gather(1, parent[..., None].expand(B, C, T)),
                                      history[:, :, :step + 1]], 2).view(B * C, T + step + 1)
                cand_real = torch.cat([mask[:, S:P].view(B, K, T).gather(1, parent[..., None].expand(B, C, T)),
                                       torch.ones(B, C, step + 1, dtype=torch.long, device=device)], 2)
                stopped |= _stop_hits(stops, cand_seq, cand_real.view(B * C, -1),
                                      torch.ones(B * C, dtype=torch.bool), criteria,
                                      record.scores if record is not None else None).view(B, C)
            # finished candidates: stopped among the first K, scored by their length-normalized sum
            finishing = stopped & (rank < K) & ~row_done[:, None] & torch.isfinite(cand_scores)
            normalized = torch.where(finishing, cand_scores / norms[step], NEG_INF)
            pool_scores = torch.cat([done_scores, normalized], 1)             # (B, K + C)
            pool_tokens = torch.cat([done_tokens, history], 1)                # (B, K + C, N)
            pool_origin = torch.cat([done_origin, lineage], 1)
            pool_length = torch.cat([done_length, torch.full_like(token, step + 1)], 1)
            best = torch.sort(pool_scores, dim=-1, descending=True, stable=True).indices[:, :K]  # earlier first on ties
            done_scores = torch.gather(pool_scores, 1, best)
            done_length = torch.gather(pool_length, 1, best)
            done_tokens = torch.gather(pool_tokens, 1, best[..., None].expand(B, K, N))
            done_origin = torch.gather(pool_origin, 1, best[..., None].expand(B, K, N))
            # running beams: the first (best; drawn: best-scored) K candidates that did not stop, then stopped
            # ones, lowered by 1e9
            if generator is None:
                order = torch.where(stopped, rank + C, rank).argsort(-1)[:, :K]  # (B, K)
            else:
                order = torch.sort(cand_scores - 1e9 * stopped, dim=-1, descending=True, stable=True).indices[:, :K]
            scores_next = torch.gather(cand_scores - 1e9 * stopped, 1, order)
            parent_next = torch.gather(parent, 1, order)
            beams = torch.gather(history, 1, order[..., None].expand(B, K, N))
            origin = torch.gather(lineage, 1, order[..., None].expand(B, K, N))
            scores = torch.where(row_done[:, None], scores, scores_next)
            # a row is done when K hypotheses are finished and (early_stopping=True) at once, or else once no
            # running beam can beat the worst (normalized at the length best_length says)
            full = torch.isfinite(done_scores).all(-1)
            if d.early_stopping is True:
                row_done |= full
            else:
                best_running = scores.max(-1).values / norms[best_length(step, d) - 1]
                row_done |= full & (done_scores.min(-1).values >= best_running)
            if step + 1 == N or bool(row_done.all()):
                break
            flat_parent = (rows[:, None] * K + parent_next).view(-1)
            cache.reorder(flat_parent)
            tokens = beams[:, :, step].reshape(-1)
            if seen is not None:
                seen = seen[flat_parent]
                seen[torch.arange(B * K, device=device), tokens] = True
            mask[:, P + step] = 1
            logits = step_fn(tokens, mask, cache, P + step)
        n = d.num_return_sequences  # the finished hypotheses, best first (done_* are kept in that order)
        M = int(done_length[:, :n].max())
        chosen = done_tokens[:, :n].reshape(B * n, N)[:, :M]
        return chosen, done_scores[:, :n].reshape(B * n), done_origin[:, :n].reshape(B * n, N)[:, :M]
