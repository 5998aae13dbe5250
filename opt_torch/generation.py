"""`generate` for the PyTorch backend, following opt_spec.generation's semantics.

Decoding writes into a preallocated KVCache (no re-allocation per token); the one-token step has
fixed shapes, so on a GPU `compile=True` lets torch.compile capture it (CUDA graphs); on the CPU the
loop runs eagerly. The loop is on the host anyway, so logits processors, stop strings and streamers
(Hugging Face's put/end protocol, CPU tensors as Hugging Face puts them, or a plain callable) cost
nothing when they are not used. `stream(...)` yields each step's tokens as they are produced.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from opt_spec.generation import (Decoding, GenerationDefaults, StopStrings, apply_processors, as_streamer,
                                 check_extras, check_prompt, length_norms, prompt_inputs)


NEG_INF = float("-inf")


# ------------------------------------------------------------------------------- one step's rules
def process_logits(scores: torch.Tensor, seen: Optional[torch.Tensor], seq: torch.Tensor, real: torch.Tensor,
                   step: int, d: Decoding) -> torch.Tensor:
    """Rules 1-3 of opt_spec.generation on float32 scores (R, V) (logits, or log-probabilities in beam
    search); seq / real (R, T + step) are the rows so far and which of their positions are real."""
    if seen is not None:
        penalized = torch.where(scores > 0, scores / d.repetition_penalty, scores * d.repetition_penalty)
        scores = torch.where(seen, penalized, scores)
    if d.no_repeat_ngram_size:
        scores = scores.masked_fill(ngram_bans(seq, real, d.no_repeat_ngram_size, scores.shape[-1]), NEG_INF)
    if step < d.min_new_tokens and d.eos_token_ids:
        scores = scores.clone()
        scores[:, list(d.eos_token_ids)] = NEG_INF
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


def filter_for_sampling(logits: torch.Tensor, cfg) -> torch.Tensor:
    logits = logits / cfg.temperature
    V = logits.shape[-1]
    if 0 < cfg.top_k < V:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, NEG_INF)
    return logits


def _prompt_seen(ids: torch.Tensor, mask: torch.Tensor, V: int) -> torch.Tensor:
    return torch.zeros(ids.shape[0], V, dtype=torch.long, device=ids.device).scatter_add_(1, ids, mask) > 0


def _host(x):
    """A tensor as NumPy for the host-side checks (None and other arrays as they are)."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _stop_hits(stops: Optional[StopStrings], seq: torch.Tensor, real: torch.Tensor, live: torch.Tensor):
    """(R,) bool: live rows whose last token completes a stop string (checked on the host)."""
    if stops is None:
        return None
    hits = stops.hits(seq.cpu().numpy(), real.cpu().numpy(), live.cpu().numpy())
    return torch.from_numpy(hits).to(seq.device)


