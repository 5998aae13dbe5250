"""The Hugging Face model surface of the three backends, against transformers 4.57.6 (test-only) on the same
random, varied weights: attention probabilities, return_dict=False tuples, torch_dtype= and dtype="auto",
gradient checkpointing, resize_token_embeddings, and PEFT's LoRA on the PyTorch causal LM."""

import copy
import json
import os

import numpy as np
import pytest
import torch

from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_batch, random_weights

from .conftest import max_abs_diff

transformers = pytest.importorskip("transformers", reason="the Hugging Face reference needs the test extra")

BACKENDS = ("torch", "tf", "flax")
HF_CLASSES = {"base": "OPTModel", "causal_lm": "OPTForCausalLM",
              "sequence_classification": "OPTForSequenceClassification",
              "question_answering": "OPTForQuestionAnswering"}
DROPOUT = dict(dropout=0.2, attention_dropout=0.1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(variant, dropout?): folder} with random causal LM weights (seed 5)."""
    made = {}

    def make(name: str, dropout: bool = False):
        if (name, dropout) not in made:
            config = VARIANTS[name].replace(**DROPOUT) if dropout else VARIANTS[name]
            path = tmp_path_factory.mktemp(f"{name}-dropout" if dropout else name)
            spec_io.save_safetensors_dir(path, random_weights(config, "causal_lm", seed=5), config.to_dict())
            made[name, dropout] = path
        return made[name, dropout]
    return make


def model_classes(backend: str) -> dict:
    if backend == "torch":
        from opt_torch.modeling import MODEL_CLASSES
    elif backend == "tf":
        from opt_tf.modeling import MODEL_CLASSES
    else:
        from opt_flax.pretrained import MODEL_CLASSES
    return {head.value: cls for head, cls in MODEL_CLASSES.items()}


def load(backend: str, path, head: str = "causal_lm", **kwargs):
    return model_classes(backend)[head].from_pretrained(path, **kwargs)


def run(backend: str, model, ids, mask, **kwargs):
    """The model's output on NumPy inputs (torch without autograd)."""
    if backend == "torch":
        kwargs = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        with torch.no_grad():
            return model(torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(mask).long(), **kwargs)
    return model(ids, attention_mask=mask, **kwargs)


def hugging_face(path, head: str = "causal_lm", attn: str = "eager"):
    return getattr(transformers, HF_CLASSES[head]).from_pretrained(path, attn_implementation=attn).eval()


def hf_run(ref, ids, mask, **kwargs):
    kwargs = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    with torch.no_grad():
        return ref(input_ids=torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(mask).long(), **kwargs)


def batch(config, seed=1, left_pad=(0, 3, 5)):
    ids, mask = random_batch(config, seed=seed, left_pad=left_pad)
    return ids.astype(np.int64), mask.astype(np.int64)


def numpy(x) -> np.ndarray:
    return x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)


# ------------------------------------------------------------------------------------------ outputs
def assert_attentions_equal(ours, theirs, mask, tol=1e-5):
    """Per layer (B, nh, T, S), compared on the real query rows (Hugging Face spreads a pad query's
    probability over every key; optkit lets it see itself, which changes no real token)."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        a, b = numpy(a), numpy(b)
        assert a.shape == b.shape
        rows = np.broadcast_to(mask[:, None, :], a.shape[:3])
        assert max_abs_diff(a, b, rows) <= tol
        np.testing.assert_allclose(a[rows.astype(bool)].sum(-1), 1.0, atol=1e-5)  # probabilities


@pytest.mark.parametrize("backend, attn", [("torch", "eager"), ("torch", "sdpa"), ("tf", None), ("flax", None)])
@pytest.mark.parametrize("name", ["pre_ln", "post_ln_proj"])
def test_attentions_equal_hugging_face_eager(checkpoints, backend, attn, name):
    path = checkpoints(name)
    model = load(backend, path, **({"attn_implementation": attn} if attn else {}))
    ids, mask = batch(VARIANTS[name])
    out = run(backend, model, ids, mask, output_attentions=True)
    want = hf_run(hugging_face(path), ids, mask, output_attentions=True)
    assert len(out.attentions) == VARIANTS[name].num_hidden_layers
    assert_attentions_equal(out.attentions, want.attentions, mask)
    assert max_abs_diff(numpy(out.logits), numpy(want.logits), mask) <= 1e-5
    assert run(backend, model, ids, mask).attentions is None  # only when asked


def test_torch_attentions_of_a_cached_step(checkpoints):
    """One new token over a cache: (B, nh, 1, past + 1), as Hugging Face's step."""
    from opt_torch import OPTForCausalLM

    path = checkpoints("pre_ln")
    model, ref = OPTForCausalLM.from_pretrained(path), hugging_face(path)
    ids, mask = batch(VARIANTS["pre_ln"])
    past = run("torch", model, ids[:, :-1], mask[:, :-1], use_cache=True).past_key_values
    ours = run("torch", model, ids[:, -1:], mask, past_key_values=past, output_attentions=True).attentions
    ref_past = hf_run(ref, ids[:, :-1], mask[:, :-1], use_cache=True).past_key_values
    with torch.no_grad():
        theirs = ref(input_ids=torch.as_tensor(ids[:, -1:]), attention_mask=torch.as_tensor(mask),
                     past_key_values=ref_past, output_attentions=True).attentions
    assert numpy(ours[0]).shape == (3, 4, 1, ids.shape[1])
    for a, b in zip(ours, theirs):
        assert max_abs_diff(numpy(a), numpy(b)) <= 1e-5


def head_inputs(head, ids, mask):
    if head == "causal_lm":
        return {"labels": np.where(mask == 1, ids, -100)}
    if head == "sequence_classification":
        return {"labels": np.array([0, 2, 1])}
    if head == "question_answering":
        return {"start_positions": np.array([1, 4, 6]), "end_positions": np.array([3, 7, 8])}
    return {}


def assert_same_fields(ours: tuple, theirs: tuple, names: list, mask):
    """A return_dict=False tuple against Hugging Face's, field by field (its record names the positions)."""
    assert len(ours) == len(theirs) == len(names), (len(ours), names)
    for name, a, b in zip(names, ours, theirs):
        if name == "attentions":
            assert_attentions_equal(a, b, mask)
        elif name == "hidden_states":
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert max_abs_diff(numpy(x), numpy(y), mask) <= 1e-5
        elif name == "past_key_values":  # Hugging Face's Cache; ours a KVCache (Flax: a (k, v) per layer)
            a = list(zip(a.keys, a.values)) if type(a).__module__ in ("opt_torch.cache", "opt_tf.modeling") else a
            assert len(a) == len(b.layers)
            keys = np.broadcast_to(mask[:, None, :], numpy(a[0][0]).shape[:3])
            for (k, v), layer in zip(a, b.layers):
                assert max_abs_diff(numpy(k), numpy(layer.keys), keys) <= 1e-5
                assert max_abs_diff(numpy(v), numpy(layer.values), keys) <= 1e-5
        else:  # loss, logits, pooled logits, span logits, last hidden state
            a, b = numpy(a), numpy(b)
            assert a.shape == b.shape, name
            tol = 2e-5 * max(1.0, float(np.abs(b).max())) if name == "loss" else 1e-5
            assert max_abs_diff(a, b, mask if a.shape[:2] == mask.shape else None) <= tol, name


