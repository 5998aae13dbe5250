"""Generation in the Flax backend: the opt_spec semantics, identical tokens to opt_torch (greedy, beam
search, repetition penalty), sampling, one compiled decode loop per setting, Hugging Face parity.

Every test here runs with jax_numpy_dtype_promotion="strict" (no silent dtype promotion).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from opt_spec import generation as gen
from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_batch, random_weights
from opt_flax import FlaxOPTForCausalLM
from opt_flax.generation import filter_for_sampling
from opt_torch import OPTForCausalLM

from .conftest import beam_samples_reference

NAMES = ("pre_ln", "post_ln_proj", "untied_head")
EOS = 75  # emitted early by row 2 of the pre_ln model below: per-row stopping and padding


@pytest.fixture(autouse=True)
def strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(Flax model, torch model) per variant, loaded once from the same random checkpoint, so that
    the compiled decode loops are shared by the tests."""
    made = {}

    def get(name):
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            spec_io.save_safetensors_dir(path, random_weights(VARIANTS[name], seed=3), VARIANTS[name].to_dict())
            made[name] = FlaxOPTForCausalLM.from_pretrained(path), OPTForCausalLM.from_pretrained(path).eval()
        return made[name]

    return get


def prompts(name, seed=2):
    """A left-padded batch of 3 prompts (0, 3 and 5 pads) as int32 NumPy arrays."""
    return random_batch(VARIANTS[name], seed=seed)


def torch_generate(model, ids, mask, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return model.generate(torch.from_numpy(ids).long(), torch.from_numpy(mask).long(), **kwargs).numpy()


def smallest_top2_gap(model, ids, mask, out, eos) -> float:
    """The smallest gap between the two largest logits over the greedy steps of `out` (each row until
    it emitted eos), from opt_torch: the test case is meaningful only without near-ties."""
    B, T = ids.shape
    full_mask = np.concatenate([mask, np.ones((B, out.shape[1] - T), mask.dtype)], axis=1)
    with torch.no_grad():
        logits = model(torch.from_numpy(out).long(), torch.from_numpy(full_mask).long()).logits.numpy()
    gaps = []
    for b in range(B):
        for t in range(T - 1, out.shape[1] - 1):
            top2 = np.sort(logits[b, t])[-2:]
            gaps.append(top2[1] - top2[0])
            if out[b, t + 1] == eos:
                break
    return float(min(gaps))


# ---------------------------------------------------------------------------- parity with torch
@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_torch(models, name):
    flax_model, torch_model = models(name)
    ids, mask = prompts(name)
    for eos in (None, EOS):
        want = torch_generate(torch_model, ids, mask, max_new_tokens=10, eos_token_id=eos)
        assert smallest_top2_gap(torch_model, ids, mask, want, eos) > 1e-4  # logits agree to ~1e-5
        got = flax_model.generate(ids, mask, max_new_tokens=10, eos_token_id=eos)
        assert isinstance(got, jax.Array) and got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), want)


def test_batch_of_one_matches_torch(models):
    """Batch 1 decodes with its cache carried in another shape (opt_flax.fast_paths.loop_cache): each
    row of the batch alone, its padding dropped, gives torch's tokens."""
    flax_model, torch_model = models("pre_ln")
    ids, mask = prompts("pre_ln")
    for b in range(ids.shape[0]):
        row = ids[b:b + 1, mask[b] == 1]
        want = torch_generate(torch_model, row, np.ones_like(row), max_new_tokens=8)
        assert smallest_top2_gap(torch_model, row, np.ones_like(row), want, None) > 1e-4
        np.testing.assert_array_equal(np.asarray(flax_model.generate(row, max_new_tokens=8)), want)


@pytest.mark.parametrize("name,num_beams,length_penalty", [("pre_ln", 2, 1.0), ("post_ln_proj", 3, 0.5),
                                                            ("pre_ln", 4, 2.0)])
def test_beam_search_matches_torch(models, name, num_beams, length_penalty):
    flax_model, torch_model = models(name)
    ids, mask = prompts(name)
    for eos in (None, EOS):
        kwargs = dict(max_new_tokens=8, num_beams=num_beams, length_penalty=length_penalty, eos_token_id=eos)
        want = torch_generate(torch_model, ids, mask, **kwargs)
        np.testing.assert_array_equal(np.asarray(flax_model.generate(ids, mask, **kwargs)), want)


