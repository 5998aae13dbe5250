"""Every backend against opt_spec's NumPy references, one suite for all three: the `backend` fixture gives
each test the backend's adapter (torch, tf, flax; each framework imported only inside its own param).

What is checked, on random varied weights and inputs: the losses (all-ignored labels included, with zero
gradients), the pooled token, the attention mask, the positions, the logits rules and sampling filters,
stopping at EOS, beam scoring, and the refusals of bad token ids and seeds with the spec's messages.
"""

import numpy as np
import pytest

from opt_spec import generation as gen
from opt_spec import inputs
from opt_spec import io as spec_io
from opt_spec import numerics
from opt_spec.testing import VARIANTS, random_batch, random_weights

CONFIG = VARIANTS["pre_ln"]  # V = 96, 2 layers, 4 heads, 40 positions, 3 labels
HEADS = ("causal_lm", "sequence_classification", "question_answering")


# ------------------------------------------------------------------------------------ the adapters
class Torch:
    name = "torch"

    def __init__(self):
        import torch

        import opt_torch.generation
        import opt_torch.modeling
        self.torch, self.gen, self.modeling = torch, opt_torch.generation, opt_torch.modeling

    def load(self, path, head):
        return self.modeling.MODEL_CLASSES[head].from_pretrained(path).eval()

    def run(self, model, grads=False, **kw):
        """The output record with NumPy fields; with grads, also the largest |gradient| of the loss."""
        t = self.torch
        kw = {k: (v if v is None or isinstance(v, bool) else t.from_numpy(np.asarray(v))) for k, v in kw.items()}
        for k in ("input_ids", "labels", "start_positions", "end_positions", "position_ids"):
            if k in kw and kw[k] is not None and not kw[k].dtype.is_floating_point:
                kw[k] = kw[k].long()
        model.zero_grad(set_to_none=True)
        with t.set_grad_enabled(grads):
            out = model(**kw)
        top = None
        if grads:
            out.loss.backward()
            top = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
        return _numpy(out, lambda x: x.detach().float().numpy()), top

    def process(self, scores, seen, seq, real, step, d):
        t = self.torch
        out = self.gen.process_logits(t.from_numpy(scores), None if seen is None else t.from_numpy(seen),
                                      t.from_numpy(seq).long(), t.from_numpy(real).long(), step, d)
        return out.numpy()

    def filter(self, logits, d, keep=1):
        return self.gen.filter_for_sampling(self.torch.from_numpy(logits), d, keep).numpy()

    def draw(self, scores, n, seed):
        generator = self.torch.Generator().manual_seed(seed)
        return self.gen.draw_without_replacement(self.torch.from_numpy(scores), n, generator).numpy()

    def generate(self, model, ids, mask, **kw):
        ids = self.torch.from_numpy(ids)  # floats stay floats: refused by the model
        return model.generate(ids if ids.is_floating_point() else ids.long(), self.torch.from_numpy(mask), **kw).numpy()

    def from_config(self, config, seed):
        return self.modeling.OPTForCausalLM.from_config(config, seed=seed)

    def classification_loss(self, pooled, labels, config):
        t = self.torch
        return float(self.modeling.sequence_classification_loss(t.from_numpy(pooled), t.from_numpy(labels), config))


