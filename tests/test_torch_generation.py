"""Generation in the PyTorch backend: the opt_spec semantics, the KV cache, Hugging Face parity."""

import numpy as np
import pytest
import torch

from opt_spec import generation as gen
from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_batch, random_weights
from opt_torch import OPTForCausalLM
from opt_torch.cache import KVCache

from .conftest import beam_samples_reference, max_abs_diff


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = {}
    for name in ("pre_ln", "post_ln_proj", "untied_head"):
        path = tmp_path_factory.mktemp(name)
        spec_io.save_safetensors_dir(path, random_weights(VARIANTS[name], seed=3), VARIANTS[name].to_dict())
        paths[name] = path
    return paths


def prompts(config, seed=2):
    return tuple(torch.from_numpy(a).long() for a in random_batch(config, seed=seed))


@pytest.mark.parametrize("whole_buffer", [True, False])
def test_preallocated_cache_decoding_equals_full_forward(checkpoints, whole_buffer):
    """A preallocated cache keeps its write position: the mask covers its every slot, or past + new."""
    config = VARIANTS["post_ln_proj"]
    model = OPTForCausalLM.from_pretrained(checkpoints["post_ln_proj"])
    ids, mask = prompts(config)
    B, T = ids.shape
    with torch.no_grad():
        full = model(ids, mask).logits
        cache = model.init_cache(B, T + 4)
        slots = torch.zeros(B, T + 4, dtype=torch.long)
        slots[:, :6] = mask[:, :6]
        steps = [model(ids[:, :6], slots if whole_buffer else slots[:, :6], past_key_values=cache).logits]
        for t in range(6, T):
            slots[:, t] = mask[:, t]
            out = model(ids[:, t:t + 1], slots if whole_buffer else slots[:, :t + 1], past_key_values=cache)
            assert out.past_key_values is cache and cache.length == t + 1
            steps.append(out.logits)
    assert max_abs_diff(torch.cat(steps, 1), full, mask) <= 1e-5


@pytest.mark.parametrize("capacity", [None, 12])
def test_a_cropped_cache_continues_as_if_the_dropped_tokens_never_came(checkpoints, capacity):
    """KVCache.crop (assisted decoding drops the candidates not taken): writing other tokens after a crop gives
    the logits of a forward over the kept tokens and the new ones."""
    model = OPTForCausalLM.from_pretrained(checkpoints["pre_ln"])
    ids = torch.tensor([[2, 5, 9, 14, 7, 7, 30, 11]])
    other = torch.tensor([[21, 3, 17]])
    with torch.no_grad():
        cache = model.init_cache(1, capacity)
        model(ids, past_key_values=cache)                    # 8 tokens, then keep 5 and write 3 others
        cache.crop(5)
        assert cache.length == 5
        got = model(other, torch.ones(1, 8, dtype=torch.long), past_key_values=cache).logits
        want = model(torch.cat([ids[:, :5], other], 1)).logits[:, 5:]
    assert cache.length == 8 and max_abs_diff(got, want) <= 1e-5
    with pytest.raises(ValueError, match="crop\\(9\\): the cache holds 8 tokens"):
        cache.crop(9)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_decode_step_equals_the_forward_pass(name, packed, attn):
    """generate's per-token DecodeStep gives the forward's logits (every variant, both attention
    kernels, fused or plain weight layout) on a left-padded batch, and fills the cache alike."""
    config = VARIANTS[name]
    model = OPTForCausalLM.from_config(config, seed=1, attn_implementation=attn).eval()
    if not packed:
        for p in model.parameters():
            p.data = p.data.contiguous()
    ids, mask = prompts(config)
    B, T = ids.shape
    L = T + 3
    slots = torch.zeros(B, L, dtype=torch.long)
    slots[:, :T] = mask
    caches = [KVCache(config, B, L), KVCache(config, B, L)]
    with torch.no_grad():
        for cache in caches:
            model._last_logits(ids, slots, cache)
        step = model._step_fn(compile=False)
        tokens = torch.tensor([5, 7, 9][:B])
        for t in range(T, L):
            slots[:, t] = 1
            fast = step(tokens, slots, caches[0], t)  # attends over slots [0, t]
            reference = model._last_logits(tokens[:, None], slots, caches[1])
            assert max_abs_diff(fast, reference) < 1e-5
            tokens = reference.argmax(-1)
    assert max_abs_diff(caches[0].keys, caches[1].keys) < 1e-6 and caches[0].length == caches[1].length == L