@pytest.mark.parametrize("head", sorted(HF_CLASSES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_return_dict_false_is_hugging_faces_tuple(tmp_path, backend, head):
    config = VARIANTS["post_ln_proj"]
    spec_io.save_safetensors_dir(tmp_path, random_weights(config, head, seed=4), config.to_dict())
    model, ref = load(backend, tmp_path, head), hugging_face(tmp_path, head)
    # the span loss's softmax runs over pad positions too, whose logits are not Hugging Face's: no pads there
    ids, mask = batch(config, left_pad=(0, 0, 0) if head == "question_answering" else (0, 3, 5))
    extra = dict(head_inputs(head, ids, mask), output_hidden_states=True, output_attentions=True)
    cache = {"flax": {}, "tf": {"use_cache": True}, "torch": {}}[backend]  # Flax returns a cache only when given one
    # (Hugging Face's question answering tuple has no cache either way, but without one it drops the hidden states)
    hf_cache = {"use_cache": False} if backend == "flax" and head != "question_answering" else {}
    got = run(backend, model, ids, mask, return_dict=False, **cache, **extra)
    theirs = hf_run(ref, ids, mask, return_dict=False, **hf_cache, **extra)
    names = list(hf_run(ref, ids, mask, **hf_cache, **extra).keys())
    assert isinstance(got, tuple)
    assert_same_fields(got, theirs, names, mask)
    if head == "causal_lm":  # and the record's own order without the optional fields
        short = run(backend, model, ids, mask, return_dict=False, **cache)
        assert len(short) == len(hf_run(ref, ids, mask, return_dict=False, **hf_cache))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pads_after_real_tokens_see_them_as_in_hugging_face(checkpoints, backend):
    """Every position from a row's first real token on, pads included (right padding, a hole), has Hugging Face's
    logits: a pad attends to the real tokens before it (what PEFT's prompt tuning trains on with left padding)."""
    path = checkpoints("pre_ln")
    ids, mask = batch(VARIANTS["pre_ln"], left_pad=(0, 0, 3))
    mask[0, -4:], mask[1, 5] = 0, 0
    seen = np.cumsum(mask, axis=1) > 0
    assert (seen & (mask == 0)).sum() == 5
    ours = numpy(run(backend, load(backend, path), ids, mask).logits)
    assert max_abs_diff(ours, numpy(hf_run(hugging_face(path), ids, mask).logits), seen) <= 1e-4


# -------------------------------------------------------------------------------------- dtype arguments
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_dtype_is_an_alias_of_dtype(checkpoints, backend):
    path = checkpoints("pre_ln")
    ids, mask = batch(VARIANTS["pre_ln"])
    half = {"torch": torch.bfloat16, "tf": "bfloat16", "flax": "bfloat16"}[backend]
    model = load(backend, path, torch_dtype=half)
    reference = load(backend, path, dtype=half)
    assert dtype_name(backend, model) == dtype_name(backend, reference) == "bfloat16"
    assert max_abs_diff(numpy(run(backend, model, ids, mask).logits),
                        numpy(run(backend, reference, ids, mask).logits)) == 0
    other = {"torch": torch.float16, "tf": "float16", "flax": "float16"}[backend]
    with pytest.raises(ValueError, match="torch_dtype"):
        load(backend, path, dtype=other, torch_dtype=half)
    fresh = model_classes(backend)["causal_lm"].from_config(VARIANTS["pre_ln"], torch_dtype=half)
    assert dtype_name(backend, fresh) == "bfloat16"


def dtype_name(backend, model) -> str:
    if backend == "torch":
        return str(model.dtype).removeprefix("torch.")
    if backend == "tf":
        return model.dtype_policy.compute_dtype
    return model.dtype.name


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_auto_takes_the_configs_dtype_first_as_hugging_face_does(tmp_path, backend):
    """float32 weights under config.json keys naming other dtypes: "dtype" wins over "torch_dtype", either over
    the weights, as in transformers' from_pretrained(dtype="auto"); without either key, the weights' dtype."""
    config = VARIANTS["pre_ln"]
    weights = random_weights(config, "causal_lm", seed=5)
    cases = [({"torch_dtype": "float16"}, "float16"), ({"dtype": "bfloat16", "torch_dtype": "float16"}, "bfloat16"),
             ({}, "float32")]
    for i, (keys, want) in enumerate(cases):
        path = tmp_path / str(i)
        spec_io.save_safetensors_dir(path, weights, {**config.to_dict(), **keys})
        hf = transformers.OPTForCausalLM.from_pretrained(path, dtype="auto")
        assert str(hf.dtype) == f"torch.{want}", keys  # the reference agrees with the case
        assert dtype_name(backend, load(backend, path, dtype="auto")) == want, keys
        assert dtype_name(backend, load(backend, path)) == "float32"  # only "auto" reads the config
    path = tmp_path / "bad"
    spec_io.save_safetensors_dir(path, weights, {**config.to_dict(), "torch_dtype": "int8"})
    with pytest.raises(ValueError, match="config.json has torch_dtype='int8'"):
        load(backend, path, dtype="auto")
    assert dtype_name(backend, load(backend, path, dtype="float16" if backend != "torch" else torch.float16)) \
        == "float16"


@pytest.mark.parametrize("saved", ["bfloat16", "float16"])
def test_flax_dtype_auto_is_the_checkpoints_dtype(tmp_path, saved):
    import jax.numpy as jnp
    import ml_dtypes

    from opt_flax import FlaxOPTForCausalLM

    config = VARIANTS["pre_ln"]
    np_dtype = ml_dtypes.bfloat16 if saved == "bfloat16" else np.float16
    spec_io.save_safetensors_dir(tmp_path, random_weights(config, "causal_lm", seed=5, dtype=np_dtype),
                                 config.to_saved_dict("OPTForCausalLM", saved))
    model = FlaxOPTForCausalLM.from_pretrained(tmp_path, dtype="auto", param_dtype="auto")
    assert model.dtype == jnp.dtype(saved) and model.param_dtype == jnp.dtype(saved)
    leaves = {leaf.dtype for leaf in __import__("jax").tree_util.tree_leaves(model.params)}
    assert leaves == {jnp.dtype(saved)}
    assert FlaxOPTForCausalLM.from_pretrained(tmp_path, dtype="auto").param_dtype == jnp.float32  # as asked
    ref = transformers.OPTForCausalLM.from_pretrained(tmp_path, dtype="auto", attn_implementation="eager").eval()
    assert str(ref.dtype) == f"torch.{saved}"
    ids, mask = batch(config)
    got, want = numpy(model(ids, attention_mask=mask).logits), numpy(hf_run(ref, ids, mask).logits)
    scale = np.abs(want[mask == 1]).max()
    assert max_abs_diff(got, want, mask) <= 0.05 * scale  # both in half precision


# ---------------------------------------------------------------------------------- gradient checkpointing
def train_step(backend: str, model, ids, mask, seed: int):
    """(output, {canonical name: gradient (canonical layout)}) of the causal LM loss in training mode, dropout
    drawn from `seed` (torch's generator, TF's global generator, a JAX key)."""
    labels = np.where(mask == 1, ids, -100)
    if backend == "torch":
        model.train()
        model.zero_grad()
        torch.manual_seed(seed)
        out = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), labels=torch.as_tensor(labels))
        out.loss.backward()
        return out, {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    if backend == "tf":
        import tensorflow as tf

        from opt_spec.layouts import from_native
        from opt_tf.checkpoint import variable_map

        variables = variable_map(model)
        tf.random.get_global_generator().reset_from_seed(seed)
        with tf.GradientTape() as tape:
            out = model(ids, attention_mask=mask, labels=labels, training=True)
        grads = tape.gradient(out.loss, [var for _, var in variables.values()])
        return out, {name: from_native(spec, tf.convert_to_tensor(g).numpy(), "keras")
                     for (name, (spec, _)), g in zip(variables.items(), grads)}
    import jax

    from opt_flax import params_to_canonical

    def loss(params):
        out = model(ids, attention_mask=mask, labels=labels, params=params, deterministic=False,
                    dropout_rng=jax.random.PRNGKey(seed))
        return out.loss, out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(model.params)
    return out, params_to_canonical(grads, model.config, model.head)


def layer_runs(backend: str, model, ids, mask) -> int:
    """How often the first decoder layer runs in one training forward and backward pass."""
    if backend == "flax":  # traced: a recomputed layer is an nn.remat (jax.checkpoint) in the gradient's program
        import jax

        def loss(params):
            return model(ids, attention_mask=mask, labels=ids, params=params, deterministic=False,
                         dropout_rng=jax.random.PRNGKey(0)).loss
        eqns = jax.make_jaxpr(jax.grad(loss))(model.params).jaxpr.eqns
        remats = sum(e.primitive.name in ("remat2", "checkpoint") for e in eqns)
        assert remats in (0, model.config.num_hidden_layers)
        return 1 + remats // model.config.num_hidden_layers
    calls = []
    if backend == "torch":
        layer = model.model.decoder.layers[0]
        handle = layer.register_forward_pre_hook(lambda module, args: calls.append(1))
        train_step(backend, model, ids, mask, seed=0)
        handle.remove()
    else:
        block = model.model.decoder.layers[0]
        call = block.call
        block.call = lambda *args, **kwargs: calls.append(1) or call(*args, **kwargs)
        train_step(backend, model, ids, mask, seed=0)
        del block.call
    return len(calls)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_checkpointing_recomputes_every_layer(checkpoints, backend):
    """Each layer runs again in the backward pass, also with labels and the config's use_cache=True (the
    cache is off in training, as in Hugging Face); disable() brings back one run."""
    model = load(backend, checkpoints("pre_ln"))
    ids, mask = batch(VARIANTS["pre_ln"])
    assert not model.is_gradient_checkpointing
    assert layer_runs(backend, model, ids, mask) == 1
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    assert layer_runs(backend, model, ids, mask) == 2
    out, _ = train_step(backend, model, ids, mask, seed=0)
    assert out.past_key_values is None
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    assert layer_runs(backend, model, ids, mask) == 1


def assert_grads_close(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys()
    for name in a:
        assert max_abs_diff(a[name], b[name]) <= tol * max(1.0, float(np.abs(b[name]).max())), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_checkpointing_replays_dropout(checkpoints, backend):
    """With dropout (residual 0.2, attention 0.1) and a fixed seed the recomputed layers draw the masks of
    the first pass: the gradients equal those without checkpointing; another seed gives others."""
    model = load(backend, checkpoints("pre_ln", dropout=True))
    ids, mask = batch(VARIANTS["pre_ln"])
    _, plain = train_step(backend, model, ids, mask, seed=3)
    _, other_seed = train_step(backend, model, ids, mask, seed=4)
    model.gradient_checkpointing_enable()
    out, checkpointed = train_step(backend, model, ids, mask, seed=3)
    assert_grads_close(checkpointed, plain, 1e-5)
    name = "model.decoder.layers.0.fc1.weight"
    assert max_abs_diff(other_seed[name], plain[name]) > 1e-3  # dropout does act


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_checkpointing_gradients_equal_hugging_face(checkpoints, backend):
    path = checkpoints("post_ln_proj")
    model = load(backend, path)
    model.gradient_checkpointing_enable()
    # unpadded: after a left pad the first real token is predicted from the last pad position, whose logits
    # are not Hugging Face's (a pad query sees itself here, every key there)
    ids, mask = batch(VARIANTS["post_ln_proj"], left_pad=(0, 0, 0))
    out, grads = train_step(backend, model, ids, mask, seed=0)
    ref = hugging_face(path)
    ref.gradient_checkpointing_enable()
    ref.train()
    labels = torch.as_tensor(np.where(mask == 1, ids, -100))
    want = ref(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), labels=labels)
    want.loss.backward()
    assert abs(float(numpy(out.loss)) - want.loss.item()) <= 1e-5 * want.loss.item()
    assert_grads_close(grads, {n: p.grad.numpy() for n, p in ref.named_parameters()}, 2e-5)


# ------------------------------------------------------------------------------------ resize_token_embeddings
def embedding(backend: str, model) -> np.ndarray:
    if backend == "torch":
        return model.get_input_embeddings().weight.detach().numpy()
    if backend == "tf":
        return model.get_input_embeddings().embeddings.numpy()
    return np.asarray(model.params["model"]["decoder"]["embed_tokens"]["embedding"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, size", [("pre_ln", {"new_num_tokens": 109}), ("untied_head", {"new_num_tokens": 109}),
                                        ("untied_head", {"new_num_tokens": 80}),
                                        ("pre_ln", {"new_num_tokens": 97, "pad_to_multiple_of": 16})])
def test_resize_token_embeddings_matches_hugging_face(checkpoints, tmp_path, backend, name, size):
    """Kept rows unchanged, added rows the old rows' mean (to 1e-9 of their covariance, as transformers),
    a tied head follows, config.vocab_size updated; the resized model saves a checkpoint Hugging Face reads."""
    path = checkpoints(name)
    model, ref = load(backend, path), hugging_face(path)
    old = embedding(backend, model)
    model.resize_token_embeddings(**size)
    ref.resize_token_embeddings(**size)
    V = ref.config.vocab_size
    assert V == {109: 109, 80: 80, 97: 112}[size["new_num_tokens"]]
    assert model.config.vocab_size == V and embedding(backend, model).shape == (V, VARIANTS[name].hidden_size)
    keep = min(V, old.shape[0])
    assert np.array_equal(embedding(backend, model)[:keep], old[:keep])
    if V > old.shape[0]:
        np.testing.assert_allclose(embedding(backend, model)[keep:], ref.get_input_embeddings().weight[keep:].detach(),
                                   atol=2e-4)
    if backend == "torch" and name == "pre_ln":
        assert model.lm_head.weight is model.get_input_embeddings().weight
    ids, mask = batch(VARIANTS[name])
    ids = np.minimum(ids, V - 1)  # tokens of the smaller vocabulary
    got, want = numpy(run(backend, model, ids, mask).logits), numpy(hf_run(ref, ids, mask).logits)
    assert got.shape == want.shape == (*ids.shape, V)
    assert max_abs_diff(got[..., :keep], want[..., :keep], mask) <= 1e-5
    assert max_abs_diff(got, want, mask) <= 2e-3  # the added rows agree to their 1e-9-covariance noise
    model.save_pretrained(tmp_path)
    saved = transformers.OPTForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert max_abs_diff(got, numpy(hf_run(saved, ids, mask).logits), mask) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_without_mean_resizing_draws_opt_init_and_refuses_losing_special_ids(checkpoints, backend):
    model = load(backend, checkpoints("untied_head"))
    old = embedding(backend, model)
    model.resize_token_embeddings(old.shape[0] + 400, mean_resizing=False)
    new = embedding(backend, model)[old.shape[0]:]
    assert np.array_equal(embedding(backend, model)[:old.shape[0]], old)
    assert abs(new.std() / model.config.init_std - 1) < 0.05 and abs(new.mean()) < 2e-3  # normal(0, init_std)
    with pytest.raises(ValueError, match="pad_token_id"):
        model.resize_token_embeddings(1)


# -------------------------------------------------------------------------------------------- PEFT (torch)
def lora_config():
    import peft

    return peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, lora_dropout=0.0)


