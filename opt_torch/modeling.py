"""OPT in PyTorch, read top to bottom: attention, layer, decoder, base model, heads.

Attribute names are the canonical checkpoint names, so `state_dict()` keys equal the spec's weight
table. Dimension letters: B batch, T new tokens, S keys (past + new, or a preallocated cache's slots),
H hidden, nh heads, hs head size, E embedding width, F ffn width, V vocabulary. What runs instead of
these modules for speed (the weight layout, generate's decode step) is in
opt_torch/fast_paths.py; past keys and values live in a KVCache (opt_torch/cache.py).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from opt_spec import Head, OPTConfig
from opt_spec.cache import check_cache_position, refuse_legacy_cache
from opt_spec.inputs import (check_attention_mask, check_batch_shape, check_classification_labels, check_pooling,
                             check_inputs_embeds, check_labels, check_position_ids, check_positions,
                             check_span_positions, check_token_ids, not_integers, refuse_head_mask,
                             token_range_message)
from opt_spec.numerics import (IGNORE_INDEX, LAYER_NORM_EPS, POSITION_OFFSET, SOFTMAX_DTYPE, attention_scale,
                               mask_value, problem_type)
from opt_spec.outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast, QuestionAnsweringModelOutput,
                              SequenceClassifierOutputWithPast)

from .cache import HFDynamicCacheView, KVCache, hugging_face_cache
from .checkpoint import PretrainedMixin
from .fast_paths import PackedWeights
from .generation import GenerationMixin
from .adapters import AdapterMethods
from .hf_compat import CausalLMMethods, HFModelMethods

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def activation_fn(formula: str):
    return {
        "relu": F.relu,
        "gelu_erf": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
    }[formula]


def attention_allowed(attention_mask: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """(B, S) mask, (T,) query slots -> (B, 1, T, S) bool: causal, mask kept, a query that would see
    nothing sees itself (opt_spec.numerics.attention_allowed)."""
    S = attention_mask.shape[1]
    q_pos = query_positions[:, None]                                  # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]    # (1, S)
    allowed = (k_pos <= q_pos) & attention_mask.bool()[:, None, :]    # (B, T, S)
    alone = ~allowed.any(-1, keepdim=True)                            # (B, T, 1)
    return (allowed | (alone & (k_pos == q_pos)))[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Optional[torch.Tensor],
           implementation: str, dropout: float = 0.0, need_probs: bool = False):
    """(softmax(q k^T) v, probabilities or None) for q (B, nh, T, hs) already scaled, k/v (B, nh, S, hs);
    allowed (B, 1, T, S) bool, or None for plain causal attention. Scores and softmax in float32.
    need_probs: also the probabilities (B, nh, T, S), after dropout as Hugging Face returns them; sdpa
    never forms them, so then the explicit computation runs instead."""
    if implementation == "sdpa" and not need_probs:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                              is_causal=allowed is None, scale=1.0), None
    T, S = q.shape[2], k.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)).float()  # (B, nh, T, S)
    if allowed is None:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~allowed, mask_value(SOFTMAX_DTYPE))
    probs = F.dropout(scores.softmax(dim=-1).to(v.dtype), p=dropout, training=dropout > 0)
    return torch.matmul(probs, v), probs if need_probs else None  # (B, nh, T, hs)


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int, attn_implementation: str = "sdpa"):
        super().__init__()
        H, bias = config.hidden_size, config.enable_bias
        self.layer_idx = layer_idx  # which of the cache's layers holds this attention's keys and values
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scaling = attention_scale(config.head_dim)
        self.dropout = config.attention_dropout
        self.attn_implementation = attn_implementation
        self.k_proj = nn.Linear(H, H, bias=bias)
        self.v_proj = nn.Linear(H, H, bias=bias)
        self.q_proj = nn.Linear(H, H, bias=bias)
        self.out_proj = nn.Linear(H, H, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x: torch.Tensor, allowed: Optional[torch.Tensor], cache: Optional[KVCache] = None,
                output_attentions: bool = False):
        """The output (B, T, H) and, with output_attentions, the probabilities (B, nh, T, S) (else None).
        With a cache, the new keys and values are written there and attention covers the past ones too."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, H) each
        q = self._heads(q * self.scaling)               # (B, nh, T, hs)
        k, v = self._heads(k), self._heads(v)           # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)   # (B, nh, S, hs): the past and the new
        y, probs = attend(q, k, v, allowed, self.attn_implementation, self.dropout if self.training else 0.0,
                          output_attentions)
        y = y.transpose(1, 2).reshape(B, T, -1)     # (B, T, nh * hs): this process's heads (nh / tp under TP)
        return self.out_proj(y), probs


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int, attn_implementation: str = "sdpa"):
        super().__init__()
        H, F_, bias, affine = (config.hidden_size, config.ffn_dim, config.enable_bias,
                               config.layer_norm_elementwise_affine)
        self.pre_ln = config.do_layer_norm_before
        self.dropout = config.dropout
        self.act = activation_fn(config.activation)
        self.self_attn = OPTAttention(config, layer_idx, attn_implementation)
        self.self_attn_layer_norm = nn.LayerNorm(H, eps=LAYER_NORM_EPS, elementwise_affine=affine)
        self.fc1 = nn.Linear(H, F_, bias=bias)
        self.fc2 = nn.Linear(F_, H, bias=bias)
        self.final_layer_norm = nn.LayerNorm(H, eps=LAYER_NORM_EPS, elementwise_affine=affine)

    def forward(self, x, allowed, cache=None, output_attentions=False):
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        h, probs = self.self_attn(h, allowed=allowed, cache=cache, output_attentions=output_attentions)
        x = x + F.dropout(h, p=self.dropout, training=self.training)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        h = self.fc2(self.act(self.fc1(h)))
        x = x + F.dropout(h, p=self.dropout, training=self.training)
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x, probs


