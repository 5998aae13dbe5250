"""The PyTorch backend's fast paths: what runs instead of the plain modules of opt_torch/modeling.py, and why.

Each is the modules' computation in another order of memory or calls (the tests named below compare
them), and steps aside where it could not be: under autograd, for a swapped or hooked module (LoRA,
probes, accelerate's dispatch: `modules_are_stock`), and for a model split over processes (DTensor,
FSDP2: `packed_layout` False). Times from a 2-core Xeon (MKL, float32, 125m shapes); generate's speed
against Hugging Face's is bench/bench_generate.py.

1. The weight layout (`PackedWeights.pack_weights`): each linear weight keeps nn.Linear's logical shape
   (out, in), but its memory is the transpose, (in, out) row-major, in a storage of its own; a tied
   embedding is laid out (E, V) for the LM head. A decoding step multiplies a few rows by every weight
   matrix, and MKL reads an (in, out) matrix faster there: batch 8 runs 25-35% faster per layer matrix,
   and batch 1's tied LM head 20-25% faster, than with (out, in).
   The layout is invisible otherwise: `state_dict()` keys, shapes and values are unchanged (transposed
   views; `save_pretrained` writes them contiguously), an optimizer updates them in place (opt_torch.training's
   Trainer lays every weight out row-major instead, where its gradients come out), and a weight that
   lost the layout (`param.data = ...`, a load with assign=True into a submodule) takes the general
   path. Models re-establish it after construction, loading (a load_state_dict post-hook) and `.to()` /
   `.half()` / `.cuda()` (`_apply`).
   No two weights share a storage. The q/k/v weights used to be column blocks of one (in, 3 * out) matrix;
   but savers that tell tensors apart by their storage took the three for one tied tensor: accelerate's
   `save_model` wrote k_proj alone and dropped q_proj and v_proj (with a warning only). (safetensors'
   `save_model` refuses transposed views whatever their storage; `save_pretrained` and accelerate write
   them.) Decoding's one q/k/v product reads a copy instead (2.). Pinned by tests/test_torch.py:
   test_packed_layout_after_construction_loading_and_to, test_packed_and_plain_layouts_give_equal_logits_and_files,
   test_training_updates_reach_the_laid_out_weights, test_savers_that_tell_tensors_apart_by_storage_keep_every_weight.
2. `DecodeStep`: generate's one-token step through the decoder as functional calls on weights gathered
   once per generate call, attending over the cache slots written so far: a 125m step spends its time
   in the matrix products instead of module calls, attribute lookups and mask building (those took
   3-5 ms of a ~19 ms step, next to 14 ms of products). Each layer's q/k/v is one product over a (H, 3H)
   copy of the three weights made for the call (the weights once more, a quarter of the layers', while
   generate runs): bench/bench_generate.py, 125m float32 batch 1 on 2 cores, gave 1.38-1.45x Hugging
   Face's tokens/s with it and 1.25-1.31x with three products (batch 8: 0.99x and 0.98-1.02x).
   Pinned by tests/test_torch_generation.py::test_decode_step_equals_the_forward_pass (every variant,
   both attention kernels, packed or plain weights) and, for when it steps aside,
   tests/test_torch_adapters.py.
3. The compiled training forward (`CompiledForward`, used by opt_torch.training.Trainer). Why: profiling the 125m
   bf16 update (bench/bench_train.py, batch 8 x 128, 2-core AVX512-BF16 CPU) put ~2.0 s of 3.8 in the matrix
   products and ~1.8 s around them: autocast's casts and the float32 <-> bf16 gradient copies (aten::copy_, 0.53 s
   in 832 calls), dropout's masks (0.14 s), LayerNorm, GELU, residual adds, the float32 log-softmax of the 1024 x
   50272 logits. Inductor fuses those into a few loops per layer; the products stay on the same oneDNN/MKL kernels.
   Measured interleaved in one process (eager and compiled updates of the same trainer taking turns, 10 each,
   machine load 12-21): median 13.9 -> 12.2 CPU seconds per update (-12%).

   Dropout: inductor draws the masks inside its fused loops (a counter-based generator seeded from torch's global
   generator at every call) instead of calling the eager bernoulli kernel and keeping float masks: in the compiled
   bf16 update's profile the eager way cost bernoulli_ (24 calls), a mask multiply forward and backward and a mask
   copy (~1 s of a 16 s update on a loaded machine, 6%). The masks differ from the eager model's (equally random,
   the same keep probability); a run and its resume draw the same ones as long as both compile (the generator
   state is in every checkpoint), as they do by default. Pinned by tests/test_torch_train_speed.py.

   Attention: the compiled graph computes it explicitly (the model's "eager" implementation: q k^T, the float32
   softmax, p v), whatever the model is set to outside it: inductor fuses the mask and softmax into its loops and
   runs the products as batched GEMMs. SDPA's CPU flash kernel took ~3x longer there (the bf16 update's loaded
   profile: flash forward + backward + zero-filling its gradient buffers 1.39 s, the explicit products and fused
   softmax 0.80 s, of ~15 s). Under autocast the scores are bf16 products, as in Hugging Face's eager attention.

   What it keeps: the model's math, the optimizer, clipping and accumulation are the trainer's as they are.

   When: `compile=None` (the trainer's default) compiles a model of at least MIN_PARAMETERS on one process without
   gradient checkpointing: compiling takes tens of seconds (minutes on a busy 2-core machine; inductor caches its
   kernels on disk for the next run), which only a real model's updates pay back. If compiling or running the
   compiled forward fails (no C++ compiler, an unsupported operation), the trainer warns once, restores the RNG and
   redoes that update eagerly, for good.
"""

