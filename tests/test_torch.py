"""The PyTorch backend: structure, checkpoints, caching, padding, attention kernels, losses, dtypes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from opt_spec import OPTConfig, WeightMismatchError, weight_table
from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_batch, random_weights
from opt_spec.torch_pickle import UnsafePickleError
from opt_torch import OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification, OPTModel
from opt_torch.modeling import MODEL_CLASSES

from .conftest import HEADS, max_abs_diff

CLASSES = {head: MODEL_CLASSES[head] for head in MODEL_CLASSES}


def write_checkpoint(path, config, head="causal_lm", seed=0):
    spec_io.save_safetensors_dir(path, random_weights(config, head, seed), config.to_dict())
    return path


def load(path, head="causal_lm", **kwargs):
    return CLASSES[head].from_pretrained(path, **kwargs)


def batch(config, **kwargs):
    ids, mask = random_batch(config, **kwargs)
    return torch.from_numpy(ids).long(), torch.from_numpy(mask).long()


def main_output(out):
    return out.logits if hasattr(out, "logits") and out.logits is not None else \
        out.start_logits if hasattr(out, "start_logits") else out.last_hidden_state


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("head", HEADS)
def test_state_dict_equals_weight_table(name, head):
    config = VARIANTS[name]
    model = CLASSES[head](config)
    state = model.state_dict()
    table = weight_table(config, head)
    assert list(state) == [w.name for w in table]
    assert all(tuple(state[w.name].shape) == w.shape for w in table)


def test_from_config_initializes_like_opt():
    config = OPTConfig.from_preset("tiny").replace(init_std=0.05)
    model = OPTForCausalLM.from_config(config, seed=0)
    emb = model.model.decoder.embed_tokens.weight
    assert torch.all(emb[config.pad_token_id] == 0)
    assert abs(float(emb.detach().std()) - 0.05) < 0.01
    layer = model.model.decoder.layers[0]
    assert torch.all(layer.fc1.bias == 0) and torch.all(layer.self_attn_layer_norm.weight == 1)
    assert abs(float(layer.fc1.weight.detach().std()) - 0.05) < 0.01
    assert model.lm_head.weight is emb  # tied


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_save_load_round_trip_bit_exact(tmp_path, name):
    config = VARIANTS[name]
    model = load(write_checkpoint(tmp_path / "src", config))
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="10KB")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False, max_shard_size="15KB")
    assert len(os.listdir(tmp_path / "sharded")) > 3
    assert (tmp_path / "bin" / spec_io.TORCH_INDEX_NAME).exists()
    for d in ("single", "sharded", "bin"):
        again = load(tmp_path / d)
        assert again.config == config
        for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2), (d, k1)
    saved = json.loads((tmp_path / "single" / "config.json").read_text())
    assert saved["architectures"] == ["OPTForCausalLM"] and saved["torch_dtype"] == "float32"


def test_tied_head_is_not_stored_and_untied_is(tmp_path):
    tied = OPTForCausalLM.from_config(VARIANTS["pre_ln"])
    tied.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in spec_io.load_safetensors_dir(tmp_path / "tied")
    untied = OPTForCausalLM.from_config(VARIANTS["untied_head"])
    untied.save_pretrained(tmp_path / "untied")
    assert "lm_head.weight" in spec_io.load_safetensors_dir(tmp_path / "untied")
    loaded = OPTForCausalLM.from_pretrained(tmp_path / "untied")
    assert loaded.lm_head.weight is not loaded.model.decoder.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, untied.lm_head.weight)


def test_base_checkpoint_into_head_models_and_back(tmp_path):
    config = VARIANTS["pre_ln"]
    base = OPTModel.from_config(config, seed=3)
    base.save_pretrained(tmp_path / "base")
    assert all(k.startswith("decoder.") for k in spec_io.load_safetensors_dir(tmp_path / "base"))
    lm = OPTForCausalLM.from_pretrained(tmp_path / "base")  # tied head = embedding: nothing missing
    assert torch.equal(lm.model.decoder.layers[1].fc2.weight, base.decoder.layers[1].fc2.weight)
    with pytest.warns(UserWarning, match="score.weight not in"):
        cls = OPTForSequenceClassification.from_pretrained(tmp_path / "base")
    assert cls.score.weight.std() > 0
    with pytest.warns(UserWarning, match="qa_outputs.weight, qa_outputs.bias not in"):
        OPTForQuestionAnswering.from_pretrained(tmp_path / "base")
    lm.save_pretrained(tmp_path / "lm")
    back = OPTModel.from_pretrained(tmp_path / "lm")  # the head's weights are left out
    ids, mask = batch(config)
    with torch.no_grad():
        assert torch.equal(back(ids, mask).last_hidden_state, base(ids, mask).last_hidden_state)


def test_untied_head_missing_is_an_error(tmp_path):
    write_checkpoint(tmp_path, VARIANTS["pre_ln"])  # tied checkpoint without lm_head.weight
    config = VARIANTS["untied_head"]
    config.to_json_file(tmp_path / "config.json")
    with pytest.raises(WeightMismatchError, match="missing \\(1\\): lm_head.weight"):
        OPTForCausalLM.from_pretrained(tmp_path)
    # a base checkpoint has no head at all: an untied LM head is then initialized, with a warning
    base = OPTModel.from_config(config)
    base.save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match="lm_head.weight not in"):
        lm = OPTForCausalLM.from_pretrained(tmp_path / "base")
    assert lm.lm_head.weight is not lm.model.decoder.embed_tokens.weight


def test_bad_checkpoints_list_every_problem(tmp_path):
    config = VARIANTS["pre_ln"]
    weights = random_weights(config)
    del weights["model.decoder.layers.0.fc1.bias"]
    weights["model.decoder.layers.1.fc2.weight"] = weights["model.decoder.layers.1.fc2.weight"].T.copy()
    weights["model.decoder.extra.weight"] = np.zeros(2, np.float32)
    spec_io.save_safetensors_dir(tmp_path, weights, config.to_dict())
    with pytest.raises(WeightMismatchError) as err:
        OPTForCausalLM.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing (1): model.decoder.layers.0.fc1.bias" in msg
    assert "unexpected (1): model.decoder.extra.weight" in msg
    assert "wrong shape: model.decoder.layers.1.fc2.weight is (48, 32), expected (32, 48)" in msg
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        OPTForCausalLM.from_pretrained(tmp_path / "nope")


def test_unsafe_pickle_is_refused(tmp_path):
    config = VARIANTS["pre_ln"]
    config.to_json_file(tmp_path / "config.json")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafePickleError, match="pytorch_model.bin: refusing to load posix.system"):
        OPTForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("head", HEADS)
def test_eager_equals_sdpa(tmp_path, name, head):
    config = VARIANTS[name]
    path = write_checkpoint(tmp_path, config, head)
    ids, mask = batch(config)
    eager = load(path, head, attn_implementation="eager")
    sdpa = load(path, head, attn_implementation="sdpa")
    with torch.no_grad():
        a, b = main_output(eager(ids, mask)), main_output(sdpa(ids, mask))
    keep = mask if a.dim() >= 2 and a.shape[:2] == mask.shape else None
    assert max_abs_diff(a, b, keep) <= 1e-5


@pytest.mark.parametrize("name", ["pre_ln", "post_ln_proj", "no_bias"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_incremental_decoding_equals_full_forward(tmp_path, name, attn):
    config = VARIANTS[name]
    model = load(write_checkpoint(tmp_path, config), attn_implementation=attn)
    ids, mask = batch(config, length=10)
    with torch.no_grad():
        full = model(ids, mask).logits
        out = model(ids[:, :6], mask[:, :6], use_cache=True)
        steps = [out.logits]
        past = out.past_key_values
        for t in range(6, 10, 2):  # two tokens at a time, the mask growing over past + new
            out = model(ids[:, t:t + 2], mask[:, :t + 2], past_key_values=past, use_cache=True)
            steps.append(out.logits)
            past = out.past_key_values
    assert max_abs_diff(torch.cat(steps, 1), full, mask) <= 1e-5
    assert past.length == 10 and past.keys[0].shape == (3, config.num_attention_heads, 10, config.head_dim)


@pytest.mark.parametrize("capacity", [None, 9])
def test_kv_cache_follows_the_spec_reference(capacity):
    """opt_torch's KVCache against opt_spec.cache's NumPy reference: what update returns, the write
    position, the mask width rule."""
    from opt_spec import cache as spec_cache
    from opt_torch.cache import KVCache

    config = VARIANTS["pre_ln"].replace(num_hidden_layers=2)
    ours, ref = KVCache(config, 2, capacity), spec_cache.KVCache(2, capacity)
    rng = np.random.default_rng(0)
    for T in (4, 1, 3):
        k, v = (rng.normal(size=(2, config.num_attention_heads, T, config.head_dim)).astype(np.float32)
                for _ in range(2))
        assert ours.mask_width(ours.length + T, T) == ref.attention_mask(np.ones((2, ref.length + T)), T).shape[1]
        for layer in range(2):
            got, want = ours.update(layer, torch.from_numpy(k), torch.from_numpy(v)), ref.update(layer, k, v)
            for a, b in zip(got, want):
                assert np.array_equal(a.numpy(), b)
        ours.advance(T)
        ref.advance(T)
        assert ours.length == ref.length
    with pytest.raises(ValueError, match="with a cache it must cover 9"):
        ours.mask_width(5, 1)


def test_a_cache_that_is_not_the_models_is_refused_in_words():
    from opt_torch.cache import KVCache

    config = VARIANTS["pre_ln"]
    model = OPTForCausalLM.from_config(config).eval()
    ids, mask = batch(config)
    with torch.no_grad():
        past = model(ids, mask, use_cache=True).past_key_values
        legacy = tuple(zip(past.keys, past.values))
        with pytest.raises(TypeError, match="not a tuple of"):
            model(ids[:, :1], past_key_values=legacy)
        with pytest.raises(ValueError, match="the cache holds .* 2 rows"):
            model(ids[:, :1], past_key_values=KVCache(config, 2))
        with pytest.raises(ValueError, match="with a cache it must cover"):
            model(ids[:, :1], mask, past_key_values=past)  # the mask lacks the new token
        with pytest.raises(ValueError, match="do not fit"):
            model(ids, past_key_values=model.init_cache(ids.shape[0], ids.shape[1] - 1))


def test_left_padding_leaves_real_tokens_unchanged(tmp_path):
    config = VARIANTS["post_ln_proj"]
    model = load(write_checkpoint(tmp_path, config))
    ids, mask = batch(config, left_pad=(0, 3, 5))
    with torch.no_grad():
        padded = model(ids, mask).logits
        for row, pads in enumerate((0, 3, 5)):
            alone = model(ids[row:row + 1, pads:]).logits
            assert max_abs_diff(padded[row:row + 1, pads:], alone) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_half_precision_left_padded_has_no_nan(tmp_path, dtype, attn):
    config = VARIANTS["post_ln_proj"]
    path = write_checkpoint(tmp_path, config)
    model = load(path, dtype=dtype, attn_implementation=attn)
    ref = load(path)
    assert model.dtype == dtype
    ids, mask = batch(config)
    with torch.no_grad():
        logits = model(ids, mask).logits
        expected = ref(ids, mask).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert max_abs_diff(logits.float(), expected, mask) < 0.15 * float(expected.abs().max())


def test_dtype_auto_keeps_checkpoint_dtype(tmp_path):
    config = VARIANTS["pre_ln"]
    OPTForCausalLM.from_config(config, dtype="bfloat16").save_pretrained(tmp_path)
    assert OPTForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert OPTForCausalLM.from_pretrained(tmp_path).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype='float8'"):
        OPTForCausalLM.from_pretrained(tmp_path, dtype="float8")


def test_dropout_only_in_training():
    config = VARIANTS["pre_ln"].replace(dropout=0.3, attention_dropout=0.2)
    model = OPTForCausalLM.from_config(config, seed=0)
    ids, mask = batch(config)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, model(ids, mask).logits)
        model.train()
        assert not torch.equal(model(ids, mask).logits, model(ids, mask).logits)


def test_inputs_embeds_equals_input_ids(tmp_path):
    config = VARIANTS["post_ln_proj"]
    model = load(write_checkpoint(tmp_path, config))
    ids, mask = batch(config)
    with torch.no_grad():
        a = model(ids, mask).logits
        b = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask).logits
    assert torch.equal(a, b)


def test_gradients_flow_to_every_parameter():
    config = VARIANTS["untied_head"]
    model = OPTForCausalLM.from_config(config, seed=0)
    ids, mask = batch(config)
    model(ids, mask, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bad_inputs_get_clear_errors():
    config = VARIANTS["pre_ln"]
    model = OPTForCausalLM.from_config(config)
    ids, mask = batch(config)
    with pytest.raises(ValueError, match="attention_mask has shape \\(3, 5\\)"):
        model(ids, mask[:, :5])
    long_ids = torch.randint(3, 50, (1, config.max_position_embeddings + 1))
    with pytest.raises(ValueError, match="max_position_embeddings=40"):
        model(long_ids)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="attn_implementation='flash'"):
        OPTForCausalLM(config, attn_implementation="flash")


def test_output_access_like_hugging_face():
    config = VARIANTS["pre_ln"]
    model = OPTForCausalLM.from_config(config).eval()
    ids, _ = batch(config)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert out[0] is out.logits and out["logits"] is out.logits
    assert out.keys() == ["logits", "past_key_values"]
    assert model(ids, use_cache=False).past_key_values is None


def test_opt_torch_imports_no_other_framework():
    code = "import sys, opt_torch; print([m for m in ('tensorflow', 'jax', 'flax') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------ weight memory layout
def _laid_out(model) -> bool:
    """Every linear weight (and a tied embedding) transposed in a storage of its own (fast path 1)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return all(w.t().is_contiguous() and w.untyped_storage().nbytes() == w.numel() * w.element_size()
               for w in weights)


