"""The model API users call directly, held to one contract in every backend: a call outside the rules of
opt_spec.inputs / opt_spec.generation raises the same ValueError or TypeError, in the spec's words naming the
argument, in torch, tf and flax alike (never a framework error from deep inside, a clamped gather, or a loss
computed over a label that is not one), and the calls at the edge of the rules work.

Every refusal happens on the host before anything is compiled, so the table is cheap; the few valid calls
share one shape per backend.
"""

import numpy as np
import pytest

from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_weights

CONFIG = VARIANTS["pre_ln"]  # V = 96, 40 positions, 32-wide embeddings, 3 labels
V, P, E = CONFIG.vocab_size, CONFIG.max_position_embeddings, CONFIG.word_embed_proj_dim
HEADS = ("causal_lm", "sequence_classification", "question_answering")

_rng = np.random.default_rng(3)
IDS = _rng.integers(3, V, size=(2, 6)).astype(np.int64)
MASK = np.ones((2, 6), np.int64)
MASK[1, :2] = 0
IDS[1, :2] = CONFIG.pad_token_id
LABELS = np.where(MASK == 1, IDS, -100)
POSITIONS = np.tile(np.arange(6), (2, 1))


def put(a, index, value, dtype=None):
    a = a.astype(dtype) if dtype is not None else a.copy()
    a[index] = value
    return a


# ------------------------------------------------------------------------------------------ adapters
class Torch:
    def __init__(self):
        import torch

        from opt_torch.modeling import MODEL_CLASSES
        self.torch, self.classes = torch, MODEL_CLASSES

    def load(self, path, head):
        return self.classes[head].from_pretrained(path).eval()

    def native(self, x):
        return self.torch.from_numpy(x) if isinstance(x, np.ndarray) else x

    def call(self, model, **kw):
        with self.torch.no_grad():
            return model(**{k: self.native(v) for k, v in kw.items()})


class TF:
    def __init__(self):
        import tensorflow as tf

        from opt_tf.modeling import MODEL_CLASSES
        self.tf, self.classes = tf, MODEL_CLASSES

    def load(self, path, head):
        return self.classes[head].from_pretrained(path)

    def native(self, x):
        return self.tf.constant(x) if isinstance(x, np.ndarray) else x

    def call(self, model, **kw):
        return model(**{k: self.native(v) for k, v in kw.items()})


class Flax:
    def __init__(self):
        from opt_flax.pretrained import MODEL_CLASSES
        self.classes = MODEL_CLASSES

    def load(self, path, head):
        return self.classes[head].from_pretrained(path)

    def native(self, x):
        return x  # NumPy as users pass it (jnp.asarray would wrap int64 to int32 on the user's side)

    def call(self, model, **kw):
        return model(**kw)


ADAPTERS = {"torch": Torch, "tf": TF, "flax": Flax}
_made: dict = {}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}
    for i, head in enumerate(HEADS):
        path = tmp_path_factory.mktemp(head)
        spec_io.save_safetensors_dir(path, random_weights(CONFIG, head, seed=21 + i), CONFIG.to_dict())
        made[head] = path
    return made


@pytest.fixture(params=["torch", "tf", "flax"])
def backend(request, checkpoints):
    name = request.param
    pytest.importorskip({"torch": "torch", "tf": "tensorflow", "flax": "flax"}[name])
    if name not in _made:
        _made[name] = ADAPTERS[name]()
    adapter = _made[name]

    def model(head="causal_lm"):
        key = (name, head)
        if key not in _made:
            _made[key] = adapter.load(checkpoints[head], head)
        return _made[key]

    adapter.model = model
    return adapter