from __future__ import annotations

import time
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from opt_spec.numerics import POSITION_OFFSET


# ------------------------------------------------------------------------------------ the layout
def lay_out_transposed(weight: nn.Parameter) -> None:
    """A 2-D weight (out, in) laid out (in, out) row-major in a storage of its own: a linear layer's
    product then reads it in BLAS's fast order, and a tied embedding (V, E) serves the LM head so (a
    lookup gathers E strided values per token, which decoding and training barely see). Values, shape
    and the Parameter object (an optimizer's reference) are kept. No-op when already so."""
    if weight.stride() == (1, weight.shape[0]) and _own_storage(weight):
        return
    with torch.no_grad():
        weight.data = weight.t().contiguous().t()


def _own_storage(t: torch.Tensor) -> bool:
    """Whether `t` spans its whole storage (nothing else can live in it)."""
    return torch.compiler.is_compiling() or t.untyped_storage().nbytes() == t.numel() * t.element_size()


def unpack_weights(root: nn.Module) -> None:
    """Undoes the layout: every parameter of `root` contiguous in its own (out, in) storage, as nn.Linear
    makes it. Tensor parallelism (DTensor) and FSDP2 need this: they slice and flatten parameters and
    refuse views into a shared buffer. Values, shapes and Parameter objects are kept."""
    with torch.no_grad():
        for p in root.parameters():  # a tied parameter is listed once
            if not p.is_contiguous() or p.untyped_storage().nbytes() != p.numel() * p.element_size():
                p.data = p.data.clone(memory_format=torch.contiguous_format)


class PackedWeights:
    """Mixed into OPTPreTrainedModel: the layout established and kept (fast path 1)."""

    packed_layout: bool = True  # False once opt_torch.distributed splits or dispatches the model: plain weights

    def pack_weights(self) -> None:
        """Lays the weights out in the memory order decoding reads fastest: every linear weight (in, out)
        row-major, a tied embedding (E, V), each in a storage of its own. Values and shapes are unchanged.
        Called by construction, loading and `.to()`; idempotent. Not for a model split over processes or
        devices (packed_layout False): DTensor and FSDP2 need each parameter plain and contiguous."""
        if not self.packed_layout:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                lay_out_transposed(m.weight)
        lm_head = getattr(self, "lm_head", None)
        if lm_head is not None and lm_head.weight is self.get_input_embeddings().weight:
            lay_out_transposed(self.get_input_embeddings().weight)

    def _after_load(self) -> None:
        """A load with assign=True replaced parameters: the layout is restored."""
        self.pack_weights()

    def _apply(self, fn, recurse=True):
        """`.to()`, `.half()`, `.cuda()`... convert each tensor on its own; the layout is then restored."""
        super()._apply(fn, recurse)
        self.pack_weights()
        return self


