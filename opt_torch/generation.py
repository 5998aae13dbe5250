"""`generate` for the PyTorch backend, following opt_spec.generation's semantics.

Decoding writes into a preallocated StaticCache (no re-allocation per token); the one-token step has
fixed shapes, so on a GPU `compile=True` lets torch.compile capture it (CUDA graphs); on the CPU the
loop runs eagerly. `stream(...)` yields each step's tokens as they are produced, and `generate(...,
streamer=fn)` calls fn with them.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from opt_spec.generation import GenerationConfig, check_prompt

from .cache import StaticCache


def _process(logits: torch.Tensor, seen: Optional[torch.Tensor], step: int, cfg: GenerationConfig) -> torch.Tensor:
    """Rules 1-2 of opt_spec.generation on float32 logits (B, V)."""
    if seen is not None:
        penalized = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if step < cfg.min_new_tokens and cfg.eos_token_id is not None:
        logits = logits.clone()
        logits[:, cfg.eos_token_id] = float("-inf")
    return logits


def _filter_for_sampling(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    logits = logits / cfg.temperature
    V = logits.shape[-1]
    if 0 < cfg.top_k < V:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class GenerationMixin:
    """Adds generate / stream to OPTForCausalLM."""

    def _last_logits(self, ids, mask, cache, positions) -> torch.Tensor:
        """float32 logits (B, V) of the last new position, filling the cache."""
        out = self.model(ids, attention_mask=mask, past_key_values=cache, cache_position=positions, use_cache=True)
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
        row, written to cache slot `slot`. Eager: opt_torch.modeling.DecodeStep over tensors gathered
        now (no module calls per step), attending over the slots written so far. compile=True: the
        model's forward over the whole buffer (fixed shapes), captured by torch.compile (CUDA graphs).
        A decoder whose layers are swapped or hooked (LoRA, probes) takes that forward uncompiled, so
        that every module runs (DecodeStep reads weights and would skip them)."""
        from .layout import modules_are_stock

        if compile or not modules_are_stock(self.model.decoder):
            forward = self._last_logits
            if compile:
                forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
            return lambda tokens, mask, cache, slot: forward(tokens[:, None], mask, cache,
                                                             torch.tensor([slot], device=mask.device))
        from .modeling import DecodeStep  # modeling imports this module

        decode = DecodeStep(self.model.decoder, self.attn_implementation)

        def step(tokens, mask, cache, slot):  # the new token's position: the real tokens before it
            allowed = mask[:, :slot + 1].bool()[:, None, None, :]  # (B, 1, 1, slot + 1)
            hidden = decode(tokens, mask.sum(1) - 1, allowed, cache, torch.tensor([slot], device=mask.device))
            return self.lm_head(hidden).float()
        return step

    def _prepare(self, input_ids, attention_mask, cfg: GenerationConfig):
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids)
        check_prompt(tuple(input_ids.shape), cfg.max_new_tokens, self.config.max_position_embeddings)
        device = self.device
        input_ids = input_ids.to(device=device, dtype=torch.long)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask).to(device=device, dtype=torch.long)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                             f"{tuple(input_ids.shape)}")
        return input_ids, attention_mask

    def _config(self, kwargs) -> GenerationConfig:
        return GenerationConfig(**kwargs).with_model_defaults(
            self.config.eos_token_id, self.config.pad_token_id, self.config.vocab_size)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 num_beams: int = 1, length_penalty: float = 1.0, repetition_penalty: float = 1.0,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None, seed: Optional[int] = None,
                 streamer: Optional[Callable[[torch.Tensor], None]] = None, compile: bool = False) -> torch.Tensor:
        """The prompts followed by the new tokens, (B, T + N); see opt_spec.generation."""
        cfg = self._config(dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
                                length_penalty=length_penalty, repetition_penalty=repetition_penalty,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed))
        input_ids, attention_mask = self._prepare(input_ids, attention_mask, cfg)
        if cfg.is_beam_search:
            if streamer is not None:
                raise ValueError("beam search cannot stream: the best beam is known only at the end")
            new = self._beam_search(input_ids, attention_mask, cfg)
        else:
            steps = []
            for tokens in self._decode(input_ids, attention_mask, cfg, compile):
                steps.append(tokens)
                if streamer is not None:
                    streamer(tokens)
            new = torch.stack(steps, dim=1)
        return torch.cat([input_ids, new], dim=1)

    def stream(self, input_ids, attention_mask=None, **kwargs) -> Iterator[torch.Tensor]:
        """Yields the (B,) tokens of each step as soon as they are chosen (greedy or sampling)."""
        compile = kwargs.pop("compile", False)
        cfg = self._config(kwargs)
        if cfg.is_beam_search:
            raise ValueError("beam search cannot stream: the best beam is known only at the end")
        input_ids, attention_mask = self._prepare(input_ids, attention_mask, cfg)
        with torch.no_grad():
            yield from self._decode(input_ids, attention_mask, cfg, compile)

    # ------------------------------------------------------------------------ greedy and sampling
    def _decode(self, input_ids, attention_mask, cfg: GenerationConfig, compile: bool) -> Iterator[torch.Tensor]:
        B, T = input_ids.shape
        L = T + cfg.max_new_tokens
        device, V = input_ids.device, self.config.vocab_size
        cache = StaticCache(self.config, B, L, self.dtype, device, self.kv_heads)
        mask = torch.zeros(B, L, dtype=torch.long, device=device)  # (B, L) over every cache slot
        mask[:, :T] = attention_mask
        generator = None
        if cfg.do_sample:
            generator = torch.Generator(device=device)
            generator.manual_seed(cfg.seed if cfg.seed is not None else self._fresh_seed())
        seen = None
        if cfg.repetition_penalty != 1.0:
            seen = torch.zeros(B, V, dtype=torch.long, device=device).scatter_add_(1, input_ids, attention_mask) > 0
        step_fn = self._step_fn(compile)
        logits = self._last_logits(input_ids, mask, cache, torch.arange(T, device=device))
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(cfg.max_new_tokens):
            logits = _process(logits, seen, step, cfg)
            if cfg.do_sample:
                probs = _filter_for_sampling(logits, cfg).softmax(-1)
                tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                tokens = logits.argmax(-1)
            tokens = torch.where(finished, cfg.pad_token_id, tokens)
            yield tokens
            if cfg.eos_token_id is not None:
                finished |= tokens == cfg.eos_token_id
            if step + 1 == cfg.max_new_tokens or bool(finished.all()):
                return
            if seen is not None:
                seen[torch.arange(B, device=device), tokens] = True
            mask[:, T + step] = 1
            logits = step_fn(tokens, mask, cache, T + step)

    # ---------------------------------------------------------------------------------- beam search
    def _beam_search(self, input_ids, attention_mask, cfg: GenerationConfig) -> torch.Tensor:
        B, T = input_ids.shape
        K, N, V = cfg.num_beams, cfg.max_new_tokens, self.config.vocab_size
        L, device = T + N, input_ids.device
        rows = torch.arange(B, device=device)
        cache = StaticCache(self.config, B * K, L, self.dtype, device, self.kv_heads)
        mask = torch.zeros(B * K, L, dtype=torch.long, device=device)
        mask[:, :T] = attention_mask.repeat_interleave(K, 0)
        seen = None
        if cfg.repetition_penalty != 1.0:
            seen = torch.zeros(B * K, V, dtype=torch.long, device=device).scatter_add_(
                1, input_ids.repeat_interleave(K, 0), mask[:, :T]) > 0
        logits = self._last_logits(input_ids.repeat_interleave(K, 0), mask, cache, torch.arange(T, device=device))
        step_fn = self._step_fn(compile=False)

        scores = torch.full((B, K), float("-inf"), device=device)
        scores[:, 0] = 0.0                                                  # one live beam to start
        beams = torch.full((B, K, N), cfg.pad_token_id, dtype=torch.long, device=device)
        done_scores = torch.full((B, K), float("-inf"), device=device)     # finished hypotheses
        done_tokens = torch.full((B, K, N), cfg.pad_token_id, dtype=torch.long, device=device)
        done_length = torch.zeros((B, K), dtype=torch.long, device=device)
        row_done = torch.zeros(B, dtype=torch.bool, device=device)
        eos = cfg.eos_token_id
        for step in range(N):
            logprobs = _process(logits, seen, step, cfg).log_softmax(-1).view(B, K, V)
            cand = (scores[..., None] + logprobs).view(B, K * V)
            cand_scores, cand_index = torch.topk(cand, 2 * K, dim=-1)    # (B, 2K), best first
            parent, token = cand_index // V, cand_index % V
            is_eos = token == eos if eos is not None else torch.zeros_like(token, dtype=torch.bool)
            # finished candidates: EOS among the first K, scored by their length-normalized sum
            rank = torch.arange(2 * K, device=device)
            finishing = is_eos & (rank < K) & ~row_done[:, None] & torch.isfinite(cand_scores)
            normalized = torch.where(finishing, cand_scores / float(step + 1) ** cfg.length_penalty,
                                     torch.tensor(float("-inf"), device=device))
            history = torch.gather(beams, 1, parent[..., None].expand(B, 2 * K, N)).clone()  # (B, 2K, N)
            history[:, :, step] = token
            pool_scores = torch.cat([done_scores, normalized], 1)             # (B, 3K)
            pool_tokens = torch.cat([done_tokens, history], 1)                # (B, 3K, N)
            pool_length = torch.cat([done_length, torch.full_like(token, step + 1)], 1)
            best = torch.topk(pool_scores, K, dim=-1).indices
            done_scores = torch.gather(pool_scores, 1, best)
            done_length = torch.gather(pool_length, 1, best)
            done_tokens = torch.gather(pool_tokens, 1, best[..., None].expand(B, K, N))
            # running beams: the first K candidates that do not end in EOS
            alive = ~is_eos
            order = torch.where(alive, rank, rank + 2 * K).argsort(-1)[:, :K]  # (B, K)
            scores_next = torch.gather(cand_scores, 1, order)
            parent_next = torch.gather(parent, 1, order)
            beams = torch.gather(history, 1, order[..., None].expand(B, K, N))
            scores = torch.where(row_done[:, None], scores, scores_next)
            # a row is done when K hypotheses are finished and no running beam can beat the worst
            full = torch.isfinite(done_scores).all(-1)
            best_running = scores.max(-1).values / float(step + 1) ** cfg.length_penalty
            row_done |= full & (done_scores.min(-1).values >= best_running)
            if step + 1 == N or bool(row_done.all()):
                break
            flat_parent = (rows[:, None] * K + parent_next).view(-1)
            cache.reorder(flat_parent)
            tokens = torch.gather(history, 1, order[..., None].expand(B, K, N))[:, :, step].reshape(-1)
            if seen is not None:
                seen = seen[flat_parent]
                seen[torch.arange(B * K, device=device), tokens] = True
            mask[:, T + step] = 1
            logits = step_fn(tokens, mask, cache, T + step)
        # rows still running at the end: their beams compete as hypotheses of length step + 1
        final = torch.where(row_done[:, None], torch.tensor(float("-inf"), device=device),
                            scores / float(step + 1) ** cfg.length_penalty)
        pool_scores = torch.cat([done_scores, final], 1)
        pool_tokens = torch.cat([done_tokens, beams], 1)
        pool_length = torch.cat([done_length, torch.full_like(done_length, step + 1)], 1)
        pick = pool_scores.argmax(-1)                                          # (B,)
        chosen = pool_tokens[rows, pick]                                       # (B, N)
        return chosen[:, :int(pool_length[rows, pick].max())]