@pytest.mark.parametrize("eos,length_penalty,more", [
    (29, 0.5, {}), (40, 0.5, {}), (89, 0.5, {}), (29, 1.0, dict(repetition_penalty=1.3, min_new_tokens=2)),
])
def test_beam_search_finishing_early_matches_torch(models, eos, length_penalty, more):
    """EOS chosen by beams (ids found for this model): rows done before max_new_tokens, hypotheses
    of different lengths, the output as long as the longest chosen one, pad filling; with the
    repetition penalty and min_new_tokens too."""
    flax_model, torch_model = models("post_ln_proj")
    ids, mask = prompts("post_ln_proj")
    T = ids.shape[1]
    kwargs = dict(max_new_tokens=8, num_beams=3, eos_token_id=eos, length_penalty=length_penalty, **more)
    want = torch_generate(torch_model, ids, mask, **kwargs)
    assert (want[:, T:] == 1).any()  # the case exercises early finishing
    np.testing.assert_array_equal(np.asarray(flax_model.generate(ids, mask, **kwargs)), want)


def test_repetition_penalty_matches_torch(models):
    flax_model, torch_model = models("pre_ln")
    ids, mask = prompts("pre_ln")
    plain = torch_generate(torch_model, ids, mask, max_new_tokens=8)
    for penalty in (1.7, 0.6):
        want = torch_generate(torch_model, ids, mask, max_new_tokens=8, repetition_penalty=penalty)
        got = np.asarray(flax_model.generate(ids, mask, max_new_tokens=8, repetition_penalty=penalty))
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, plain)  # the penalty changed something: the test can fail


# ----------------------------------------------------------------------- EOS, lengths, padding
def test_eos_stops_rows_and_pads_them(models):
    flax_model, _ = models("pre_ln")
    ids, mask = prompts("pre_ln")
    T = ids.shape[1]
    free = np.asarray(flax_model.generate(ids, mask, max_new_tokens=10))
    eos = int(free[2, T])  # the first token row 2 generates
    out = np.asarray(flax_model.generate(ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0))
    assert out.shape == (3, T + 10)
    assert out[2, T] == eos and (out[2, T + 1:] == 0).all()
    for row in (0, 1):  # rows that never emit it are unchanged
        assert np.array_equal(out[row], free[row]) or (free[row, T:] == eos).any()
    held = np.asarray(flax_model.generate(ids, mask, max_new_tokens=10, min_new_tokens=3, eos_token_id=eos,
                                          pad_token_id=0))
    assert (held[2, T:T + 3] != eos).all()
    np.testing.assert_array_equal(held[:, :T], ids)


def test_all_rows_finished_ends_early(models):
    flax_model, torch_model = models("pre_ln")
    ids, mask = prompts("pre_ln")
    T = ids.shape[1]
    same = ids[[2, 2, 2]], mask[[2, 2, 2]]  # three copies of row 2 (the compiled loop of the other tests)
    first = int(np.asarray(flax_model.generate(*same, max_new_tokens=10))[0, T])
    out = flax_model.generate(*same, max_new_tokens=10, eos_token_id=first)
    assert out.shape == (3, T + 1)
    # the whole batch: decoding runs until the last row finishes, finished rows padded
    want = torch_generate(torch_model, ids, mask, max_new_tokens=10, eos_token_id=EOS, min_new_tokens=2)
    got = flax_model.generate(ids, mask, max_new_tokens=10, eos_token_id=EOS, min_new_tokens=2)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.slow
def test_half_precision_generates(models):
    flax_model, _ = models("pre_ln")
    ids, mask = prompts("pre_ln")
    half = FlaxOPTForCausalLM(flax_model.config, flax_model.params, dtype="bfloat16")
    out = half.generate(ids, mask, max_new_tokens=6, eos_token_id=EOS)
    assert out.dtype == jnp.int32 and out.shape[0] == 3
    np.testing.assert_array_equal(np.asarray(out)[:, :ids.shape[1]], ids)
    assert ((np.asarray(out) >= 0) & (np.asarray(out) < flax_model.config.vocab_size)).all()


# ------------------------------------------------------------------------------------ sampling
def test_sampling_is_reproducible_with_a_seed(models):
    flax_model, _ = models("pre_ln")
    ids, mask = prompts("pre_ln")
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=40, top_p=0.95)
    a = np.asarray(flax_model.generate(ids, mask, seed=1, **kwargs))
    np.testing.assert_array_equal(a, np.asarray(flax_model.generate(ids, mask, seed=1, **kwargs)))
    assert not np.array_equal(a, np.asarray(flax_model.generate(ids, mask, seed=2, **kwargs)))
    np.testing.assert_array_equal(a[:, :ids.shape[1]], ids)
    greedy = np.asarray(flax_model.generate(ids, mask, max_new_tokens=10))
    assert not np.array_equal(a, greedy)
    top1 = flax_model.generate(ids, mask, max_new_tokens=10, do_sample=True, top_k=1, temperature=2.0, seed=5)
    np.testing.assert_array_equal(np.asarray(top1), greedy)
    tiny_p = flax_model.generate(ids, mask, **{**kwargs, "top_p": 1e-6}, seed=5)  # keeps only the most probable
    np.testing.assert_array_equal(np.asarray(tiny_p), greedy)