class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        V, E, H, P = (config.vocab_size, config.word_embed_proj_dim, config.hidden_size,
                      config.max_position_embeddings)
        self.config = config
        self.embed_tokens = nn.Embedding(V, E, padding_idx=config.pad_token_id)
        self.embed_positions = nn.Embedding(P + POSITION_OFFSET, H)
        self.project_out = nn.Linear(H, E, bias=False) if config.has_projections else None
        self.project_in = nn.Linear(E, H, bias=False) if config.has_projections else None
        self.final_layer_norm = (nn.LayerNorm(H, eps=LAYER_NORM_EPS,
                                              elementwise_affine=config.layer_norm_elementwise_affine)
                                 if config.has_final_layer_norm else None)
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i, attn_implementation)
                                    for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False  # recompute each layer in backward (training, no cache)
        self.checkpoint_fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=False, output_hidden_states=False, output_attentions=False,
                head_mask=None, cache_position=None):
        """past_key_values: a KVCache (opt_torch.cache), or a Hugging Face DynamicCache, written in place and
        returned; use_cache=True without one starts a dynamic cache. attention_mask (B, past + new), or
        (B, capacity) with a preallocated cache (opt_spec.cache.cache_mask_width). cache_position (Hugging
        Face's loops pass it): the new tokens' slots, which must be the cache's next ones (the cache keeps
        its own write position). head_mask: refused unless None (opt_spec.inputs.refuse_head_mask)."""
        config = self.config
        refuse_head_mask(head_mask)
        if self.gradient_checkpointing and self.training:
            use_cache = False  # a cache would keep every layer's keys alive (Hugging Face turns it off too)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        _check_tensors(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       position_ids=position_ids)
        if inputs_embeds is None:
            _check_token_ids(input_ids, config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, E)
        else:
            check_inputs_embeds(tuple(inputs_embeds.shape), inputs_embeds.dtype, config.word_embed_proj_dim)
        B, T = inputs_embeds.shape[:2]
        if attention_mask is not None:
            check_attention_mask(_host_values(attention_mask))
        device = inputs_embeds.device
        heads = self.layers[0].self_attn.num_heads  # num_attention_heads / tp under tensor parallelism
        cache = past_key_values
        given = None if attention_mask is None else tuple(attention_mask.shape)
        if cache is None:
            S, q_pos = T, torch.arange(T, device=device)
            cache = KVCache(config, B, num_heads=heads) if use_cache else None
        else:  # the keys: past + new, or the preallocated buffer (opt_spec.cache.cache_mask_width)
            cache = _layer_cache(cache, config, B, heads, self.embed_tokens.weight.dtype)
            width = attention_mask.shape[-1] if attention_mask is not None else cache.length + T
            S, q_pos = cache.mask_width(width, T), cache.positions(T, device)
            if attention_mask is None:  # attending over a past: the mask says which slots are written
                attention_mask = torch.ones(B, width, dtype=torch.long, device=device)
            if S > width:  # slots not written yet: 0
                attention_mask = F.pad(attention_mask, (0, S - width))
        if cache_position is not None and not torch.compiler.is_compiling():
            check_cache_position(_host_values(cache_position), 0 if cache is None else cache.length, T)
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask has shape {given}; expected (batch, past + new) = ({B}, {S})")
        if position_ids is None:
            mask = (attention_mask if attention_mask is not None else torch.ones(B, S, device=device)).long()
            position_ids = (torch.cumsum(mask, dim=1) * mask - 1)[:, q_pos]  # (B, T), pads -1
            # Positions never exceed S - 1, so only a longer S needs its positions read (a host sync): pads
            # take none, so a batch whose every row is padded may be longer than the table, as in Hugging Face
            # and the other backends. A compiled graph cannot read them and refuses by the shape alone.
            if S > config.max_position_embeddings:
                if torch.compiler.is_compiling():
                    raise ValueError(f"{S} tokens (past + new) are more than the model's max_position_embeddings="
                                     f"{config.max_position_embeddings}")
                _check_positions(position_ids, config.max_position_embeddings)
        else:
            check_position_ids(tuple(position_ids.shape), position_ids.dtype, B, T, config.max_position_embeddings,
                               _host_values(position_ids))
        # Plain causal attention needs no mask at all (fast kernels); otherwise build (B, 1, T, S).
        allowed = None if attention_mask is None else attention_allowed(attention_mask, q_pos)

        x = self.project_in(inputs_embeds) if self.project_in is not None else inputs_embeds  # (B, T, H)
        x = x + self.embed_positions(position_ids + POSITION_OFFSET).to(x.dtype)
        hidden_states = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            if self.training and config.layerdrop > 0 and torch.rand([]).item() < config.layerdrop:
                continue
            if self.gradient_checkpointing and self.training and cache is None:
                forward = functools.partial(layer, allowed=allowed, output_attentions=output_attentions)
                x, probs = self.checkpoint_fn(forward, x)
            else:
                x, probs = layer(x, allowed=allowed, cache=cache, output_attentions=output_attentions)
            if attentions is not None:
                attentions.append(probs)
        if cache is not None:
            cache.advance(T)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # (B, T, E)
        if hidden_states is not None:
            hidden_states.append(x)
        if isinstance(cache, HFDynamicCacheView):
            cache = cache.cache  # the caller's DynamicCache, now holding the new keys and values
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=cache,
                                       hidden_states=tuple(hidden_states) if hidden_states is not None else None,
                                       attentions=tuple(attentions) if attentions is not None else None)


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """opt_spec.inputs' rule on the host; on an accelerator an asynchronous device-side assert (no host sync
    per forward), so its error names only the range."""
    if input_ids.dtype.is_floating_point:
        raise not_integers(input_ids.dtype)
    check_batch_shape(tuple(input_ids.shape))
    if not torch.compiler.is_compiling():
        if input_ids.device.type == "cpu":
            check_token_ids(input_ids.numpy(), vocab_size)
        else:
            torch._assert_async(((input_ids >= 0) & (input_ids < vocab_size)).all(), token_range_message(vocab_size))


