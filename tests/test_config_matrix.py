"""Every config axis Hugging Face's OPTConfig takes and real checkpoints use, in all three backends, against
transformers 4.57.6 (the test-only reference) on the same random varied weights.

opt_spec.testing.VARIANTS changes one structural switch at a time from a 125m-like tiny config; MATRIX below
covers every axis at least once and in varied combinations (a pairwise cover, not a product), 1 to 3 layers of
hidden 16-32:

    name                LN    E/H   bias affine final LN act                tied pad/bos/eos ffn/H nh P  L weights
    opt350m             post  16/32 yes  yes    (none)   relu               yes  1/2/2       4     4  40 2 float16
    galactica           pre   32/32 yes  yes    yes      gelu               yes  1/0/2       4     2  40 3 float32
    nobias_silu         post  16/16 no   yes    (none)   silu               no   0/1/3       2.5   1  12 2 float32
    noaffine_gelu_new   pre   24/16 yes  no     yes      gelu_new           yes  None/2/2    1     8  20 1 bfloat16
    nofinal_tanh        pre   24/24 no   yes    removed  gelu_pytorch_tanh  no   1/2/37      2.7   2  16 2 float32
    swish_post_noaffine post  16/32 yes  no     removed  swish              no   6/4/39      3     8  24 2 float32

(E/H: word_embed_proj_dim / hidden_size, project_in/out when they differ; "removed": _remove_final_layer_norm;
nh: heads; P: max_position_embeddings; L: layers; weights: the checkpoint's dtype, stated in config.json for
the first two and noaffine_gelu_new.) Rates used only in training, all ignored in eval: opt350m dropout 0.1;
galactica dropout, attention_dropout 0.1, layerdrop 0.3; nofinal_tanh attention_dropout, layerdrop 0.2 and
use_cache=False. opt350m also carries the keys a real facebook/opt config.json has that OPTConfig does not
model. Per variant, on a left-padded batch: the causal LM's logits and the other heads' outputs against
Hugging Face, cached decoding step by step against Hugging Face's full forward, greedy tokens against Hugging
Face's generate (up to the position limit exactly where P is small; rows stopping at EOS, filled with a
non-default or absent pad id), save_pretrained -> from_pretrained with dtype="auto", and conversion through
every writable format and back, bit-exact with config.json intact. Then the position limit and one past it,
and the activations Hugging Face takes that optkit does not, refused in words.
"""

import json
import os
import re

import ml_dtypes
import numpy as np
import pytest
import torch

from conversion import FORMATS, ConversionError, convert
from opt_spec import OPTConfig
from opt_spec import io as spec_io
from opt_spec.config import ACTIVATIONS
from opt_spec.errors import ConfigError
from opt_spec.testing import random_batch, random_weights

from .conftest import max_abs_diff

transformers = pytest.importorskip("transformers", reason="the Hugging Face reference needs the test extra")