def test_sampling_filters_work_traced():
    """Under jit with a traced temperature and top_p (the eager filters: tests/test_conformance.py)."""
    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32) * 3
    jitted = jax.jit(lambda x, t, p: filter_for_sampling(x, t, 10, p))
    got = np.asarray(jitted(jnp.asarray(logits), jnp.float32(0.7), jnp.float32(0.5)))
    ref = gen.top_p_filter(gen.top_k_filter(logits / np.float32(0.7), 10), 0.5)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))


def test_sampling_follows_the_filtered_distribution(models):
    """The first sampled token of each row over many seeds: always among what top-k / top-p keep, and
    about as often as the softmax of the kept logits says."""
    flax_model, torch_model = models("pre_ln")
    ids, mask = prompts("pre_ln")
    T, temperature, top_k, top_p = ids.shape[1], 1.5, 40, 0.95
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    drawn = np.stack([np.asarray(flax_model.generate(ids, mask, seed=seed, **kwargs))[:, T] for seed in range(60)])
    with torch.no_grad():  # the same logits as the Flax model's (to ~1e-5)
        logits = torch_model(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).logits[:, -1].numpy()
    kept = gen.top_p_filter(gen.top_k_filter(logits / np.float32(temperature), top_k), top_p)  # (B, V)
    probs = np.exp(kept - kept.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for b in range(3):
        assert np.isfinite(kept[b, drawn[:, b]]).all()
        top = int(np.argmax(probs[b]))
        assert abs((drawn[:, b] == top).mean() - probs[b, top]) < 0.2, (b, (drawn[:, b] == top).mean(), probs[b, top])
    assert len(set(drawn[:, 0].tolist())) > 1  # row 0 is far from deterministic


@pytest.mark.slow  # ~15 s: the compiled loop's program and the host loop's pieces
def test_beam_sampling_equals_the_reference_given_the_same_draws(models):
    """Beam sampling (do_sample with num_beams) against opt_spec.generation.beam_search_reference with draw=:
    the reference adds the Gumbel noise generate draws (jax.random.gumbel of the seed's key folded with the
    step, one (B, K * V) array a step), so every candidate, finished hypothesis and running beam must agree,
    on the compiled loop and on the host's; next-token scores are the model's full forward with the spec's
    filters (top_p keeping 1 + len(EOS) tokens a beam)."""
    flax_model, _ = models("pre_ln")
    config = flax_model.config
    ids = prompts("pre_ln")[0][:2, :5]
    (B, T), N, K, V, seed = ids.shape, 6, 3, config.vocab_size, 11

    def last_logits(rows):  # rows (R <= K, L) right-filled to (K, T + N): one shape, one compilation; causal
        R, L = rows.shape    # attention keeps the fill out of position L - 1
        full = np.full((K, T + N), 5, np.int32)
        full[:R, :L] = rows
        return np.asarray(flax_model(full).logits[:R, L - 1], np.float32)

    first = np.argsort(-last_logits(ids), axis=-1)
    eos = (int(first[0, 0]), int(first[1, 1]))  # likely: hypotheses finish early
    settings = dict(max_new_tokens=N, num_beams=K, num_return_sequences=2, eos_token_id=list(eos), pad_token_id=1,
                    do_sample=True, temperature=1.5, top_k=0, top_p=0.2, length_penalty=0.7)
    d = gen.resolve(gen.GenerationConfig(), None, settings, prompt_length=T, max_positions=40, vocab_size=V)
    noise = [np.asarray(jax.random.gumbel(jax.random.fold_in(jax.random.key(seed), step), (B, K * V), jnp.float32))
             for step in range(N)]  # what generate adds: the seed's key folded with the step
    padded, finished = beam_samples_reference(last_logits, ids, d, noise)
    got = np.asarray(flax_model.generate(ids, seed=seed, **settings))
    np.testing.assert_array_equal(got[:, T:], padded)
    host = np.asarray(flax_model.generate(ids, seed=seed, **settings, logits_processor=[lambda ids, x: x]))
    np.testing.assert_array_equal(host, got)
    assert finished and any(step < N - 1 for _, step, _ in finished)
    others = [np.asarray(flax_model.generate(ids, seed=s, **settings)) for s in range(seed + 1, seed + 6)]
    assert any(not np.array_equal(other, got) for other in others)  # the draws matter

# ---------------------------------------------------------------------------- compiled once
def test_second_call_does_not_recompile(models):
    flax_model = FlaxOPTForCausalLM(VARIANTS["pre_ln"], models("pre_ln")[0].params)  # a fresh instance
    ids, mask = prompts("pre_ln")
    assert getattr(flax_model, "_generation_traces", 0) == 0
    flax_model.generate(ids, mask, max_new_tokens=5, eos_token_id=EOS)
    assert flax_model._generation_traces == 1
    # other numbers (ids, EOS/pad ids, min_new_tokens, penalties given as traced arguments), same shapes
    flax_model.generate(ids[::-1].copy(), mask[::-1].copy(), max_new_tokens=5, eos_token_id=7, pad_token_id=0,
                        min_new_tokens=2)
    params = jax.tree.map(lambda p: p * 1.0, flax_model.params)
    flax_model.generate(ids, mask, max_new_tokens=5, params=params)
    assert flax_model._generation_traces == 1


def test_rules_and_outputs_are_traced_only_when_asked_for(models):
    """A rule that cannot apply, or a record without scores, runs the plain program (no new trace); asking
    for output_scores adds its (N, B, V) buffer to that call's program only."""
    flax_model = FlaxOPTForCausalLM(VARIANTS["pre_ln"], models("pre_ln")[0].params)  # a fresh instance
    ids, mask = prompts("pre_ln")
    B, V, N = ids.shape[0], flax_model.config.vocab_size, 4
    plain = flax_model.generate(ids, mask, max_new_tokens=N, eos_token_id=EOS)
    assert flax_model._generation_traces == 1
    # greedy: the sampling filters do not apply; a prompt longer than one token is never forced to BOS
    record = flax_model.generate(ids, mask, max_new_tokens=N, eos_token_id=EOS, return_dict_in_generate=True,
                                 typical_p=0.5, min_p=0.2, epsilon_cutoff=0.1, forced_bos_token_id=3)
    assert flax_model._generation_traces == 1
    np.testing.assert_array_equal(np.asarray(record.sequences), np.asarray(plain))
    assert record.scores is None and record.logits is None
    flax_model.generate(ids, mask, max_new_tokens=N, eos_token_id=EOS, return_dict_in_generate=True,
                        output_scores=True)
    assert flax_model._generation_traces == 2
    from opt_flax.generation import _knobs

    buffer = f"f32[{N},{B},{V}]"
    cfg = gen.Decoding(max_new_tokens=N, eos_token_ids=(EOS,), pad_token_id=1)
    for static, fn in flax_model._generation_fns.items():
        jaxpr = str(jax.make_jaxpr(fn)(flax_model.params, jnp.asarray(ids), jnp.asarray(mask), _knobs(cfg),
                                       jax.random.key(0)))
        assert (buffer in jaxpr) == static.keep_scores


def test_beam_search_host_loop_gives_the_fast_paths_record(models):
    """A logits processor sends beam search through the step-by-step host loop: the same tokens, scores,
    logits, beam indices and sequence scores as the compiled loop (greedy: tests/test_generation_surface.py)."""
    flax_model, _ = models("pre_ln")
    ids, mask = prompts("pre_ln")
    settings = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, eos_token_id=[EOS, 41], early_stopping=True,
                    sequence_bias={(EOS,): 2.0, (41, 41): -1.0}, renormalize_logits=True,
                    return_dict_in_generate=True, output_scores=True, output_logits=True)
    fast = flax_model.generate(ids, mask, **settings)
    host = flax_model.generate(ids, mask, **settings, logits_processor=[lambda ids, x: x])
    np.testing.assert_array_equal(np.asarray(host.sequences), np.asarray(fast.sequences))
    assert len(host.scores) == len(fast.scores) == len(host.logits) == len(fast.logits)
    for a, b in zip(host.scores + host.logits, fast.scores + fast.logits):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(host.beam_indices), np.asarray(fast.beam_indices))
    assert (np.asarray(fast.beam_indices) >= 0).any()
    np.testing.assert_allclose(np.asarray(host.sequences_scores), np.asarray(fast.sequences_scores), atol=1e-5)