def _check_tensors(**given) -> None:
    """The inputs given are torch tensors (NumPy arrays and lists are for the TensorFlow and JAX models)."""
    for name, x in given.items():
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _host_values(x: torch.Tensor):
    """x as NumPy for a host check when that needs no device sync (eager, on the CPU), else None."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).detach().numpy()


def _layer_cache(cache, config: OPTConfig, B: int, heads: int, dtype: torch.dtype):
    """What the layers write, checked to be this model's: a KVCache of its layers, the batch's rows and the
    layers' own heads (num_attention_heads / tp under tensor parallelism), or a Hugging Face DynamicCache
    seen through HFDynamicCacheView (an empty one takes any batch)."""
    refuse_legacy_cache(cache)
    if hugging_face_cache(cache):
        cache = HFDynamicCacheView(cache, config, heads, dtype)
        if cache.batch_size is None:
            return cache
    elif not isinstance(cache, KVCache):
        raise TypeError(f"past_key_values must be the model's KVCache (opt_torch.cache), got {type(cache).__name__}")
    if (cache.num_layers, cache.batch_size, cache.num_heads) != (config.num_hidden_layers, B, heads):
        raise ValueError(f"the cache holds {cache.num_layers} layers x {cache.batch_size} rows x {cache.num_heads} "
                         f"heads; the model has {config.num_hidden_layers} layers x {heads} heads and the batch "
                         f"{B} rows (build it with model.init_cache)")
    return cache


def _check_positions(position_ids: torch.Tensor, max_positions: int) -> None:
    if not torch.compiler.is_compiling() and position_ids.numel():
        check_positions(int(position_ids.max()), max_positions)


class OPTPreTrainedModel(HFModelMethods, AdapterMethods, PretrainedMixin, PackedWeights, nn.Module):
    """Shared construction: config, attention choice, OPT's initialization (the weight layout that
    pack_weights establishes: opt_torch.fast_paths)."""

    head: Head = Head.BASE

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        if not isinstance(config, OPTConfig):
            raise TypeError(f"config must be an OPTConfig, got {type(config).__name__}")
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={attn_implementation!r}; choose one of {ATTN_IMPLEMENTATIONS}")
        self.config = config
        self.attn_implementation = attn_implementation
        self.name_or_path = ""  # from_pretrained's folder or Hub id (PEFT's adapter_config.json names it)
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._after_load())

    def _after_load(self) -> None:
        """A load with assign=True replaces parameters: a tied head is tied again (then the layout restored)."""
        if hasattr(self, "tie_weights"):
            self.tie_weights()
        super()._after_load()

    def init_weights(self, modules: Optional[Sequence[nn.Module]] = None) -> None:
        """OPT's initialization: normal(0, init_std) for linear and embedding weights, zero biases and
        pad embedding row, unit LayerNorm. On `modules` only, when given."""
        std = self.config.init_std
        with torch.no_grad():
            for m in (modules if modules is not None else self.modules()):
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, std)
                    if isinstance(m, nn.Linear) and m.bias is not None:
                        m.bias.zero_()
                    if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                        m.weight[m.padding_idx].zero_()
                elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                    m.weight.fill_(1.0)
                    m.bias.zero_()

    def set_attn_implementation(self, name: str) -> None:
        if name not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={name!r}; choose one of {ATTN_IMPLEMENTATIONS}")
        self.attn_implementation = name
        for m in self.modules():
            if isinstance(m, OPTAttention):
                m.attn_implementation = name

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Training trades compute for memory: each decoder layer's activations are recomputed in
        the backward pass (torch.utils.checkpoint; dropout replays the same random numbers). The same
        as Hugging Face's gradient_checkpointing_enable() / _disable() (opt_torch.hf_compat)."""
        self.gradient_checkpointing_enable() if enabled else self.gradient_checkpointing_disable()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device, or a dispatched model's main device (whose first
        parameter may be offloaded to disk: opt_torch.distributed.load_dispatched)."""
        main = getattr(self, "main_device", None)
        return torch.device(main) if main is not None else next(self.parameters()).device

    @property
    def kv_heads(self) -> int:
        """The attention heads whose keys and values this process keeps (the KV cache's size): all of
        them, or num_attention_heads / tp under tensor parallelism (opt_torch.distributed)."""
        return next(m.num_heads for m in self.modules() if isinstance(m, OPTAttention))

    def init_cache(self, batch_size: int, max_length: Optional[int] = None, pads: int = 0) -> KVCache:
        """An empty KVCache for this model (its dtype, device and kv_heads): preallocated for max_length
        tokens, or dynamic with max_length None (opt_torch.cache); pads: slots past the position table
        for left-padded prompts' pads (opt_spec.cache.check_capacity)."""
        return KVCache(self.config, batch_size, max_length, self.dtype, self.device, self.kv_heads, pads)


class OPTModel(OPTPreTrainedModel):
    head = Head.BASE

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.decoder = OPTDecoder(config, attn_implementation)
        self.init_weights()
        self.pack_weights()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=False, output_attentions=False,
                return_dict=None, head_mask=None, cache_position=None):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                           output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                           head_mask=head_mask, cache_position=cache_position)
        return returned(out, return_dict)