@pytest.mark.parametrize("name", ["pre_ln", "post_ln_proj", "untied_head"])
def test_greedy_matches_hugging_face(checkpoints, name):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face reference needs the test extra")
    config = VARIANTS[name]
    ours = OPTForCausalLM.from_pretrained(checkpoints[name])
    ref = transformers.OPTForCausalLM.from_pretrained(checkpoints[name]).eval()
    ids, mask = prompts(config)
    for eos in (None, 75):  # 75 is emitted early by row 2 of this model: per-row stopping and padding
        got = ours.generate(ids, mask, max_new_tokens=10, eos_token_id=eos)
        want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                            eos_token_id=eos if eos is not None else config.eos_token_id, pad_token_id=1)
        assert torch.equal(got, want)


@pytest.mark.parametrize("num_beams,length_penalty", [(2, 1.0), (3, 0.5), (4, 2.0)])
def test_beam_search_matches_hugging_face(checkpoints, num_beams, length_penalty):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face reference needs the test extra")
    config = VARIANTS["pre_ln"]
    ours = OPTForCausalLM.from_pretrained(checkpoints["pre_ln"])
    ref = transformers.OPTForCausalLM.from_pretrained(checkpoints["pre_ln"]).eval()
    ids, mask = prompts(config)
    got = ours.generate(ids, mask, max_new_tokens=8, num_beams=num_beams, length_penalty=length_penalty)
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=num_beams,
                        length_penalty=length_penalty, do_sample=False, pad_token_id=1)
    assert torch.equal(got, want)


def test_eos_stops_rows_and_pads_them(checkpoints):
    config = VARIANTS["pre_ln"]
    model = OPTForCausalLM.from_pretrained(checkpoints["pre_ln"])
    ids, mask = prompts(config)
    free = model.generate(ids, mask, max_new_tokens=6)
    eos = int(free[2, 9])  # the first token row 2 generates
    out = model.generate(ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out[2, 9] == eos and (out[2, 10:] == 0).all()
    for row in (0, 1):  # rows that never emit it are unchanged
        assert torch.equal(out[row], free[row]) or (free[row, 9:] == eos).any()
    held = model.generate(ids, mask, max_new_tokens=6, min_new_tokens=3, eos_token_id=eos, pad_token_id=0)
    assert (held[2, 9:12] != eos).all()


def test_all_rows_finished_ends_early(checkpoints):
    config = VARIANTS["pre_ln"]
    model = OPTForCausalLM.from_pretrained(checkpoints["pre_ln"])
    ids, mask = prompts(config)
    first = model.generate(ids[2:], mask[2:], max_new_tokens=1)[0, -1]
    out = model.generate(ids[2:], mask[2:], max_new_tokens=20, eos_token_id=int(first))
    assert out.shape == (1, ids.shape[1] + 1)


def test_sampling_is_reproducible_with_a_seed(checkpoints):
    config = VARIANTS["pre_ln"]
    model = OPTForCausalLM.from_pretrained(checkpoints["pre_ln"])
    ids, mask = prompts(config)
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=40, top_p=0.95)
    a = model.generate(ids, mask, seed=1, **kwargs)
    assert torch.equal(a, model.generate(ids, mask, seed=1, **kwargs))
    assert not torch.equal(a, model.generate(ids, mask, seed=2, **kwargs))
    greedy = model.generate(ids, mask, max_new_tokens=12)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=12, do_sample=True, top_k=1, seed=5), greedy)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=12, do_sample=True, top_p=1e-6, seed=5), greedy)