# ------------------------------------------------------------------------------------------ refusals
# (case, head, keyword arguments, error, words the message holds)
FORWARD_REFUSALS = [
    ("ids 1-D", "causal_lm", dict(input_ids=IDS[0]), ValueError, r"input_ids must be \(batch, length\).*\(6,\)"),
    ("ids 3-D", "causal_lm", dict(input_ids=IDS[None]), ValueError, r"input_ids must be \(batch, length\)"),
    ("ids T=0", "causal_lm", dict(input_ids=np.zeros((2, 0), np.int64)), ValueError, r"length >= 1.*\(2, 0\)"),
    ("ids B=0", "causal_lm", dict(input_ids=np.zeros((0, 6), np.int64)), ValueError, r"batch >= 1.*\(0, 6\)"),
    ("embeds width", "causal_lm", dict(inputs_embeds=np.zeros((2, 6, E - 1), np.float32)), ValueError,
     f"inputs_embeds has shape \\(2, 6, {E - 1}\\).*word_embed_proj_dim={E}"),
    ("embeds 2-D", "causal_lm", dict(inputs_embeds=np.zeros((6, E), np.float32)), ValueError,
     r"inputs_embeds must be \(batch, length, width\)"),
    ("embeds int", "causal_lm", dict(inputs_embeds=np.zeros((2, 6, E), np.int32)), TypeError,
     "inputs_embeds must be floating point"),
    ("mask 2", "causal_lm", dict(input_ids=IDS, attention_mask=put(MASK, (0, 3), 2)), ValueError,
     r"attention_mask must hold only 0 \(pad\) and 1 \(token\); it holds 2 at index \(0, 3\)"),
    ("mask -1", "causal_lm", dict(input_ids=IDS, attention_mask=put(MASK, (0, 3), -1)), ValueError,
     "attention_mask must hold only 0"),
    ("mask 0.5", "causal_lm", dict(input_ids=IDS, attention_mask=put(MASK, (0, 3), 0.5, np.float32)), ValueError,
     "it holds 0.5"),
    ("positions -2", "causal_lm", dict(input_ids=IDS, position_ids=put(POSITIONS, (1, 0), -2)), ValueError,
     r"position_ids holds -2 at index \(1, 0\)"),
    ("positions past", "causal_lm", dict(input_ids=IDS, position_ids=put(POSITIONS, (0, 5), P)), ValueError,
     f"position {P} is past the model's max_position_embeddings={P}"),
    ("positions shape", "causal_lm", dict(input_ids=IDS, position_ids=POSITIONS[:, :5]), ValueError,
     r"position_ids has shape \(2, 5\); expected"),
    ("positions 1-D", "causal_lm", dict(input_ids=IDS, position_ids=POSITIONS[0]), ValueError,
     r"position_ids has shape \(6,\)"),
    ("positions float", "causal_lm", dict(input_ids=IDS, position_ids=POSITIONS.astype(np.float32)), TypeError,
     "position_ids must be integers"),
    ("labels shape", "causal_lm", dict(input_ids=IDS, labels=LABELS[:, :5]), ValueError,
     r"labels has shape \(2, 5\); expected input_ids' \(batch, length\) = \(2, 6\)"),
    ("labels >= V", "causal_lm", dict(input_ids=IDS, labels=put(LABELS, (0, 3), V)), ValueError,
     f"label {V} at batch row 0, position 3 is neither a token id"),
    ("labels -5", "causal_lm", dict(input_ids=IDS, labels=put(LABELS, (1, 4), -5)), ValueError,
     "label -5 at batch row 1, position 4"),
    ("labels float", "causal_lm", dict(input_ids=IDS, labels=LABELS.astype(np.float32)), TypeError,
     "labels must be integers"),
    ("class label 3", "sequence_classification", dict(input_ids=IDS, labels=np.array([0, 3])), ValueError,
     r"label 3 of batch row 1 is neither a class in \[0, 3\)"),
    ("class labels shape", "sequence_classification", dict(input_ids=IDS, labels=np.zeros((2, 6), np.int64)),
     ValueError, r"labels has shape \(2, 6\); a single_label_classification problem takes \(2,\)"),
    ("multi-label width", "sequence_classification", dict(input_ids=IDS, labels=np.zeros((2, 2), np.float32)),
     ValueError, r"multi_label_classification problem takes \(2, 3\)"),
    ("span float", "question_answering", dict(input_ids=IDS, start_positions=np.array([1.0, 2.0], np.float32),
                                              end_positions=np.array([3, 4])), TypeError,
     "start_positions must be integers"),
    ("span shape", "question_answering", dict(input_ids=IDS, start_positions=np.array([1, 2]),
                                              end_positions=np.zeros((2, 6), np.int64)), ValueError,
     r"end_positions has shape \(2, 6\)"),
]


@pytest.mark.parametrize("case,head,kwargs,error,words", FORWARD_REFUSALS, ids=[c[0] for c in FORWARD_REFUSALS])
def test_forward_refuses_in_the_spec_words(backend, case, head, kwargs, error, words):
    with pytest.raises(error, match=words):
        backend.call(backend.model(head), **kwargs)


GENERATE_REFUSALS = [
    ("ids None", dict(input_ids=None), ValueError, "generate needs input_ids"),
    ("ids B=0", dict(input_ids=np.zeros((0, 6), np.int64)), ValueError, r"batch >= 1.*\(0, 6\)"),
    ("ids T=0", dict(input_ids=np.zeros((2, 0), np.int64)), ValueError, r"length >= 1.*\(2, 0\)"),
    ("mask 2", dict(input_ids=IDS, attention_mask=put(MASK, (1, 4), 2)), ValueError,
     r"it holds 2 at index \(1, 4\)"),
    ("temperature 0 sampling", dict(input_ids=IDS, do_sample=True, temperature=0.0), ValueError,
     "temperature=0.0: must be > 0 when sampling"),
    ("temperature < 0", dict(input_ids=IDS, temperature=-1.0), ValueError, "temperature=-1.0: must be >= 0"),
]