class TF:
    name = "tf"

    def __init__(self):
        import tensorflow as tf

        import opt_tf.generation
        import opt_tf.modeling
        self.tf, self.gen, self.modeling = tf, opt_tf.generation, opt_tf.modeling

    def load(self, path, head):
        return self.modeling.MODEL_CLASSES[head].from_pretrained(path)

    def run(self, model, grads=False, **kw):
        tf = self.tf
        kw = {k: v for k, v in kw.items() if v is not None}
        with tf.GradientTape() as tape:
            out = model(**kw)
        top = None
        if grads:
            g = tape.gradient(out.loss, model.trainable_variables)
            top = max(float(tf.reduce_max(tf.abs(tf.convert_to_tensor(x)))) for x in g if x is not None)
        return _numpy(out, lambda x: np.asarray(x, np.float32)), top

    def process(self, scores, seen, seq, real, step, d):
        tf = self.tf
        now = seq.shape[1]
        out = self.gen.process_logits(tf.constant(scores), None if seen is None else tf.constant(seen),
                                      tf.constant(seq, tf.int32), tf.constant(real, tf.int32), tf.constant(now),
                                      tf.constant(step), d)
        return out.numpy()

    def filter(self, logits, d, keep=1):
        return self.gen.filter_for_sampling(self.tf.constant(logits), d, keep).numpy()

    def draw(self, scores, n, seed):
        tf = self.tf
        draw = tf.function(self.gen.draw_without_replacement, jit_compile=True)  # as generate draws: under XLA
        return draw(tf.constant(scores), n, tf.constant([0, seed], tf.int32)).numpy()

    def generate(self, model, ids, mask, **kw):
        return model.generate(ids, mask, **kw).numpy()

    def from_config(self, config, seed):
        return self.modeling.TFOPTForCausalLM.from_config(config, seed=seed)

    def classification_loss(self, pooled, labels, config):
        return float(self.modeling.sequence_classification_loss(self.tf.constant(pooled), self.tf.constant(labels),
                                                                config))


class Flax:
    name = "flax"

    def __init__(self):
        import jax
        import jax.numpy as jnp

        import opt_flax.generation
        import opt_flax.modeling
        import opt_flax.pretrained
        self.jax, self.jnp, self.gen = jax, jnp, opt_flax.generation
        self.modeling, self.pretrained = opt_flax.modeling, opt_flax.pretrained

    def load(self, path, head):
        return self.pretrained.MODEL_CLASSES[head].from_pretrained(path)

    def run(self, model, grads=False, **kw):
        kw = {k: v for k, v in kw.items() if v is not None}
        out = model(**kw)
        top = None
        if grads:
            g = self.jax.grad(lambda p: model(params=p, **kw).loss)(model.params)
            top = max(float(np.abs(np.asarray(x)).max()) for x in self.jax.tree_util.tree_leaves(g))
        return _numpy(out, lambda x: np.asarray(x, np.float32)), top

    def process(self, scores, seen, seq, real, step, d):
        jnp = self.jnp
        eos = jnp.asarray(np.array(d.eos_token_ids, np.int32)) if d.eos_token_ids else None
        out = self.gen.process_logits(jnp.asarray(scores), None if seen is None else jnp.asarray(seen), jnp.int32(step),
                                      jnp.float32(d.repetition_penalty), eos, jnp.int32(d.min_new_tokens))
        n = d.no_repeat_ngram_size
        if n:  # the loop applies rule 2 after rules 1 and 3, as the other backends do
            banned = self.gen.ngram_bans(jnp.asarray(seq), jnp.asarray(real), jnp.int32(seq.shape[1]), n,
                                         scores.shape[-1])
            out = jnp.where(banned, -jnp.inf, out)
        return np.asarray(out)

    def filter(self, logits, d, keep=1):
        return np.asarray(self.gen.filter_for_sampling(self.jnp.asarray(logits), d.temperature, d.top_k,
                                                       d.top_p if d.top_p < 1.0 else None, d, keep))

    def draw(self, scores, n, seed):
        return np.asarray(self.gen.draw_without_replacement(self.jnp.asarray(scores), n, self.jax.random.key(seed)))

    def generate(self, model, ids, mask, **kw):
        return np.asarray(model.generate(ids, mask, **kw))

    def from_config(self, config, seed):
        return self.pretrained.FlaxOPTForCausalLM.from_config(config, seed=seed)

    def classification_loss(self, pooled, labels, config):
        jnp = self.jnp
        return float(self.modeling.sequence_classification_loss(jnp.asarray(pooled), jnp.asarray(labels), config))


def _numpy(out, convert) -> dict:
    fields = {}
    for key in ("loss", "logits", "start_logits", "end_logits"):
        value = getattr(out, key, None)
        if value is not None:
            fields[key] = convert(value)
    for key in ("hidden_states", "attentions"):
        value = getattr(out, key, None)
        if value is not None:
            fields[key] = [convert(x) for x in value]
    return fields