def test_peft_lora_builds_trains_generates_and_merges(checkpoints):
    import peft

    from opt_torch import OPTForCausalLM
    from opt_torch.fast_paths import modules_are_stock

    path = checkpoints("pre_ln")
    lora = peft.get_peft_model(OPTForCausalLM.from_pretrained(path), lora_config())
    assert isinstance(lora, peft.PeftModelForCausalLM)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}  # peft's default targets for OPT
    ids, mask = (torch.as_tensor(a) for a in batch(VARIANTS["pre_ln"]))
    labels = torch.where(mask == 1, ids, -100)
    with torch.no_grad():
        before = lora(input_ids=ids, attention_mask=mask).logits
    lora.train()
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    lora.eval()
    with torch.no_grad():
        logits = lora(input_ids=ids, attention_mask=mask).logits
    assert max_abs_diff(logits, before, mask) > 1e-3  # the step moved the adapter
    tokens = lora.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6)

    ref = peft.get_peft_model(hugging_face(path), lora_config())  # Hugging Face's OPT with the same adapter
    peft.set_peft_model_state_dict(ref, peft.get_peft_model_state_dict(lora))
    ref.eval()
    with torch.no_grad():
        assert max_abs_diff(logits, ref(input_ids=ids, attention_mask=mask).logits, mask) <= 1e-5
    assert torch.equal(tokens, ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False))

    merged = lora.merge_and_unload()
    assert isinstance(merged, OPTForCausalLM) and modules_are_stock(merged)
    with torch.no_grad():
        assert max_abs_diff(merged(ids, attention_mask=mask).logits, logits, mask) <= 1e-5
    assert torch.equal(merged.generate(ids, attention_mask=mask, max_new_tokens=6), tokens)


def prompt_learning_config(kind: str):
    import peft

    if kind == "prompt_tuning":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=32)