def test_repetition_penalty_matches_spec_reference(checkpoints):
    config = VARIANTS["pre_ln"]
    model = OPTForCausalLM.from_pretrained(checkpoints["pre_ln"])
    ids, mask = prompts(config)
    out = model.generate(ids, mask, max_new_tokens=3, repetition_penalty=1.7)
    # replay the steps with the NumPy reference of the rule
    seq, m = ids.clone(), mask.clone()
    for step in range(3):
        with torch.no_grad():
            logits = model(seq, m).logits[:, -1].float().numpy()
        seen = np.zeros_like(logits, dtype=bool)
        for b in range(seq.shape[0]):
            seen[b, seq[b][m[b].bool()].numpy()] = True
        nxt = torch.from_numpy(gen.apply_repetition_penalty(logits, seen, 1.7).argmax(-1))
        assert torch.equal(nxt, out[:, ids.shape[1] + step])
        seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, torch.ones(3, 1, dtype=torch.long)], 1)


def test_streaming_yields_the_generated_tokens(checkpoints):
    config = VARIANTS["pre_ln"]
    model = OPTForCausalLM.from_pretrained(checkpoints["pre_ln"])
    ids, mask = prompts(config)
    out = model.generate(ids, mask, max_new_tokens=5)
    received = []
    assert torch.equal(model.generate(ids, mask, max_new_tokens=5, streamer=received.append), out)
    assert torch.equal(torch.stack(received, 1), out[:, 9:])
    assert torch.equal(torch.stack(list(model.stream(ids, mask, max_new_tokens=5)), 1), out[:, 9:])
    with pytest.raises(ValueError, match="beam search cannot stream"):
        list(model.stream(ids, mask, num_beams=2))


def test_streamer_and_outputs_together(checkpoints):
    """return_dict_in_generate with a streamer: the streamer still gets every step, and the record holds
    the plain call's tokens with one scores / logits entry per step taken."""
    model = OPTForCausalLM.from_pretrained(checkpoints["pre_ln"])
    ids, mask = prompts(VARIANTS["pre_ln"])
    plain = model.generate(ids, mask, max_new_tokens=5, suppress_tokens=[4], renormalize_logits=True)
    received = []
    out = model.generate(ids, mask, max_new_tokens=5, suppress_tokens=[4], renormalize_logits=True,
                         return_dict_in_generate=True, output_scores=True, output_logits=True, streamer=received.append)
    assert torch.equal(out.sequences, plain) and torch.equal(torch.stack(received, 1), plain[:, 9:])
    assert len(out.scores) == len(out.logits) == 5
    for s, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        assert torch.equal(scores.argmax(-1), plain[:, 9 + s]) and torch.isneginf(scores[:, 4]).all()
        assert torch.allclose(scores, logits.masked_fill(torch.arange(logits.shape[1]) == 4, float("-inf"))
                              .log_softmax(-1), atol=1e-6)
    assert torch.equal(torch.stack(list(model.stream(ids, mask, max_new_tokens=5, suppress_tokens=[4])), 1),
                       plain[:, 9:])


def test_stream_takes_stopping_criteria_and_prefix_allowed_tokens(checkpoints):
    """stream with both host rules yields generate's tokens: each row keeps to its allowed tokens, and a row
    the criterion stops is padded from the next step on."""
    model = OPTForCausalLM.from_pretrained(checkpoints["pre_ln"])
    ids, mask = prompts(VARIANTS["pre_ln"])

    def allowed(batch_id, row):  # three tokens, shifting with the row and its last token
        return [(int(row[-1]) + batch_id + j) % 40 + 5 for j in range(3)]

    def stop(input_ids, scores):  # rows whose last token is even end there
        return input_ids[:, -1] % 2 == 0

    kwargs = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=1, stopping_criteria=[stop],
                  prefix_allowed_tokens_fn=allowed)
    out = model.generate(ids, mask, **kwargs)
    new = torch.stack(list(model.stream(ids, mask, **kwargs)), 1)
    assert torch.equal(new, out[:, 9:]) and new.shape[1] < 6           # every row stopped early
    for b in range(out.shape[0]):
        ends = [s for s in range(new.shape[1]) if new[b, s] % 2 == 0]
        assert ends, b
        for s in range(ends[0] + 1):
            assert int(new[b, s]) in allowed(b, out[b, :9 + s]), (b, s)
        assert (new[b, ends[0] + 1:] == 1).all(), b


