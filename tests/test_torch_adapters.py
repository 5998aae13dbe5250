"""PyTorch fast paths step aside for anything that wraps, swaps or hooks a layer (LoRA, probes, quantized
Linear replacements): the model's output is then what calling every module gives, as in Hugging Face."""

import copy

import peft  # test-only; dev.sh installs it with --no-deps
import pytest
import torch
from torch import nn

from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_batch, random_weights
from opt_torch import OPTForCausalLM
from opt_torch.fast_paths import modules_are_stock

from .conftest import max_abs_diff


@pytest.fixture
def model(tmp_path):
    config = VARIANTS["pre_ln"]
    spec_io.save_safetensors_dir(tmp_path, random_weights(config, "causal_lm", seed=3), config.to_dict())
    return OPTForCausalLM.from_pretrained(tmp_path).eval()


def inputs(config):
    ids, mask = random_batch(config, seed=1)
    return torch.from_numpy(ids).long(), torch.from_numpy(mask).long()


def test_a_forward_hook_runs_once_per_call_with_and_without_autograd(model):
    ids, mask = inputs(model.config)
    calls = []
    q_proj = model.model.decoder.layers[0].self_attn.q_proj
    handle = q_proj.register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape)))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert calls == [(*ids.shape, model.config.hidden_size)]
    calls.clear()
    model.generate(ids, attention_mask=mask, max_new_tokens=4)
    assert len(calls) == 4  # the prompt, then one call per new token but the last (as Hugging Face)
    handle.remove()
    assert modules_are_stock(model)


def test_a_hook_that_changes_the_output_changes_logits_and_tokens(model):
    ids, mask = inputs(model.config)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
    fc1 = model.model.decoder.layers[1].fc1
    handle = fc1.register_forward_hook(lambda module, args, out: out * 3.0)
    with torch.no_grad():
        hooked = model(ids, attention_mask=mask).logits
    hooked_grad = model(ids, attention_mask=mask).logits.detach()
    hooked_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    handle.remove()
    assert max_abs_diff(hooked, plain) > 1e-2
    assert max_abs_diff(hooked, hooked_grad) < 1e-5
    # generate's module path gives what the hooked forward pass gives, token by token
    with torch.no_grad():
        handle = fc1.register_forward_hook(lambda module, args, out: out * 3.0)
        greedy = []
        ids_now, mask_now = ids, mask
        for _ in range(6):
            logits = model(ids_now, attention_mask=mask_now).logits[:, -1]
            greedy.append(logits.argmax(-1))
            ids_now = torch.cat([ids_now, greedy[-1][:, None]], 1)
            mask_now = torch.cat([mask_now, torch.ones_like(mask_now[:, :1])], 1)
        handle.remove()
    assert torch.equal(hooked_tokens[:, ids.shape[1]:], torch.stack(greedy, 1))


def test_a_global_forward_hook_takes_the_module_path(model):
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: calls.append(type(module)))
    try:
        assert not modules_are_stock(model)
        ids, mask = inputs(model.config)
        with torch.no_grad():
            model(ids, attention_mask=mask)
        assert calls.count(nn.Linear) >= 6 * model.config.num_hidden_layers
    finally:
        handle.remove()


def test_a_swapped_linear_is_called(model):
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    ids, mask = inputs(model.config)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
    attn = model.model.decoder.layers[0].self_attn
    swapped = Doubled(attn.v_proj.in_features, attn.v_proj.out_features)
    swapped.load_state_dict(attn.v_proj.state_dict())
    attn.v_proj = swapped
    assert not modules_are_stock(model)
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    assert max_abs_diff(out, plain) > 1e-3
    assert max_abs_diff(out, model(ids, attention_mask=mask).logits.detach()) < 1e-5


def merged_copy(lora_model):
    """A stock model whose q/v/fc1 weights are LoRA's merged W + scale * B @ A (no peft module left)."""
    plain = OPTForCausalLM(lora_model.config).eval()
    state = {}
    for name, module in lora_model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            base = module.get_base_layer()
            delta = module.get_delta_weight("default")
            state[f"{name}.weight"] = base.weight.detach() + delta.detach()
            if base.bias is not None:
                state[f"{name}.bias"] = base.bias.detach()
    for name, tensor in lora_model.state_dict().items():
        if "lora_" not in name and ".base_layer." not in name:
            state.setdefault(name, tensor)
    missing, unexpected = plain.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return plain


def test_lora_adapters_act_in_no_grad_forward_and_generate(model):
    ids, mask = inputs(model.config)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    lora_config = peft.LoraConfig(target_modules=["q_proj", "v_proj", "fc1"], r=4, lora_alpha=8,
                                  init_lora_weights=False)
    lora = peft.inject_adapter_in_model(lora_config, copy.deepcopy(model)).eval()
    merged = merged_copy(lora)
    assert modules_are_stock(merged) and not modules_are_stock(lora)
    with torch.no_grad():
        lora_logits = lora(ids, attention_mask=mask).logits
        merged_logits = merged(ids, attention_mask=mask).logits
    assert max_abs_diff(lora_logits, before) > 0.05               # the adapter moves the logits
    assert max_abs_diff(lora_logits, merged_logits) < 1e-4        # exactly as its merged weights do
    assert max_abs_diff(lora_logits, lora(ids, attention_mask=mask).logits.detach()) < 1e-5
    for kwargs in (dict(), dict(num_beams=3)):
        assert torch.equal(lora.generate(ids, attention_mask=mask, max_new_tokens=8, **kwargs),
                           merged.generate(ids, attention_mask=mask, max_new_tokens=8, **kwargs))