# -------------------------------------------------------------------------- when fast paths may run
_STOCK_CLASSES = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.ModuleList)


def modules_are_stock(*roots: nn.Module) -> bool:
    """Whether reading the weights of `roots` directly computes exactly what calling them would.

    Generate's DecodeStep reads weights and skips the module calls. That is only the same computation
    while every module below `roots` is a stock nn.Linear / LayerNorm / Embedding / ModuleList or one of
    optkit's own classes, and nothing is hooked: a LoRA adapter (peft swaps q_proj for its own Linear),
    a quantized Linear, a forward hook or pre-hook (activation probes), a parametrization (which changes
    the class), a global forward hook, a forward replaced on the instance (accelerate's dispatch hooks,
    which load offloaded weights) or a parameter that is a tensor subclass (a DTensor: tensor
    parallelism, FSDP2) each make this False, and the callers then take the module path.
    """
    from torch.nn.modules import module as module_state

    if module_state._global_forward_hooks or module_state._global_forward_pre_hooks:
        return False
    for root in roots:
        for m in root.modules():
            if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
                return False
            cls = type(m)
            if cls not in _STOCK_CLASSES and not cls.__module__.startswith("opt_torch."):
                return False
            if any(type(p) is not nn.Parameter for p in m._parameters.values() if p is not None):
                return False
    return True


# ---------------------------------------------------------------------------------- the decode step
class DecodeStep:
    """One new token per row through the decoder, for generation (fast path 2): the operations of
    OPTDecoder.forward for T = 1 without autograd or dropout, on tensors gathered once (per generate call).

    step(tokens (B,), positions (B,), allowed (B, 1, 1, S) bool, cache) -> (B, E), the final hidden
    state, with the tokens' keys and values written to the preallocated KVCache at its write position
    (then advanced by one). The attention covers the cache's first S slots (S = allowed's last size, the
    slots written so far and the new one), so a step does not read the unused rest of the buffer.
    """

    def __init__(self, decoder: nn.Module, implementation: str):
        from .modeling import attend  # modeling imports this module

        config = decoder.config
        self.attend, self.implementation = attend, implementation
        self.pre_ln = config.do_layer_norm_before
        self.shape = (config.num_attention_heads, config.head_dim)
        self.embed_tokens = decoder.embed_tokens.weight
        self.embed_positions = decoder.embed_positions.weight
        self.project_in = decoder.project_in.weight if decoder.project_in is not None else None
        self.project_out = decoder.project_out.weight if decoder.project_out is not None else None
        self.final_norm = _norm_args(decoder.final_layer_norm)
        self.layers = []
        for layer in decoder.layers:
            attn = layer.self_attn
            self.layers.append(dict(
                attn_norm=_norm_args(layer.self_attn_layer_norm), scaling=attn.scaling,
                qkv=_fused_qkv(attn),
                out=(attn.out_proj.weight, attn.out_proj.bias), act=layer.act,
                fc1=(layer.fc1.weight, layer.fc1.bias), fc2=(layer.fc2.weight, layer.fc2.bias),
                final_norm=_norm_args(layer.final_layer_norm)))

    def __call__(self, tokens, positions, allowed, cache) -> torch.Tensor:
        B, S = tokens.shape[0], allowed.shape[-1]
        nh, hs = self.shape
        x = F.embedding(tokens, self.embed_tokens)  # (B, E)
        if self.project_in is not None:
            x = F.linear(x, self.project_in)
        x = x + F.embedding(positions + POSITION_OFFSET, self.embed_positions).to(x.dtype)  # (B, H)
        for i, layer in enumerate(self.layers):
            h = F.layer_norm(x, *layer["attn_norm"]) if self.pre_ln else x
            q, k, v = F.linear(h, *layer["qkv"]).chunk(3, dim=-1)  # (B, H) each
            keys, values = cache.update(i, k.view(B, nh, 1, hs), v.view(B, nh, 1, hs))  # (B, nh, L, hs)
            keys, values = keys[:, :, :S], values[:, :, :S]                              # (B, nh, S, hs)
            y, _ = self.attend((q * layer["scaling"]).view(B, nh, 1, hs), keys, values, allowed, self.implementation)
            x = x + F.linear(y.reshape(B, nh * hs), *layer["out"])
            if not self.pre_ln:
                x = F.layer_norm(x, *layer["attn_norm"])
            h = F.layer_norm(x, *layer["final_norm"]) if self.pre_ln else x
            x = x + F.linear(layer["act"](F.linear(h, *layer["fc1"])), *layer["fc2"])
            if not self.pre_ln:
                x = F.layer_norm(x, *layer["final_norm"])
        cache.advance(1)
        if self.final_norm is not None:
            x = F.layer_norm(x, *self.final_norm)
        if self.project_out is not None:
            x = F.linear(x, self.project_out)
        return x