@pytest.mark.parametrize("case,kwargs,error,words", GENERATE_REFUSALS, ids=[c[0] for c in GENERATE_REFUSALS])
def test_generate_refuses_in_the_spec_words(backend, case, kwargs, error, words):
    kwargs = {k: backend.native(v) for k, v in kwargs.items()}
    with pytest.raises(error, match=words):
        backend.model().generate(max_new_tokens=2, **kwargs)


def test_torch_takes_tensors_only(checkpoints):
    """NumPy arrays are TensorFlow's and JAX's inputs; the torch model says so instead of an AttributeError."""
    pytest.importorskip("torch")
    adapter = Torch()
    model = adapter.load(checkpoints["causal_lm"], "causal_lm")
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor, got ndarray"):
        model(input_ids=IDS)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        model(input_ids=adapter.native(IDS), labels=LABELS.tolist())


# --------------------------------------------------------------------------------- the edges that work
def _logits(out) -> np.ndarray:
    return np.asarray(out.logits.numpy() if hasattr(out.logits, "numpy") else out.logits, np.float32)


def test_inputs_at_the_edge_of_the_rules_work(backend):
    """A float or bool mask of 0/1, one row of positions for every row, -1 (a pad's position) and labels
    of -100 give what their plain forms give."""
    lm = backend.model()
    plain = _logits(backend.call(lm, input_ids=IDS, attention_mask=MASK))
    for mask in (MASK.astype(np.float32), MASK.astype(bool)):
        np.testing.assert_allclose(_logits(backend.call(lm, input_ids=IDS, attention_mask=mask)), plain, atol=1e-6)
    spec_positions = np.cumsum(MASK, 1) * MASK - 1  # pads -1
    np.testing.assert_allclose(_logits(backend.call(lm, input_ids=IDS, attention_mask=MASK,
                                                    position_ids=spec_positions)), plain, atol=1e-6)
    full = np.ones_like(MASK)
    tiled = _logits(backend.call(lm, input_ids=IDS, attention_mask=full, position_ids=POSITIONS))
    one_row = _logits(backend.call(lm, input_ids=IDS, attention_mask=full, position_ids=POSITIONS[:1]))
    np.testing.assert_allclose(one_row, tiled, atol=1e-6)
    out = backend.call(lm, input_ids=IDS, attention_mask=MASK, labels=np.full_like(LABELS, -100))
    assert float(np.asarray(out.loss)) == 0.0


def test_temperature_zero_resolves_to_greedy_search():
    """As in Hugging Face, temperature=0 without sampling is plain greedy search (a generation_config.json may
    say so); with sampling it is refused (above)."""
    from opt_spec.generation import GenerationConfig, resolve

    d = resolve(GenerationConfig(temperature=0.0), None, {"max_new_tokens": 3}, prompt_length=6, max_positions=P,
                vocab_size=V)
    assert not d.do_sample and d.num_beams == 1 and d.temperature == 0.0
    with pytest.raises(ValueError, match="temperature=0.0: must be > 0 when sampling"):
        resolve(GenerationConfig(temperature=0.0), None, {"do_sample": True}, prompt_length=6, max_positions=P,
                vocab_size=V)


@pytest.mark.slow  # TensorFlow compiles a second decode program for the other setting (~10 s)
def test_temperature_zero_generates_the_greedy_tokens(backend):
    lm = backend.model()
    ids, mask = backend.native(IDS), backend.native(MASK)
    greedy = np.asarray(lm.generate(ids, mask, max_new_tokens=4))
    np.testing.assert_array_equal(np.asarray(lm.generate(ids, mask, max_new_tokens=4, temperature=0.0)), greedy)


def test_classification_without_a_pad_id_takes_one_row_as_hugging_face_does(backend, tmp_path):
    """With config.pad_token_id None a row's last real token cannot be found: a batch of several rows is
    refused in words (Hugging Face refuses it too); one row pools its last position, as Hugging Face's does."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config = type(CONFIG).from_dict({**CONFIG.to_dict(), "pad_token_id": None})
    spec_io.save_safetensors_dir(tmp_path, random_weights(config, "sequence_classification", seed=4), config.to_dict())
    model = backend.load(tmp_path, "sequence_classification")
    with pytest.raises(ValueError, match="batch of 2 rows needs config.pad_token_id"):
        backend.call(model, input_ids=IDS)
    with torch.no_grad():
        hf = transformers.OPTForSequenceClassification.from_pretrained(tmp_path).eval()
        want = hf(input_ids=torch.from_numpy(IDS[:1])).logits.numpy()
        with pytest.raises(ValueError, match="Cannot handle batch sizes > 1"):
            hf(input_ids=torch.from_numpy(IDS))
    np.testing.assert_allclose(_logits(backend.call(model, input_ids=IDS[:1])), want, atol=2e-5)
