"""Output records shared by the three backends (plain dataclasses holding each framework's arrays).

Fields are read as attributes (`out.logits`), by key (`out["logits"]`) or by position over the
fields that are set (`out[0]`), as Hugging Face users are used to; `to_tuple()` is what a model returns
with `return_dict=False`, in Hugging Face's order. `attentions` holds one (B, nh, T, S) tensor of
attention probabilities per layer when the model is called with `output_attentions=True`.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class ModelOutput:
    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


@dataclasses.dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None


@dataclasses.dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: Any = None
    logits: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None


@dataclasses.dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: Any = None
    logits: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None


@dataclasses.dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Any = None
    start_logits: Any = None
    end_logits: Any = None
    past_key_values: Any = None  # not in Hugging Face's record: left out of the tuple
    hidden_states: Any = None
    attentions: Any = None

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.keys() if k != "past_key_values")


@dataclasses.dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """generate(..., return_dict_in_generate=True) for greedy search and sampling (opt_spec.generation,
    "Outputs"): scores / logits are tuples with one (rows, V) array per step, when asked for."""
    sequences: Any = None
    scores: Any = None
    logits: Any = None
    attentions: Any = None
    hidden_states: Any = None
    past_key_values: Any = None


@dataclasses.dataclass
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """generate(..., return_dict_in_generate=True) for beam search: also each returned hypothesis's score
    (sequences_scores, with output_scores) and the running beam each of its tokens extended (beam_indices)."""
    sequences: Any = None
    sequences_scores: Any = None
    scores: Any = None
    logits: Any = None
    beam_indices: Any = None
    attentions: Any = None
    hidden_states: Any = None
    past_key_values: Any = None