ADAPTERS = {"torch": Torch, "tf": TF, "flax": Flax}
_made = {}


@pytest.fixture(params=["torch", "tf", "flax"])
def backend(request):
    """The backend's adapter; its framework is imported here, in its own param, only when it runs."""
    name = request.param
    pytest.importorskip({"torch": "torch", "tf": "tensorflow", "flax": "flax"}[name])
    if name not in _made:
        _made[name] = ADAPTERS[name]()
    return _made[name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One random checkpoint per head (seed differs per head), with its weights for the references."""
    made = {}
    for i, head in enumerate(HEADS):
        weights = random_weights(CONFIG, head, seed=11 + i)
        path = tmp_path_factory.mktemp(head)
        spec_io.save_safetensors_dir(path, weights, CONFIG.to_dict())
        made[head] = (path, weights)
    return made


_models = {}


def model(backend, checkpoints, head):
    key = (backend.name, head)
    if key not in _models:
        _models[key] = backend.load(checkpoints[head][0], head)
    return _models[key]


def batch(seed: int, pads=(0, 2, 5)):
    return random_batch(CONFIG, batch=3, length=9, seed=seed, left_pad=pads)


# ------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("seed", [0, 1])
def test_causal_lm_loss_equals_the_reference(backend, checkpoints, seed):
    ids, mask = batch(seed)
    rng = np.random.default_rng(seed)
    labels = np.where((mask == 1) & (rng.random(ids.shape) < 0.8), ids, numerics.IGNORE_INDEX)
    out, _ = backend.run(model(backend, checkpoints, "causal_lm"), input_ids=ids, attention_mask=mask, labels=labels)
    want = numerics.causal_lm_loss(out["logits"], labels)
    assert abs(float(out["loss"]) - want) <= 1e-5 * max(1.0, want)


def test_all_ignored_labels_give_zero_loss_and_zero_gradients(backend, checkpoints):
    ids, mask = batch(2)
    labels = np.full(ids.shape, numerics.IGNORE_INDEX, ids.dtype)  # the dtype of the ids: one compilation
    lm = model(backend, checkpoints, "causal_lm")
    out, top = backend.run(lm, grads=True, input_ids=ids, attention_mask=mask, labels=labels)
    assert numerics.causal_lm_loss(out["logits"], labels) == 0.0
    assert float(out["loss"]) == 0.0 and top == 0.0
    far = np.full(3, 50)  # every QA position outside the sequence: left out
    qa = model(backend, checkpoints, "question_answering")
    out, top = backend.run(qa, grads=True, input_ids=ids, attention_mask=mask, start_positions=far, end_positions=far)
    assert float(out["loss"]) == 0.0 and top == 0.0
    cls = model(backend, checkpoints, "sequence_classification")
    out, top = backend.run(cls, grads=True, input_ids=ids, attention_mask=mask, labels=np.full(3, -100))
    assert float(out["loss"]) == 0.0 and top == 0.0
    # and a batch where something counts has gradients: the check above can fail
    _, top = backend.run(lm, grads=True, input_ids=ids, attention_mask=mask, labels=ids)
    assert top > 0


@pytest.mark.parametrize("labels", [np.array([0, 2, 1]), np.array([2, -100, 0]),
                                    np.array([[0, 1, 1], [1, 0, 0], [0, 0, 1]], np.float32)],
                         ids=["single_label", "single_label_ignored", "multi_label"])
def test_sequence_classification_loss_equals_the_reference(backend, checkpoints, labels):
    ids, mask = batch(3)
    out, _ = backend.run(model(backend, checkpoints, "sequence_classification"), input_ids=ids, attention_mask=mask,
                         labels=labels)
    want = numerics.sequence_classification_loss(out["logits"], labels, CONFIG)
    assert abs(float(out["loss"]) - want) <= 1e-5 * max(1.0, want)


def test_problem_types_follow_the_spec(backend, checkpoints):
    """Regression (num_labels = 1, or problem_type set) through the backend's own loss function."""
    ids, mask = batch(4)
    out, _ = backend.run(model(backend, checkpoints, "sequence_classification"), input_ids=ids, attention_mask=mask)
    pooled = out["logits"]
    y = np.random.default_rng(4).standard_normal(pooled.shape).astype(np.float32)
    for config, labels in ((CONFIG.replace(problem_type="regression"), y), (CONFIG.replace(num_labels=1), y[:, 0]),
                           (CONFIG.replace(problem_type="single_label_classification"), np.array([2, 0, 1]))):
        got = backend.classification_loss(pooled[:, :config.num_labels], labels, config)
        want = numerics.sequence_classification_loss(pooled[:, :config.num_labels], labels, config)
        assert abs(got - want) <= 1e-5 * max(1.0, want)
    assert numerics.problem_type(CONFIG, True) == "single_label_classification"
    assert numerics.problem_type(CONFIG, False) == "multi_label_classification"
    assert numerics.problem_type(CONFIG.replace(num_labels=1), True) == "regression"


@pytest.mark.parametrize("seed", [0, 1])
def test_question_answering_loss_equals_the_reference(backend, checkpoints, seed):
    ids, mask = batch(seed, pads=(0, 0, 0))
    rng = np.random.default_rng(seed)
    start, end = rng.integers(0, 12, 3), rng.integers(-2, 9, 3)  # some outside [0, 9): left out
    out, _ = backend.run(model(backend, checkpoints, "question_answering"), input_ids=ids, attention_mask=mask,
                         start_positions=start, end_positions=end)
    want = numerics.question_answering_loss(out["start_logits"], out["end_logits"], start, end)
    assert abs(float(out["loss"]) - want) <= 1e-5 * max(1.0, want)


# -------------------------------------------------------------------------- pooling, masks, positions
def test_pooled_token_is_the_spec_index(backend, checkpoints):
    """Left, right and inner pads and a row of pads only: the pooled logits are the score head applied to
    the last hidden state at opt_spec.numerics.pooled_token_index."""
    rng = np.random.default_rng(5)
    pad = CONFIG.pad_token_id
    ids = rng.integers(3, CONFIG.vocab_size, (4, 8)).astype(np.int32)
    ids[0, :3] = pad       # left padding
    ids[1, 5:] = pad       # right padding
    ids[2, [1, 4, 7]] = pad  # pads inside and at the end
    ids[3, :] = pad        # only pads: index 0
    mask = (ids != pad).astype(np.int32)
    mask[3] = 1
    out, _ = backend.run(model(backend, checkpoints, "sequence_classification"), input_ids=ids, attention_mask=mask,
                         output_hidden_states=True)
    index = numerics.pooled_token_index(ids, pad, 8, 4)
    assert index.tolist() == [7, 4, 6, 0]
    hidden = out["hidden_states"][-1]
    want = hidden[np.arange(4), index] @ checkpoints["sequence_classification"][1]["score.weight"].T
    np.testing.assert_allclose(out["logits"], want, atol=1e-4, rtol=1e-4)


def test_attention_sees_what_the_spec_mask_allows(backend, checkpoints):
    """The eager attention probabilities are > 0 exactly where opt_spec.numerics.attention_allowed says."""
    ids, mask = batch(6, pads=(0, 4, 8))  # the last row: one real token after 8 pads
    holes = mask.copy()
    holes[0, -3:], holes[1, 6] = 0, 0  # pads after real tokens: right padding, a hole
    for mask in (mask, holes):
        out, _ = backend.run(model(backend, checkpoints, "causal_lm"), input_ids=ids, attention_mask=mask,
                             output_attentions=True)
        allowed = numerics.attention_allowed(mask, ids.shape[1])  # (B, T, S)
        assert len(out["attentions"]) == CONFIG.num_hidden_layers
        for probs in out["attentions"]:  # (B, nh, T, S)
            np.testing.assert_array_equal(probs > 0, np.broadcast_to(allowed[:, None], probs.shape))


def test_positions_from_the_mask_are_the_spec_positions(backend, checkpoints):
    ids, mask = batch(7)
    lm = model(backend, checkpoints, "causal_lm")
    implicit, _ = backend.run(lm, input_ids=ids, attention_mask=mask)
    spec_positions = numerics.position_ids_from_mask(mask).astype(np.int32)
    explicit, _ = backend.run(lm, input_ids=ids, attention_mask=mask, position_ids=spec_positions)
    np.testing.assert_allclose(implicit["logits"], explicit["logits"], atol=1e-6, rtol=0)
    shifted, _ = backend.run(lm, input_ids=ids, attention_mask=mask, position_ids=spec_positions + 1)
    assert np.abs(shifted["logits"] - implicit["logits"]).max() > 1e-3  # positions matter: the check can fail


# ------------------------------------------------------------------------------ logits and sampling
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_process_logits_equals_the_reference(backend, seed):
    """Rules 1-3 (repetition penalty, no repeated n-grams, EOS held back before min_new_tokens)."""
    rng = np.random.default_rng(seed)
    R, L, V = 4, 12, 20
    scores = (rng.standard_normal((R, V)) * 2).astype(np.float32)
    seq = rng.integers(0, 6, (R, L)).astype(np.int32)  # a small alphabet: n-grams repeat
    real = (rng.random((R, L)) < 0.85).astype(np.int32)
    seen = np.zeros((R, V), bool)
    for r in range(R):
        seen[r, seq[r][real[r] == 1]] = True
    n, penalty, eos = (1, 2, 3)[seed], (1.3, 0.7, 1.0)[seed], (4, 7)
    d = gen.Decoding(max_new_tokens=5, min_new_tokens=2, repetition_penalty=penalty, no_repeat_ngram_size=n,
                     eos_token_ids=eos)
    for step in (1, 2):  # EOS held at step 1, free at step 2
        got = backend.process(scores, seen if penalty != 1.0 else None, seq, real, step, d)
        assert not np.array_equal(got, scores) or step == 2  # the rules did something: the check can fail
        want = gen.apply_repetition_penalty(scores, seen, penalty) if penalty != 1.0 else scores.copy()
        want = np.where(gen.banned_by_ngrams(seq, real, n, V), -np.inf, want)
        if step < d.min_new_tokens:
            want[:, list(eos)] = -np.inf
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
        # equal up to float32 rounding (XLA may divide through a reciprocal: 1 ulp)
        np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=3e-7, atol=0)