_TINY = dict(vocab_size=64, num_hidden_layers=2, dropout=0.0, num_labels=3)
MATRIX = {
    "opt350m": OPTConfig(**{**_TINY, "vocab_size": 80, "dropout": 0.1}, hidden_size=32, word_embed_proj_dim=16,
                         do_layer_norm_before=False, ffn_dim=128, num_attention_heads=4, max_position_embeddings=40,
                         extra={"torch_dtype": "float16", "activation_dropout": 0.0, "prefix": "</s>",
                                "_name_or_path": "facebook/opt-350m", "architectures": ["OPTForCausalLM"]}),
    "galactica": OPTConfig(**{**_TINY, "num_hidden_layers": 3, "dropout": 0.1}, hidden_size=32, ffn_dim=128,
                           num_attention_heads=2, activation_function="gelu", bos_token_id=0, attention_dropout=0.1,
                           layerdrop=0.3, max_position_embeddings=40, extra={"dtype": "float32",
                                                                             "torch_dtype": "float32"}),
    "nobias_silu": OPTConfig(**_TINY, hidden_size=16, ffn_dim=40, num_attention_heads=1, enable_bias=False,
                             activation_function="silu", do_layer_norm_before=False, tie_word_embeddings=False,
                             pad_token_id=0, bos_token_id=1, eos_token_id=3, max_position_embeddings=12),
    "noaffine_gelu_new": OPTConfig(**{**_TINY, "num_hidden_layers": 1}, hidden_size=16, word_embed_proj_dim=24,
                                   ffn_dim=16, num_attention_heads=8, layer_norm_elementwise_affine=False,
                                   activation_function="gelu_new", pad_token_id=None, max_position_embeddings=20,
                                   extra={"dtype": "bfloat16", "torch_dtype": "bfloat16"}),
    "nofinal_tanh": OPTConfig(**_TINY, hidden_size=24, ffn_dim=64, num_attention_heads=2, enable_bias=False,
                              _remove_final_layer_norm=True, activation_function="gelu_pytorch_tanh",
                              tie_word_embeddings=False, eos_token_id=37, attention_dropout=0.2, layerdrop=0.2,
                              use_cache=False, max_position_embeddings=16),
    "swish_post_noaffine": OPTConfig(**_TINY, hidden_size=32, word_embed_proj_dim=16, ffn_dim=96,
                                     num_attention_heads=8, activation_function="swish", do_layer_norm_before=False,
                                     layer_norm_elementwise_affine=False, _remove_final_layer_norm=True,
                                     tie_word_embeddings=False, pad_token_id=6, bos_token_id=4, eos_token_id=39,
                                     max_position_embeddings=24),
}
WEIGHT_DTYPES = {"opt350m": np.float16, "noaffine_gelu_new": ml_dtypes.bfloat16}  # the rest: float32
HEADS = ("causal_lm", "base", "sequence_classification", "question_answering")
HF_CLASSES = dict(causal_lm="OPTForCausalLM", base="OPTModel", sequence_classification="OPTForSequenceClassification",
                  question_answering="OPTForQuestionAnswering")
BACKENDS = ("torch", "tf", "flax")
TOL = 2e-5  # float32 logits of |x| < 10 agree to ~5e-6 between frameworks


def test_the_matrix_covers_every_axis():
    configs = MATRIX.values()
    assert {c.activation_function for c in configs} == set(ACTIVATIONS)
    for field in ("do_layer_norm_before", "enable_bias", "layer_norm_elementwise_affine", "tie_word_embeddings",
                  "_remove_final_layer_norm", "has_projections", "has_final_layer_norm", "use_cache"):
        assert {getattr(c, field) for c in configs} == {True, False}, field
    assert {c.word_embed_proj_dim > c.hidden_size for c in configs if c.has_projections} == {True, False}
    assert {c.tie_word_embeddings for c in configs if c.has_projections} == {True, False}  # lm_head (V, E)
    assert {c.num_hidden_layers for c in configs} >= {1, 2, 3} and {c.num_attention_heads for c in configs} >= {1, 8}
    assert any(c.ffn_dim != 4 * c.hidden_size for c in configs) and any(c.pad_token_id is None for c in configs)
    assert all(c.dropout or c.attention_dropout or c.layerdrop for c in (MATRIX["galactica"], MATRIX["nofinal_tanh"]))
    assert {(c.pad_token_id, c.bos_token_id, c.eos_token_id) for c in configs} > {(1, 2, 2)}


# ------------------------------------------------------------------------------------ the reference
class Reference:
    """One variant's checkpoints (one per head) and Hugging Face's outputs on the left-padded batch."""

    def __init__(self, root, name):
        config = self.config = MATRIX[name]
        self.ids, self.mask = random_batch(config, batch=3, length=9, seed=2, left_pad=(0, 3, 5))
        self.paths, self.outputs = {}, {}
        for head in HEADS:
            path = self.paths[head] = os.path.join(root, name, head)
            weights = random_weights(config, head, seed=5, dtype=WEIGHT_DTYPES.get(name, np.float32))
            spec_io.save_safetensors_dir(path, weights, config.to_dict())
            hf = getattr(transformers, HF_CLASSES[head]).from_pretrained(path).eval()  # float32, as ours
            rows = self.rows(head)
            with torch.no_grad():
                self.outputs[head] = main_outputs(hf(input_ids=torch.from_numpy(self.ids[rows]).long(),
                                                     attention_mask=torch.from_numpy(self.mask[rows]).long()))
            if head == "causal_lm":
                self.hf_auto_dtype = str(transformers.OPTForCausalLM.from_pretrained(path, dtype="auto").dtype)
                self.new_tokens = min(8, config.max_position_embeddings - self.ids.shape[1])  # up to P exactly
                with torch.no_grad():
                    self.tokens = hf.generate(torch.from_numpy(self.ids).long(),
                                              attention_mask=torch.from_numpy(self.mask).long(),
                                              max_new_tokens=self.new_tokens, do_sample=False).numpy()

    def rows(self, head):
        """Hugging Face's classifier refuses a batch of more than one row without a pad id: then row 0 alone."""
        return slice(0, 1) if head == "sequence_classification" and self.config.pad_token_id is None else slice(None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("matrix"), {}

    def get(name):
        if name not in made:
            made[name] = Reference(str(root), name)
        return made[name]
    return get


def main_outputs(out) -> list[np.ndarray]:
    """The head's outputs as float32 arrays: hidden states, logits, or start and end logits."""
    if getattr(out, "start_logits", None) is not None:
        values = [out.start_logits, out.end_logits]
    else:
        values = [out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state]
    return [v.float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float32) for v in values]