class GenerationMixin(GenerationDefaults):
    """Adds generate / stream to OPTForCausalLM (generation_config from opt_spec.GenerationDefaults)."""

    def _last_logits(self, ids, mask, cache) -> torch.Tensor:
        """float32 logits (B, V) of the last new position, filling the cache."""
        out = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        return self.lm_head(out.last_hidden_state[:, -1]).float()

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

    def _prepare(self, input_ids, attention_mask, generation_config, kwargs) -> tuple:
        """(input_ids, attention_mask) as long tensors on the model's device, and the call's Decoding."""
        prompt_inputs(_host(input_ids), _host(attention_mask), self.config.vocab_size)
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids)
        d = self._decoding(generation_config, kwargs, input_ids.shape[1])
        check_prompt(tuple(input_ids.shape), d.max_new_tokens, self.config.max_position_embeddings)
        device = self.device
        input_ids = input_ids.to(device=device, dtype=torch.long)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask).to(device=device, dtype=torch.long)
        return input_ids, attention_mask, d

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, generation_config=None, logits_processor=None,
                 streamer=None, tokenizer=None, compile: bool = False, **kwargs) -> torch.Tensor:
        """The prompts followed by the new tokens, (B * num_return_sequences, T + N); settings by Hugging
        Face's names as keywords (max_new_tokens, do_sample, num_beams, eos_token_id, ...) or in
        generation_config, defaults from model.generation_config; see opt_spec.generation."""
        input_ids, attention_mask, d = self._prepare(input_ids, attention_mask, generation_config, kwargs)
        processors = check_extras(d, logits_processor, streamer, tokenizer)
        stops = StopStrings(d.stop_strings, tokenizer) if d.stop_strings else None
        if d.is_beam_search:
            new = self._beam_search(input_ids, attention_mask, d, processors, stops)
            return torch.cat([input_ids.repeat_interleave(d.num_return_sequences, 0), new], dim=1)
        n = d.num_return_sequences
        input_ids, attention_mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
        streamer = as_streamer(streamer)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        steps = []
        for tokens in self._decode(input_ids, attention_mask, d, compile, processors, stops):
            steps.append(tokens)
            if streamer is not None:
                streamer.put(tokens.cpu())
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)

    def stream(self, input_ids, attention_mask=None, generation_config=None, logits_processor=None,
               tokenizer=None, compile: bool = False, **kwargs) -> Iterator[torch.Tensor]:
        """Yields the (B * num_return_sequences,) tokens of each step as soon as they are chosen (greedy
        or sampling)."""
        input_ids, attention_mask, d = self._prepare(input_ids, attention_mask, generation_config, kwargs)
        if d.is_beam_search:
            raise ValueError("beam search cannot stream: the best beam is known only at the end (use num_beams=1)")
        processors = check_extras(d, logits_processor, None, tokenizer)
        stops = StopStrings(d.stop_strings, tokenizer) if d.stop_strings else None
        n = d.num_return_sequences
        with torch.no_grad():
            yield from self._decode(input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0), d,
                                    compile, processors, stops)

    # ------------------------------------------------------------------------ greedy and sampling
    def _decode(self, input_ids, attention_mask, d: Decoding, compile: bool, processors=(),
                stops: Optional[StopStrings] = None) -> Iterator[torch.Tensor]:
        B, T = input_ids.shape
        N, V = d.max_new_tokens, self.config.vocab_size
        L, device = T + N, input_ids.device
        cache = self.init_cache(B, L)
        mask = torch.zeros(B, L, dtype=torch.long, device=device)  # (B, L) over every cache slot
        mask[:, :T] = attention_mask
        seq = torch.full((B, L), d.pad_token_id, dtype=torch.long, device=device)  # the rows so far
        seq[:, :T] = input_ids
        generator = None
        if d.do_sample:
            generator = torch.Generator(device=device)
            generator.manual_seed(d.seed if d.seed is not None else self._fresh_seed())
        seen = _prompt_seen(input_ids, attention_mask, V) if d.repetition_penalty != 1.0 else None
        eos = torch.tensor(d.eos_token_ids, dtype=torch.long, device=device)
        step_fn = self._step_fn(compile)
        logits = self._last_logits(input_ids, mask, cache)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(N):
            now = T + step
            scores = process_logits(logits, seen, seq[:, :now], mask[:, :now], step, d)
            scores = apply_processors(processors, seq[:, :now], scores)
            if d.do_sample:
                probs = filter_for_sampling(scores, d).softmax(-1)
                tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                tokens = scores.argmax(-1)
            tokens = torch.where(finished, d.pad_token_id, tokens)
            seq[:, now] = tokens
            mask[:, now] = 1
            yield tokens
            hits = _stop_hits(stops, seq[:, :now + 1], mask[:, :now + 1], ~finished)
            finished |= torch.isin(tokens, eos)
            if hits is not None:
                finished |= hits
            if step + 1 == N or bool(finished.all()):
                return
            if seen is not None:
                seen[torch.arange(B, device=device), tokens] = True
            logits = step_fn(tokens, mask, cache, now)

    # ---------------------------------------------------------------------------------- beam search
    def _beam_search(self, input_ids, attention_mask, d: Decoding, processors=(),
                     stops: Optional[StopStrings] = None) -> torch.Tensor:
        """(B * num_return_sequences, M) new tokens: each row's best hypotheses, best first."""
        B, T = input_ids.shape
        K, N, V, C = d.num_beams, d.max_new_tokens, self.config.vocab_size, d.candidates
        L, device = T + N, input_ids.device
        rows = torch.arange(B, device=device)
        cache = self.init_cache(B * K, L)
        mask = torch.zeros(B * K, L, dtype=torch.long, device=device)
        mask[:, :T] = attention_mask.repeat_interleave(K, 0)
        prompt = input_ids.repeat_interleave(K, 0)                           # (BK, T)
        seen = _prompt_seen(prompt, mask[:, :T], V) if d.repetition_penalty != 1.0 else None
        logits = self._last_logits(prompt, mask, cache)
        step_fn = self._step_fn(compile=False)
        eos = torch.tensor(d.eos_token_ids, dtype=torch.long, device=device)
        norms = length_norms(N, d.length_penalty).tolist()  # float32 values as Python floats

        scores = torch.full((B, K), NEG_INF, device=device)
        scores[:, 0] = 0.0                                                  # one live beam to start
        beams = torch.full((B, K, N), d.pad_token_id, dtype=torch.long, device=device)
        done_scores = torch.full((B, K), NEG_INF, device=device)           # finished hypotheses
        done_tokens = torch.full((B, K, N), d.pad_token_id, dtype=torch.long, device=device)
        done_length = torch.zeros((B, K), dtype=torch.long, device=device)
        row_done = torch.zeros(B, dtype=torch.bool, device=device)
        rank = torch.arange(C, device=device)
        for step in range(N):
            seq = torch.cat([prompt, beams.view(B * K, N)[:, :step]], 1)   # (BK, T + step)
            logprobs = process_logits(logits.log_softmax(-1), seen, seq, mask[:, :T + step], step, d)
            logprobs = apply_processors(processors, seq, logprobs).view(B, K, V)
            cand = (scores[..., None] + logprobs).view(B, K * V)
            cand_scores, cand_index = torch.topk(cand, C, dim=-1)           # (B, C), best first
            parent, token = cand_index // V, cand_index % V
            history = torch.gather(beams, 1, parent[..., None].expand(B, C, N)).clone()  # (B, C, N)
            history[:, :, step] = token
            stopped = torch.isin(token, eos)
            if stops is not None:
                cand_seq = torch.cat([prompt.view(B, K, T).gather(1, parent[..., None].expand(B, C, T)),
                                      history[:, :, :step + 1]], 2).view(B * C, T + step + 1)
                cand_real = torch.cat([mask[:, :T].view(B, K, T).gather(1, parent[..., None].expand(B, C, T)),
                                       torch.ones(B, C, step + 1, dtype=torch.long, device=device)], 2)
                stopped |= _stop_hits(stops, cand_seq, cand_real.view(B * C, -1),
                                      torch.ones(B * C, dtype=torch.bool)).view(B, C)
            # finished candidates: stopped among the first K, scored by their length-normalized sum
            finishing = stopped & (rank < K) & ~row_done[:, None] & torch.isfinite(cand_scores)
            normalized = torch.where(finishing, cand_scores / norms[step], NEG_INF)
            pool_scores = torch.cat([done_scores, normalized], 1)             # (B, K + C)
            pool_tokens = torch.cat([done_tokens, history], 1)                # (B, K + C, N)
            pool_length = torch.cat([done_length, torch.full_like(token, step + 1)], 1)
            best = torch.topk(pool_scores, K, dim=-1).indices
            done_scores = torch.gather(pool_scores, 1, best)
            done_length = torch.gather(pool_length, 1, best)
            done_tokens = torch.gather(pool_tokens, 1, best[..., None].expand(B, K, N))
            # running beams: the first K candidates that did not stop (then stopped ones, lowered by 1e9)
            order = torch.where(stopped, rank + C, rank).argsort(-1)[:, :K]  # (B, K)
            scores_next = torch.gather(cand_scores - 1e9 * stopped, 1, order)
            parent_next = torch.gather(parent, 1, order)
            beams = torch.gather(history, 1, order[..., None].expand(B, K, N))
            scores = torch.where(row_done[:, None], scores, scores_next)
            # a row is done when K hypotheses are finished and no running beam can beat the worst
            full = torch.isfinite(done_scores).all(-1)
            best_running = scores.max(-1).values / norms[step]
            row_done |= full & (done_scores.min(-1).values >= best_running)
            if step + 1 == N or bool(row_done.all()):
                break
            flat_parent = (rows[:, None] * K + parent_next).view(-1)
            cache.reorder(flat_parent)
            tokens = beams[:, :, step].reshape(-1)
            if seen is not None:
                seen = seen[flat_parent]
                seen[torch.arange(B * K, device=device), tokens] = True
            mask[:, T + step] = 1
            logits = step_fn(tokens, mask, cache, T + step)
        # rows still running at the end: their beams compete as hypotheses of length step + 1
        final = torch.where(row_done[:, None], NEG_INF, scores / norms[step])
        pool_scores = torch.cat([done_scores, final], 1)
        pool_tokens = torch.cat([done_tokens, beams], 1)
        pool_length = torch.cat([done_length, torch.full_like(done_length, step + 1)], 1)
        n = d.num_return_sequences
        pick = torch.sort(pool_scores, dim=-1, descending=True, stable=True).indices[:, :n]  # (B, n), best first
        chosen = torch.gather(pool_tokens, 1, pick[..., None].expand(B, n, N)).view(B * n, N)
        return chosen[:, :int(torch.gather(pool_length, 1, pick).max())]