def _fused_qkv(attn: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """F.linear's (weight (3H, H), bias (3H,) or None) for an attention's q, k and v in one product: a copy
    laid out (H, 3H) row-major, made once per generate call (the parameters keep storages of their own)."""
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([p.weight.t() for p in projections], dim=1).t()
    bias = None if attn.q_proj.bias is None else torch.cat([p.bias for p in projections])
    return weight, bias


def _norm_args(norm: Optional[nn.LayerNorm]):
    """F.layer_norm's arguments after the input, or None without a norm."""
    return None if norm is None else (norm.normalized_shape, norm.weight, norm.bias, norm.eps)


# ------------------------------------------------------------------ the compiled training forward
MIN_PARAMETERS = 20_000_000  # below this a step is too short to pay for compiling (test models, tiny fine-tunes)


def wants_compile(model: torch.nn.Module, setting: bool | None, split: bool, checkpointing: bool) -> bool:
    """compile=True/False as asked; None: a model of at least MIN_PARAMETERS, unsplit, not recomputing."""
    if setting is not None:
        return bool(setting)
    return not split and not checkpointing and sum(p.numel() for p in model.parameters()) >= MIN_PARAMETERS


class CompiledForward:
    """model(**inputs) through torch.compile, until it fails once; `seconds` is the wall time of the first
    compiled update (the compilation of forward and backward with it), None before it."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.fn = torch.compile(model)  # dropout: inductor's own masks, seeded from torch's generator (see above)
        self.failed: Exception | None = None
        self.seconds: float | None = None

    @property
    def active(self) -> bool:
        return self.failed is None

    def __call__(self, **inputs):
        if self.failed is not None:
            return self.model(**inputs)
        explicit = getattr(self.model, "set_attn_implementation", None)
        if explicit is None:
            return self.fn(**inputs)
        previous = self.model.attn_implementation
        explicit("eager")  # the explicit attention inside the compiled graph (see "Attention" above)
        try:
            return self.fn(**inputs)
        finally:
            explicit(previous)

    def run_first(self, step):
        """step() (one update's forward and backward) with compilation timed; on an exception the RNG is
        restored, the compiled path dropped with a warning, and step() run again eagerly."""
        if self.seconds is not None or self.failed is not None:
            return step()
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        start = time.perf_counter()
        try:
            out = step()
        except Exception as err:  # a compiler missing or refusing: the eager model computes the same
            self.failed = err
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); training uncompiled")
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            return step()
        self.seconds = time.perf_counter() - start
        return out