def test_inputs_embeds_on_the_compiled_and_host_loops(models):
    """generate(inputs_embeds=) on the compiled loop and on the host's step-by-step loop (a streamer, stopping
    criteria, prefix_allowed_tokens_fn and stop strings at once): a prompt's own embeddings give its new
    tokens (the same draws), the rows the host's rules see start empty, and the ids path's compiled program
    is neither confused with the embeddings' nor traced again (Hugging Face parity: test_generate_embeds.py)."""
    flax_model = FlaxOPTForCausalLM(VARIANTS["pre_ln"], models("pre_ln")[0].params)  # a fresh instance
    ids, mask = prompts("pre_ln")
    (B, T), V = ids.shape, flax_model.config.vocab_size
    embeds = flax_model.params["model"]["decoder"]["embed_tokens"]["embedding"][ids]  # (B, T, E)
    settings = dict(max_new_tokens=6, eos_token_id=EOS, do_sample=True, top_k=0, seed=5, num_return_sequences=2)
    whole = np.asarray(flax_model.generate(ids, mask, **settings))
    new = np.asarray(flax_model.generate(inputs_embeds=embeds, attention_mask=mask, **settings))
    assert new.tolist() == whole[:, T:].tolist() and flax_model._generation_traces == 2
    np.testing.assert_array_equal(np.asarray(flax_model.generate(ids, mask, **settings)), whole)
    assert flax_model._generation_traces == 2

    class Letters:  # one letter per id: stop strings' tokenizer
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(ord("a") + int(i) % 26) for i in ids)

    stop, want = Letters().decode(new[0, 2:4]), new.copy()  # a row stops where the spec's rule says: pads after
    for r in range(len(new)):
        ends = [s for s in range(1, new.shape[1] + 1) if gen.StopStrings([stop], Letters()).hit(new[r, :s])]
        want[r, ends[0] if ends else new.shape[1]:] = 1
    assert (want != new).any()
    seen, puts = [], []
    got = np.asarray(flax_model.generate(
        inputs_embeds=embeds, attention_mask=mask, **settings, stop_strings=stop, tokenizer=Letters(),
        streamer=puts.append, prefix_allowed_tokens_fn=lambda batch_id, row: (seen.append(row.shape), range(V))[1],
        stopping_criteria=[lambda rows, scores: (seen.append(rows.shape), np.zeros(len(rows), bool))[1]]))
    assert got.tolist() == want[:, :got.shape[1]].tolist() and (want[:, got.shape[1]:] == 1).all()
    assert seen[2 * B - 1:2 * B + 2] == [(0,), (2 * B, 1), (1,)] and len(puts) == got.shape[1]  # a callable: each step


