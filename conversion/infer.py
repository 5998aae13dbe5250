"""An OPTConfig inferred from a checkpoint's tensor shapes, for formats that carry no config.json
(metaseq files, bare state_dict / weights files).

Shapes fix the sizes (vocabulary, widths, layers, positions) and the structural switches (biases,
LayerNorm affine, final LayerNorm, projections, tied head). What shapes cannot tell (the number of
heads, pre/post-LN when there is no final LayerNorm, the activation) comes from hints (a
checkpoint's own training args), else from the published preset with the same widths, else from
OPT's defaults (64-wide heads, relu); every guess is reported in the notes. Overrides win over all.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from opt_spec import PRESETS, OPTConfig
from opt_spec.weights import strip_base_prefix

from .base import ConversionError

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_fast": "gelu_new", "gelu_accurate": "gelu_new",
                "gelu_new": "gelu_new", "swish": "silu", "silu": "silu"}


def infer_config(shapes: Mapping[str, tuple[int, ...]], hints: Mapping[str, Any] | None = None,
                 overrides: Mapping[str, Any] | None = None, where: str = "checkpoint") -> tuple[OPTConfig, list[str]]:
    hints = dict(hints or {})
    notes: list[str] = []
    base = {strip_base_prefix(n): tuple(s) for n, s in shapes.items()}
    need = ["decoder.embed_tokens.weight", "decoder.embed_positions.weight", "decoder.layers.0.fc1.weight"]
    absent = [n for n in need if n not in base]
    if absent:
        raise ConversionError(f"{where}: cannot infer an OPT config: no {', '.join(absent)} "
                              f"(found {len(base)} tensors, e.g. {', '.join(sorted(base)[:5])})")
    V, E = base["decoder.embed_tokens.weight"]
    P2, H = base["decoder.embed_positions.weight"]
    F = base["decoder.layers.0.fc1.weight"][0]
    layer_ids = sorted({int(m.group(1)) for n in base if (m := _LAYER.match(n))})
    if layer_ids != list(range(len(layer_ids))):
        raise ConversionError(f"{where}: layer indices are not 0..N-1: {layer_ids}")
    affine = "decoder.layers.0.self_attn_layer_norm.weight" in base
    final_ln = "decoder.final_layer_norm.weight" in base
    config: dict[str, Any] = dict(
        vocab_size=V, hidden_size=H, word_embed_proj_dim=E, ffn_dim=F, num_hidden_layers=len(layer_ids),
        max_position_embeddings=P2 - 2, enable_bias="decoder.layers.0.fc1.bias" in base,
        layer_norm_elementwise_affine=affine,
        tie_word_embeddings=bool(hints.get("tie_word_embeddings", "lm_head.weight" not in shapes)),
    )
    if "score.weight" in shapes:
        config["num_labels"] = shapes["score.weight"][0]
    preset = next((p for p in PRESETS.values() if p["hidden_size"] == H and p.get("word_embed_proj_dim", H) == E
                   and p["ffn_dim"] == F), None)

    heads = hints.get("decoder_attention_heads") or hints.get("num_attention_heads")
    if heads:
        config["num_attention_heads"] = int(heads)
    elif preset is not None:
        config["num_attention_heads"] = preset["num_attention_heads"]
        notes.append(f"num_attention_heads={preset['num_attention_heads']} taken from the OPT preset of the same "
                     "size (shapes do not tell; override with num_attention_heads=...)")
    else:
        config["num_attention_heads"] = max(1, H // 64)
        notes.append(f"num_attention_heads={config['num_attention_heads']} guessed as hidden/64 (shapes do not "
                     "tell; override with num_attention_heads=...)")

    pre_ln = hints.get("decoder_normalize_before", hints.get("do_layer_norm_before"))
    if pre_ln is not None:
        config["do_layer_norm_before"] = bool(pre_ln)
    elif affine:
        config["do_layer_norm_before"] = final_ln  # OPT: pre-LN models end with a LayerNorm, post-LN (350m) not
        if not final_ln:
            notes.append("do_layer_norm_before=False (post-LN, as 350m) inferred from the missing final LayerNorm; "
                         "override with do_layer_norm_before=true for a pre-LN model without one")
    else:
        config["do_layer_norm_before"] = True
        notes.append("do_layer_norm_before=True assumed (LayerNorms without parameters leave no trace)")

    act = hints.get("activation_fn") or hints.get("activation_function")
    if act:
        if str(act) not in _ACTIVATIONS:
            raise ConversionError(f"{where}: unknown activation {act!r} in the checkpoint's args")
        config["activation_function"] = _ACTIVATIONS[str(act)]
    for ours, theirs in (("dropout", "dropout"), ("attention_dropout", "attention_dropout")):
        if isinstance(hints.get(theirs), (int, float)) and not isinstance(hints.get(theirs), bool):
            config[ours] = float(hints[theirs])
    config.update(dict(overrides or {}))
    if config["do_layer_norm_before"] and affine and not final_ln and "_remove_final_layer_norm" not in config:
        config["_remove_final_layer_norm"] = True
    try:
        return OPTConfig.from_dict(config), notes
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{where}: inferred config is invalid: {err}") from None