# --------------------------------------------------------------------------------- the three backends
def load(backend, path, head="causal_lm", dtype=None):
    if backend == "torch":
        from opt_torch.modeling import MODEL_CLASSES
        return MODEL_CLASSES[head].from_pretrained(path, dtype=dtype).eval()
    if backend == "tf":
        pytest.importorskip("tensorflow")
        from opt_tf.modeling import MODEL_CLASSES
        return MODEL_CLASSES[head].from_pretrained(path, dtype=dtype)
    pytest.importorskip("flax")
    from opt_flax.pretrained import MODEL_CLASSES
    return MODEL_CLASSES[head].from_pretrained(path, dtype=dtype, param_dtype=dtype or "float32")


def forward(backend, model, ids, mask, **kwargs):
    if backend == "torch":
        with torch.no_grad():
            return model(torch.from_numpy(ids).long(), torch.from_numpy(mask).long(), **kwargs)
    return model(ids, attention_mask=mask, **kwargs)


def generate(backend, model, ids, mask, **kwargs) -> np.ndarray:
    if backend == "torch":
        ids, mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    return np.asarray(model.generate(ids, mask, **kwargs))


def decode_step_by_step(backend, model, ids, mask, prefill: int) -> np.ndarray:
    """The prompt's first `prefill` tokens in one call, then one token per call through the backend's KV cache:
    the logits of every position (B, T, V). Flax: a preallocated cache with the mask over its capacity, one token
    at a time from the start under jit (one compilation; eager JAX compiles each op of each shape, slower here)."""
    B, T = ids.shape
    if backend == "flax":
        import jax

        step = jax.jit(lambda params, i, c: model(i, mask, params=params, past_key_values=c))
        cache, logits = model.init_cache(B, T), []
        for t in range(T):
            out = step(model.params, ids[:, t:t + 1], cache)
            cache = out.past_key_values
            logits.append(np.asarray(out.logits))
        return np.concatenate(logits, axis=1)
    # torch and tf: a dynamic cache the first call starts, the mask covering past + new
    out = forward(backend, model, ids[:, :prefill], mask[:, :prefill], use_cache=True)
    steps = [main_outputs(out)[0]]
    for t in range(prefill, T):
        out = forward(backend, model, ids[:, t:t + 1], mask[:, :t + 1], past_key_values=out.past_key_values,
                      use_cache=True)
        steps.append(main_outputs(out)[0])
    return np.concatenate(steps, axis=1)


def dtype_name(backend, model) -> str:
    if backend == "tf":
        return model.compute_dtype
    return str(model.dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(MATRIX))
def test_every_head_matches_hugging_face(reference, name, backend):
    ref = reference(name)
    for head in HEADS:
        rows = ref.rows(head)
        ids, mask = ref.ids[rows], ref.mask[rows]
        got = main_outputs(forward(backend, load(backend, ref.paths[head], head), ids, mask))
        for a, b in zip(got, ref.outputs[head]):
            keep = mask if a.shape[:2] == mask.shape else None  # pooled classifier logits have no time axis
            assert max_abs_diff(a, b, keep) <= TOL, head


def compiled_on(**default):
    """(name, backend) params: torch on every variant, TF and Flax (whose compilations cost 1-3 s a variant) on
    default[backend] by default and on the other variants with the slow tests."""
    return [pytest.param(n, b, marks=() if b == "torch" or n in default[b] else pytest.mark.slow)
            for n in sorted(MATRIX) for b in BACKENDS]