def test_inputs_embeds_in_beam_search(models):
    """Beam search from a prompt's own embeddings, compiled and step by step (a logits processor): its new tokens."""
    flax_model = models("pre_ln")[0]  # test_beam_search_matches_torch's program for the ids
    ids, mask = prompts("pre_ln")
    embeds = flax_model.params["model"]["decoder"]["embed_tokens"]["embedding"][ids]  # (B, T, E)
    beams = dict(max_new_tokens=8, num_beams=2, length_penalty=1.0, eos_token_id=EOS)
    beam = np.asarray(flax_model.generate(ids, mask, **beams))[:, ids.shape[1]:]
    for host in ({}, dict(logits_processor=[lambda rows, x: x])):
        got = flax_model.generate(inputs_embeds=embeds, attention_mask=mask, **beams, **host)
        np.testing.assert_array_equal(np.asarray(got), beam)


def test_generate_is_one_while_loop(models):
    """The decode is one jitted program whose per-token work sits in a single while loop."""
    flax_model, _ = models("pre_ln")
    ids, mask = prompts("pre_ln")
    flax_model.generate(ids, mask, max_new_tokens=10, eos_token_id=EOS)
    (fn,) = [f for s, f in flax_model._generation_fns.items() if s.max_new_tokens == 10 and s.num_beams == 1
             and not s.do_sample and not s.repetition]
    from opt_flax.generation import _knobs

    cfg = gen.Decoding(max_new_tokens=10, eos_token_ids=(EOS,), pad_token_id=1)
    jaxpr = str(jax.make_jaxpr(fn)(flax_model.params, jnp.asarray(ids), jnp.asarray(mask), _knobs(cfg),
                                   jax.random.key(0)))
    assert jaxpr.count("while[") == 1


def test_batch_of_one_loop_copies_each_cache_buffer_at_most_once(models):
    """At batch 1 the compiled decode loop copies each KV-cache buffer at most once per step (the
    copy between the carried (nh, S, hs) and the model's (1, nh, S, hs) view, which measured ~1 us:
    a copy onto its own buffer). Carried as (1, nh, S, hs), XLA copied every buffer four times."""
    flax_model, _ = models("pre_ln")
    config = flax_model.config
    T, N = 4, 6
    ids = np.full((1, T), 5, np.int32)
    flax_model.generate(ids, max_new_tokens=N)
    (fn,) = [f for s, f in flax_model._generation_fns.items() if s.batch == 1 and s.max_new_tokens == N]
    from opt_flax.generation import _knobs

    cfg = gen.Decoding(max_new_tokens=N, eos_token_ids=(config.eos_token_id,), pad_token_id=1)
    hlo = fn.lower(flax_model.params, jnp.asarray(ids), jnp.ones((1, T), jnp.int32), _knobs(cfg),
                   jax.random.key(0)).compile().as_text()
    body = re.search(r"body=%?([\w.\-]+)", hlo[hlo.index(" while("):]).group(1)
    start = hlo.index("\n%" + body + " ")
    loop = hlo[start:hlo.index("\n}\n", start)]
    buffer = rf"f32\[(1,)?{config.num_attention_heads},{T + N},{config.head_dim}\]"
    assert re.search(buffer, loop)  # the cache buffers are in the loop ...
    copies = [line for line in loop.splitlines() if " copy(" in line and re.search(buffer, line)]
    assert len(copies) <= 2 * config.num_hidden_layers, copies[:3]  # ... and copied at most once each