@pytest.mark.parametrize("name", ["pre_ln", "no_bias", "post_ln_proj"])
def test_packed_layout_after_construction_loading_and_to(tmp_path, name):
    """Linear weights are (in, out) row-major views, each in a storage of its own, a tied embedding (E, V) -
    after construction, from_pretrained and a dtype round trip - while values, shapes and the very
    Parameter objects (an optimizer's references) stay."""
    config = VARIANTS[name]
    model = load(write_checkpoint(tmp_path, config))
    assert _laid_out(model) and _laid_out(OPTForCausalLM(config))
    assert model.lm_head.weight.t().is_contiguous()  # tied: the embedding, laid out for the head
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = list(model.parameters())
    model.to(torch.float64).to(torch.float32)
    assert _laid_out(model) and all(a is b for a, b in zip(model.parameters(), params))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_packed_and_plain_layouts_give_equal_logits_and_files(tmp_path):
    """The laid-out weights give the logits of plain row-major ones (a model whose weights lost the layout)
    with and without autograd; save_pretrained writes the same bytes from either layout; a model whose q/k/v
    weights still share one buffer (the layout of earlier versions) gets storages of its own back."""
    config = VARIANTS["pre_ln"]
    packed = load(write_checkpoint(tmp_path / "ckpt", config))
    plain = load(tmp_path / "ckpt")
    for p in plain.parameters():
        p.data = p.data.contiguous()  # the layout lost: the general path
    assert not _laid_out(plain)
    ids, mask = batch(config)
    with torch.no_grad():
        a, b = packed(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits
    c = packed(ids, attention_mask=mask).logits.detach()
    assert max_abs_diff(a, b) < 1e-5 and max_abs_diff(a, c) < 1e-5
    packed.save_pretrained(tmp_path / "a")
    plain.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    state = packed.state_dict()
    reloaded = OPTForCausalLM(config)
    reloaded.load_state_dict({k: v.contiguous() for k, v in state.items()})
    assert _laid_out(reloaded) and all(torch.equal(reloaded.state_dict()[k], v) for k, v in state.items())
    attn = plain.model.decoder.layers[0].self_attn
    with torch.no_grad():
        shared = torch.cat([attn.q_proj.weight.t(), attn.k_proj.weight.t(), attn.v_proj.weight.t()], dim=1)
        for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
            proj.weight.data = shared[:, i * config.hidden_size:(i + 1) * config.hidden_size].t()
    plain.pack_weights()
    assert _laid_out(plain) and attn.q_proj.weight.untyped_storage().data_ptr() != shared.data_ptr()


def test_training_updates_reach_the_laid_out_weights():
    """An optimizer step writes into the transposed views, so the next no-grad forward (and generate's decode
    step) sees the new weights."""
    config = VARIANTS["pre_ln"]
    model = OPTForCausalLM.from_config(config, seed=0)
    ids, mask = batch(config)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    assert _laid_out(model)
    with torch.no_grad():
        laid_out = model(ids, attention_mask=mask).logits
    plain = OPTForCausalLM(config)
    plain.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    for p in plain.parameters():
        p.data = p.data.contiguous()
    with torch.no_grad():
        assert max_abs_diff(laid_out, plain(ids, attention_mask=mask).logits) < 1e-5
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5),
                       plain.generate(ids, attention_mask=mask, max_new_tokens=5))