@pytest.mark.parametrize("top_k,top_p,temperature", [(5, 1.0, 1.0), (0, 0.7, 1.0), (10, 0.5, 0.7), (0, 0.999, 2.0),
                                                     (1, 1.0, 1.0), (50, 1e-6, 1.0)])
def test_sampling_filters_equal_the_reference(backend, top_k, top_p, temperature):
    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32) * 3
    logits[1, 7] = logits[1, 9]  # a tie: both kept or both dropped by top-k; top-p keeps the lower id first
    d = gen.Decoding(max_new_tokens=1, do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature)
    got = backend.filter(logits, d)
    want = gen.top_p_filter(gen.top_k_filter(logits / np.float32(temperature), top_k), top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


@pytest.mark.parametrize("keep", [1, 3])
def test_every_sampling_filter_keeps_what_the_spec_keeps(backend, keep):
    """Beam sampling's filters keep at least `keep` tokens a row (Hugging Face's min_tokens_to_keep): each
    filter at its narrowest, alone and all together, against the spec's filters."""
    logits = np.random.default_rng(1).standard_normal((4, 50)).astype(np.float32) * 3
    narrow = dict(top_k=1, top_p=0.01, min_p=0.95, typical_p=0.01, epsilon_cutoff=0.6, eta_cutoff=0.6)
    for name in [*narrow, "all"]:
        settings = narrow if name == "all" else {name: narrow[name]}
        d = gen.Decoding(max_new_tokens=1, do_sample=True, **{"top_k": 0, **settings}, temperature=0.8)
        want = gen.sampling_filters(logits, d, keep)
        got = backend.filter(logits, d, keep)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=name)
        kept = np.isfinite(got).sum(-1)
        assert (kept >= keep).all() and (name not in ("top_k", "all") or (kept == keep).all()), name
        np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6, err_msg=name)