# ------------------------------------------------------------------------------- a re-used prompt cache
def prompt_cache(model, ids, mask, C: int, capacity: int = 12):
    """The model's KVCache of the rows' first C prompt tokens (a forward over ids[:, :C], mask[:, :C])."""
    cache = model.init_cache(len(ids), capacity)
    return model(ids[:, :C], attention_mask=mask[:, :C], past_key_values=cache).past_key_values


def cache_arrays(cache) -> list:
    return [np.asarray(a).copy() for a in (*cache.keys, *cache.values, cache.length)]


def test_generate_reuses_a_cache_of_the_prompts_first_tokens(models):
    """generate(past_key_values=cache of ids[:, :C]) (Hugging Face's prompt re-use) on left-padded rows: the tokens
    of the call without it, greedy, beams returning two, seeded sampling, each on the compiled loop and on the
    host's step-by-step loop (a logits processor; a streamer, which gets the whole prompt first); the cache given
    is left as it was."""
    flax_model, _ = models("pre_ln")
    ids, mask = prompts("pre_ln")  # 0, 3 and 5 pads
    (B, T), C = ids.shape, ids.shape[1] - 2
    cache = prompt_cache(flax_model, ids, mask, C)
    before = cache_arrays(cache)
    assert int(cache.length) == C and mask[:, C:].all() and not mask[:, :C].all()
    for settings in (dict(max_new_tokens=6, eos_token_id=EOS),
                     dict(max_new_tokens=5, num_beams=3, num_return_sequences=2),
                     dict(max_new_tokens=6, do_sample=True, seed=4, top_k=5)):
        plain = np.asarray(flax_model.generate(ids, mask, **settings))
        assert plain.shape[0] == B * settings.get("num_return_sequences", 1) and plain.shape[1] > T
        for host in ({}, dict(logits_processor=[lambda rows, scores: scores])):
            got = flax_model.generate(ids, mask, past_key_values=cache, **settings, **host)
            np.testing.assert_array_equal(np.asarray(got), plain, err_msg=str((settings, host)))

    class Streamer:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, x):
            self.puts.append(np.asarray(x))

        def end(self):
            self.ended = True

    streamer = Streamer()
    plain = np.asarray(flax_model.generate(ids, mask, max_new_tokens=6, eos_token_id=EOS))
    got = np.asarray(flax_model.generate(ids, mask, max_new_tokens=6, eos_token_id=EOS, past_key_values=cache,
                                         streamer=streamer))
    np.testing.assert_array_equal(got, plain)
    np.testing.assert_array_equal(streamer.puts[0], ids)  # the whole prompt, as without the cache
    np.testing.assert_array_equal(np.stack(streamer.puts[1:], axis=1), got[:, T:])
    assert streamer.ended
    for a, b in zip(cache_arrays(cache), before, strict=True):
        np.testing.assert_array_equal(a, b)


def at_positions(x: np.ndarray, real: np.ndarray) -> np.ndarray:
    """A record's hidden state (rows, q, E) or attentions (rows, heads, q, k) at the positions `real` (rows, q)."""
    return x[real] if x.ndim == 3 else x.transpose(0, 2, 1, 3)[real]