def _close(a, b, atol=1e-5) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.array_equal(np.isneginf(a), np.isneginf(b)) and np.array_equal(np.isposinf(a), np.isposinf(b)) \
        and np.allclose(np.where(np.isinf(a), 0, a), np.where(np.isinf(b), 0, b), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("search", ["greedy", "sample", "beam", "forced_bos"])
def test_step_scores_equal_the_reference(search):
    """Every rule of a step at once (opt_spec.generation.reference_scores) on random scores and rows
    from a small alphabet, so that the multi-token biases and n-grams match: each step of a call, from
    the first (begin_suppress_tokens, min_length, a one-token prompt's forced BOS, which moves
    begin_suppress_tokens to the second) to the last (forced EOS)."""
    from opt_torch.generation import TokenRules, step_scores

    rng = np.random.default_rng(["greedy", "sample", "beam", "forced_bos"].index(search))
    R, V, N = 4, 24, 5
    T = 1 if search == "forced_bos" else 6
    rows = rng.integers(0, 5, (R, T + N))
    real = np.ones((R, T + N), np.int64)
    real[1:, :T - 1] = rng.random((R - 1, T - 1)) < 0.6  # prompt pads (the first token is real)
    settings = dict(max_new_tokens=N, eos_token_id=[8, 9], sequence_bias={(3,): -2.0, (1, 2): 4.0, (2, 2, 5): -1.5,
                    (4, 1): -float("inf"), (4, 9): -float("inf")}, bad_words_ids=[[7], [0, 3], [8]], min_length=T + 1,
                    repetition_penalty=1.3,
                    no_repeat_ngram_size=2, suppress_tokens=[11], begin_suppress_tokens=[12, 13], forced_eos_token_id=9,
                    exponential_decay_length_penalty=(1, 1.5), renormalize_logits=True)
    invalid = search in ("greedy", "beam")  # NaN and inf logits made finite (and -inf then too: no banned EOS
    if invalid:                             # for the decay to keep; a small factor keeps -max * it finite)
        settings.update(remove_invalid_values=True, exponential_decay_length_penalty=(1, 1.05))
    if search == "sample":
        settings.update(do_sample=True, temperature=0.7, top_k=20, top_p=0.95, min_p=0.02, typical_p=0.9,
                        epsilon_cutoff=1e-3, eta_cutoff=1e-3)
    if search == "beam":
        settings.update(num_beams=2)
    settings.update(forced_bos_token_id=5)  # forces the first token of a one-token prompt only
    d = gen.resolve(gen.GenerationConfig(), None, settings, prompt_length=T, max_positions=64, vocab_size=V)
    rules = TokenRules(d, V, torch.device("cpu"))
    processors = [lambda ids, scores: scores - 0.25 * (ids[:, -1:] % 3)]  # rule 4, on either framework's arrays
    for step in range(N):
        L = T + step
        logits = (rng.standard_normal((R, V)) * 3).astype(np.float32)
        if invalid:
            logits[0, 6], logits[2, 10], logits[3, 14] = np.nan, -np.inf, np.inf
        seen = torch.zeros(R, V, dtype=torch.bool)
        for r in range(R):
            seen[r, rows[r, :L][real[r, :L] == 1]] = True
        got = step_scores(torch.from_numpy(logits), seen, torch.from_numpy(rows[:, :L]), torch.from_numpy(real[:, :L]),
                          step, d, rules, processors, beam=search == "beam").numpy()
        with np.errstate(over="ignore", invalid="ignore"):  # the reference on +-inf and NaN logits
            want = gen.reference_scores(logits, rows[:, :L], real[:, :L], d, T, processors, beam=search == "beam")
        assert _close(got, want), step
        assert np.isfinite(got).any(-1).all() and np.isneginf(got).any()  # something is kept and something banned


@pytest.mark.parametrize("kwargs,words", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=0.0, do_sample=True), "temperature=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(min_new_tokens=9, max_new_tokens=3), "min_new_tokens=9"),
    (dict(max_new_tokens=35), "max_position_embeddings=40"),
    (dict(eos_token_id=500), "eos_token_id=500 is outside the vocabulary"),
])
def test_generate_rejects_bad_arguments(checkpoints, kwargs, words):
    model = OPTForCausalLM.from_pretrained(checkpoints["pre_ln"])
    ids, mask = prompts(VARIANTS["pre_ln"])
    with pytest.raises(ValueError, match=words.replace("(", "\\(")):
        model.generate(ids, mask, **kwargs)