def test_savers_that_tell_tensors_apart_by_storage_keep_every_weight(tmp_path):
    """accelerate's save_model keeps one name per storage (for tied weights): every weight but the tied head
    must reach its file, with its values, and load back into a model that gives the same logits (q/k/v
    weights that shared one buffer lost q_proj and v_proj there)."""
    import safetensors.torch

    accelerate = pytest.importorskip("accelerate")
    config = VARIANTS["pre_ln"]
    model = OPTForCausalLM.from_config(config, seed=0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    accelerate.Accelerator(cpu=True).save_model(model, tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(state) - {"lm_head.weight"}  # the tied head is the embedding
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    reloaded = OPTForCausalLM(config)
    reloaded.load_state_dict(saved, strict=False)  # the head is tied again to the loaded embedding
    ids, mask = batch(config)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_decoding_step_traces_as_one_graph_for_every_step():
    """torch.compile (fullgraph, fixed shapes, as generate(compile=True) uses it on a GPU) captures a
    cached step with the fused q/k/v product once for all steps: the cache's write position is a tensor
    moved inside the graph, not a Python int the graph would be specialized on (a recompile per token).
    A counting backend checks the capture without a C++ compiler."""
    from torch._dynamo.testing import CompileCounter

    config = VARIANTS["pre_ln"]
    model = OPTForCausalLM.from_config(config, seed=0).eval()
    ids, _ = batch(config)
    B, T = ids.shape
    L = T + 3
    mask = torch.zeros(B, L, dtype=torch.long)
    mask[:, :T] = 1
    counter = CompileCounter()
    step = torch.compile(model._last_logits, backend=counter, fullgraph=True, dynamic=False)
    caches = [model.init_cache(B, L), model.init_cache(B, L)]
    with torch.no_grad():
        for cache in caches:
            model._last_logits(ids, mask, cache)  # the prompt, eagerly (as generate does)
        tokens = ids[:, -1].clone()
        for t in range(T, L):
            mask[:, t] = 1
            eager, traced = model._last_logits(tokens[:, None], mask, caches[0]), step(tokens[:, None], mask, caches[1])
            assert max_abs_diff(eager, traced) < 1e-6
            tokens = eager.argmax(-1)
    assert counter.frame_count == 1 and caches[1].length == L
    assert torch.equal(caches[0].keys, caches[1].keys)


@pytest.mark.filterwarnings("ignore:No complete tensor found")  # torch.save's note on the transposed weight views
@pytest.mark.parametrize("name", ["pre_ln", "post_ln_proj"])
def test_torch_export_captures_the_forward_for_any_batch_and_length(tmp_path, name):
    """torch.export with a dynamic batch and length (what deployment tools start from): the saved and reloaded
    program gives the model's logits at other shapes than the traced one, left padding included."""
    config = VARIANTS[name]
    model = OPTForCausalLM.from_config(config, seed=0).eval()

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids, mask = (torch.as_tensor(a).long() for a in random_batch(config, seed=1))
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=config.max_position_embeddings)
    program = torch.export.export(Logits(model), (ids, mask), dynamic_shapes=({0: batch, 1: length},) * 2)
    torch.export.save(program, tmp_path / "opt.pt2")
    exported = torch.export.load(tmp_path / "opt.pt2").module()
    other_ids, other_mask = (torch.as_tensor(a).long() for a in random_batch(config, 2, 13, seed=2, left_pad=(0, 4)))
    with torch.no_grad():
        for i, m in ((ids, mask), (other_ids, other_mask), (ids[:1, 2:], mask[:1, 2:])):
            assert torch.equal(exported(i, m), model(i, attention_mask=m).logits)