@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning"])
def test_peft_prompt_learning_trains_and_generates_as_on_hugging_faces_opt(checkpoints, kind):
    """PEFT's learned prompts (embeddings put before the prompt's, by its forward and by the first step of its
    generate): the same loss, prompt gradients and tokens (greedy, beams, a length limit) as PEFT on Hugging
    Face's OPT with the same prompt weights, and not the tokens of the model without them."""
    import peft

    from opt_torch import OPTForCausalLM

    path = checkpoints("pre_ln")
    ours = peft.get_peft_model(OPTForCausalLM.from_pretrained(path), prompt_learning_config(kind))
    ref = peft.get_peft_model(hugging_face(path), prompt_learning_config(kind))
    ref.prompt_encoder.load_state_dict(ours.prompt_encoder.state_dict())  # P-tuning's MLP included
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_encoder.") for n in trainable)
    ids, mask = (torch.as_tensor(a) for a in batch(VARIANTS["pre_ln"]))
    labels = torch.where(mask == 1, ids, -100)
    losses, grads = [], []
    for model in (ours.eval(), ref.eval()):  # eval: no dropout draws, gradients all the same
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() == trainable
    for name in trainable:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)
    for settings in (dict(max_new_tokens=6), dict(max_new_tokens=5, num_beams=3), dict(max_length=ids.shape[1] + 4)):
        tokens = ours.generate(input_ids=ids, attention_mask=mask, **settings)
        want = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, **settings)
        assert torch.equal(tokens, want), settings
    plain = ours.get_base_model().generate(ids, attention_mask=mask, max_new_tokens=6)
    assert not torch.equal(plain, ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6))


def prefix_tuning_pair(path, num_virtual_tokens=4):
    """PEFT's prefix tuning on optkit's OPT and on Hugging Face's, with the same prefix weights."""
    import peft

    from opt_torch import OPTForCausalLM

    def config():
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)

    ours = peft.get_peft_model(OPTForCausalLM.from_pretrained(path), config())
    ref = peft.get_peft_model(hugging_face(path), config())
    torch.nn.init.normal_(ours.prompt_encoder.default.embedding.weight, std=0.5)  # a prefix that changes tokens
    ref.prompt_encoder.load_state_dict(ours.prompt_encoder.state_dict())
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("name", ["pre_ln", "post_ln_proj"])
def test_peft_prefix_tuning_trains_and_generates_as_on_hugging_faces_opt(checkpoints, name):
    """PEFT's prefix tuning (learned keys and values of virtual positions, handed to the model as a Hugging Face
    DynamicCache by its forward and by the first step of its generate): the same loss and prefix gradients,
    the same tokens (greedy, beams with several returned, a length limit) and the same per-step scores,
    hidden states and attentions as PEFT on Hugging Face's OPT; not the tokens of the model without it."""
    ours, ref = prefix_tuning_pair(checkpoints(name))
    ids, mask = (torch.as_tensor(a) for a in batch(VARIANTS[name]))
    labels = torch.where(mask == 1, ids, -100)
    losses, grads = [], []
    for model in (ours, ref):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert list(grads[0]) == list(grads[1]) == ["prompt_encoder.default.embedding.weight"]
    torch.testing.assert_close(grads[0]["prompt_encoder.default.embedding.weight"],
                               grads[1]["prompt_encoder.default.embedding.weight"], rtol=1e-4, atol=1e-6)
    ours.get_base_model().gradient_checkpointing_enable()  # kept with a prefix (Hugging Face drops the prefix)
    with torch.no_grad():
        assert float(ours.train()(input_ids=ids, attention_mask=mask, labels=labels).loss) == pytest.approx(
            losses[0], rel=1e-6)
    ours.get_base_model().gradient_checkpointing_disable()
    ours.eval()
    for settings in (dict(max_new_tokens=6), dict(max_new_tokens=5, num_beams=3, num_return_sequences=2),
                     dict(max_length=ids.shape[1] + 4)):
        tokens = ours.generate(input_ids=ids, attention_mask=mask, **settings)
        assert torch.equal(tokens, ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, **settings))
    plain = ours.get_base_model().generate(ids, attention_mask=mask, max_new_tokens=6)
    assert not torch.equal(plain, ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6))

    for beams in (1, 3):  # the returned rows, or each step's running beams
        record = dict(max_new_tokens=4, num_beams=beams, return_dict_in_generate=True, output_scores=True,
                      output_hidden_states=True, output_attentions=True)
        got = ours.generate(input_ids=ids, attention_mask=mask, **record)
        want = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, **record)
        assert torch.equal(got.sequences, want.sequences)
        real = mask.bool().repeat_interleave(beams, 0)
        for step in range(4):
            assert max_abs_diff(got.scores[step], want.scores[step]) <= 1e-4
            rows = real if step == 0 else torch.ones(len(real), 1, dtype=torch.bool)  # the step's query positions
            for a, b in zip(got.hidden_states[step], want.hidden_states[step], strict=True):
                assert a.shape == b.shape and max_abs_diff(a, b, rows) <= 1e-5
            keys = 4 + ids.shape[1] + step  # the prefix, the prompt and the tokens before this one
            for a, b in zip(got.attentions[step], want.attentions[step], strict=True):
                assert a.shape == b.shape == (len(real), VARIANTS[name].num_attention_heads, rows.shape[1], keys)
                assert max_abs_diff(a.transpose(1, 2), b.transpose(1, 2), rows) <= 1e-5


def test_peft_prefix_tuning_with_prompt_lookup_and_an_assistant(checkpoints):
    """Prefix tuning with assisted decoding: prompt lookup gives greedy decoding's tokens (Hugging Face's
    assisted decoding fails under PEFT's prefix there), and an assistant model, which cannot read the prefix,
    is refused in words."""
    from opt_torch import OPTForCausalLM

    path = checkpoints("pre_ln")
    ours, _ = prefix_tuning_pair(path)
    ids, mask = (torch.as_tensor(a) for a in batch(VARIANTS["pre_ln"]))
    greedy = ours.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=10)
    assert torch.equal(ours.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=10,
                                     prompt_lookup_num_tokens=2), greedy)
    with pytest.raises(ValueError, match="cannot read the prefix"):
        ours.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=3,
                      assistant_model=OPTForCausalLM.from_pretrained(path))


def test_a_hugging_face_dynamic_cache_is_read_and_written_as_in_hugging_face(checkpoints):
    """A DynamicCache passed as past_key_values (code written for transformers): Hugging Face's documented decode
    loop (the same object passed each step, with cache_position) gives Hugging Face's logits, and the cache holds
    what Hugging Face's would; a cache that does not fit the model, another kind of Hugging Face cache, a
    cache_position other than the cache's next slots and a head_mask are refused in words."""
    from opt_torch import OPTForCausalLM

    path = checkpoints("pre_ln")
    config = VARIANTS["pre_ln"]
    ours, ref = OPTForCausalLM.from_pretrained(path).eval(), hugging_face(path)
    ids, mask = (torch.as_tensor(a) for a in batch(config))
    caches, logits = [transformers.DynamicCache(), transformers.DynamicCache()], [[], []]
    with torch.no_grad():
        for model, cache, out in zip((ours, ref), caches, logits):  # Hugging Face's documented loop
            step_ids, step_mask, position = ids, mask, torch.arange(ids.shape[1])
            for _ in range(3):
                result = model(input_ids=step_ids, attention_mask=step_mask, past_key_values=cache, use_cache=True,
                               cache_position=position)
                assert result.past_key_values is cache
                out.append(result.logits[:, -1])
                step_ids = result.logits[:, -1].argmax(-1, keepdim=True)
                step_mask = torch.cat([step_mask, torch.ones_like(step_ids)], dim=1)
                position = position[-1:] + 1
    for a, b in zip(*logits):
        assert max_abs_diff(a, b) <= 1e-5
    assert caches[0].get_seq_length() == caches[1].get_seq_length() == ids.shape[1] + 2
    for (k0, v0), (k1, v1) in zip(caches[0], caches[1], strict=True):
        keys = mask.bool()[:, None, :, None].expand(-1, config.num_attention_heads, -1, config.head_dim)
        assert max_abs_diff(k0[:, :, :ids.shape[1]], k1[:, :, :ids.shape[1]], keys) <= 1e-5
        assert max_abs_diff(v0[:, :, ids.shape[1]:], v1[:, :, ids.shape[1]:]) <= 1e-5

    with pytest.raises(ValueError, match="2 layers x 3 rows"):  # 3 rows written, 2 given
        ours(input_ids=ids[:2], attention_mask=torch.ones(2, ids.shape[1] + 3, dtype=torch.long),
             past_key_values=caches[0])
    half = transformers.DynamicCache([(k.half(), v.half()) for k, v in caches[1]])
    with pytest.raises(ValueError, match="float32"):
        ours(input_ids=ids[:, :1], past_key_values=half)
    static = transformers.StaticCache(config=ref.config, max_cache_len=16)
    with pytest.raises(TypeError, match="StaticCache"):
        ours(input_ids=ids, attention_mask=mask, past_key_values=static)
    with pytest.raises(ValueError, match=r"cache_position is \[3\]; the cache holds 11 tokens"):  # a static write
        ours(input_ids=ids[:, :1], past_key_values=caches[0], cache_position=torch.tensor([3]))
    with pytest.raises(ValueError, match="head_mask is not supported"):  # Hugging Face's OPT ignores it
        ours(input_ids=ids, head_mask=torch.zeros(config.num_hidden_layers, config.num_attention_heads))


