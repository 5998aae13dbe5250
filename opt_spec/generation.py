"""What `generate` means, once for every backend: the settings, where their defaults come from, and
the rules of a decoding step. Hugging Face transformers 4.57's names and meanings throughout.

`model.generate(input_ids, attention_mask=None, generation_config=None, logits_processor=None,
streamer=None, tokenizer=None, stopping_criteria=None, prefix_allowed_tokens_fn=None, **settings)` takes a
left-padded batch of prompts (B, T) and returns the prompts followed by the new tokens,
(B * num_return_sequences, T + N), as the backend's own array type.
`inputs_embeds=` (B, P, word_embed_proj_dim) floats, with an attention_mask (B, P) or none (all ones), makes
the model see those vectors as its first P positions instead of the prompt's token embeddings (soft
prompts, an image encoder's outputs), as in Hugging Face: without input_ids the rows the rules below see
(and generate returns) start empty, T = 0, and hold only the new tokens, (B * n, N); with input_ids, which
must then be (B, P), the ids of those positions, the rows start with them as usual. Lengths count what
Hugging Face counts: max_length and min_length include the P embedded positions (the default, without
max_new_tokens or max_length, is Hugging Face's max_length of 20 including them, so 20 - P new tokens;
with input_ids too, 20 new tokens); forced_bos_token_id and begin_suppress_tokens go by the rows (T).
N is the number of decoding steps actually taken: at most the length limit, fewer when every row
finished early (greedy and sampling), or the longest returned hypothesis (beam search).

Settings and their defaults (GenerationConfig, below). Each comes from, first to last: the keyword
arguments (None means "not given"), then `generation_config=` (an opt_spec GenerationConfig, a dict, or
an object with Hugging Face's attribute names such as transformers.GenerationConfig) whose values at
the global defaults fall back to the model's (as Hugging Face does for models saved by >= 4.50; not with
use_model_defaults=False, which takes the generation_config as it is), then
`model.generation_config`: the checkpoint's generation_config.json when it has one, else the config's
bos/eos/pad ids. `save_pretrained` writes `model.generation_config` back as generation_config.json,
keys optkit does not use included. The length limit: max_new_tokens; else max_length minus the prompt
length T (the padded length, Hugging Face's meaning; max_new_tokens wins when both are given); else 20
new tokens, fewer if the model's positions end sooner. A config's max_length of exactly 20 counts as
unset, since Hugging Face cannot tell it from its default. top_k defaults to 50, as in Hugging Face.
In a generation_config.json file, num_beams and num_return_sequences are at most MAX_ROWS_PER_PROMPT (256;
each row is a cache of its own, and a stranger's file could otherwise ask for any number); a call may ask
for more, as it may pass a batch of any size.
Hugging Face settings optkit does not implement (UNSUPPORTED: max_time, penalty_alpha, ...) are
refused in a call unless at their default value, and ignored with a warning in a file; keys nobody
knows are an error in a call (TypeError) and kept in a file (`extra`), as Hugging Face keeps them.

One decoding step, per row, on the logits of the row's last position (computed in float32); L is the
row's length so far (prompt length T, pads included, plus the step, 0-based), as Hugging Face counts it:
0. Sequence bias (sequence_bias, and bad_words_ids as a bias of -inf; an EOS id alone is never a bad
   word): a one-token sequence's bias is added to that token's score; a longer one's to its last token's
   when the row ends with the rest of it (pads included, as Hugging Face matches). Reference:
   `sequence_bias_table`.
1. Repetition penalty (when != 1): every token id that occurs among the row's real tokens so far
   (prompt tokens under the mask, and generated tokens) has its score divided by the penalty when
   positive and multiplied by it when negative. (Hugging Face also counts the prompt's pad ids.)
2. No repeated n-grams (no_repeat_ngram_size = n > 0): a token that would complete an n-gram already
   present in the row is banned (score -inf). The n-grams are the runs of n consecutive positions that
   are all real tokens; the next token completes one when the last n - 1 positions equal its first
   n - 1 tokens (n = 1 bans every token the row holds). Reference: `banned_by_ngrams`.
3. Length and token rules, in this order: every EOS id's score is -inf while L < min_length or fewer
   than min_new_tokens tokens have been generated (min_length counts the model's positions, P + step: a
   resolved Decoding holds it as min_new_tokens, and min_new_tokens given wins over min_length, as
   in Hugging Face); when L == 1 every score is -inf but
   forced_bos_token_id's (0); at the last step allowed (step N - 1) every score is -inf but those of
   forced_eos_token_id (an id or a list; 0); remove_invalid_values: NaN becomes 0 and +-inf the largest
   finite float32 of that sign; exponential_decay_length_penalty = (start, factor): from step start + 1
   on, each EOS score s gets |s| * (factor ** (step - start) - 1) added, except -inf and the lowest float32
   (what remove_invalid_values makes of -inf): a banned EOS stays banned (Hugging Face makes the first NaN,
   and then every probability, and the second +inf, so EOS is chosen); suppress_tokens get -inf; at the
   first step (the second when a one-token prompt's first token is forced_bos_token_id)
   begin_suppress_tokens get -inf. (Between the EOS rule and forced_bos_token_id: prefix_allowed_tokens_fn,
   below.)
4. The user's logits processors, in order: `scores = processor(input_ids, scores)` with input_ids the
   rows so far (rows, T + step), prompt pads included as Hugging Face passes them, and scores (rows, V)
   float32, both the backend's own arrays; each must return scores of the same shape.
5. Greedy (do_sample=False, num_beams=1): the next token is the argmax (lowest id on ties).
   Sampling (do_sample=True): scores / temperature, then top-k (keep the k largest; 0 keeps all),
   then top-p (keep the smallest set of most probable tokens whose probability reaches top_p, always
   at least one), then min_p (keep the tokens at least min_p times as probable as the best), typical_p
   (`typical_filter`), epsilon_cutoff and eta_cutoff (`epsilon_filter`, `eta_filter`), then draw from
   the softmax of what is kept, with the backend's own random stream seeded by `seed` (reproducible
   within a backend, not across backends). The sampling filters apply only when sampling. With
   renormalize_logits the scores are then replaced by their log_softmax (last of all rules; it changes
   no greedy or sampled token, but it does change beam scores and output_scores).
   With num_return_sequences = n, each prompt is repeated n times (rows b*n .. b*n + n - 1) and every
   row draws on its own.
6. A row that emits one of the EOS ids (eos_token_id: an id or a list) is finished, and so is a row
   whose text now ends a stop string (below) or that a stopping criterion (below) says is done; from then
   on it emits pad_token_id (default: the first EOS id). Decoding stops when every row is finished or the
   length limit is reached.
Reference of rules 0-5 (the scores a step chooses from): `reference_scores`.

Beam search (num_beams = K > 1, no sampling): each row keeps K running beams, starting from one beam
(the others scored -inf). As Hugging Face does, a step takes log_softmax of the logits first and applies
rules 1-4 to those log-probabilities; every continuation of every running beam is then scored as beam
score + processed log-probability. The best C = max(2, 1 + number of EOS ids) * K candidates per row
(higher score first, then lower beam * V + token index) are taken in order: a candidate ending in an
EOS id or a stop string becomes a finished hypothesis with score sum_logprobs / (generated_length **
length_penalty), generated_length counting its last token (only candidates among the first K may
finish); the others fill the K running beams in order (when fewer than K remain, finished ones follow
with their score lowered by 1e9, as in Hugging Face). A row is done once it has K finished hypotheses
and its best running beam, normalized at the current length (with early_stopping="never" and
length_penalty > 0: at the length limit, `best_length`), can no longer beat the worst of them; with
early_stopping=True, as soon as it has K finished hypotheses. At the length limit every candidate stops:
the first K finish, whatever their last token (Hugging Face's max-length criterion). The output per row
is its num_return_sequences best hypotheses, best first, padded with pad_token_id. Beam search does
not stream (Hugging Face refuses it too).
Beam sampling (num_beams = K > 1 with do_sample=True, Hugging Face's beam sample): a step's scores also
take the sampling filters (rule 5: temperature, top-k, top-p, min_p, typical_p, epsilon, eta), each
keeping at least max(2, 1 + number of EOS ids) tokens per beam (Hugging Face's min_tokens_to_keep for
beams; `Decoding.filter_keep`), before renormalize_logits; the C candidates are then drawn without
replacement from the softmax of the K * V continuations' scores (beam score + processed log-probability),
in the order drawn (`draw_without_replacement`; only the first K drawn may finish), and the running beams
are the K best-scored candidates that did not finish. Everything else is beam search's.

Outputs. By default generate returns the sequences (an array). With return_dict_in_generate=True it returns
a record (opt_spec.outputs.GenerateDecoderOnlyOutput; GenerateBeamDecoderOnlyOutput for beam search) whose
`sequences` is that array, as Hugging Face does:
- output_scores=True: `scores`, a tuple with one (rows, V) float32 array per step taken: the scores that
  step chose from, after every rule (greedy and sampling: rules 0-5, sampling filters and renormalization
  included; beam search: each running beam's processed log-probabilities, before its beam score is added;
  rows = B * num_beams, in the order of the running beams at that step). Rows that are finished (or a
  prompt whose search is done) still get scores, of the pad they are fed; their values are not specified.
- output_logits=True: `logits`, the same shape, the model's raw float32 logits of each step.
- beam search: `sequences_scores` (B * num_return_sequences,) float32, each returned hypothesis's
  normalized score (with output_scores), and `beam_indices` (B * num_return_sequences, M): for each new
  token of a returned hypothesis, the running beam it extended at that step, as b * num_beams + k, -1
  past its end.
- output_hidden_states=True / output_attentions=True: `hidden_states`, a tuple with one entry per step taken,
  each a tuple of the (num_hidden_layers + 1) hidden states the model gave for that step's input, and
  `attentions` likewise, one (rows, heads, q, k) probability tensor per layer: the first step the whole prompt
  (q = k = T), step s after it its one new position (q = 1, k = T + s), as Hugging Face's incremental forward
  passes give them. Greedy and sampling: the rows are the returned ones, and optkit computes the states in one
  forward over their first T + M - 1 positions after decoding (`step_outputs` slices it; a causal model's state
  at a position depends on the positions before it only), so decoding itself is unchanged. Beam search: the
  rows are step s's running beams (B * num_beams, in the order of its scores), which the returned sequences do
  not hold; the search keeps each step's running beams and optkit runs one forward per step over them after
  decoding (`replayed_step_outputs`). A compiled backend takes its step-by-step loop for that (`needs_host`).
  A prompt pad's own states are not specified (as in a forward pass).
past_key_values is None (generate keeps no cache). A streamer still gets every step.
`compute_transition_scores` (below) turns the scores into each chosen token's score.

Re-using a prompt's cache (every backend: generate(input_ids, attention_mask, past_key_values=cache)): the cache
holds the keys and values of the rows' first C tokens, 0 < C < T, as a forward over input_ids[:, :C] with
attention_mask[:, :C] gives them (the model's own cache; PyTorch also takes Hugging Face's DynamicCache). The
prompt pass feeds the last T - C tokens only; everything else (rows, lengths, rules, tokens) is what it is
without the cache. The record's step 0 then covers the T - C positions fed, as in Hugging Face. The cache given
is left as it is (Hugging Face's generate extends it in place, which is why its users copy it first).

Stop strings (stop_strings=, with tokenizer= whose decode(ids, skip_special_tokens=False) gives text):
a row stops when, after its new token, the text of its real tokens contains a stop string that was not
complete before that token; the stop string may start in earlier tokens (even in the prompt) and the
new token may run past its end (Hugging Face's StopStringCriteria, which matches token strings from
the vocabulary: the same whenever decoding is concatenating token strings). Reference: `StopStrings`.

prefix_allowed_tokens_fn(batch_id, row) -> list of token ids (Hugging Face's constrained decoding): at every
step, each row's scores outside its list get -inf (added, as Hugging Face adds a -inf mask), `row` being the
row so far (T + step,), prompt pads included, as the backend's 1-D array, and batch_id the row's index
divided by num_beams (so with sampling and num_return_sequences = n, every drawn row has its own batch_id,
as in Hugging Face). An empty list or an id outside the vocabulary is a ValueError naming it.
Reference: `allowed_tokens`.

stopping_criteria=[criterion, ...] (Hugging Face's StoppingCriteria, or any callable): after every step,
each is called as criterion(input_ids, scores) with input_ids the rows so far including the new token
(rows, T + step + 1), prompt pads included, and scores the tuple of the steps' scores so far when
output_scores asks for them, else None (Hugging Face passes the same); it returns a bool per row (rows,),
or one bool for all rows; a row any criterion says is done is finished (rule 6). In beam search they are
asked of every candidate (the beams extended by their candidate token, B * candidates rows), and a
candidate they stop finishes as one ending in an EOS id does. Reference: `criteria_hits`.

max_time = seconds (Hugging Face's MaxTimeCriteria): a stopping criterion that ends every row once more
than that many seconds of wall-clock time have passed since generate resolved its settings (so a compiled
backend's first call counts its compilation); it is asked after each step, so at least one token is always
made. Like any stopping criterion it takes the backend's step-by-step host loop. Reference: `MaxTime`.

Assisted decoding (Hugging Face's, which it has in PyTorch only; here every backend; greedy search and sampling,
one prompt and one row: num_beams and num_return_sequences 1). Candidates for the next tokens come from
  - prompt lookup (prompt_lookup_num_tokens = k): the row's own tokens after the first earlier occurrence of
    its last n tokens, n from max_matching_ngram_size (default 2) down to 1, at most k of them, cut before an
    EOS id (Hugging Face's PromptLookupCandidateGenerator; `prompt_lookup`), or
  - generate(assistant_model=...): a smaller model of the same vocabulary drafts them greedily, up to
    num_assistant_tokens (20), stopping after a token it gives less than assistant_confidence_threshold (0.4)
    probability; num_assistant_tokens_schedule "heuristic" or "heuristic_transient" adds 2 after a draft
    taken whole and takes 1 off otherwise, within the call (`next_draft_length`; optkit never changes the
    assistant's settings), "constant" (the default) keeps it.
The model then reads the last chosen token and the candidates in one forward pass, and each position's
logits go through the step's rules as if the candidates had been generated one by one (rules 0-6, the
rows, stop strings and criteria included): a candidate is kept while it is the token the step chooses
(greedy: the argmax; sampling: the token drawn), and the token chosen at the first mismatch (or after the
last candidate) is added. So greedy search gives its own tokens and sampling draws from its own
distribution, in fewer forward passes when the candidates are right. Refused in words: more than one row,
beams, inputs_embeds with an assistant, an assistant of another backend or vocabulary.

Streamers follow Hugging Face's protocol: `streamer.put(prompt ids (rows, T))` once, then
`streamer.put(tokens (rows,))` after every step (pad for finished rows), then `streamer.end()`; so
transformers.TextStreamer works. A plain callable is called with each step's tokens only.

Every backend keeps one fast path, with nothing on the host between steps, for calls without logits
processors, stop strings or a streamer; those need the host between steps and take a step-by-step
loop there (each backend says how).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from .errors import ConfigError
from .inputs import check_attention_mask, check_batch_shape, check_inputs_embeds, check_seed, check_token_ids

GENERATION_CONFIG_NAME = "generation_config.json"
DEFAULT_NEW_TOKENS = 20       # when no length is given (Hugging Face: 20 new tokens, within the positions)
# Decoding rows per prompt (num_beams, num_return_sequences): each is a full cache, so a generation_config.json
# asking for 10**8 would make generate allocate without bound; far above real use (beams ~4-16, samples ~100).
MAX_ROWS_PER_PROMPT = 256
HF_DEFAULT_MAX_LENGTH = 20    # Hugging Face's max_length default: a config saying 20 counts as unset
DRAFT_SCHEDULES = ("constant", "heuristic", "heuristic_transient")  # num_assistant_tokens_schedule's values
# Decoding's settings that only the host reads (Decoding.without_host_settings)
HOST_SETTINGS = ("seed", "max_time", "prompt_lookup_num_tokens", "max_matching_ngram_size", "num_assistant_tokens",
                 "num_assistant_tokens_schedule", "assistant_confidence_threshold")

# Hugging Face GenerationConfig keys optkit does not implement, with their default values. A file may
# hold them at any value (kept, ignored, with a warning when they would change the tokens); a call may
# pass them only at their default values.
UNSUPPORTED = {
    "encoder_repetition_penalty": 1.0, "token_healing": False, "guidance_scale": None,
    "watermarking_config": None,
    "encoder_no_repeat_ngram_size": 0, "penalty_alpha": None, "dola_layers": None, "diversity_penalty": 0.0,
    "num_beam_groups": 1, "constraints": None, "force_words_ids": None,
}
# Hugging Face keys about how (not what) it computes, or about models optkit is not: any value is fine.
HARMLESS = {
    "use_cache", "cache_implementation", "cache_config", "return_legacy_cache", "prefill_chunk_size",
    "disable_compile", "compile_config", "low_memory", "decoder_start_token_id", "is_assistant",
    "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
    "transformers_version", "_from_model_config",
}


# ------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass
class GenerationConfig:
    """Generation settings by Hugging Face's names (see the module docstring); mutable like
    transformers.GenerationConfig (model.generation_config.max_new_tokens = 7 works), checked by
    `validate()` on creation and at every generate call. `extra` keeps a file's other keys."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    max_time: float | None = None
    seed: int | None = None
    # assisted decoding (module docstring)
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    num_assistant_tokens: int = 20
    num_assistant_tokens_schedule: str = "constant"
    assistant_confidence_threshold: float = 0.4
    # the rules of steps 1-3 and 6 beyond the basics (module docstring, "More rules")
    min_length: int = 0
    early_stopping: bool | str = False
    bad_words_ids: list[list[int]] | None = None
    sequence_bias: Any = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    remove_invalid_values: bool = False
    exponential_decay_length_penalty: tuple | list | None = None
    min_p: float | None = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    renormalize_logits: bool = False
    # what generate returns (module docstring, "Outputs")
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool | None = None
    output_attentions: bool = False
    output_hidden_states: bool = False
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raises ValueError naming the field and the value for anything out of its range."""
        def fail(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r:.200}: {why}")

        def is_int(value):
            return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

        def is_number(value):
            return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))

        for name, least in (("max_new_tokens", 1), ("max_length", 1), ("min_new_tokens", 0)):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < least):
                fail(name, f"must be an int >= {least} (or None)")
        for name, least in (("top_k", 0), ("num_beams", 1), ("no_repeat_ngram_size", 0),
                            ("num_return_sequences", 1)):
            value = getattr(self, name)
            if not is_int(value) or value < least:
                fail(name, f"must be an int >= {least}")
        if not isinstance(self.do_sample, (bool, np.bool_)):
            fail("do_sample", "must be true or false")
        for name in ("temperature", "top_p", "length_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not is_number(value) or not math.isfinite(value):
                fail(name, "must be a finite number")
        if not self.temperature >= 0 or (self.do_sample and self.temperature == 0):
            fail("temperature", "must be > 0 when sampling (0 is greedy search: do_sample=False)"
                 if self.temperature == 0 else "must be >= 0")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not self.repetition_penalty > 0:
            fail("repetition_penalty", "must be > 0")
        eos = self.eos_token_id  # ids are checked against the vocabulary when a call resolves them
        if eos is not None:
            ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
            if not ids or not all(is_int(i) for i in ids):
                fail("eos_token_id", "must be a token id (an int) or a non-empty list of them")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not is_int(value):
                fail(name, "must be a token id (an int) or None")
        stops = self.stop_strings
        if stops is not None:
            items = [stops] if isinstance(stops, str) else stops
            if not isinstance(items, (list, tuple)) or not items or not all(isinstance(s, str) and s for s in items):
                fail("stop_strings", "must be a non-empty string or a non-empty list of them")
        if self.seed is not None:
            check_seed(self.seed)
        if self.max_time is not None and (not is_number(self.max_time) or not self.max_time >= 0):
            fail("max_time", "must be a number of seconds >= 0 (or None)")
        for name, least in (("prompt_lookup_num_tokens", 1), ("max_matching_ngram_size", 1)):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < least):
                fail(name, f"must be an int >= {least} (or None)")
        if not is_int(self.num_assistant_tokens) or self.num_assistant_tokens < 1:
            fail("num_assistant_tokens", "must be an int >= 1")
        if self.num_assistant_tokens_schedule not in DRAFT_SCHEDULES:
            fail("num_assistant_tokens_schedule", f"must be one of {', '.join(DRAFT_SCHEDULES)}")
        if not is_number(self.assistant_confidence_threshold) or not 0 <= self.assistant_confidence_threshold <= 1:
            fail("assistant_confidence_threshold", "must be a number in [0, 1]")
        if self.num_return_sequences > 1:
            if self.num_beams == 1 and not self.do_sample:
                fail("num_return_sequences", "greedy search returns one sequence per prompt; use do_sample=True "
                     "or num_beams >= num_return_sequences")
            if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
                fail("num_return_sequences", f"is more than num_beams={self.num_beams}")
        if (self.min_new_tokens is not None and self.max_new_tokens is not None
                and self.min_new_tokens > self.max_new_tokens):
            fail("min_new_tokens", f"is more than max_new_tokens={self.max_new_tokens}")
        if not isinstance(self.extra, dict):
            fail("extra", "must be a dict")
        self._validate_rules(fail, is_int, is_number)

    def _validate_rules(self, fail, is_int, is_number) -> None:
        """The checks of the settings of "More rules" and "Outputs" (token ids are checked against the
        vocabulary when a call resolves them)."""
        if not is_int(self.min_length) or self.min_length < 0:
            fail("min_length", "must be an int >= 0")
        if not (isinstance(self.early_stopping, (bool, np.bool_)) or self.early_stopping == "never"):
            fail("early_stopping", 'must be true, false or "never"')

        def is_ids(value, least=1):
            return isinstance(value, (list, tuple)) and len(value) >= least and all(is_int(i) and i >= 0 for i in value)

        if self.bad_words_ids is not None:
            if not isinstance(self.bad_words_ids, (list, tuple)) or not self.bad_words_ids or \
                    not all(is_ids(word) for word in self.bad_words_ids):
                fail("bad_words_ids", "must be a non-empty list of non-empty lists of token ids")
        if self.sequence_bias is not None:
            try:
                sequence_bias_items(self.sequence_bias)
            except ValueError as err:
                fail("sequence_bias", str(err))
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            value = getattr(self, name)
            if value is not None and not is_ids(value, least=0):
                fail(name, "must be a list of token ids (or None)")
        if self.forced_bos_token_id is not None and not (is_int(self.forced_bos_token_id)
                                                         and self.forced_bos_token_id >= 0):
            fail("forced_bos_token_id", "must be a token id (an int) or None")
        forced = self.forced_eos_token_id
        if forced is not None and not (is_int(forced) and forced >= 0) and not is_ids(forced):
            fail("forced_eos_token_id", "must be a token id (an int), a non-empty list of them, or None")
        decay = self.exponential_decay_length_penalty
        if decay is not None and not (isinstance(decay, (list, tuple)) and len(decay) == 2 and is_int(decay[0])
                                      and decay[0] >= 0 and is_number(decay[1]) and math.isfinite(decay[1])
                                      and decay[1] > 0):
            fail("exponential_decay_length_penalty", "must be (start: an int >= 0, factor: a number > 0) or None")
        if self.min_p is not None and not (is_number(self.min_p) and 0 <= self.min_p <= 1):
            fail("min_p", "must be a number in [0, 1] (or None)")
        if not (is_number(self.typical_p) and 0 < self.typical_p <= 1):
            fail("typical_p", "must be in (0, 1] (1 keeps every token)")
        for name in ("epsilon_cutoff", "eta_cutoff"):
            value = getattr(self, name)
            if not (is_number(value) and 0 <= value < 1):
                fail(name, "must be in [0, 1) (0 keeps every token)")
        for name in ("remove_invalid_values", "renormalize_logits", "return_dict_in_generate", "output_scores",
                     "output_attentions", "output_hidden_states"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                fail(name, "must be true or false")
        if self.output_logits is not None and not isinstance(self.output_logits, (bool, np.bool_)):
            fail("output_logits", "must be true, false or None")

    # ------------------------------------------------------------------------------ conversions
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], strict: bool = True, where: str = "generation config"):
        """A config from Hugging Face's keys. Keys optkit does not know are kept in `extra`. A key of
        Hugging Face's that optkit does not implement, at a value other than its default, is an error
        (strict) or a warning that it is ignored (a file's). A config's max_length of 20 is dropped."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
        names = set(cls.field_names())
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        ignored = sorted(k for k, v in extra.items() if k in UNSUPPORTED and v != UNSUPPORTED[k])
        if ignored:
            what = ", ".join(f"{k}={extra[k]!r:.50}" for k in ignored)
            if strict:
                raise ValueError(f"{where}: optkit's generate does not implement {what}")
            warnings.warn(f"{where}: {what} ignored (optkit's generate does not implement "
                          f"{'it' if len(ignored) == 1 else 'them'})", stacklevel=3)
        if known.get("max_length") == HF_DEFAULT_MAX_LENGTH:
            known.pop("max_length")
        for key in ("eos_token_id", "stop_strings"):
            if isinstance(known.get(key), tuple):
                known[key] = list(known[key])
        try:
            return cls(**known, extra=extra)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None

    @classmethod
    def coerce(cls, value) -> "GenerationConfig":
        """`generation_config=` as given: a GenerationConfig, a dict of settings, or an object with
        Hugging Face's attribute names (its to_dict(), else its attributes)."""
        if isinstance(value, cls):
            value.validate()
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value, where="generation_config")
        to_dict = getattr(value, "to_dict", None)
        data = to_dict() if callable(to_dict) else getattr(value, "__dict__", None)
        if not isinstance(data, Mapping):
            raise TypeError(f"generation_config must be a GenerationConfig, a dict or an object with Hugging "
                            f"Face's generation attributes, got {type(value).__name__}")
        data = {k: v for k, v in data.items() if not k.startswith("_") and k != "transformers_version"}
        return cls.from_dict(data, where=f"generation_config ({type(value).__name__})")

    def to_dict(self) -> dict:
        """The file's content: every setting away from its default, then the kept keys (Hugging Face
        writes only what differs from its defaults too, so both read the same settings back)."""
        defaults = type(self)()
        out = {}
        for name in self.field_names():
            value = getattr(self, name)
            if name == "sequence_bias" and value is not None:
                value = [[list(ids), bias] for ids, bias in sequence_bias_items(value)]  # JSON has no tuple keys
            if value != getattr(defaults, name):
                out[name] = _plain(value)
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        """The defaults of a model without generation_config.json: its config's token ids."""
        return cls(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                   pad_token_id=config.pad_token_id)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config=None) -> "GenerationConfig":
        """The folder's generation_config.json (read by the bounded JSON reader, names checked by
        opt_spec.io.checkpoint_file); from_model_config(config) when the folder has none. A bad value
        is a ConfigError naming the file and the field; keys the file holds that optkit does not
        implement at a non-default value are ignored with a warning."""
        from .io import checkpoint_file, json_object

        path = os.path.join(os.fspath(directory), GENERATION_CONFIG_NAME)
        if not os.path.lexists(path):
            if config is None:
                return cls()
            return cls.from_model_config(config)
        path = checkpoint_file(directory, GENERATION_CONFIG_NAME)
        data = json_object(path)
        try:
            cfg = cls.from_dict(data, strict=False, where=path)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        for name in ("num_beams", "num_return_sequences"):  # the caches generate would allocate for a file's rows
            if getattr(cfg, name) > MAX_ROWS_PER_PROMPT:
                raise ConfigError(f"{path}: {name}={getattr(cfg, name)}: is more than optkit's maximum "
                                  f"{MAX_ROWS_PER_PROMPT} decoding rows per prompt in a file "
                                  "(opt_spec.generation.MAX_ROWS_PER_PROMPT)")
        return cfg

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Writes generation_config.json into `directory` (atomically); returns its path."""
        import json

        from .io import atomic_write_text

        self.validate()
        path = os.path.join(os.fspath(directory), GENERATION_CONFIG_NAME)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


def _plain(value):
    """A value as JSON writes it: NumPy scalars as Python's, tuples as lists, nested."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