@pytest.mark.parametrize("name,backend", compiled_on(tf=MATRIX, flax=("galactica", "nobias_silu", "noaffine_gelu_new")))
def test_cached_decoding_matches_hugging_face(reference, name, backend):
    """Four tokens at once, then one at a time through the cache: Hugging Face's full-forward logits."""
    ref = reference(name)
    model = load(backend, ref.paths["causal_lm"])
    logits = decode_step_by_step(backend, model, ref.ids, ref.mask, prefill=4)
    assert max_abs_diff(logits, ref.outputs["causal_lm"][0], ref.mask) <= TOL


# By default in TF and Flax: the variant whose tokens reach the position limit, and the one whose rows stop at a
# non-default EOS and are filled with a non-default pad id.
@pytest.mark.parametrize("name,backend", compiled_on(tf=("nobias_silu", "swish_post_noaffine"),
                                                     flax=("nobias_silu", "swish_post_noaffine")))
def test_greedy_tokens_match_hugging_face(reference, name, backend):
    ref = reference(name)
    tokens = generate(backend, load(backend, ref.paths["causal_lm"]), ref.ids, ref.mask, max_new_tokens=ref.new_tokens)
    np.testing.assert_array_equal(tokens, ref.tokens)


def test_generation_reaches_the_limits_and_stops(reference):
    """The greedy cases above are meaningful: the small-P variant generates up to max_position_embeddings
    exactly, and rows stop at a (non-default) EOS and are filled with the (non-default, or absent) pad id."""
    assert reference("nobias_silu").tokens.shape[1] == MATRIX["nobias_silu"].max_position_embeddings
    for name in ("noaffine_gelu_new", "nofinal_tanh", "swish_post_noaffine"):
        config, new = MATRIX[name], reference(name).tokens[:, 9:]
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        stopped = [row for row in new if config.eos_token_id in row[:-1].tolist()]
        assert stopped, name
        for row in stopped:
            after = row[row.tolist().index(config.eos_token_id) + 1:]
            assert (after == pad).all(), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(MATRIX))
def test_save_pretrained_round_trip(reference, tmp_path, name, backend):
    """dtype="auto" keeps the checkpoint's dtype (Hugging Face's choice too); what is saved is the source, bit
    for bit, with every config.json key kept (so loading it is loading the source, checked above)."""
    ref = reference(name)
    model = load(backend, ref.paths["causal_lm"], dtype="auto")
    assert dtype_name(backend, model) == ref.hf_auto_dtype.removeprefix("torch.")
    model.save_pretrained(tmp_path)
    source = spec_io.load_safetensors_dir(ref.paths["causal_lm"])
    saved = spec_io.load_safetensors_dir(tmp_path)
    assert set(saved) == set(source)
    for n, w in source.items():
        assert saved[n].dtype == w.dtype and np.array_equal(saved[n].view(np.uint8), w.view(np.uint8)), n
    assert json_config(tmp_path) == saved_config(ref.paths["causal_lm"], type(model).__name__)