def test_generate_with_a_reused_cache_records_the_positions_fed(models):
    """return_dict_in_generate with a re-used cache: scores as without it; the hidden states and attentions of
    step 0 cover the T - C positions fed (attending to all T), equal to the last T - C of the plain call's (real
    rows), and later steps' equal the plain call's; greedy (compiled loop, one replayed forward) and beam search
    (the host loop, one forward per step); the same record as opt_torch's with its own cache."""
    flax_model, torch_model = models("pre_ln")
    ids, mask = prompts("pre_ln")
    (B, T), C, N = ids.shape, ids.shape[1] - 2, 4
    cache = prompt_cache(flax_model, ids, mask, C)
    record = dict(max_new_tokens=N, return_dict_in_generate=True, output_scores=True, output_hidden_states=True,
                  output_attentions=True)
    for beams in ({}, dict(num_beams=3)):
        got = flax_model.generate(ids, mask, past_key_values=cache, **record, **beams)
        plain = flax_model.generate(ids, mask, **record, **beams)
        np.testing.assert_array_equal(np.asarray(got.sequences), np.asarray(plain.sequences))
        assert len(got.scores) == len(plain.scores) == len(got.hidden_states) == len(got.attentions) == N
        rows = len(got.hidden_states[0][0])
        real = np.repeat(mask, rows // B, 0)[:, C:].astype(bool)  # (rows, T - C): the real positions fed
        for step in range(N):
            np.testing.assert_allclose(np.asarray(got.scores[step]), np.asarray(plain.scores[step]), atol=1e-4)
            for a, b in zip(got.hidden_states[step] + got.attentions[step],
                            plain.hidden_states[step] + plain.attentions[step], strict=True):
                a, b = np.asarray(a), np.asarray(b)
                if step == 0:  # (rows, T - C, E) and (rows, heads, T - C, T)
                    b = b[:, C:] if b.ndim == 3 else b[:, :, C:]
                    assert a.shape[-2] == T - C and (a.ndim == 3 or a.shape[-1] == T)
                    a, b = at_positions(a, real), at_positions(b, real)
                assert a.shape == b.shape
                np.testing.assert_allclose(a, b, atol=1e-5)

    with torch.no_grad():  # opt_torch's record with its own cache (tests/test_hf_surface.py: Hugging Face's)
        t_ids, t_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
        t_cache = torch_model(t_ids[:, :C], attention_mask=t_mask[:, :C], use_cache=True).past_key_values
        want = torch_model.generate(t_ids, attention_mask=t_mask, past_key_values=t_cache, **record)
    got = flax_model.generate(ids, mask, past_key_values=cache, **record)
    np.testing.assert_array_equal(np.asarray(got.sequences), want.sequences.numpy())
    real = mask[:, C:].astype(bool)
    for step in range(N):
        np.testing.assert_allclose(np.asarray(got.scores[step]), want.scores[step].numpy(), atol=1e-4)
        for a, b in zip(got.hidden_states[step] + got.attentions[step],
                        want.hidden_states[step] + want.attentions[step], strict=True):
            a, b = np.asarray(a), b.numpy()
            assert a.shape == b.shape
            if step == 0:
                a, b = at_positions(a, real), at_positions(b, real)
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_reused_cache_is_an_argument_of_the_compiled_decode(models):
    """A second call with another cache of the same shapes runs the same compiled program (its keys and values are
    arguments: the new tokens are those of the prompt whose first C tokens that cache holds); a call without a
    cache runs its own program, not the re-using one. C = 4: the third row's cached positions are all pads."""
    flax_model = FlaxOPTForCausalLM(VARIANTS["pre_ln"], models("pre_ln")[0].params)  # a fresh instance
    ids, mask = prompts("pre_ln")
    other, other_mask = prompts("pre_ln", seed=7)
    T, C = ids.shape[1], 4
    assert not mask[2, :C].any() and (other[:, :C] != ids[:, :C]).any()
    settings = dict(max_new_tokens=5, eos_token_id=EOS)
    first = np.asarray(flax_model.generate(ids, mask, past_key_values=prompt_cache(flax_model, ids, mask, C),
                                           **settings))
    assert flax_model._generation_traces == 1
    mixed = np.asarray(flax_model.generate(ids, mask, **settings, past_key_values=prompt_cache(
        flax_model, other, other_mask, C)))
    assert flax_model._generation_traces == 1
    np.testing.assert_array_equal(np.asarray(flax_model.generate(ids, mask, **settings)), first)
    assert flax_model._generation_traces == 2
    spliced = np.concatenate([other[:, :C], ids[:, C:]], axis=1)
    spliced_mask = np.concatenate([other_mask[:, :C], mask[:, C:]], axis=1)
    want = np.asarray(flax_model.generate(spliced, spliced_mask, **settings))
    np.testing.assert_array_equal(mixed[:, :T], ids)  # the rows are the prompt given
    np.testing.assert_array_equal(mixed[:, T:], want[:, T:])
    assert (mixed[:, T:] != first[:, T:]).any()  # the cache's contents matter


def test_generate_refuses_a_cache_it_cannot_reuse(models):
    """past_key_values that is not a cache of the prompt's first 0 < C < T tokens for this model and batch, or that
    comes with inputs_embeds, or is not the model's KVCache, is refused in words."""
    from opt_flax.modeling import KVCache

    flax_model, _ = models("pre_ln")
    ids, mask = prompts("pre_ln")
    (B, T), config = ids.shape, flax_model.config
    cache = prompt_cache(flax_model, ids, mask, 4)
    with pytest.raises(ValueError, match="not with inputs_embeds"):
        embeds = flax_model.params["model"]["decoder"]["embed_tokens"]["embedding"][ids]
        flax_model.generate(inputs_embeds=embeds, attention_mask=mask, past_key_values=cache)
    with pytest.raises(ValueError, match=rf"each \(batch 2, {config.num_attention_heads}, tokens"):
        flax_model.generate(ids[:2], mask[:2], past_key_values=cache)
    with pytest.raises(ValueError, match=rf"holds 1 layers .* the model has {config.num_hidden_layers} layers"):
        flax_model.generate(ids, mask, past_key_values=KVCache(cache.keys[:1], cache.values[:1], cache.length))
    with pytest.raises(ValueError, match=rf"\(batch {B}, {config.num_attention_heads}, tokens"):
        flax_model.generate(ids, mask, past_key_values=KVCache([k[:, 1:] for k in cache.keys],
                                                               [v[:, 1:] for v in cache.values], cache.length))
    with pytest.raises(ValueError, match=f"holds {T} tokens and the prompt has {T}"):
        flax_model.generate(ids, mask, past_key_values=prompt_cache(flax_model, ids, mask, T))
    with pytest.raises(ValueError, match=f"holds 0 tokens and the prompt has {T}"):
        flax_model.generate(ids, mask, past_key_values=flax_model.init_cache(B, 12))
    with pytest.raises(TypeError, match="not a tuple"):
        flax_model.generate(ids, mask, past_key_values=tuple(zip(cache.keys, cache.values)))
    with pytest.raises(TypeError, match="got dict"):
        flax_model.generate(ids, mask, past_key_values={"keys": cache.keys})


# ------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs,words", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=0.0, do_sample=True), "temperature=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(min_new_tokens=9, max_new_tokens=3), "min_new_tokens=9"),
    (dict(max_new_tokens=35), "max_position_embeddings=40"),
    (dict(eos_token_id=500), "eos_token_id=500 is outside the vocabulary"),
    (dict(pad_token_id=-2), "pad_token_id=-2 is outside the vocabulary"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
    (dict(seed=-1, do_sample=True), "seed=-1"),
])
def test_generate_rejects_bad_arguments(models, kwargs, words):
    flax_model, _ = models("pre_ln")
    ids, mask = prompts("pre_ln")
    with pytest.raises(ValueError, match=words.replace("(", "\\(")):
        flax_model.generate(ids, mask, **kwargs)