class _OPTWithHead(OPTPreTrainedModel):
    """A head model: the base model under `model.`, a head on its last hidden state."""

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.model = OPTModel(config, attn_implementation)

    def _base(self, **inputs) -> BaseModelOutputWithPast:
        """The base model's output; inputs by name only, so that no signature's order can misroute one."""
        return self.model(**inputs)


class OPTForCausalLM(GenerationMixin, CausalLMMethods, _OPTWithHead):
    head = Head.CAUSAL_LM
    accepts_loss_kwargs = True  # Hugging Face's Trainer then passes num_items_in_batch to forward

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.init_weights([self.lm_head])
        self.tie_weights()
        self.pack_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=False,
                output_attentions=False, return_dict=None, head_mask=None,
                cache_position=None, num_items_in_batch=None):
        """num_items_in_batch (Hugging Face's Trainer passes it): the loss is the summed token losses divided by
        it, the labels counted over every micro-batch of an accumulated update, instead of their mean here."""
        out = self._base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                         head_mask=head_mask, cache_position=cache_position)
        logits = self.lm_head(out.last_hidden_state)  # (B, T, V)
        loss = None
        if labels is not None:
            _check_tensors(labels=labels)
            B, T, V = logits.shape
            check_labels(tuple(labels.shape), labels.dtype, B, T, V, _host_values(labels))
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
        return returned(CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                               hidden_states=out.hidden_states, attentions=out.attentions),
                        return_dict)