def json_config(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def saved_config(source, architecture="OPTForCausalLM") -> dict:
    """The source's config.json as a save writes it back: every key kept, the class that wrote it, and the weights'
    dtype under both keys Hugging Face reads (test_saved_config.py)."""
    dtype = str(next(iter(spec_io.load_safetensors_dir(source).values())).dtype)
    return {**json_config(source), "architectures": [architecture.removeprefix("TF").removeprefix("Flax")],
            "dtype": dtype, "torch_dtype": dtype}


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_conversion_round_trip(reference, tmp_path, name):
    """Through every writable format and back to safetensors: the same bytes and the same config.json."""
    src = reference(name).paths["causal_lm"]
    for fmt in (f for f, spec in FORMATS.items() if spec.write is not None and f != "hf-safetensors"):
        there, back = tmp_path / fmt, tmp_path / f"{fmt}-back"
        if fmt == "hf-tf" and WEIGHT_DTYPES.get(name) is ml_dtypes.bfloat16:  # Keras 2's HDF5 file has no bfloat16
            with pytest.raises(ConversionError, match="HDF5 has no bfloat16; convert with --dtype float32 or float16"):
                convert(src, there, to=fmt, progress=False)
            assert not there.exists()
            continue
        convert(src, there, to=fmt, progress=False)
        convert(there, back, progress=False)
        assert json_config(there) == json_config(back) == saved_config(src), fmt
        want, got = spec_io.load_safetensors_dir(src), spec_io.load_safetensors_dir(back)
        assert set(got) == set(want), fmt
        for n, w in want.items():
            assert got[n].dtype == w.dtype and np.array_equal(got[n].view(np.uint8), w.view(np.uint8)), (fmt, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_up_to_the_table_and_one_past(reference, backend):
    """max_position_embeddings = 12: a row of 12 real tokens (positions 0-11) matches Hugging Face, also in a batch
    of 13 columns whose every row is padded (pads take no position); 13 real tokens, or a prompt + new tokens past
    12, are refused in words."""
    ref, P = reference("nobias_silu"), 12
    hf = transformers.OPTForCausalLM.from_pretrained(ref.paths["causal_lm"]).eval()
    model = load(backend, ref.paths["causal_lm"])
    ids, mask = random_batch(ref.config, batch=3, length=P + 1, seed=3, left_pad=(1, 2, 5))
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits
    assert max_abs_diff(main_outputs(forward(backend, model, ids, mask))[0], want, mask) <= TOL
    ids, mask = random_batch(ref.config, batch=3, length=P + 1, seed=3, left_pad=(0, 2, 5))
    with pytest.raises(ValueError, match="position 12 is past the model's max_position_embeddings=12"):
        forward(backend, model, ids, mask)
    with pytest.raises(ValueError, match="9 tokens \\+ max_new_tokens=4 = 13 is more than the model's "
                                         "max_position_embeddings=12"):
        generate(backend, model, ref.ids, ref.mask, max_new_tokens=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_on_a_padded_batch_wider_than_the_table(reference, backend):
    """max_position_embeddings = 12, a batch 14 wide whose longest row holds 9 real tokens: 3 new tokens fit
    the table (pads take no position), so generate gives Hugging Face's tokens (greedy, beams) from a cache
    of 17 slots; a 4th would need position 12 and is refused in words."""
    ref = reference("nobias_silu")
    hf = transformers.OPTForCausalLM.from_pretrained(ref.paths["causal_lm"]).eval()
    model = load(backend, ref.paths["causal_lm"])
    ids, mask = random_batch(ref.config, batch=3, length=14, seed=4, left_pad=(5, 7, 11))
    for settings in (dict(max_new_tokens=3), dict(max_new_tokens=3, num_beams=2)):
        with torch.no_grad():
            want = hf.generate(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                               pad_token_id=ref.config.pad_token_id, **settings).numpy()
        np.testing.assert_array_equal(generate(backend, model, ids, mask, **settings), want)
    with pytest.raises(ValueError, match="prompt of 9 tokens \\(the longest row's, pads aside\\) \\+ "
                                         "max_new_tokens=4 = 13 is more than the model's max_position_embeddings=12"):
        generate(backend, model, ids, mask, max_new_tokens=4)


def test_activations_hugging_face_takes_that_optkit_does_not_are_refused_in_words(tmp_path):
    from transformers.activations import ACT2CLS

    config = MATRIX["galactica"].to_dict()
    unsupported = sorted(set(ACT2CLS) - set(ACTIVATIONS))
    assert unsupported and set(ACTIVATIONS) <= set(ACT2CLS)  # optkit's names are all Hugging Face's
    for act in unsupported:
        with pytest.raises(ConfigError, match=f"activation_function='{act}': unknown activation; known: gelu, "):
            OPTConfig.from_dict({**config, "activation_function": act})
    src = tmp_path / "src"
    spec_io.save_safetensors_dir(src, random_weights(MATRIX["galactica"]), config)
    (src / "config.json").write_text(json.dumps({**config, "activation_function": "quick_gelu"}))
    readers = [OPTConfig.from_pretrained, lambda p: convert(p, tmp_path / "out", progress=False)]
    readers += [lambda p, b=b: load(b, p) for b in BACKENDS]
    for read in readers:
        with pytest.raises(ConfigError, match=re.escape(f"{src / 'config.json'}: OPTConfig.activation_function="
                                                        "'quick_gelu': unknown activation")):
            read(src)
    assert not (tmp_path / "out").exists()