def test_generate_reuses_a_cache_of_the_prompts_first_tokens(checkpoints):
    """generate(past_key_values=cache of input_ids[:, :C]) (Hugging Face's prompt re-use), with the model's own
    KVCache or a DynamicCache filled by Hugging Face's model: the tokens of a call without it (greedy, beams with
    several returned, sampling with a seed, prompt lookup, an assistant), per-step records as Hugging Face's generate gives them
    with its cache (step 0 covers the T - C positions fed), and the given cache left as it was (Hugging Face's
    grows, which is why its users copy it first)."""
    import copy

    from opt_torch import OPTForCausalLM

    path, C = checkpoints("pre_ln"), 7
    ours, ref = OPTForCausalLM.from_pretrained(path).eval(), hugging_face(path)
    ids, mask = (torch.as_tensor(a) for a in batch(VARIANTS["pre_ln"]))  # left-padded by 0, 3 and 5
    with torch.no_grad():
        mine = ours(ids[:, :C], attention_mask=mask[:, :C], use_cache=True).past_key_values
        theirs = ref(ids[:, :C], attention_mask=mask[:, :C], use_cache=True).past_key_values
    for settings in (dict(max_new_tokens=6), dict(max_new_tokens=5, num_beams=3, num_return_sequences=2),
                     dict(max_new_tokens=6, do_sample=True, seed=4, top_k=5)):
        plain = ours.generate(ids, attention_mask=mask, **settings)
        for cache in (mine, theirs):
            assert torch.equal(ours.generate(ids, attention_mask=mask, past_key_values=cache, **settings), plain)
    assert mine.length == theirs.get_seq_length() == C
    one = ours(ids[:1, :C], use_cache=True).past_key_values
    greedy = ours.generate(ids[:1], max_new_tokens=8)
    assert torch.equal(ours.generate(ids[:1], max_new_tokens=8, prompt_lookup_num_tokens=2, past_key_values=one),
                       greedy)
    assistant = OPTForCausalLM.from_config(VARIANTS["pre_ln"], seed=1)  # reads the whole prompt itself
    assert torch.equal(ours.generate(ids[:1], max_new_tokens=8, assistant_model=assistant, past_key_values=one),
                       greedy)

    record = dict(max_new_tokens=4, return_dict_in_generate=True, output_scores=True, output_hidden_states=True,
                  output_attentions=True)
    got = ours.generate(ids, attention_mask=mask, past_key_values=mine, **record)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, past_key_values=copy.deepcopy(theirs), do_sample=False, **record)
    assert torch.equal(got.sequences, want.sequences)
    real = mask[:, C:].bool()
    for step in range(4):
        assert max_abs_diff(got.scores[step], want.scores[step]) <= 1e-4
        rows = real if step == 0 else torch.ones(len(ids), 1, dtype=torch.bool)
        for a, b in zip(got.hidden_states[step] + got.attentions[step], want.hidden_states[step] +
                        want.attentions[step], strict=True):
            assert a.shape == b.shape and max_abs_diff(a.transpose(1, -2) if a.dim() == 4 else a,
                                                        b.transpose(1, -2) if b.dim() == 4 else b, rows) <= 1e-5
    beams = dict(record, num_beams=3)  # Hugging Face's beam search cannot take a cache (its rows are not expanded)
    got, plain = (ours.generate(ids, attention_mask=mask, past_key_values=c, **beams) for c in (mine, None))
    assert torch.equal(got.sequences, plain.sequences)
    for step in range(4):
        for a, b in zip(got.hidden_states[step] + got.attentions[step], plain.hidden_states[step] +
                        plain.attentions[step], strict=True):
            b = b[..., C:, :] if step == 0 else b  # the positions fed at step 0
            assert a.shape == b.shape and max_abs_diff(a, b) <= 1e-5

    with pytest.raises(ValueError, match="holds 9 tokens and the prompt has 9"):
        ours.generate(ids, attention_mask=mask, past_key_values=ours(ids, attention_mask=mask, use_cache=True)
                      .past_key_values)
    with pytest.raises(ValueError, match=r"each \(batch 2"):
        ours.generate(ids[:2], attention_mask=mask[:2], past_key_values=mine)
    with pytest.raises(ValueError, match="not with inputs_embeds"):
        ours.generate(inputs_embeds=ours.get_input_embeddings()(ids).detach(), attention_mask=mask,
                      past_key_values=mine)
    with pytest.raises(TypeError, match="StaticCache"):
        ours.generate(ids, attention_mask=mask, past_key_values=transformers.StaticCache(config=ref.config,
                                                                                         max_cache_len=16))


def test_hugging_faces_trainer_trains_saves_and_resumes_as_with_its_own_opt(checkpoints, tmp_path):
    """transformers.Trainer on optkit's OPT (a full fine-tune: 3 AdamW updates of 2 accumulated micro-batches of
    unequal size, a checkpoint after 2, a resume from it) logs the losses it logs on Hugging Face's OPT with the
    same weights and data (the loss divided by Trainer's num_items_in_batch, as there), and its checkpoint
    holds the trained weights. Trainer saves a model that is not a transformers PreTrainedModel as a bare state
    dict: safetensors' save_file refuses tied (and transposed) tensors there, so such a run sets
    save_safetensors=False."""
    from opt_torch import OPTForCausalLM

    path = checkpoints("pre_ln")
    ids, mask = batch(VARIANTS["pre_ln"], left_pad=(0, 0, 0))
    prompt = [0, 3, 5]  # labels counted from there (a prompt's are not trained on): micro-batches count unequally
    rows = [dict(input_ids=torch.as_tensor(i), attention_mask=torch.as_tensor(m),
                 labels=torch.as_tensor(np.where(np.arange(len(i)) >= p, i, -100)))
            for i, m, p in zip(ids, mask, prompt)]

    def train(model, out, resume=None):
        args = transformers.TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=3,
                                              gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1,
                                              save_steps=2, report_to=[], use_cpu=True, save_safetensors=False,
                                              disable_tqdm=True, seed=3)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train(resume_from_checkpoint=resume)
        return [log["loss"] for log in trainer.state.log_history if "loss" in log], trainer

    ours_losses, ours = train(OPTForCausalLM.from_pretrained(path), tmp_path / "ours")
    hf_losses, hf = train(hugging_face(path).train(), tmp_path / "hf")
    assert len(ours_losses) == 3 and ours_losses == pytest.approx(hf_losses, rel=1e-4)
    assert ours.state.total_flos == hf.state.total_flos > 0  # summed floating_point_ops of every micro-batch
    resumed_losses, resumed = train(OPTForCausalLM.from_pretrained(path), tmp_path / "ours",
                                    resume=str(tmp_path / "ours" / "checkpoint-2"))
    assert resumed_losses == pytest.approx(ours_losses, rel=1e-4)  # two restored from the checkpoint, one new
    saved = torch.load(tmp_path / "ours" / "checkpoint-3" / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in resumed.model.state_dict().items())