def test_generate_rejects_bad_inputs(models):
    flax_model, _ = models("pre_ln")
    ids, mask = prompts("pre_ln")
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\)"):
        flax_model.generate(ids[0])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        flax_model.generate(ids, mask[:, 1:])
    with pytest.raises(ValueError, match="only 0 .pad. and 1"):
        flax_model.generate(ids, mask * 2)
    bad = ids.copy()
    bad[1, 4] = 96
    with pytest.raises(ValueError, match="token id 96 at batch row 1, position 4"):
        flax_model.generate(bad, mask)
    with pytest.raises(TypeError, match="input_ids must be integers"):
        flax_model.generate(ids.astype(np.float32), mask)


# ------------------------------------------------------------------------------- Hugging Face
def hf_flax_generate(transformers, model, ids, mask, **kwargs) -> np.ndarray:
    with jax.numpy_dtype_promotion("standard"):  # Hugging Face's code relies on implicit promotion
        hf_config = transformers.OPTConfig.from_dict(model.config.to_dict())
        hf = transformers.FlaxOPTForCausalLM(hf_config, _do_init=False)  # our parameter tree as is
        return np.asarray(hf.generate(ids, attention_mask=mask, params=model.params, do_sample=False,
                                      **kwargs).sequences)


@pytest.mark.parametrize("name", ["pre_ln", pytest.param("post_ln_proj", marks=pytest.mark.slow),
                                  pytest.param("untied_head", marks=pytest.mark.slow)])
def test_greedy_matches_hugging_face_flax(models, name):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face reference needs the test extra")
    flax_model, _ = models(name)
    ids, mask = prompts(name)
    got = np.asarray(flax_model.generate(ids, mask, max_new_tokens=10, eos_token_id=EOS))
    want = hf_flax_generate(transformers, flax_model, ids, mask, max_new_tokens=10, eos_token_id=EOS,
                            pad_token_id=1)
    assert want.shape == (3, ids.shape[1] + 10)  # Hugging Face pads to max_length; we stop at N steps
    np.testing.assert_array_equal(got, want[:, :got.shape[1]])
    assert (want[:, got.shape[1]:] == 1).all()