@dataclasses.dataclass(frozen=True)
class Decoding:
    """What one generate call does, every default resolved (hashable: the compiled backends keep one
    program per value, the seed aside)."""

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    stop_strings: tuple[str, ...] = ()
    max_time: float | None = None          # seconds (MaxTime, a host-side stopping criterion)
    seed: int | None = None
    prompt_lookup_num_tokens: int = 0      # assisted decoding (0: no prompt lookup)
    max_matching_ngram_size: int = 2
    num_assistant_tokens: int = 20
    num_assistant_tokens_schedule: str = "constant"
    assistant_confidence_threshold: float = 0.4
    # "More rules", resolved: token ids checked against the vocabulary, lists as tuples (min_length is
    # folded into min_new_tokens)
    early_stopping: bool | str = False
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] = ()  # bad words included, as bias -inf
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    begin_suppress_step: int = 0          # the step begin_suppress_tokens apply at
    forced_bos_token_id: int | None = None
    forced_eos_token_ids: tuple[int, ...] = ()
    remove_invalid_values: bool = False
    exponential_decay: tuple[int, float] | None = None
    min_p: float | None = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    renormalize_logits: bool = False
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False
    output_attentions: bool = False     # only with return_dict_in_generate (as in Hugging Face)
    output_hidden_states: bool = False

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    @property
    def candidates(self) -> int:
        """Beam candidates kept per row and step (Hugging Face's count)."""
        return max(2, 1 + len(self.eos_token_ids)) * self.num_beams

    @property
    def filter_keep(self) -> int:
        """Tokens each sampling filter keeps at least per row: 1, or with beams the candidates one beam
        may contribute (Hugging Face's min_tokens_to_keep)."""
        return self.candidates // self.num_beams if self.is_beam_search else 1

    @property
    def rows_per_prompt(self) -> int:
        """Decoding rows per prompt: the beams, or the independent samples."""
        return self.num_beams if self.is_beam_search else self.num_return_sequences

    def without_host_settings(self) -> "Decoding":
        """This Decoding with what only the host reads at its defaults (the seed, an input of a compiled
        loop; max_time, a stopping criterion; assisted decoding's, PyTorch's loop): what a compiled decode
        loop depends on, so that calls differing only in those share one program."""
        return dataclasses.replace(self, **{f.name: f.default for f in dataclasses.fields(self)
                                            if f.name in HOST_SETTINGS})