@pytest.mark.parametrize("name", ["pre_ln", "untied_head", "post_ln_proj"])
def test_floating_point_ops_and_name_or_path_are_hugging_faces(checkpoints, tmp_path, name):
    """floating_point_ops (Trainer's total_flos) and name_or_path (PEFT's base_model_name_or_path) as
    transformers gives them."""
    import peft

    from opt_torch import OPTForCausalLM

    path = checkpoints(name)
    ours, theirs = OPTForCausalLM.from_pretrained(path), hugging_face(path)
    ids, mask = (torch.as_tensor(a) for a in batch(VARIANTS[name]))
    for inputs in ({"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:1, :4]}):
        for exclude in (True, False):
            assert ours.floating_point_ops(inputs, exclude) == theirs.floating_point_ops(inputs, exclude) > 0
    with pytest.warns(UserWarning, match="no input_ids"):
        assert ours.floating_point_ops({"inputs_embeds": torch.zeros(1, 2, 3)}) == 0

    assert ours.name_or_path == theirs.name_or_path == str(path)
    assert OPTForCausalLM.from_config(VARIANTS[name]).name_or_path == ""
    assert OPTForCausalLM.from_pretrained(os.fspath(path)).name_or_path == str(path)
    peft.get_peft_model(ours, lora_config()).save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(path)


def test_setting_embeddings_heads_and_decoders_as_hugging_face(checkpoints, tmp_path):
    """set_input_embeddings / set_output_embeddings / set_decoder give Hugging Face's logits after the same
    swaps (and its tie_weights); a tied head follows a new embedding; modules that do not fit are refused."""
    from opt_torch import OPTForCausalLM, OPTModel

    def fresh(rows: int, cols: int, seed: int, cls=torch.nn.Embedding):
        torch.manual_seed(seed)
        module = cls(cols, rows, bias=False) if cls is torch.nn.Linear else cls(rows, cols)
        torch.nn.init.normal_(module.weight, std=0.1)
        return module

    for name in ("pre_ln", "untied_head", "post_ln_proj"):
        config = VARIANTS[name]
        shape = (config.vocab_size, config.word_embed_proj_dim)
        path = checkpoints(name)
        ours, theirs = OPTForCausalLM.from_pretrained(path), hugging_face(path)
        assert ours.get_decoder() is ours.model.decoder and OPTModel.from_pretrained(path).get_decoder().layers
        ids, mask = batch(config)
        embedding = fresh(*shape, seed=1)
        ours.set_input_embeddings(embedding)
        theirs.set_input_embeddings(copy.deepcopy(embedding))
        if not config.tie_word_embeddings:
            head = fresh(*shape, seed=2, cls=torch.nn.Linear)
            ours.set_output_embeddings(head)
            theirs.set_output_embeddings(copy.deepcopy(head))
        theirs.tie_weights()
        assert ours.get_input_embeddings() is embedding
        assert (ours.lm_head.weight is embedding.weight) == config.tie_word_embeddings
        got = numpy(run("torch", ours, ids, mask).logits)
        assert max_abs_diff(got, numpy(hf_run(theirs, ids, mask).logits), mask) <= 1e-5
        assert torch.equal(ours.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=4),
                           theirs.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                                           max_new_tokens=4, do_sample=False))
        ours.save_pretrained(tmp_path / name)
        again = OPTForCausalLM.from_pretrained(tmp_path / name)
        assert max_abs_diff(numpy(run("torch", again, ids, mask).logits), got, mask) == 0

        other = OPTForCausalLM.from_config(config, seed=7).eval()
        ours.set_decoder(other.get_decoder())
        if not config.tie_word_embeddings:
            ours.set_output_embeddings(other.lm_head)
        assert max_abs_diff(numpy(run("torch", ours, ids, mask).logits), numpy(run("torch", other, ids, mask).logits),
                            mask) == 0

    tied = OPTForCausalLM.from_pretrained(checkpoints("pre_ln"))
    with pytest.raises(ValueError, match=r"\(96, 16\); the model's config needs \(96, 32\).*resize_token_embeddings"):
        tied.set_input_embeddings(fresh(96, 16, seed=3))
    with pytest.raises(TypeError, match="nn.Module with a weight"):
        tied.set_input_embeddings(torch.zeros(96, 32))
    with pytest.raises(ValueError, match="tie_word_embeddings is True"):
        tied.set_output_embeddings(fresh(96, 32, seed=4, cls=torch.nn.Linear))
    with pytest.raises(ValueError, match="OPTDecoder of the model's config"):
        tied.set_decoder(OPTForCausalLM.from_config(VARIANTS["no_bias"]).get_decoder())
    with pytest.raises(AttributeError, match="no LM head"):
        OPTModel.from_config(VARIANTS["pre_ln"]).set_output_embeddings(fresh(96, 32, seed=4, cls=torch.nn.Linear))


@pytest.mark.parametrize("name", ["pre_ln", "untied_head", "post_ln_proj"])
def test_parameter_counts_and_memory_footprint_are_hugging_faces(checkpoints, name):
    import peft

    from opt_torch import OPTForCausalLM, OPTModel

    path = checkpoints(name)
    for dtype in (torch.float32, torch.bfloat16):
        ours, theirs = OPTForCausalLM.from_pretrained(path, dtype=dtype), hugging_face(path).to(dtype)
        for kwargs in ({}, {"exclude_embeddings": True}, {"only_trainable": True}):
            assert ours.num_parameters(**kwargs) == theirs.num_parameters(**kwargs), kwargs
        for buffers in (True, False):
            assert ours.get_memory_footprint(buffers) == theirs.get_memory_footprint(buffers)
    assert ours.num_parameters(exclude_embeddings=True) < ours.num_parameters()
    assert ours.get_memory_footprint() == 2 * ours.num_parameters()  # bfloat16, no buffers
    lora, ref = (peft.get_peft_model(m, lora_config()) for m in (ours, theirs))
    assert 0 < lora.num_parameters(only_trainable=True) == ref.num_parameters(only_trainable=True) \
        < lora.num_parameters()
    assert OPTForCausalLM.can_generate() and not OPTModel.can_generate()