def test_draws_without_replacement_follow_the_softmax(backend):
    """Beam sampling's draw: the first two of n draws from softmax(scores), without replacement and in order,
    have Plackett-Luce's law, P(i, j) = p_i p_j / (1 - p_i), within 5 standard errors over 40,000 rows; an
    impossible (-inf) entry comes after every possible one."""
    with np.errstate(divide="ignore"):
        scores = np.log(np.array([0.4, 0.25, 0.2, 0.1, 0.05, 0.0], np.float64)).astype(np.float32)
    R, M = 40_000, scores.size
    got = backend.draw(np.tile(scores, (R, 1)), 5, seed=3)
    assert got.shape == (R, 5) and (got != M - 1).all()
    assert (np.sort(got, -1) == np.arange(5)).all()  # without replacement
    p = np.exp(scores.astype(np.float64))
    counts = np.zeros((M, M))
    np.add.at(counts, (got[:, 0], got[:, 1]), 1)
    for i in range(M - 1):
        for j in range(M - 1):
            want = 0.0 if i == j else p[i] * p[j] / (1 - p[i])
            assert abs(counts[i, j] / R - want) <= 5 * np.sqrt(want * (1 - want) / R) + 1e-9, (i, j, counts[i, j] / R)


@pytest.mark.parametrize("num_beams,returned", [(2, 1), (3, 2)])
def test_cold_beam_sampling_is_beam_search(backend, checkpoints, num_beams, returned):
    """Beam sampling at temperature 1e-4: every score is 10^4 times beam search's, so the draws take the best
    candidates first and the hypotheses are beam search's (a hotter one draws others: seeds differ). TensorFlow
    compiles a program per temperature, so it draws hot on the 3-beam case only; the others on both."""
    ids, mask = batch(9, pads=(0, 2, 0))
    lm = model(backend, checkpoints, "causal_lm")
    settings = dict(max_new_tokens=6, num_beams=num_beams, num_return_sequences=returned, pad_token_id=1,
                    eos_token_id=None, top_k=0)
    want = backend.generate(lm, ids, mask, **settings)
    cold = backend.generate(lm, ids, mask, do_sample=True, temperature=1e-4, seed=5, **settings)
    np.testing.assert_array_equal(cold, want)
    if backend.name == "tf" and num_beams == 2:
        return
    hot = {backend.generate(lm, ids, mask, do_sample=True, seed=seed, **settings).tobytes() for seed in range(4)}
    assert len(hot) > 1


