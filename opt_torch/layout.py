"""The memory order of the PyTorch backend's weights (their shapes and values are the spec's).

A linear layer's weight keeps nn.Linear's logical shape (out, in), but its memory is laid out as the
transpose, (in, out) row-major, and the query, key and value projections of an attention block share
one (in, 3 * out) matrix as adjacent column blocks (their biases one (3 * out,) vector). Why: a decoding
step multiplies a few rows by every weight matrix, and BLAS reads an (in, out) matrix faster there
(MKL on a 2-core Xeon, float32: batch 8 runs 25-35% faster per layer matrix, and batch 1's tied LM
head 20-25% faster, than with (out, in)); one product over the fused query/key/value matrix replaces
three. The layout is invisible to everything else: `state_dict()` keys, shapes and values are
unchanged (the tensors are views; `save_pretrained` writes them contiguously), training updates the
views in place, and a weight that lost the layout (`param.data = ...`, a load with assign=True into
a submodule) simply takes the general path. `OPTPreTrainedModel.pack_weights` establishes it; models
re-establish it after construction, loading and `.to()` / `.half()` / `.cuda()`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


def _consecutive(tensors: Sequence[torch.Tensor], sizes: Sequence[int]) -> bool:
    """Whether `tensors` start `sizes` elements apart in one storage. Not traceable by torch.compile,
    which then relies on the strides alone (a stride that matches is the mark of pack_linears)."""
    if torch.compiler.is_compiling():
        return True
    first = tensors[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t, size in zip(tensors, sizes):
        if t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset:
            return False
        offset += size
    return True


def column_blocks(weights: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The (in, sum of outs) row-major matrix whose column blocks are `weights` (each (out, in), as
    transposed views), or None when they are not laid out that way."""
    first = weights[0]
    total = sum(w.shape[0] for w in weights)
    if any(w.dim() != 2 or w.shape[1] != first.shape[1] or w.dtype != first.dtype or w.stride() != (1, total)
           for w in weights) or not _consecutive(weights, [w.shape[0] for w in weights]):
        return None
    return first.as_strided((first.shape[1], total), (total, 1))


def vector_blocks(vectors: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The one vector whose consecutive pieces are `vectors`, or None (also when any is None)."""
    if any(v is None for v in vectors):
        return None
    first = vectors[0]
    if any(v.dim() != 1 or v.dtype != first.dtype or v.stride() != (1,) for v in vectors) \
            or not _consecutive(vectors, [v.shape[0] for v in vectors]):
        return None
    return first.as_strided((sum(v.shape[0] for v in vectors),), (1,))


def pack_linears(linears: Sequence[nn.Linear]) -> None:
    """Lays the weights of `linears` (equal in-features) out as column blocks of one (in, sum of outs)
    row-major matrix, and their biases as one vector. Values, shapes and Parameter objects (hence an
    optimizer's references) are kept; only the memory behind them changes. No-op when already so."""
    weights = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears]
    has_bias = all(b is not None for b in biases)
    if column_blocks(weights) is not None and (not has_bias or len(linears) == 1 or vector_blocks(biases) is not None):
        return
    with torch.no_grad():
        fused = torch.cat([w.t() for w in weights], dim=1)  # (in, sum of outs), contiguous
        start = 0
        for lin in linears:
            out = lin.weight.shape[0]
            lin.weight.data = fused[:, start:start + out].t()
            start += out
        if has_bias and len(linears) > 1:
            fused_bias = torch.cat(biases)
            start = 0
            for lin in linears:
                out = lin.bias.shape[0]
                lin.bias.data = fused_bias[start:start + out]
                start += out


def pack_embedding_for_head(embedding: nn.Embedding) -> None:
    """A tied embedding (V, E) laid out (E, V) row-major: the LM head's product then reads it in BLAS's
    fast order; a lookup gathers E strided values per token, which decoding and training barely see."""
    w = embedding.weight
    if w.stride() == (1, w.shape[0]):
        return
    with torch.no_grad():
        w.data = w.t().contiguous().t()


def unpack_weights(root: nn.Module) -> None:
    """Undoes the layout: every parameter of `root` contiguous in its own (out, in) storage, as nn.Linear
    makes it. Tensor parallelism (DTensor) and FSDP2 need this: they slice and flatten parameters and
    refuse views into a shared buffer. Values, shapes and Parameter objects are kept."""
    with torch.no_grad():
        for p in root.parameters():  # a tied parameter is listed once
            if not p.is_contiguous() or p.untyped_storage().nbytes() != p.numel() * p.element_size():
                p.data = p.data.clone(memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- when fast paths may run
_STOCK_CLASSES = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.ModuleList)


def modules_are_stock(*roots: nn.Module) -> bool:
    """Whether reading the weights of `roots` directly computes exactly what calling them would.

    The fast paths (the fused q/k/v product without autograd, generate's DecodeStep) read weights and
    skip the module calls. That is only the same computation while every module below `roots` is a
    stock nn.Linear / LayerNorm / Embedding / ModuleList or one of optkit's own classes, and nothing
    is hooked: a LoRA adapter (peft swaps q_proj for its own Linear), a quantized Linear, a forward
    hook or pre-hook (activation probes), a parametrization (which changes the class), a global forward
    hook, a forward replaced on the instance (accelerate's dispatch hooks, which load offloaded weights)
    or a parameter that is a tensor subclass (a DTensor: tensor parallelism, FSDP2) each make this
    False, and the callers then take the module path.
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