@pytest.mark.filterwarnings("ignore:.*freshly initialized")
@pytest.mark.parametrize("backend", ["tf", "flax"])
def test_tf_and_flax_sizes_and_name_or_path_are_hugging_faces(checkpoints, backend):
    """num_parameters, get_memory_footprint, floating_point_ops and name_or_path of the TF and Flax models, as
    transformers gives them for its PyTorch OPT with the same weights (float32 and bfloat16, every head, a tied
    and an untied LM head, 350m's projections); TF's only_trainable follows Keras' trainable flags."""
    import jax.numpy as jnp
    import tensorflow as tf

    for name in ("pre_ln", "untied_head", "post_ln_proj"):
        path = checkpoints(name)
        ids, mask = batch(VARIANTS[name])
        theirs = hugging_face(path)
        for dtype, jax_dtype in ((torch.float32, jnp.float32), (torch.bfloat16, jnp.bfloat16)):
            ours = load(backend, path, **(dict(dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
                                          if backend == "tf" else dict(param_dtype=jax_dtype)))
            theirs = theirs.to(dtype)
            for kwargs in ({}, {"exclude_embeddings": True}, {"only_trainable": True}):
                assert ours.num_parameters(**kwargs) == theirs.num_parameters(**kwargs), (name, dtype, kwargs)
            assert ours.get_memory_footprint() == theirs.get_memory_footprint()
            inputs = {"input_ids": tf.constant(ids) if backend == "tf" else jnp.asarray(ids), "attention_mask": mask}
            for exclude in (True, False):
                assert ours.floating_point_ops(inputs, exclude) == theirs.floating_point_ops(
                    {"input_ids": torch.as_tensor(ids)}, exclude) > 0
        assert ours.name_or_path == theirs.name_or_path == str(path)
    assert model_classes(backend)["causal_lm"].from_config(VARIANTS["pre_ln"]).name_or_path == ""
    for head in ("base", "sequence_classification", "question_answering"):
        assert load(backend, path, head).num_parameters() == hugging_face(path, head).num_parameters(), head
    if backend == "tf":  # Keras' flags: a frozen decoder leaves the LM head (tied: nothing) to train
        untied = load("tf", checkpoints("untied_head"))
        untied.model.trainable = False
        V, E = VARIANTS["untied_head"].vocab_size, VARIANTS["untied_head"].word_embed_proj_dim
        assert untied.num_parameters(only_trainable=True) == V * E < untied.num_parameters()


def test_peft_lora_with_gradient_checkpointing_gives_the_same_adapter_gradients(checkpoints):
    import peft

    from opt_torch import OPTForCausalLM

    path = checkpoints("pre_ln", dropout=True)
    ids, mask = (torch.as_tensor(a) for a in batch(VARIANTS["pre_ln"]))
    grads = []
    for checkpointing in (False, True):
        model = OPTForCausalLM.from_pretrained(path)
        if checkpointing:
            model.gradient_checkpointing_enable()  # peft then makes the embedding output require grad
        torch.manual_seed(0)
        lora = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))
        lora.train()
        lora(input_ids=ids, attention_mask=mask, labels=torch.where(mask == 1, ids, -100)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_prepare_inputs_for_generation_drives_a_decode_loop_like_generate(checkpoints):
    """A Hugging Face-style loop (prepare the inputs, forward with the cache, pick greedily, pad finished
    rows) over prepare_inputs_for_generation makes generate's tokens, and Hugging Face's."""
    from opt_torch import OPTForCausalLM

    path = checkpoints("post_ln_proj")
    model, ref = OPTForCausalLM.from_pretrained(path), hugging_face(path)
    ids, mask = (torch.as_tensor(a) for a in batch(VARIANTS["post_ln_proj"]))
    tokens, attention, past = ids, mask, None
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(8):
            inputs = model.prepare_inputs_for_generation(tokens, past_key_values=past, attention_mask=attention)
            assert inputs["input_ids"].shape[1] == (ids.shape[1] if past is None else 1)
            out = model(**inputs)
            past = out.past_key_values
            new = torch.where(finished, model.config.pad_token_id, out.logits[:, -1].argmax(-1))
            finished |= new == model.config.eos_token_id
            tokens = torch.cat([tokens, new[:, None]], 1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
    assert torch.equal(tokens, model.generate(ids, attention_mask=mask, max_new_tokens=8))
    assert torch.equal(tokens, ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False))
    embeds = model.get_input_embeddings()(ids)
    first = model.prepare_inputs_for_generation(ids, attention_mask=mask, inputs_embeds=embeds)
    assert first["inputs_embeds"] is embeds and "input_ids" not in first


def test_tf_gradient_checkpointing_under_xla_replays_dropout(checkpoints):
    """The same inside one XLA program (what Keras fit compiles): the seeds drawn before each layer are
    what its recomputation uses."""
    import tensorflow as tf

    model = load("tf", checkpoints("pre_ln", dropout=True))
    ids, mask = batch(VARIANTS["pre_ln"])
    labels = np.where(mask == 1, ids, -100)

    def step():
        with tf.GradientTape() as tape:
            loss = model(ids, attention_mask=mask, labels=labels, training=True).loss
        return loss, tape.gradient(loss, model.trainable_variables)

    results = []
    for checkpointing in (False, True):
        model.gradient_checkpointing_enable() if checkpointing else model.gradient_checkpointing_disable()
        tf.random.get_global_generator().reset_from_seed(3)
        loss, grads = tf.function(step, jit_compile=True)()  # traced anew: the setting is read when tracing
        results.append((float(loss), [tf.convert_to_tensor(g).numpy() for g in grads]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        assert max_abs_diff(a, b) <= 1e-6


TEXTS = ["the cat", "a dog sat on the"]


def pipeline_tokenizer(tmp_path):
    """transformers' fast GPT-2 tokenizer over a small BPE trained here, OPT's special tokens, padding left."""
    from . import test_tokenizer

    test_tokenizer.build_bpe(tmp_path / "tok")
    return transformers.GPT2TokenizerFast(vocab_file=str(tmp_path / "tok" / "vocab.json"),
                                          merges_file=str(tmp_path / "tok" / "merges.txt"), bos_token="</s>",
                                          eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="left")


def test_transformers_pipeline_generates_as_with_hugging_faces_opt(tmp_path):
    """transformers.pipeline("text-generation") on optkit's OPT: its defaults under generation_config.json's
    values, greedy and batched (left-padded) calls, return_full_text=False: Hugging Face's OPT's texts and ids."""
    from opt_torch import OPTForCausalLM

    tokenizer = pipeline_tokenizer(tmp_path)
    config = VARIANTS["pre_ln"].replace(vocab_size=len(tokenizer))
    for settings in (None, {"max_length": 30, "no_repeat_ngram_size": 2, "repetition_penalty": 1.3}):
        path = tmp_path / f"model-{settings is None}"
        spec_io.save_safetensors_dir(path, random_weights(config, "causal_lm", seed=5), config.to_dict())
        if settings:
            (path / "generation_config.json").write_text(json.dumps(settings))
        ours, theirs = (transformers.pipeline("text-generation", model=m, tokenizer=tokenizer)
                        for m in (OPTForCausalLM.from_pretrained(path), hugging_face(path)))
        for name in ("do_sample", "temperature", "max_new_tokens", "max_length", "no_repeat_ngram_size",
                     "repetition_penalty", "pad_token_id", "eos_token_id"):
            want = getattr(theirs.generation_config, name)
            assert getattr(ours.generation_config, name) == (None if (name, want) == ("max_length", 20) else want)
        limit = {} if settings else {"max_new_tokens": 6}  # the pipeline's default of 256 is past the positions
        for kwargs in (dict(return_tensors=True), dict(batch_size=2, return_full_text=False)):
            got, want = (pipe(TEXTS, do_sample=False, **limit, **kwargs) for pipe in (ours, theirs))
            assert got == want and len(got) == 2
    # the pipeline samples unless told not to; a file's max_length replaces its 256 new tokens (as there)
    assert ours.generation_config.do_sample and ours.generation_config.max_new_tokens is None
    assert len(got[1][0]["generated_text"]) > 0


def test_transformers_tf_pipeline_generates_as_with_hugging_faces_tf_opt(tmp_path):
    """transformers 4.57's TensorFlow text-generation pipeline takes optkit's TF OPT and gives Hugging Face's
    TFOPTForCausalLM's texts and ids (both start from the model's generation_config, as that pipeline does)."""
    from opt_tf import TFOPTForCausalLM

    from .hf_reference import hf_tf_causal_lm

    tokenizer = pipeline_tokenizer(tmp_path)
    config = VARIANTS["pre_ln"].replace(vocab_size=len(tokenizer))
    weights = random_weights(config, "causal_lm", seed=5)
    spec_io.save_safetensors_dir(tmp_path / "model", weights, config.to_dict())
    ours, theirs = (transformers.pipeline("text-generation", model=m, tokenizer=tokenizer, framework="tf")
                    for m in (TFOPTForCausalLM.from_pretrained(tmp_path / "model"), hf_tf_causal_lm(config, weights)))
    assert ours.generation_config.do_sample is theirs.generation_config.do_sample is False
    for kwargs in (dict(return_tensors=True), dict(return_full_text=False, no_repeat_ngram_size=2)):
        got, want = (pipe(TEXTS, max_new_tokens=5, **kwargs) for pipe in (ours, theirs))
        assert got == want and len(got) == 2
    assert len(got[1][0]["generated_text"]) > 0


def test_load_adapter_and_the_adapter_methods_as_transformers(checkpoints, tmp_path):
    """load_adapter / set_adapter / disable_adapters / get_adapter_state_dict / save_pretrained / delete_adapter on
    optkit's OPT give what transformers' PEFT integration gives on its OPT, with two LoRA adapters PEFT saved."""
    import peft

    from opt_torch import OPTForCausalLM

    path = checkpoints("pre_ln")
    for name, seed, targets in (("a", 0, ["q_proj", "v_proj"]), ("b", 1, ["fc1", "k_proj"])):
        torch.manual_seed(seed)
        config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=targets, init_lora_weights=False)
        peft.get_peft_model(hugging_face(path), config).save_pretrained(tmp_path / name)
    ours, theirs = OPTForCausalLM.from_pretrained(path), hugging_face(path)
    ids, mask = (torch.as_tensor(a) for a in batch(VARIANTS["pre_ln"]))

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    base = logits(ours)
    for model in (ours, theirs):
        model.load_adapter(tmp_path / "a")
        model.load_adapter(tmp_path / "b", adapter_name="b")
    assert ours.active_adapters() == ["default"]  # loading adds an adapter; transformers runs b where a is not
    for active in ("default", "b", ["default", "b"]):
        for model in (ours, theirs):
            model.set_adapter(active)
        assert ours.active_adapters() == theirs.active_adapters() == (active if isinstance(active, list) else [active])
        got = logits(ours)
        assert max_abs_diff(got, logits(theirs), mask) <= 1e-5 and max_abs_diff(got, base, mask) > 1e-2
        assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=4),
                           theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False))
    ours.disable_adapters()
    assert torch.equal(logits(ours), base)
    ours.enable_adapters()
    assert max_abs_diff(logits(ours), got, mask) == 0
    mine, hers = ours.get_adapter_state_dict("b"), theirs.get_adapter_state_dict("b")
    assert mine.keys() == hers.keys() and all(torch.equal(mine[k], hers[k]) for k in mine)

    for model in (ours, theirs):
        model.set_adapter("b")
    ours.save_pretrained(tmp_path / "saved")  # the active adapter, as PEFT writes it
    again = OPTForCausalLM.from_pretrained(path)
    again.load_adapter(tmp_path / "saved")
    assert max_abs_diff(logits(again), logits(ours), mask) == 0
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(path) and sorted(saved["target_modules"]) == ["fc1", "k_proj"]
    for model in (ours, theirs):
        model.delete_adapter("b")
        model.set_adapter("default")
    assert ours.active_adapters() == ["default"] and max_abs_diff(logits(ours), logits(theirs), mask) <= 1e-5
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        ours.set_adapter("b")
    with pytest.raises(ValueError, match="named 'default' is loaded already"):
        ours.load_adapter(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="a PEFT adapter's folder; load its base model, then model.load_adapter"):
        OPTForCausalLM.from_pretrained(tmp_path / "a")