# ----------------------------------------------------------------------------- stopping, beam search
def test_rows_stop_at_eos_and_then_pad(backend, checkpoints):
    """Rule 6: a row that emits an EOS id emits pad_token_id after it; decoding stops once every row has."""
    ids, mask = batch(8, pads=(0, 0, 0))
    lm = model(backend, checkpoints, "causal_lm")
    T, N = ids.shape[1], 8
    free = backend.generate(lm, ids, mask, max_new_tokens=N)[:, T:]
    eos = (int(free[0, 1]), int(free[1, 3]))  # tokens the rows do produce
    out = backend.generate(lm, ids, mask, max_new_tokens=N, eos_token_id=list(eos), pad_token_id=0)[:, T:]
    want = free.copy()
    ends = []
    for r in range(3):
        hits = np.flatnonzero(np.isin(free[r], eos))
        end = int(hits[0]) + 1 if hits.size else N
        want[r, end:] = 0
        ends.append(end)
    np.testing.assert_array_equal(out, want[:, :max(ends)])
    assert min(ends) < N  # some row stopped early


@pytest.mark.parametrize("num_beams,length_penalty,returned", [(2, 1.0, 1), (3, 0.5, 2)])
def test_beam_search_equals_the_reference(backend, checkpoints, num_beams, length_penalty, returned):
    """The backend's beam search against opt_spec.generation.beam_search_reference, whose next-token
    log-probabilities come from the same model's full forward on each beam (no cache)."""
    ids, _ = batch(9, pads=(0, 0, 0))
    ids = ids[:2, :6]
    lm = model(backend, checkpoints, "causal_lm")
    T, N = ids.shape[1], 6

    def next_logprobs(rows):  # rows (R, L) right-filled to (3, T + N): one shape, one compilation; causal
        R, L = rows.shape       # attention keeps the fill out of position L - 1
        full = np.full((3, T + N), 5, np.int32)
        full[:R, :L] = rows
        logits = backend.run(lm, input_ids=full, attention_mask=np.ones_like(full))[0]["logits"]
        last = logits[:R, L - 1].astype(np.float64)
        top = last.max(-1, keepdims=True)
        return (last - top - np.log(np.exp(last - top).sum(-1, keepdims=True))).astype(np.float32)

    first = np.argsort(-next_logprobs(ids), axis=-1)
    eos = (int(first[0, 0]), int(first[1, 2]))  # likely continuations: beams finish early
    d = gen.Decoding(max_new_tokens=N, num_beams=num_beams, length_penalty=length_penalty,
                     num_return_sequences=returned, eos_token_ids=eos, pad_token_id=1)
    finished = []
    want = gen.beam_search_reference(next_logprobs, ids, d, finished)
    longest = max(len(h) for row in want for h in row)
    padded = np.array([h + [1] * (longest - len(h)) for row in want for h in row])
    got = backend.generate(lm, ids, np.ones_like(ids), max_new_tokens=N, num_beams=num_beams,
                           length_penalty=length_penalty, num_return_sequences=returned, eos_token_id=list(eos),
                           pad_token_id=1)
    np.testing.assert_array_equal(got[:, T:], padded)
    assert any(step < N - 1 for _, step, _ in finished)  # hypotheses finished early: the case exercises the rules