class OPTForSequenceClassification(_OPTWithHead):
    head = Head.SEQUENCE_CLASSIFICATION

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.word_embed_proj_dim, config.num_labels, bias=False)
        self.init_weights([self.score])
        self.pack_weights()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=False,
                output_attentions=False, return_dict=None, head_mask=None,
                cache_position=None):
        out = self._base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                         head_mask=head_mask, cache_position=cache_position)
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        B, T = logits.shape[:2]
        check_pooling(B, self.config.pad_token_id)
        if input_ids is not None and self.config.pad_token_id is not None:
            # the rightmost token that is not a pad (left or right padding alike)
            not_pad = (input_ids != self.config.pad_token_id).int()
            last = (torch.arange(T, device=logits.device, dtype=torch.int32) * not_pad).argmax(-1)
        else:
            last = torch.full((B,), T - 1, device=logits.device)
        pooled = logits[torch.arange(B, device=logits.device), last]  # (B, num_labels)
        loss = None
        if labels is not None:
            _check_tensors(labels=labels)
            check_classification_labels(tuple(labels.shape), labels.dtype, B, self.config, _host_values(labels))
            loss = sequence_classification_loss(pooled, labels, self.config)
        return returned(SequenceClassifierOutputWithPast(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                                                         hidden_states=out.hidden_states, attentions=out.attentions),
                        return_dict)


