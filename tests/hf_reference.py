"""Hugging Face's TensorFlow OPT built from our weights: a numerics reference for tests and benchmarks
(transformers 4.57.6 and tf-keras, test extras only)."""

import warnings

import numpy as np


def hf_tf_causal_lm(config, weights):
    """Hugging Face's TFOPTForCausalLM with our canonical weights (name -> array) assigned by name.

    Its own from_pretrained cannot read a safetensors directory with safetensors 0.8 ("TypeError:
    'builtins.safe_open' object is not iterable" in load_pytorch_state_dict_in_tf2_model). It always
    ties the LM head, and it ignores enable_bias=False and layer_norm_elementwise_affine=False and
    builds those variables anyway: they get the neutral values (zero biases, unit scales) that make its
    model the variant's function."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.TFOPTForCausalLM(transformers.OPTConfig(**config.to_dict()))
        hf(hf.dummy_inputs)
    values = []
    for var in hf.weights:  # 'tfopt_for_causal_lm/model/decoder/layers.0/fc1/kernel:0'
        scope, leaf = var.name.split(":")[0].split("/", 1)[1].rsplit("/", 1)
        name = scope.replace("/", ".") + (".bias" if leaf in ("bias", "beta") else ".weight")
        if name in weights:
            values.append(weights[name].T if leaf == "kernel" else weights[name])
        elif leaf in ("bias", "beta", "gamma") and (not config.enable_bias or not config.layer_norm_elementwise_affine):
            values.append(np.full(var.shape, 1.0 if leaf == "gamma" else 0.0, np.float32))
        else:
            raise KeyError(f"Hugging Face variable {var.name} has no canonical weight {name}")
    hf.set_weights(values)
    return hf