def test_beam_sampling_equals_the_reference_given_the_same_draws(checkpoints):
    """Beam sampling (do_sample with num_beams) against opt_spec.generation.beam_search_reference with
    draw=: the reference draws from the same uniform numbers the seeded torch.Generator gives generate (one
    (B, K * V) batch a step, Gumbel-top-k), so every candidate, finished hypothesis and running beam must
    agree; next-token scores are the model's full forward with the spec's filters (keeping 1 + len(EOS))."""
    config = VARIANTS["pre_ln"]
    model = OPTForCausalLM.from_pretrained(checkpoints["pre_ln"])
    ids = prompts(config)[0][:2, :5]
    T, N, K, V, seed = ids.shape[1], 6, 3, config.vocab_size, 11
    with torch.no_grad():
        first = model(ids).logits[:, -1].argsort(-1, descending=True)
    eos = (int(first[0, 0]), int(first[1, 1]))  # likely: hypotheses finish early
    settings = dict(max_new_tokens=N, num_beams=K, num_return_sequences=2, eos_token_id=list(eos), pad_token_id=1,
                    do_sample=True, temperature=2.0, top_k=0, top_p=0.5, length_penalty=0.7)
    d = gen.resolve(gen.GenerationConfig(), None, settings, prompt_length=T, max_positions=40, vocab_size=V)
    generator = torch.Generator().manual_seed(seed)  # the uniforms generate draws, one (B, K * V) batch a step
    noise = [-torch.log(-torch.log(torch.rand((len(ids), K * V), generator=generator).clamp_(
        min=torch.finfo(torch.float32).tiny))).numpy() for _ in range(N)]

    def last_logits(rows):
        with torch.no_grad():
            return model(torch.as_tensor(rows)).logits[:, -1].float().numpy()

    padded, finished = beam_samples_reference(last_logits, ids.numpy(), d, noise)
    got = model.generate(ids, seed=seed, **settings).numpy()
    np.testing.assert_array_equal(got[:, T:], padded)
    assert finished and any(step < N - 1 for _, step, _ in finished)
    others = [model.generate(ids, seed=s, **settings).numpy() for s in range(seed + 1, seed + 6)]
    assert any(not np.array_equal(other, got) for other in others)  # the draws matter


@pytest.mark.slow
def test_beam_sampling_draws_like_hugging_faces_beam_sample(checkpoints):
    """Hugging Face's beam sample and ours cannot draw the same numbers, but their outcomes must follow one law:
    over 500 seeds each, the second returned hypothesis's token (one step, 2 beams, 2 EOS ids: EOS-finished and
    running candidates compete) has nearly the same distribution. Total variation 0.24 here; finishing the
    running beams at the length limit instead of the first K drawn (an earlier reading) gives 0.55."""
    transformers = pytest.importorskip("transformers", reason="the Hugging Face reference needs the test extra")
    config = VARIANTS["pre_ln"]
    ours = OPTForCausalLM.from_pretrained(checkpoints["pre_ln"])
    ref = transformers.OPTForCausalLM.from_pretrained(checkpoints["pre_ln"]).eval()
    ids = prompts(config)[0][:1, :5]
    with torch.no_grad():
        ranked = ours(ids).logits[0, -1].argsort(descending=True).tolist()
    settings = dict(max_new_tokens=1, num_beams=2, num_return_sequences=2, do_sample=True, temperature=2.5, top_k=0,
                    pad_token_id=1, eos_token_id=[ranked[0], ranked[16]])  # the likeliest token, a rarer one
    n, mine, theirs = 500, np.zeros(config.vocab_size), np.zeros(config.vocab_size)
    with torch.no_grad():
        for seed in range(n):
            mine[int(ours.generate(ids, seed=seed, **settings)[1, -1])] += 1
            torch.manual_seed(seed)
            theirs[int(ref.generate(input_ids=ids, **settings)[1, -1])] += 1
    assert 0.5 * np.abs(mine - theirs).sum() / n < 0.4