class OPTForQuestionAnswering(_OPTWithHead):
    head = Head.QUESTION_ANSWERING

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.qa_outputs = nn.Linear(config.word_embed_proj_dim, 2)
        self.init_weights([self.qa_outputs])
        self.pack_weights()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, start_positions=None, end_positions=None, use_cache=None,
                output_hidden_states=False, output_attentions=False, return_dict=None, head_mask=None,
                cache_position=None):
        out = self._base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                         head_mask=head_mask, cache_position=cache_position)
        logits = self.qa_outputs(out.last_hidden_state)  # (B, T, 2)
        start_logits, end_logits = logits[..., 0].contiguous(), logits[..., 1].contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            _check_tensors(start_positions=start_positions, end_positions=end_positions)
            for name, given in (("start_positions", start_positions), ("end_positions", end_positions)):
                check_span_positions(name, tuple(given.shape), given.dtype, logits.shape[0])
            loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions)
        return returned(QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                                     past_key_values=out.past_key_values,
                                                     hidden_states=out.hidden_states, attentions=out.attentions),
                        return_dict)


def returned(out, return_dict: Optional[bool]):
    """The output record, or with return_dict=False Hugging Face's tuple of its fields that are set."""
    return out.to_tuple() if return_dict is False else out


# ----------------------------------------------------------------------------------------- losses
# opt_spec.numerics defines each loss (and its NumPy reference): means over what counts, 0 over nothing.
def _mean_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                        count=None) -> torch.Tensor:
    """Mean float32 cross entropy of (N, C) logits over targets != ignore_index; 0, with zero gradients,
    when none counts (torch's own mean would be 0 / 0). `count` (a number or a tensor): divide the sum by it
    instead of by the targets counted here."""
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    if count is not None:
        return total / (count.to(total.device) if isinstance(count, torch.Tensor) else count)
    return total / (target != ignore_index).sum().clamp(min=1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, count=None) -> torch.Tensor:
    """Mean cross entropy (float32) of logits[:, t] against labels[:, t + 1], skipping IGNORE_INDEX (the sum
    divided by `count` when given: _mean_cross_entropy)."""
    V = logits.shape[-1]
    labels = labels.to(logits.device)
    # shift the labels, not the logits: no copy of the (B, T, V) tensor
    target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    return _mean_cross_entropy(logits.reshape(-1, V), target.reshape(-1), IGNORE_INDEX, count)


def sequence_classification_loss(pooled: torch.Tensor, labels: torch.Tensor, config: OPTConfig) -> torch.Tensor:
    integer = not (labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool)
    problem = problem_type(config, integer)
    pooled = pooled.float()
    if problem == "regression":
        if config.num_labels == 1:
            return F.mse_loss(pooled.squeeze(), labels.float().squeeze())
        return F.mse_loss(pooled, labels.float())
    if problem == "single_label_classification":
        return _mean_cross_entropy(pooled.view(-1, config.num_labels), labels.view(-1).long(), IGNORE_INDEX)
    return F.binary_cross_entropy_with_logits(pooled, labels.float())


def question_answering_loss(start_logits, end_logits, start_positions, end_positions) -> torch.Tensor:
    """Mean of start and end cross entropy; positions outside [0, T) are clamped to T and ignored."""
    T = start_logits.shape[1]
    start = start_positions.reshape(-1).clamp(0, T)
    end = end_positions.reshape(-1).clamp(0, T)
    return (_mean_cross_entropy(start_logits, start, T) + _mean_cross_entropy(end_logits, end, T)) / 2


MODEL_CLASSES = {Head.BASE: OPTModel, Head.CAUSAL_LM: OPTForCausalLM,
                 Head.SEQUENCE_CLASSIFICATION: OPTForSequenceClassification,
                 Head.QUESTION_ANSWERING: OPTForQuestionAnswering}
