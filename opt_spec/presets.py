"""The published OPT sizes (all share vocab 50272, 2048 positions and relu)."""

def _preset(layers: int, hidden: int, heads: int, **extra) -> dict:
    return dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                ffn_dim=4 * hidden, vocab_size=50272, max_position_embeddings=2048, **extra)


PRESETS: dict[str, dict] = {
    "125m": _preset(12, 768, 12),
    # 350m is the odd one: post-LN, 512-wide embeddings projected in and out, no final LayerNorm.
    "350m": _preset(24, 1024, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
    "1.3b": _preset(24, 2048, 32),
    "2.7b": _preset(32, 2560, 32),
    "6.7b": _preset(32, 4096, 32),
    "13b": _preset(40, 5120, 40),
    "30b": _preset(48, 7168, 56),
    "66b": _preset(64, 9216, 72),
    "175b": _preset(96, 12288, 96),
}

# Tiny shapes for tests and examples: same structure as the real presets, seconds to run.
PRESETS["tiny"] = _preset(2, 32, 4) | dict(vocab_size=100, max_position_embeddings=64)
PRESETS["tiny-350m"] = PRESETS["tiny"] | dict(word_embed_proj_dim=16, do_layer_norm_before=False)
