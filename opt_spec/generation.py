"""What `generate` means, once for every backend.

`model.generate(input_ids, attention_mask=None, max_new_tokens=20, ...)` takes a left-padded batch of
prompts (B, T) and returns the prompts followed by the new tokens, (B, T + N), as the backend's own
array type. N is the number of decoding steps actually taken: at most max_new_tokens, fewer when every
row finished early (greedy and sampling), or the longest chosen hypothesis (beam search).

One decoding step, per row, on the logits of the row's last position (computed in float32):
1. Repetition penalty (when != 1): every token id that occurs among the row's real tokens so far
   (prompt tokens under the mask, and generated tokens) has its logit divided by the penalty when
   positive and multiplied by it when negative.
2. While fewer than min_new_tokens tokens have been generated, the EOS logit is set to -inf.
3. Greedy (do_sample=False, num_beams=1): the next token is the argmax (lowest id on ties).
   Sampling (do_sample=True): logits / temperature, then top-k (keep the k largest; 0 keeps all),
   then top-p (keep the smallest set of most probable tokens whose probability reaches top_p, always
   at least one), then draw from the softmax of what is kept, with the backend's own random stream
   seeded by `seed` (reproducible within a backend, not across backends).
4. A row that emits eos_token_id is finished; from then on it emits pad_token_id. Decoding stops when
   every row is finished or max_new_tokens steps were taken.

Beam search (num_beams = K > 1, no sampling): each row keeps K running beams, starting from one beam
(the others scored -inf). A step scores every continuation of every running beam as
beam score + log_softmax(processed logits); the 2K best candidates per row (higher score first, then
lower beam * V + token index) are taken in order: a candidate ending in EOS becomes a finished
hypothesis with score sum_logprobs / (generated_length ** length_penalty), generated_length counting
the EOS (only candidates among the first K may finish); the others fill the K running beams. A row is
done once it has K finished hypotheses and its best running beam, normalized at the current length, can
no longer beat the worst of them. At max_new_tokens the running beams are finished with their
normalized scores. The output per row is the best finished hypothesis, padded with pad_token_id.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        def fail(field, why):
            raise ValueError(f"{field}={getattr(self, field)!r}: {why}")

        for name in ("max_new_tokens", "min_new_tokens", "top_k", "num_beams"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(name, "must be a non-negative int")
        if self.max_new_tokens < 1:
            fail("max_new_tokens", "must be at least 1")
        if self.num_beams < 1:
            fail("num_beams", "must be at least 1")
        if self.min_new_tokens > self.max_new_tokens:
            fail("min_new_tokens", f"is more than max_new_tokens={self.max_new_tokens}")
        if not self.temperature > 0:
            fail("temperature", "must be > 0")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not self.repetition_penalty > 0:
            fail("repetition_penalty", "must be > 0")
        if self.do_sample and self.num_beams > 1:
            fail("num_beams", "beam search does not sample; use do_sample=False with num_beams > 1")

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    def with_model_defaults(self, eos_token_id: int | None, pad_token_id: int | None, vocab_size: int):
        """Fills eos/pad from the model config and checks every id is in the vocabulary."""
        cfg = dataclasses.replace(
            self, eos_token_id=self.eos_token_id if self.eos_token_id is not None else eos_token_id,
            pad_token_id=self.pad_token_id if self.pad_token_id is not None else pad_token_id)
        if cfg.pad_token_id is None:
            cfg = dataclasses.replace(cfg, pad_token_id=cfg.eos_token_id if cfg.eos_token_id is not None else 0)
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(cfg, name)
            if value is not None and not 0 <= value < vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {vocab_size})")
        return cfg


def check_prompt(input_ids_shape: tuple[int, ...], max_new_tokens: int, max_positions: int) -> None:
    if len(input_ids_shape) != 2 or input_ids_shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids_shape)}")
    total = input_ids_shape[1] + max_new_tokens
    if total > max_positions:
        raise ValueError(f"prompt of {input_ids_shape[1]} tokens + max_new_tokens={max_new_tokens} = {total} "
                         f"is more than the model's max_position_embeddings={max_positions}")


# --------------------------------------------------------------- NumPy reference of one step's rules
def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """logits (B, V) float32; seen (B, V) bool: token occurred among the row's real tokens."""
    penalized = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalized, logits).astype(np.float32)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.sort(logits, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits).astype(np.float32)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, -1).astype(np.float64)
    probs = np.exp(sorted_logits - sorted_logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    before = np.cumsum(probs, -1) - probs      # probability mass strictly before each token
    drop_sorted = before >= p                   # keep tokens until the mass reaches p (always the first)
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, -1)
    return np.where(drop, -np.inf, logits).astype(np.float32)