def with_model_defaults(given: GenerationConfig, model_defaults: GenerationConfig) -> GenerationConfig:
    """A call's generation_config with each setting it leaves at the global default taken from the model's,
    where the model's differs from it (what Hugging Face >= 4.50 does; `extra` is not carried)."""
    plain = GenerationConfig()
    values = {}
    for name in GenerationConfig.field_names():
        mine, model = getattr(given, name), getattr(model_defaults, name)
        values[name] = model if mine == getattr(plain, name) and model != getattr(plain, name) else mine
    return GenerationConfig(**values)


def prepared_config(model_defaults: GenerationConfig, generation_config=None, use_model_defaults: bool | None = None,
                    **kwargs: Any) -> tuple[GenerationConfig, dict]:
    """(settings, the kwargs that are no setting), as transformers' PyTorch GenerationMixin's
    _prepare_generation_config that its pipelines call: a copy of generation_config (else of the model's
    defaults), whose values at the global defaults take the model's (unless use_model_defaults is False),
    updated by the kwargs that name settings. A pipeline thereby starts from its own defaults (sampling,
    256 new tokens) under generation_config.json's values, as it does with Hugging Face's PyTorch models
    (its TensorFlow pipelines take the model's generation_config as it is)."""
    if generation_config is None:
        cfg = copy.deepcopy(model_defaults)
    else:
        cfg = copy.deepcopy(GenerationConfig.coerce(generation_config))
        if use_model_defaults is not False:
            cfg = with_model_defaults(cfg, model_defaults)
    names = set(GenerationConfig.field_names())
    cfg = dataclasses.replace(cfg, **{k: v for k, v in kwargs.items() if k in names})  # runs validate()
    return cfg, {k: v for k, v in kwargs.items() if k not in names}