def test_load_adapter_refuses_a_strangers_folder_and_keeps_the_model(checkpoints, tmp_path):
    """A rank the file's tensors do not have (which would allocate before reading), another PEFT kind, a
    tensor that does not fit, a missing tensor, a file outside the folder: refused in words, and the model
    keeps the adapters it had."""
    import peft

    from opt_spec.errors import CheckpointError
    from opt_torch import OPTForCausalLM

    path = checkpoints("pre_ln")
    torch.manual_seed(0)
    peft.get_peft_model(hugging_face(path), peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False)) \
        .save_pretrained(tmp_path / "good")
    good = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    tensors = dict(spec_io.SafetensorsFile(tmp_path / "good" / "adapter_model.safetensors"))

    def folder(name, settings=None, arrays=None, link=False):
        where = tmp_path / name
        where.mkdir()
        (where / "adapter_config.json").write_text(json.dumps({**good, **(settings or {})}))
        if link:
            (where / "adapter_model.safetensors").symlink_to(tmp_path / "good" / "adapter_model.safetensors")
        else:
            spec_io.write_safetensors(where / "adapter_model.safetensors", arrays or tensors)
        return where

    model = OPTForCausalLM.from_pretrained(path)
    model.load_adapter(tmp_path / "good", adapter_name="kept")
    ids, mask = (torch.as_tensor(a) for a in batch(VARIANTS["pre_ln"]))
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    first = next(iter(tensors))
    cases = [
        (folder("huge_rank", {"r": 10**9}), CheckpointError, "r is 1000000000; a rank must be .* at most 4"),
        (folder("pattern", {"rank_pattern": {"q_proj": 64}}), CheckpointError, r"rank_pattern\['q_proj'\] is 64"),
        (folder("ia3", {"peft_type": "IA3"}), CheckpointError, "peft_type is 'IA3'.*LoRA"),
        (folder("no_lora", arrays={"x.weight": np.zeros(2, np.float32)}), CheckpointError, "no LoRA weights"),
        (folder("outside", link=True), CheckpointError, "outside the checkpoint folder"),
        (folder("shape", arrays={**tensors, first: np.zeros((4, 7), np.float32)}), ValueError, "size mismatch"),
        (folder("missing", arrays={k: v for k, v in tensors.items() if k != first}), ValueError, "tensors missing"),
        (folder("extra", arrays={**tensors, "base_model.model.lm_head.lora_A.weight": tensors[first]}), ValueError,
         "no place for"),
    ]
    for where, error, message in cases:
        with pytest.raises(error, match=message):
            model.load_adapter(where, adapter_name="new")
        assert model.active_adapters() == ["kept"] and list(model.peft_config) == ["kept"], where.name
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_add_adapter_and_a_trainable_load_train_as_transformers(checkpoints, tmp_path):
    """add_adapter makes the adapter transformers makes (same seed, same tensors, the same parameters left
    trainable) and one SGD step moves both alike; load_adapter(is_trainable=True) leaves the adapter trainable."""
    import peft

    from opt_torch import OPTForCausalLM

    path = checkpoints("pre_ln")
    ids, mask = (torch.as_tensor(a) for a in batch(VARIANTS["pre_ln"], left_pad=(0, 0, 0)))  # a pad's logits
    # would predict the first real token, and a pad query attends differently here (README)
    labels = torch.where(mask == 1, ids, -100)
    states = []
    for model in (OPTForCausalLM.from_pretrained(path), hugging_face(path)):
        torch.manual_seed(3)
        model.add_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "fc2"], init_lora_weights="gaussian"),
                          adapter_name="t")
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)  # Adam's first
        # step would turn rounding noise in a zero gradient into a full-size update
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        states.append((model.active_adapters(), trainable, model.get_adapter_state_dict("t")))
    (active, trainable, mine), (their_active, their_trainable, hers) = states
    assert active == their_active == ["t"] and trainable == their_trainable and len(trainable) == 8
    assert mine.keys() == hers.keys() and all(torch.allclose(mine[k], hers[k], atol=1e-6) for k in mine)
    assert any(k.endswith("lora_B.weight") and mine[k].abs().max() > 1e-4 for k in mine)  # B starts at zero

    loaded = OPTForCausalLM.from_pretrained(path)
    loaded.save_pretrained(tmp_path / "plain")
    torch.manual_seed(0)
    peft.get_peft_model(hugging_face(path), peft.LoraConfig(r=4)).save_pretrained(tmp_path / "adapter")
    loaded.load_adapter(tmp_path / "adapter", is_trainable=True)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
        {n for n in dict(loaded.named_parameters()) if ".lora_" in n} != set()


@pytest.mark.parametrize("labels", [None, {"0": "negative", "1": "neutral", "2": "positive"}])
def test_classification_and_question_answering_pipelines_as_with_hugging_faces_opt(tmp_path, labels):
    """transformers' text-classification and question-answering pipelines on optkit's heads, PyTorch and
    TensorFlow (its TF pipelines; Hugging Face had no TF OPT heads): Hugging Face's labels (config.json's
    id2label, or LABEL_i), scores and answers on the same weights."""
    from opt_tf import TFOPTForQuestionAnswering, TFOPTForSequenceClassification
    from opt_torch import OPTForQuestionAnswering, OPTForSequenceClassification

    tokenizer = pipeline_tokenizer(tmp_path)
    config = VARIANTS["pre_ln"].replace(vocab_size=len(tokenizer))
    saved = {**config.to_dict(), **({"id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}}
                                    if labels else {})}
    for head, classes in (("sequence_classification", (OPTForSequenceClassification, TFOPTForSequenceClassification)),
                          ("question_answering", (OPTForQuestionAnswering, TFOPTForQuestionAnswering))):
        spec_io.save_safetensors_dir(tmp_path / head, random_weights(config, head, seed=5), saved)
        task = head.replace("sequence_", "text-").replace("_", "-")
        theirs = transformers.pipeline(task, model=hugging_face(tmp_path / head, head), tokenizer=tokenizer)
        for cls, framework in zip(classes, ("pt", "tf")):
            ours = transformers.pipeline(task, model=cls.from_pretrained(tmp_path / head), tokenizer=tokenizer,
                                         framework=framework)
            if head == "sequence_classification":
                got, want = (pipe(TEXTS, top_k=None) for pipe in (ours, theirs))
                assert [[r["label"] for r in row] for row in got] == [[r["label"] for r in row] for row in want]
                assert {r["label"] for r in got[0]} == set(labels.values() if labels else
                                                           ("LABEL_0", "LABEL_1", "LABEL_2"))
                assert np.allclose([[r["score"] for r in row] for row in got],
                                   [[r["score"] for r in row] for row in want], atol=1e-5)
            else:
                got, want = (pipe(question="what sat?", context="the cat sat on the mat", top_k=2)
                             for pipe in (ours, theirs))
                assert [(a["start"], a["end"], a["answer"]) for a in got] == \
                    [(a["start"], a["end"], a["answer"]) for a in want]
                assert np.allclose([a["score"] for a in got], [a["score"] for a in want], rtol=1e-4)