# ---------------------------------------------------------------------------------------- refusals
def test_bad_token_ids_are_refused_with_the_spec_message(backend, checkpoints):
    ids, mask = batch(10)
    bad = ids.copy()
    bad[1, 4] = CONFIG.vocab_size + 7
    with pytest.raises(ValueError) as spec_error:
        inputs.check_token_ids(bad, CONFIG.vocab_size)
    assert "token id 103 at batch row 1, position 4 is outside the vocabulary [0, 96)" in str(spec_error.value)
    lm = model(backend, checkpoints, "causal_lm")
    for call in (lambda x: backend.run(lm, input_ids=x, attention_mask=mask),
                 lambda x: backend.generate(lm, x, mask, max_new_tokens=2)):
        with pytest.raises(ValueError) as error:
            call(bad)
        assert str(spec_error.value) in str(error.value)  # Keras adds the layer it came from
        negative = ids.copy()
        negative[2, 8] = -1
        with pytest.raises(ValueError, match="token id -1 at batch row 2, position 8"):
            call(negative)
        with pytest.raises(TypeError, match="input_ids must be integers"):
            call(ids.astype(np.float32))


def test_positions_past_the_table_are_refused(backend, checkpoints):
    lm = model(backend, checkpoints, "causal_lm")
    ids = np.full((1, 4), 5, np.int32)
    with pytest.raises(ValueError, match="position 40 is past the model's max_position_embeddings=40"):
        backend.run(lm, input_ids=ids, position_ids=np.array([[37, 38, 39, 40]], np.int32))


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_seeds_outside_the_spec_range_are_refused(backend, checkpoints, seed):
    with pytest.raises(ValueError, match=r"seed=.*must be an int in \[0, 2\*\*32\)"):
        backend.from_config(CONFIG, seed)
    ids, mask = batch(11)
    with pytest.raises(ValueError, match=r"seed=.*must be an int in \[0, 2\*\*32\)"):
        backend.generate(model(backend, checkpoints, "causal_lm"), ids, mask, max_new_tokens=2, do_sample=True,
                         seed=seed)


def test_the_largest_seed_is_taken(backend, checkpoints):
    backend.from_config(CONFIG, 2**32 - 1)
    ids, mask = batch(12)
    backend.generate(model(backend, checkpoints, "causal_lm"), ids, mask, max_new_tokens=2, do_sample=True,
                     seed=2**32 - 1)