def resolve(model_defaults: GenerationConfig | None, generation_config, kwargs: Mapping[str, Any], *,
            prompt_length: int, max_positions: int, vocab_size: int, row_length: int | None = None) -> Decoding:
    """The Decoding of one call: kwargs over generation_config over the model's defaults (see the
    module docstring); a clear ValueError (or TypeError for an unknown keyword) otherwise. prompt_length:
    the positions the model sees before the first new token (P); row_length: the prompt's token ids the
    rows start with (T; P unless inputs_embeds came without input_ids, then 0)."""
    P, T = prompt_length, (prompt_length if row_length is None else row_length)
    model_defaults = model_defaults if model_defaults is not None else GenerationConfig()
    names = GenerationConfig.field_names()
    use_model_defaults = kwargs.get("use_model_defaults")
    if use_model_defaults not in (None, True, False):
        raise ValueError(f"use_model_defaults={use_model_defaults!r:.50}: True, False or None")
    if generation_config is None:
        base = dataclasses.replace(model_defaults, extra={})
    elif use_model_defaults is False:  # the call's generation_config as it is
        base = dataclasses.replace(GenerationConfig.coerce(generation_config), extra={})
    else:
        base = with_model_defaults(GenerationConfig.coerce(generation_config), model_defaults)
    unknown = sorted(k for k in kwargs if k not in names and k not in UNSUPPORTED and k not in HARMLESS
                     and k != "use_model_defaults")
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(unknown)}")
    unsupported = sorted(k for k in kwargs if k in UNSUPPORTED and kwargs[k] != UNSUPPORTED[k])
    if unsupported:
        raise ValueError("optkit's generate does not implement "
                         + ", ".join(f"{k}={kwargs[k]!r:.50}" for k in unsupported))
    given = {k: v for k, v in kwargs.items() if k in names and v is not None}
    if isinstance(given.get("eos_token_id"), tuple):
        given["eos_token_id"] = list(given["eos_token_id"])
    cfg = dataclasses.replace(base, **given)  # runs validate()
    cfg.validate()

    what = "inputs_embeds" if T < P else "input_ids"
    if cfg.max_new_tokens is not None:
        new = cfg.max_new_tokens
    elif cfg.max_length is not None or T < P:  # embeddings alone: Hugging Face's default max_length counts them
        limit = cfg.max_length if cfg.max_length is not None else HF_DEFAULT_MAX_LENGTH
        new = limit - P
        if new < 1:
            raise ValueError(f"input length of {what} is {P}, but max_length is set to {limit}"
                             f"{'' if cfg.max_length is not None else ' (the default)'}; "
                             "increase max_length or set max_new_tokens")
    else:
        new = min(DEFAULT_NEW_TOKENS, max_positions - P)
        if new < 1:
            raise ValueError(f"a prompt of {P} tokens leaves no room in the model's "
                             f"max_position_embeddings={max_positions}")
    if cfg.min_new_tokens is not None:  # Hugging Face: min_new_tokens replaces min_length
        min_new = cfg.min_new_tokens
        if min_new > new:
            raise ValueError(f"min_new_tokens={min_new} is more than the {new} new tokens allowed")
    else:  # min_length counts the model's positions: EOS waits while P + step < min_length
        min_new = min(max(int(cfg.min_length) - P, 0), new)
    eos = cfg.eos_token_id
    eos_ids = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos])) if eos is not None else ()
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    for name, ids in (("eos_token_id", eos_ids), ("pad_token_id", (pad,))):
        for i in ids:
            if not 0 <= i < vocab_size:
                raise ValueError(f"{name}={i} is outside the vocabulary [0, {vocab_size})")
    K = int(cfg.num_beams)
    if K > 1 and max(2, 1 + len(eos_ids)) * K > K * vocab_size:  # Decoding.candidates, of the K * V continuations
        raise ValueError(f"num_beams={K} with {len(eos_ids)} eos_token_id entries keeps {max(2, 1 + len(eos_ids)) * K} "
                         f"candidates a step, more than the {K * vocab_size} continuations of the beams")
    stops = cfg.stop_strings
    stops = (stops,) if isinstance(stops, str) else tuple(stops or ())
    return Decoding(max_new_tokens=int(new), min_new_tokens=int(min_new), do_sample=bool(cfg.do_sample),
                    temperature=float(cfg.temperature), top_k=int(cfg.top_k), top_p=float(cfg.top_p),
                    num_beams=int(cfg.num_beams), length_penalty=float(cfg.length_penalty),
                    repetition_penalty=float(cfg.repetition_penalty),
                    no_repeat_ngram_size=int(cfg.no_repeat_ngram_size),
                    num_return_sequences=int(cfg.num_return_sequences), eos_token_ids=eos_ids,
                    pad_token_id=int(pad), stop_strings=stops,
                    max_time=None if cfg.max_time is None else float(cfg.max_time),
                    prompt_lookup_num_tokens=int(cfg.prompt_lookup_num_tokens or 0),
                    max_matching_ngram_size=int(cfg.max_matching_ngram_size or 2),
                    num_assistant_tokens=int(cfg.num_assistant_tokens),
                    num_assistant_tokens_schedule=str(cfg.num_assistant_tokens_schedule),
                    assistant_confidence_threshold=float(cfg.assistant_confidence_threshold),
                    seed=None if cfg.seed is None else int(cfg.seed),
                    **_resolve_rules(cfg, eos_ids, T, vocab_size))


def sequence_bias_items(value) -> tuple[tuple[tuple[int, ...], float], ...]:
    """sequence_bias as ((token ids, bias), ...): from Hugging Face's {(ids...): bias} or its file form
    [[[ids...], bias], ...]; a sequence given twice keeps its first place and its last bias (a dict's rule)."""
    pairs = value.items() if isinstance(value, Mapping) else value
    if not isinstance(pairs, (list, tuple, type({}.items()))) or not pairs:
        raise ValueError("must be a non-empty {(token ids): bias} dict or [[token ids], bias] list")
    out: dict[tuple[int, ...], float] = {}
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{pair!r:.60} is not a (token ids, bias) pair")
        ids, bias = pair
        if not isinstance(ids, (list, tuple)) or not ids or not all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"{ids!r:.60}: the biased sequence must be a non-empty list of token ids")
        if not isinstance(bias, (int, float, np.integer, np.floating)) or isinstance(bias, bool) or math.isnan(bias):
            raise ValueError(f"{bias!r:.60}: a bias must be a number")
        out[tuple(int(i) for i in ids)] = float(bias)
    return tuple(out.items())


def _resolve_rules(cfg: GenerationConfig, eos_ids: tuple[int, ...], row_length: int, vocab_size: int) -> dict:
    """The Decoding fields of "More rules" and "Outputs", token ids checked against the vocabulary;
    row_length: the prompt ids the rows start with (T)."""
    def ids(name, values):
        values = tuple(int(i) for i in values)
        for i in values:
            if not 0 <= i < vocab_size:
                raise ValueError(f"{name}: token id {i} is outside the vocabulary [0, {vocab_size})")
        return values

    bias = sequence_bias_items(cfg.sequence_bias) if cfg.sequence_bias is not None else ()
    for seq, _ in bias:
        ids("sequence_bias", seq)
    # a bad word is a bias of -inf (Hugging Face's rule; an EOS id alone is not banned), which no other rule
    # can undo, so it joins sequence_bias
    words = [ids("bad_words_ids", w) for w in cfg.bad_words_ids or ()]
    merged = dict(bias)
    merged.update((w, -math.inf) for w in words if not (len(w) == 1 and w[0] in eos_ids))
    forced_eos = cfg.forced_eos_token_id
    forced_eos = () if forced_eos is None else (forced_eos if isinstance(forced_eos, (list, tuple)) else [forced_eos])
    forced_bos = cfg.forced_bos_token_id
    decay = cfg.exponential_decay_length_penalty
    # Hugging Face: begin_suppress_tokens apply to the first new token, or to the second when the rows' first
    # new token is forced to forced_bos_token_id (rows of one token, or none: inputs_embeds alone)
    begin_step = 1 if row_length <= 1 and forced_bos is not None else 0
    return dict(early_stopping=cfg.early_stopping if cfg.early_stopping == "never"
                else bool(cfg.early_stopping), sequence_bias=tuple(merged.items()),
                suppress_tokens=ids("suppress_tokens", cfg.suppress_tokens or ()),
                begin_suppress_tokens=ids("begin_suppress_tokens", cfg.begin_suppress_tokens or ()),
                begin_suppress_step=begin_step,
                forced_bos_token_id=None if forced_bos is None else ids("forced_bos_token_id", [forced_bos])[0],
                forced_eos_token_ids=ids("forced_eos_token_id", forced_eos),
                remove_invalid_values=bool(cfg.remove_invalid_values),
                exponential_decay=None if decay is None else (int(decay[0]), float(decay[1])),
                min_p=None if cfg.min_p is None else float(cfg.min_p), typical_p=float(cfg.typical_p),
                epsilon_cutoff=float(cfg.epsilon_cutoff), eta_cutoff=float(cfg.eta_cutoff),
                renormalize_logits=bool(cfg.renormalize_logits),
                return_dict_in_generate=bool(cfg.return_dict_in_generate), output_scores=bool(cfg.output_scores),
                output_logits=bool(cfg.output_logits),
                output_attentions=bool(cfg.output_attentions and cfg.return_dict_in_generate),
                output_hidden_states=bool(cfg.output_hidden_states and cfg.return_dict_in_generate))


def step_forward_mask(prompt_mask, steps: int) -> np.ndarray:
    """The attention mask (rows, T + steps - 1) of the one forward that step_outputs cuts: the prompt's, then
    1 for every new token but the last (the last is never fed back; finished rows' pads count, as in
    Hugging Face). The forward's input_ids are the returned rows' first that many positions."""
    prompt_mask = np.asarray(prompt_mask)
    return np.concatenate([prompt_mask, np.ones((len(prompt_mask), steps - 1), prompt_mask.dtype)], axis=1)


def step_outputs(prompt_length: int, steps: int, hidden_states=None, attentions=None, past: int = 0) -> tuple:
    """(hidden_states, attentions) of generate's record, per step as Hugging Face's incremental forward passes
    give them, cut from one forward over the rows' first prompt_length + steps - 1 positions (any array type
    that slices): step 0 the prompt's positions, step s its position T + s - 1 attending to T + s keys, and to
    the `past` positions a cache held before the forward (a prefix's keys and values)."""
    T = prompt_length

    def rows(s: int) -> slice:
        return slice(0, T) if s == 0 else slice(T + s - 1, T + s)

    hs = None if hidden_states is None else tuple(tuple(h[:, rows(s)] for h in hidden_states) for s in range(steps))
    att = None if attentions is None else tuple(tuple(a[:, :, rows(s), :past + T + s] for a in attentions)
                                                for s in range(steps))
    return hs, att


def replayed_step_outputs(prompt_length: int, steps: int, forward: Callable, past: int = 0) -> tuple:
    """(hidden_states, attentions) of generate's record when each step's rows are others (beam search's running
    beams): forward(s) gives (hidden_states, attentions) of one forward over step s's rows' first
    prompt_length + s positions, from which step s's entry is cut as step_outputs cuts it."""
    hidden, attentions = [], []
    for s in range(steps):
        h, a = step_outputs(prompt_length, s + 1, *forward(s), past)
        hidden.append(None if h is None else h[s])
        attentions.append(None if a is None else a[s])
    return (None if not steps or hidden[0] is None else tuple(hidden),
            None if not steps or attentions[0] is None else tuple(attentions))


def prompt_inputs(input_ids, attention_mask, vocab_size: int, inputs_embeds=None,
                  width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """generate's inputs as NumPy (ids, mask), checked on the host: integer token ids (B, T), B, T >= 1, in
    the vocabulary; a mask of the same shape holding only 0 (pad) and 1 (token), all ones by default.
    With inputs_embeds (any array with .shape and .dtype; floats (B, P, width)): the mask is (B, P), and
    the ids are input_ids (B, P), the embedded positions' ids, or (B, 0) int64 when not given."""
    if inputs_embeds is not None:
        check_inputs_embeds(tuple(inputs_embeds.shape), inputs_embeds.dtype, width)
        shape = tuple(int(n) for n in inputs_embeds.shape[:2])
        ids = np.zeros((shape[0], 0), np.int64) if input_ids is None else np.asarray(input_ids)
        if input_ids is not None and ids.shape != shape:
            raise ValueError(f"input_ids given with inputs_embeds must be the ids of the embedded positions, "
                             f"{shape}; got shape {ids.shape}")
    elif input_ids is None:  # Hugging Face would start from BOS alone; an OPT prompt always has one
        raise ValueError("generate needs input_ids (a (batch, length) batch of prompts, each starting with </s>) "
                         "or inputs_embeds")
    else:
        ids = np.asarray(input_ids)
        check_token_ids(ids, vocab_size)
        check_batch_shape(ids.shape)
        shape = ids.shape
    if inputs_embeds is not None:
        check_token_ids(ids, vocab_size)
    if attention_mask is None:
        return ids, np.ones(shape, np.int32)
    mask = np.asarray(attention_mask)
    if mask.shape != shape:
        what = "inputs_embeds' (batch, length)" if inputs_embeds is not None else "input_ids"
        raise ValueError(f"attention_mask has shape {mask.shape}, {what} {shape}")
    check_attention_mask(mask)
    return ids, mask


def check_prompt(attention_mask, max_new_tokens: int, max_positions: int) -> None:
    """Every row's real tokens and the new ones must fit the position table. Pads take no position, so a
    left-padded batch may be wider than the table (as in Hugging Face): the cache then holds the pads
    past it (opt_spec.cache.pad_slots). attention_mask: (B, P) over the prompt's positions, on the host."""
    mask = np.asarray(attention_mask)
    if mask.ndim != 2 or mask.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {mask.shape}")
    longest = int(mask.astype(bool).sum(1).max()) if mask.shape[0] else 0
    total = longest + max_new_tokens
    if total > max_positions:
        pads = "" if longest == mask.shape[1] else " (the longest row's, pads aside)"
        raise ValueError(f"prompt of {longest} tokens{pads} + max_new_tokens={max_new_tokens} = {total} "
                         f"is more than the model's max_position_embeddings={max_positions}")


def needs_host(d: Decoding, logits_processor, streamer, stopping_criteria=None, prefix_allowed_tokens_fn=None) -> bool:
    """Whether the call needs the host between steps (a compiled backend's step-by-step loop): also beam search
    asked for hidden states or attentions (the loop keeps each step's running beams)."""
    return (bool(logits_processor) or streamer is not None or bool(d.stop_strings) or bool(stopping_criteria)
            or prefix_allowed_tokens_fn is not None or beam_step_rows(d))


def beam_step_rows(d: Decoding) -> bool:
    """Whether beam search must keep each step's running beams (for replayed_step_outputs)."""
    return d.is_beam_search and d.return_dict_in_generate and (d.output_hidden_states or d.output_attentions)


def check_host_rules(stopping_criteria, prefix_allowed_tokens_fn, max_time: float | None = None) -> list:
    """Checks a call's stopping_criteria (a list of callables, Hugging Face's StoppingCriteriaList included)
    and prefix_allowed_tokens_fn (a callable or None); returns the criteria as a list, with a MaxTime
    (its clock started now) at the end when the call has a max_time (Decoding.max_time)."""
    criteria = list(stopping_criteria or [])
    for i, c in enumerate(criteria):
        if not callable(c):
            raise TypeError(f"stopping_criteria[{i}] is a {type(c).__name__}, not a callable (input_ids, scores)")
    if prefix_allowed_tokens_fn is not None and not callable(prefix_allowed_tokens_fn):
        raise TypeError(f"prefix_allowed_tokens_fn is a {type(prefix_allowed_tokens_fn).__name__}, not a callable "
                        "(batch_id, input_ids) -> list of token ids")
    if max_time is not None:
        criteria.append(MaxTime(max_time))
    return criteria


class MaxTime:
    """max_time's stopping criterion: every row is done once more than `seconds` have passed since it was
    made (a monotonic clock); one bool for all rows, as criteria may return."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.monotonic()

    def __call__(self, input_ids, scores) -> np.bool_:
        return np.bool_(time.monotonic() - self.start > self.seconds)


# ------------------------------------------------------------------------------- assisted decoding
def check_assisted(d: Decoding, assistant, rows: int, embeds: bool, vocab_size: int, backend: str) -> bool:
    """Whether the call decodes assisted (prompt_lookup_num_tokens, or an assistant model); a ValueError in
    words when it cannot: more than one row, beams, an assistant with inputs_embeds, of another backend
    (`backend`: "torch", "tf" or "flax", the model's) or of another vocabulary."""
    if assistant is None and not d.prompt_lookup_num_tokens:
        return False
    what = "assistant_model" if assistant is not None else f"prompt_lookup_num_tokens={d.prompt_lookup_num_tokens}"
    if assistant is not None and d.prompt_lookup_num_tokens:
        raise ValueError("pass assistant_model or prompt_lookup_num_tokens, not both")
    if rows != 1 or d.is_beam_search or d.num_return_sequences != 1:
        raise ValueError(f"{what}: assisted decoding takes one prompt and one row (num_beams=1, "
                         f"num_return_sequences=1), as in Hugging Face; this call has {rows} prompts, "
                         f"num_beams={d.num_beams}, num_return_sequences={d.num_return_sequences}")
    if assistant is not None:
        if embeds:
            raise ValueError("assistant_model: the assistant cannot read inputs_embeds; pass input_ids")
        other = getattr(getattr(assistant, "config", None), "vocab_size", None)
        family = type(assistant).__module__.split(".")[0]
        if other != vocab_size or family != f"opt_{backend}" or not callable(getattr(assistant, "generate", None)):
            raise ValueError(f"assistant_model must be an optkit opt_{backend} causal LM (the model's backend) of the "
                             f"same vocabulary ({vocab_size} tokens); got {type(assistant).__name__} from {family} "
                             f"with vocab_size={other}")
    return True


def prompt_lookup(row: Sequence[int], num_tokens: int, max_ngram: int, eos_ids: Sequence[int] = ()) -> list[int]:
    """Prompt lookup's candidates for a row of token ids (Hugging Face's PromptLookupCandidateGenerator): for n
    from min(max_ngram, len(row) - 1) down to 1, the first earlier occurrence of the row's last n tokens
    that has tokens after it gives up to num_tokens of them, cut before the first EOS id; [] when none."""
    row = np.asarray(row)
    L = row.shape[0]
    for n in range(min(max_ngram, L - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(row, n)  # (L - n + 1, n)
        for start in np.flatnonzero((windows == row[L - n:]).all(1)):
            begin, end = start + n, min(start + n + num_tokens, L)
            if begin < end:
                chosen = row[begin:end]
                stop = np.flatnonzero(np.isin(chosen, list(eos_ids)))
                return (chosen[:stop[0]] if stop.size else chosen).tolist()
    return []


class PromptLookup:
    """Assisted decoding's candidates from the row itself (`prompt_lookup` with the call's settings), the
    drafter every backend's prompt lookup is: propose(row so far (1-D ids), room) -> up to `room` token ids;
    taken(matched, drafted) keeps nothing (an assistant's draft length follows it)."""

    def __init__(self, d: "Decoding"):
        self.d = d

    def propose(self, row, room: int) -> list[int]:
        d = self.d
        return prompt_lookup(row, min(room, d.prompt_lookup_num_tokens), d.max_matching_ngram_size, d.eos_token_ids)

    def taken(self, matched: int, drafted: int) -> None:
        pass


class AssistantDrafts:
    """What every backend's assistant model keeps across its drafts ("Assisted decoding"): the draft length
    (`draft`, from num_assistant_tokens, following the schedule), the row's positions its own cache holds
    (`valid`), and the last draft's extent (`upto`: the row's length when it drafted; `written`: the positions it
    had then written, the last drafted token never read). A backend's assistant subclasses it."""

    def __init__(self, d: "Decoding", valid: int = 0):
        self.d, self.draft = d, d.num_assistant_tokens
        self.valid, self.upto, self.written = valid, 0, 0

    def taken(self, matched: int, drafted: int) -> None:
        """The model kept the first `matched` of the `drafted` candidates: the assistant's cache holds the row up
        to them; the draft length follows the schedule."""
        self.valid = min(self.upto + matched, self.written)
        self.draft = next_draft_length(self.draft, matched, drafted, self.d.num_assistant_tokens_schedule)


def next_draft_length(current: int, matched: int, drafted: int, schedule: str) -> int:
    """num_assistant_tokens after a draft of `drafted` tokens of which the model kept `matched`: "heuristic"
    schedules add 2 when it kept them all and take 1 off (to no less than 1) otherwise; "constant" keeps it."""
    if schedule == "constant":
        return current
    return current + 2 if matched == drafted else max(1, current - 1)


def allowed_tokens(fn: Callable, rows: Sequence, num_beams: int, vocab_size: int) -> np.ndarray:
    """prefix_allowed_tokens_fn's rule: (R, V) bool, the tokens each row may take next. rows: the R rows so far
    as the backend's 1-D arrays (what `fn` receives); row r's batch_id is r // num_beams."""
    allowed = np.zeros((len(rows), vocab_size), dtype=bool)
    for r, row in enumerate(rows):
        ids = fn(r // num_beams, row)
        try:
            ids = np.asarray([int(i) for i in ids], dtype=np.int64)
        except (TypeError, ValueError):
            raise ValueError(f"prefix_allowed_tokens_fn returned {ids!r:.80} for batch_id {r // num_beams}; it must "
                             "return a list of token ids") from None
        if ids.size == 0:
            raise ValueError(f"prefix_allowed_tokens_fn returned no token for batch_id {r // num_beams}: every row "
                             "needs at least one allowed token")
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            raise ValueError(f"prefix_allowed_tokens_fn returned token id {int(bad[0])} for batch_id "
                             f"{r // num_beams}, outside the vocabulary [0, {vocab_size})")
        allowed[r, ids] = True
    return allowed


def criteria_hits(criteria: Sequence[Callable], input_ids, scores, rows: int, to_host: Callable) -> np.ndarray:
    """The stopping criteria's verdict: (rows,) bool, the rows any criterion says are done. input_ids and
    scores are passed as they are (the backend's arrays); `to_host` turns a result into NumPy."""
    done = np.zeros(rows, dtype=bool)
    for i, criterion in enumerate(criteria):
        out = np.asarray(to_host(criterion(input_ids, scores)))
        if out.shape not in ((), (rows,)) or not (out.dtype == bool or np.issubdtype(out.dtype, np.integer)):
            raise ValueError(f"stopping_criteria[{i}] returned {out.dtype} of shape {out.shape}; it must return a "
                             f"bool per row ({rows},) or one bool")
        done |= out.astype(bool)
    return done


def check_extras(d: Decoding, logits_processor, streamer, tokenizer) -> list:
    """Checks the host-side extras of a call; returns the logits processors as a list."""
    processors = list(logits_processor or [])
    for i, p in enumerate(processors):
        if not callable(p):
            raise TypeError(f"logits_processor[{i}] is a {type(p).__name__}, not a callable (input_ids, scores)")
    if streamer is not None and d.is_beam_search:
        raise ValueError("beam search cannot stream: the best beam is known only at the end (use num_beams=1)")
    if streamer is not None and not (callable(getattr(streamer, "put", None)) or callable(streamer)):
        raise TypeError(f"streamer must have put()/end() (Hugging Face's protocol) or be callable, "
                        f"got {type(streamer).__name__}")
    if d.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer: pass tokenizer= to generate (its decode turns tokens "
                         "into the text the stop strings are looked for in)")
    return processors


def apply_processors(processors: Sequence[Callable], input_ids, scores):
    """Rule 4: each processor in turn; the result must keep the scores' shape."""
    for i, processor in enumerate(processors):
        out = processor(input_ids, scores)
        if tuple(getattr(out, "shape", ())) != tuple(scores.shape):
            raise ValueError(f"logits_processor[{i}] returned shape {tuple(getattr(out, 'shape', ()))}; "
                             f"it must return scores of shape {tuple(scores.shape)}")
        scores = out
    return scores


# ------------------------------------------------------------------------------------------ streamers
class _CallbackStreamer:
    """A plain callable as a streamer: called with each step's tokens, not with the prompt."""

    def __init__(self, fn: Callable):
        self.fn, self.prompt_seen = fn, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.fn(value)
        self.prompt_seen = True

    def end(self) -> None:
        pass


def as_streamer(streamer):
    """Hugging Face's put/end protocol for what `streamer=` was given (None stays None)."""
    if streamer is None or callable(getattr(streamer, "put", None)):
        return streamer
    return _CallbackStreamer(streamer)


# ---------------------------------------------------------------------------------------- stop strings
class StopStrings:
    """Rule 6's stop strings, checked on the host on each row's tokens (see the module docstring)."""

    def __init__(self, stop_strings: Sequence[str], tokenizer):
        self.strings = tuple(stop_strings)
        self.tokenizer = tokenizer
        # tokens to decode: each carries at least one byte, so 4 per character (UTF-8) always suffice
        self.window = 4 * max(len(s) for s in self.strings) + 4

    def _text(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def hit(self, tokens: Sequence[int]) -> bool:
        """Whether the last token of `tokens` (one row's real tokens) completes a stop string."""
        window = list(tokens)[-self.window:]
        if not window:
            return False
        before, text = self._text(window[:-1]), self._text(window)
        start = 0  # text up to `start` was there before the last token
        while start < min(len(before), len(text)) and before[start] == text[start]:
            start += 1
        return any(text.find(s, max(0, start - len(s) + 1)) >= 0 for s in self.strings)

    def hits(self, tokens: np.ndarray, real: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """(R,) bool for rows of tokens (R, L) with `real` (R, L) marking real tokens; only `rows`
        (a bool (R,) mask, default all) are checked."""
        tokens, real = np.asarray(tokens), np.asarray(real).astype(bool)
        out = np.zeros(tokens.shape[0], dtype=bool)
        for r in range(tokens.shape[0]):
            if rows is None or rows[r]:
                out[r] = self.hit(tokens[r][real[r]])
        return out


# ------------------------------------------------------------------------- NumPy reference of the rules
def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Rule 1: logits (B, V) float32; seen (B, V) bool: token occurred among the row's real tokens."""
    penalized = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalized, logits).astype(np.float32)


def banned_by_ngrams(tokens: np.ndarray, real: np.ndarray, n: int, vocab_size: int) -> np.ndarray:
    """Rule 2: (R, V) bool, the tokens banned as the next one after rows `tokens` (R, L) whose real
    positions `real` (R, L) marks (the next token comes at position L)."""
    tokens, real = np.asarray(tokens), np.asarray(real).astype(bool)
    R, L = tokens.shape
    banned = np.zeros((R, vocab_size), dtype=bool)
    if n < 1 or L < n - 1:
        return banned
    for r in range(R):
        if not real[r, L - n + 1:].all():
            continue
        tail = tuple(tokens[r, L - n + 1:])
        for i in range(L - n + 1):
            if real[r, i:i + n].all() and tuple(tokens[r, i:i + n - 1]) == tail:
                banned[r, tokens[r, i + n - 1]] = True
    return banned


def single_token_bias(sequence_bias, vocab_size: int) -> np.ndarray:
    """Rule 0's one-token entries as one (V,) float32 vector (a dict holds each sequence once: set, not added)."""
    bias = np.zeros(vocab_size, dtype=np.float32)
    for ids, value in sequence_bias:
        if len(ids) == 1:
            bias[ids[0]] = value
    return bias


class LongerSequences(NamedTuple):
    """Rule 0's entries of two tokens or more, packed for a vectorized match: rest (M, P) int32, each entry's
    tokens but its last, right-aligned and padded on the left with -1 (matches anything); last (M,) int32,
    bias (M,) float32, length (M,) int32 (a row must hold at least that many tokens)."""
    rest: np.ndarray
    last: np.ndarray
    bias: np.ndarray
    length: np.ndarray


def longer_sequences(sequence_bias, max_length: int) -> LongerSequences | None:
    """The entries of 2..max_length tokens (a longer one cannot match a row of max_length), or None."""
    entries = [(ids, value) for ids, value in sequence_bias if 1 < len(ids) <= max_length]
    if not entries:
        return None
    P = max(len(ids) for ids, _ in entries) - 1
    rest = np.full((len(entries), P), -1, np.int32)
    for m, (ids, _) in enumerate(entries):
        rest[m, P - len(ids) + 1:] = ids[:-1]
    return LongerSequences(rest, np.array([ids[-1] for ids, _ in entries], np.int32),
                           np.array([value for _, value in entries], np.float32),
                           np.array([len(ids) for ids, _ in entries], np.int32))


def longer_matches(tail: np.ndarray, length: int, longer: LongerSequences) -> np.ndarray:
    """(R, M) bool: which rows end with which entry's rest; tail (R, P): each row's last P tokens (any value
    where the row is shorter), length: the rows' length."""
    return ((tail[:, None, :] == longer.rest) | (longer.rest < 0)).all(-1) & (length >= longer.length)


def sequence_bias_table(tokens: np.ndarray, sequence_bias, vocab_size: int) -> np.ndarray:
    """Rule 0: (R, V) float32, the bias added to each next token of rows `tokens` (R, L) (prompt pads
    included, as Hugging Face matches them): a one-token sequence's bias always, a longer one's when the
    row ends with all of it but its last token (and the row holds at least as many tokens as it)."""
    tokens = np.asarray(tokens)
    R, L = tokens.shape
    bias = np.tile(single_token_bias(sequence_bias, vocab_size), (R, 1))
    longer = longer_sequences(sequence_bias, L)
    if longer is not None:
        P = longer.rest.shape[1]
        match = longer_matches(tokens[:, L - P:], L, longer)                  # (R, M)
        for m in range(len(longer.last)):
            bias[match[:, m], longer.last[m]] += longer.bias[m]
    return bias


def decay_growth(exponential_decay: tuple[int, float], max_new_tokens: int) -> np.ndarray:
    """exponential_decay_length_penalty (start, factor) per step: (N,) float32, factor ** (step - start) - 1
    after step start, 0 before (computed in float64, rounded once), so every backend adds the same value."""
    start, factor = exponential_decay
    steps = np.arange(max_new_tokens)
    with np.errstate(over="ignore"):
        growth = np.where(steps > start, np.power(np.float64(factor), steps - start) - 1, 0)
    return growth.astype(np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    top = x.max(-1, keepdims=True)
    return (x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(x))


def _keep_best(drop: np.ndarray, logits: np.ndarray, keep: int) -> np.ndarray:
    """drop (R, V) bool, except for each row's `keep` most probable tokens (ties: lower id first)."""
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :keep]
    best = np.zeros_like(drop)
    np.put_along_axis(best, order, True, -1)
    return drop & ~best


def min_p_filter(logits: np.ndarray, min_p: float, keep: int = 1) -> np.ndarray:
    """Keep the tokens at least min_p times as probable as the most probable one (and the `keep` best)."""
    probs = softmax(logits)
    drop = _keep_best(probs < np.float32(min_p) * probs.max(-1, keepdims=True), logits, keep)
    return np.where(drop, -np.inf, logits).astype(np.float32)


def typical_filter(logits: np.ndarray, mass: float, keep: int = 1) -> np.ndarray:
    """Locally typical sampling: order the tokens by how far their surprisal is from the entropy, keep
    them in that order until their probability reaches `mass` (the token that crosses it included, with
    every token as close to the entropy as it), always the `keep` closest ones."""
    if mass >= 1.0:
        return logits
    logp = log_softmax(logits)
    p = np.exp(logp)
    entropy = -(np.where(p > 0, logp, 0) * p).sum(-1, keepdims=True)
    shifted = np.abs(-logp - entropy)
    order = np.argsort(shifted, axis=-1, kind="stable")
    sorted_shifted = np.take_along_axis(shifted, order, -1)
    cumulative = np.cumsum(softmax(np.take_along_axis(logits, order, -1)), -1)
    last = np.minimum((cumulative < mass).sum(-1), logits.shape[-1] - 1)
    drop_sorted = sorted_shifted > np.take_along_axis(sorted_shifted, last[:, None], -1)
    drop_sorted[:, :keep] = False
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, -1)
    return np.where(drop, -np.inf, logits).astype(np.float32)


def _below_kth(logits: np.ndarray, keep: int) -> np.ndarray:
    """(R, V) bool: tokens scored below each row's keep-th best score (never the `keep` best, ties kept)."""
    kth = np.sort(logits, axis=-1)[:, -min(keep, logits.shape[-1])][:, None]
    return logits < kth


def epsilon_filter(logits: np.ndarray, epsilon: float, keep: int = 1) -> np.ndarray:
    """Drop the tokens less probable than epsilon, never the `keep` most probable ones."""
    probs = softmax(logits)
    drop = (probs < np.float32(epsilon)) & _below_kth(logits, keep)
    return np.where(drop, -np.inf, logits).astype(np.float32)


def eta_filter(logits: np.ndarray, epsilon: float, keep: int = 1) -> np.ndarray:
    """Drop the tokens less probable than min(epsilon, sqrt(epsilon) * exp(-entropy)), never the `keep`
    most probable ones (the entropy counts a -inf logit as contributing nothing)."""
    logp = log_softmax(logits)
    p = np.exp(logp)
    entropy = -(np.maximum(logp, np.finfo(np.float32).min) * p).sum(-1, keepdims=True)
    eta = np.minimum(np.float32(epsilon), np.float32(np.sqrt(epsilon)) * np.exp(-entropy))
    drop = (p < eta) & _below_kth(logits, keep)
    return np.where(drop, -np.inf, logits).astype(np.float32)


def reference_scores(logits: np.ndarray, tokens: np.ndarray, real: np.ndarray, d: Decoding, prompt_length: int,
                     processors: Sequence[Callable] = (), beam: bool = False,
                     allowed: np.ndarray | None = None) -> np.ndarray:
    """The scores (R, V) float32 one step chooses from, every rule of the module docstring in its order,
    written plainly: the definition the backends' steps are tested against (and what output_scores holds).
    logits (R, V): each row's next-token logits; tokens / real (R, L): the rows so far (prompt pads
    included) and which positions are real tokens; the step is L - prompt_length. beam=True: beam search's
    scores (log-probabilities first; the sampling filters when beam sampling, keeping d.filter_keep).
    allowed (R, V) bool: prefix_allowed_tokens_fn's tokens (`allowed_tokens`), or None."""
    x = np.asarray(logits, np.float32)
    tokens, real = np.asarray(tokens), np.asarray(real).astype(bool)
    R, L = tokens.shape
    V, step = x.shape[1], L - prompt_length
    eos = list(d.eos_token_ids)
    if beam:
        x = log_softmax(x)
    if d.sequence_bias:                                                            # 0
        x = x + sequence_bias_table(tokens, d.sequence_bias, V)
    if d.repetition_penalty != 1.0:                                                # 1
        seen = np.zeros((R, V), dtype=bool)
        for r in range(R):
            seen[r, tokens[r][real[r]]] = True
        x = apply_repetition_penalty(x, seen, d.repetition_penalty)
    if d.no_repeat_ngram_size:                                                     # 2
        x = np.where(banned_by_ngrams(tokens, real, d.no_repeat_ngram_size, V), -np.inf, x)
    if eos and step < d.min_new_tokens:                                            # 3
        x = x.copy()
        x[:, eos] = -np.inf
    if allowed is not None:                                                        # prefix_allowed_tokens_fn
        x = x + np.where(allowed, np.float32(0), np.float32(-np.inf))
    if d.forced_bos_token_id is not None and L == 1:                               # 3a
        x = np.full_like(x, -np.inf)
        x[:, d.forced_bos_token_id] = 0
    if d.forced_eos_token_ids and step == d.max_new_tokens - 1:                    # 3b
        x = np.full_like(x, -np.inf)
        x[:, list(d.forced_eos_token_ids)] = 0
    if d.remove_invalid_values:                                                    # 3c
        big = np.finfo(np.float32).max
        x = np.where(np.isnan(x), 0, np.where(x == np.inf, big, np.where(x == -np.inf, -big, x)))
    if d.exponential_decay is not None and eos and step > d.exponential_decay[0]:  # 3d
        x, scores = x.copy(), x[:, eos]
        with np.errstate(invalid="ignore", over="ignore"):
            boosted = scores + np.abs(scores) * decay_growth(d.exponential_decay, d.max_new_tokens)[step]
        x[:, eos] = np.where(scores > np.finfo(np.float32).min, boosted, scores)  # a banned EOS stays banned
    if d.suppress_tokens:                                                          # 3e
        x = x.copy()
        x[:, list(d.suppress_tokens)] = -np.inf
    if d.begin_suppress_tokens and step == d.begin_suppress_step:                 # 3f
        x = x.copy()
        x[:, list(d.begin_suppress_tokens)] = -np.inf
    x = np.asarray(apply_processors(processors, tokens, x.astype(np.float32)), np.float32)  # 4
    if d.do_sample:                                                                # 5
        x = sampling_filters(x, d, d.filter_keep)
    if d.renormalize_logits:                                                       # 5a
        x = log_softmax(x)
    return x.astype(np.float32)


def sampling_filters(x: np.ndarray, d: Decoding, keep: int = 1) -> np.ndarray:
    """Rule 5's filters in order (temperature, top-k, top-p, min_p, typical_p, epsilon, eta), each keeping
    at least the `keep` most probable tokens of a row."""
    if d.temperature != 1.0:
        x = (x / np.float32(d.temperature)).astype(np.float32)
    x = top_p_filter(top_k_filter(x, d.top_k, keep), d.top_p, keep)
    if d.min_p is not None:
        x = min_p_filter(x, d.min_p, keep)
    x = typical_filter(x, d.typical_p, keep)
    if 0 < d.epsilon_cutoff:
        x = epsilon_filter(x, d.epsilon_cutoff, keep)
    if 0 < d.eta_cutoff:
        x = eta_filter(x, d.eta_cutoff, keep)
    return x


def top_k_filter(logits: np.ndarray, k: int, keep: int = 1) -> np.ndarray:
    k = max(k, keep) if k > 0 else 0
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.sort(logits, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits).astype(np.float32)


def top_p_filter(logits: np.ndarray, p: float, keep: int = 1) -> np.ndarray:
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, -1).astype(np.float64)
    probs = np.exp(sorted_logits - sorted_logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    before = np.cumsum(probs, -1) - probs      # probability mass strictly before each token
    drop_sorted = before >= p                   # keep tokens until the mass reaches p (always the first)
    drop_sorted[:, :keep] = False
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, -1)
    return np.where(drop, -np.inf, logits).astype(np.float32)


def transition_scores(sequences: np.ndarray, scores: Sequence[np.ndarray], beam_indices: np.ndarray | None = None,
                      normalize_logits: bool = False) -> np.ndarray:
    """(rows, steps) float32: the score of each generated token in the step's scores (output_scores),
    Hugging Face's compute_transition_scores. sequences (rows, T + N) as generate returned them; with
    beam_indices (beam search) each token's score is read from the running beam it extended, and is 0
    past a hypothesis's end; normalize_logits takes log_softmax of each step's scores first."""
    steps = np.stack([np.asarray(s, np.float32) for s in scores])          # (N, R, V)
    if normalize_logits:
        steps = log_softmax(steps.reshape(-1, steps.shape[-1])).reshape(steps.shape)
    sequences = np.asarray(sequences)
    N, R, V = steps.shape
    if beam_indices is None:
        beam_indices = np.broadcast_to(np.arange(R)[:, None], (R, N))
    beam_indices = np.asarray(beam_indices)
    past_end = beam_indices < 0
    M = int((~past_end).sum(-1).max()) if past_end.size else 0
    beams, past_end = np.where(past_end, 0, beam_indices)[:, :M], past_end[:, :M]
    tokens = sequences[:, sequences.shape[1] - M:]
    out = steps[np.arange(M)[None, :], beams, tokens]                        # (rows, M)
    return np.where(past_end, 0, out).astype(np.float32)


# ------------------------------------------------------------------------------------- beam scoring
def length_norms(max_new_tokens: int, length_penalty: float) -> np.ndarray:
    """(N,) float32: generated_length ** length_penalty for lengths 1..N, computed in float64 and rounded
    once. A hypothesis of length n scores sum_logprobs / length_norms[n - 1]: every backend divides by
    these values, so the three agree to the bit."""
    return np.array([float(n) ** length_penalty for n in range(1, max_new_tokens + 1)], dtype=np.float32)


def draw_without_replacement(scores: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(R, n) indices drawn without replacement from softmax(scores) (R, M), in the order drawn: the n largest
    of scores + Gumbel noise (the Gumbel-top-k trick, the same law as drawing one at a time from what is left,
    as torch.multinomial does). Impossible entries (-inf) come after every possible one."""
    keyed = np.asarray(scores, np.float64) + rng.gumbel(size=np.shape(scores))
    return np.argsort(-keyed, axis=-1, kind="stable")[:, :n]


def best_length(step: int, d: Decoding) -> int:
    """The length a running beam is normalized at to see whether it could still beat the finished
    hypotheses, at `step` (0-based): the current length (step + 1), or the length limit with
    early_stopping="never" and a positive length_penalty (longer can only score higher then)."""
    return d.max_new_tokens if d.early_stopping == "never" and d.length_penalty > 0 else step + 1


def beam_search_reference(next_logprobs: Callable[[np.ndarray], np.ndarray], prompts: np.ndarray,
                          d: Decoding, finished: list | None = None, scores: list | None = None,
                          draw: Callable[[np.ndarray, int], np.ndarray] | None = None) -> list[list[list[int]]]:
    """The beam-search rules of the module docstring, written plainly, one prompt row at a time: for each
    of the B prompts (B, T) (all tokens real), its num_return_sequences best hypotheses, best first, each
    a list of new tokens (no padding). `next_logprobs(rows (R, L)) -> (R, V)` gives the processed
    log-probabilities of the next token after each row (rules 1-4 already applied). Scores are float32 as
    in the backends. This is the definition the backends' vectorized beam searches are tested against.
    `finished`, when given, receives (row, step, tokens) for every hypothesis that finishes on an EOS id;
    `scores`, when given, receives each prompt's list of the returned hypotheses' scores (sequences_scores).
    Beam sampling: `draw(scores (K * V,), C)` gives the C candidates' indices in the order drawn (for example
    `draw_without_replacement` on one row); the running beams are then the best-scored of them."""
    K, C, N = d.num_beams, d.candidates, d.max_new_tokens
    norms = length_norms(N, d.length_penalty)
    eos = set(d.eos_token_ids)
    out = []
    for row, prompt in enumerate(np.asarray(prompts)):
        beams = [(np.float32(0.0), [])] + [(np.float32(-np.inf), [])] * (K - 1)  # one live beam to start
        done: list[tuple[np.float32, list[int]]] = []   # finished hypotheses: (normalized score, tokens)
        row_done = False
        for step in range(N):
            rows = np.array([list(prompt) + tokens for _, tokens in beams])
            logprobs = np.asarray(next_logprobs(rows), np.float32)            # (K, V)
            V = logprobs.shape[1]
            scored = [(np.float32(score + logprobs[k, v]), k * V + v) for k, (score, _) in enumerate(beams)
                      for v in range(V)]
            if draw is None:
                cands = sorted(scored, key=lambda c: (-c[0], c[1]))[:C]      # higher score, then lower index
            else:
                cands = [scored[i] for i in draw(np.array([c[0] for c in scored], np.float32), C)]
            running, last = [], step == N - 1  # at the length limit every candidate stops
            for rank, (score, index) in enumerate(cands):
                k, v = divmod(index, V)
                tokens = beams[k][1] + [v]
                if v in eos or last:  # only the first K candidates may finish; the rest are dropped
                    if rank < K and not row_done and np.isfinite(score):
                        done.append((np.float32(score / norms[step]), tokens))
                        if finished is not None and v in eos:
                            finished.append((row, step, tokens))
                else:
                    running.append((score, tokens))
            done = sorted(done, key=lambda h: -h[0])[:K]
            if last:
                break
            stopped = [(np.float32(s - 1e9), [*beams[i // V][1], i % V]) for s, i in cands
                       if i % V in eos]                                      # fill-ins when too few run on
            if not row_done:
                beams = (running + stopped) if draw is None else sorted(running + stopped, key=lambda b: -b[0])
                beams = beams[:K]
            best_running = max(s for s, _ in beams) / norms[best_length(step, d) - 1]
            row_done = row_done or (len(done) == K and (d.early_stopping is True
                                                        or min(s for s, _ in done) >= best_running))
            if row_done:
                break
        ranked = sorted(done, key=lambda h: -h[0])  # stable: earlier-finished first on equal scores
        out.append([tokens for _, tokens in ranked[:d.num_return_sequences]])
        if scores is not None:
            scores.append([score for score, _ in ranked[:d.num_return_sequences]])
    return out


# ------------------------------------------------------------------------------- the model attribute
class GenerationDefaults:
    """`model.generation_config` for every backend's generation mixin (the model provides `config`):
    from_pretrained sets it from the folder, save_pretrained writes it, and otherwise it is made from
    the config's token ids on first use. Assigning None resets it; a dict or a Hugging Face config
    object is converted."""

    @property
    def generation_config(self) -> GenerationConfig:
        cfg = self.__dict__.get("_generation_config")
        if cfg is None:
            cfg = GenerationConfig.from_model_config(self.config)
            self.__dict__["_generation_config"] = cfg
        return cfg

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.__dict__["_generation_config"] = None if value is None else GenerationConfig.coerce(value)

    def _load_generation_config(self, directory: str | os.PathLike) -> None:
        self.generation_config = GenerationConfig.from_pretrained(directory, self.config)

    def _save_generation_config(self, directory: str | os.PathLike) -> str:
        return self.generation_config.save_pretrained(directory)

    def _decoding(self, generation_config, kwargs: Mapping[str, Any], prompt_length: int,
                  row_length: int | None = None) -> Decoding:
        config = self.config
        return resolve(self.generation_config, generation_config, kwargs, prompt_length=prompt_length,
                       max_positions=config.max_position_embeddings, vocab_size=config.vocab_size,
                       row_length=row_length)
