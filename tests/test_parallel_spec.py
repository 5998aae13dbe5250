"""The partition table (opt_spec.parallel): it covers every weight of every variant and head, its
splits compose into the unsplit layer (a NumPy tensor-parallel layer built from the table's blocks
equals the whole layer), bad plans are refused in words, undivided dimensions are reported, and the
bytes-per-device figures agree with counts made another way."""

import subprocess
import sys

import numpy as np
import pytest

from opt_spec import OPTConfig, count_parameters, tied_source, weight_table
from opt_spec.layouts import CONVENTIONS, native_shape
from opt_spec.numerics import attention_scale
from opt_spec.parallel import (FSDP, TP, batch_axis, canonical_split, check_plan, format_memory_table,
                               memory_per_device, memory_table, native_split, output_split, parse_mesh)
from opt_spec.testing import VARIANTS, random_weights
from opt_spec.weights import Role, WeightKind

from .conftest import HEADS


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("head", HEADS)
def test_table_covers_every_weight(name, head):
    config = VARIANTS[name]  # 4 heads, ffn 48: tp=2 and tp=4 both work
    for fsdp, tp in ((1, 1), (2, 2), (1, 4), (8, 1)):
        plan = check_plan(config, fsdp=fsdp, tp=tp, head=head)
        table = weight_table(config, head)
        assert set(plan.splits) == {w.name for w in table}
        for spec in table:
            split = plan.splits[spec.name]
            assert len(split) == len(spec.shape) and set(split) <= {FSDP, TP, None}
            assert len([a for a in split if a]) == len({a for a in split if a})  # an axis splits one dimension
            for size, axis in zip(spec.shape, split):
                assert axis is None or size % plan.axis_size(axis) == 0
            shards = fsdp * tp // plan.replication(spec)
            assert np.prod(plan.shard_shape(spec)) * shards == spec.numel
        for tied, source in tied_source(config, head).items():
            assert plan.splits[tied] == plan.splits[source]


def test_splits_follow_kind_and_role():
    config = VARIANTS["post_ln_proj"]
    for spec in weight_table(config, "question_answering"):
        split = canonical_split(spec)
        if spec.kind in (WeightKind.NORM_SCALE, WeightKind.NORM_BIAS):
            assert split == (None,)
        elif spec.role in (Role.ATTENTION_IN, Role.FFN_IN):
            assert split == ((TP, FSDP) if spec.kind is WeightKind.LINEAR_WEIGHT else (TP,)), spec.name
        elif spec.role in (Role.ATTENTION_OUT, Role.FFN_OUT):
            assert split == ((FSDP, TP) if spec.kind is WeightKind.LINEAR_WEIGHT else (None,)), spec.name
        elif spec.role is Role.TOKEN_EMBEDDING:
            assert split == (TP, FSDP)
        else:  # positions, projections, the QA head: never on tp
            assert TP not in split, spec.name
    names = {s.name.split(".")[-2] for s in weight_table(config, "causal_lm")
             if s.kind is WeightKind.LINEAR_WEIGHT and canonical_split(s)[0] == TP}
    assert names == {"q_proj", "k_proj", "v_proj", "fc1", "lm_head"}
    lm_head = next(s for s in weight_table(VARIANTS["untied_head"], "causal_lm") if s.role is Role.LM_HEAD)
    assert canonical_split(lm_head) == (TP, FSDP)
    assert output_split(check_plan(VARIANTS["untied_head"], tp=2), lm_head) == TP
    assert output_split(check_plan(VARIANTS["untied_head"], tp=1), lm_head) is None
    vocab_odd = VARIANTS["untied_head"].replace(vocab_size=95)  # 95 rows do not split over tp=2
    assert output_split(check_plan(vocab_odd, tp=2), lm_head) is None


def test_native_split_follows_the_layout():
    config = VARIANTS["pre_ln"]
    for spec in weight_table(config, "causal_lm"):
        split = canonical_split(spec)
        for convention in CONVENTIONS:
            native = native_split(spec, split, convention)
            # the split names the same dimensions of the native array as of the canonical one
            if len(set(spec.shape)) == len(spec.shape):  # distinct sizes: the split follows each dimension
                assert dict(zip(native_shape(spec, convention), native)) == dict(zip(spec.shape, split))
            if convention != "torch" and spec.kind is WeightKind.LINEAR_WEIGHT:
                assert native == split[::-1]
            else:
                assert native == split


# --------------------------------------------------------------------- the splits compose exactly
def _blocks(plan, weights, spec_by_name, name, tp_index):
    spec = spec_by_name[name]
    return weights[name][plan.block(spec, 0, tp_index)]


def _layer_reference(w, prefix, x, config):
    """One pre-LN-free attention + FFN block of OPT in NumPy on x (T, H), no mask beyond causality."""
    T, H = x.shape
    nh, hs = config.num_attention_heads, config.head_dim

    def lin(name, v):
        return v @ w[f"{prefix}.{name}.weight"].T + w[f"{prefix}.{name}.bias"]

    q = (lin("self_attn.q_proj", x) * attention_scale(hs)).reshape(T, nh, hs).transpose(1, 0, 2)
    k = lin("self_attn.k_proj", x).reshape(T, nh, hs).transpose(1, 0, 2)
    v = lin("self_attn.v_proj", x).reshape(T, nh, hs).transpose(1, 0, 2)
    scores = q @ k.transpose(0, 2, 1) + np.triu(np.full((T, T), -1e30), 1)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = lin("self_attn.out_proj", (probs @ v).transpose(1, 0, 2).reshape(T, H))
    return lin("fc2", np.maximum(lin("fc1", x + attn), 0.0)) + x + attn


def _layer_tensor_parallel(w, prefix, x, config, plan, spec_by_name):
    """The same block with each of plan.tp devices holding only the table's blocks: column-parallel
    q/k/v/fc1 on its heads / FFN block, row-parallel out_proj/fc2 partial sums, summed over tp."""
    T, H = x.shape
    hs = config.head_dim
    attn = 0.0
    ffn_partials = []
    for d in range(plan.tp):
        def col(name, v, d=d):
            return v @ _blocks(plan, w, spec_by_name, f"{prefix}.{name}.weight", d).T + \
                _blocks(plan, w, spec_by_name, f"{prefix}.{name}.bias", d)

        q = col("self_attn.q_proj", x) * attention_scale(hs)
        nh_local = q.shape[1] // hs
        q = q.reshape(T, nh_local, hs).transpose(1, 0, 2)
        k = col("self_attn.k_proj", x).reshape(T, nh_local, hs).transpose(1, 0, 2)
        v = col("self_attn.v_proj", x).reshape(T, nh_local, hs).transpose(1, 0, 2)
        scores = q @ k.transpose(0, 2, 1) + np.triu(np.full((T, T), -1e30), 1)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        local = (probs @ v).transpose(1, 0, 2).reshape(T, nh_local * hs)
        attn = attn + local @ _blocks(plan, w, spec_by_name, f"{prefix}.self_attn.out_proj.weight", d).T
    attn = attn + w[f"{prefix}.self_attn.out_proj.bias"]  # replicated bias, added once after the sum
    h = x + attn
    for d in range(plan.tp):
        inner = np.maximum(h @ _blocks(plan, w, spec_by_name, f"{prefix}.fc1.weight", d).T
                           + _blocks(plan, w, spec_by_name, f"{prefix}.fc1.bias", d), 0.0)
        ffn_partials.append(inner @ _blocks(plan, w, spec_by_name, f"{prefix}.fc2.weight", d).T)
    return sum(ffn_partials) + w[f"{prefix}.fc2.bias"] + h


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_blocks_compose_into_the_layer(tp):
    config = VARIANTS["pre_ln"]
    plan = check_plan(config, fsdp=1, tp=tp)
    w = {k: v.astype(np.float64) for k, v in random_weights(config, "causal_lm", seed=3).items()}
    spec_by_name = {s.name: s for s in weight_table(config, "causal_lm")}
    x = np.random.default_rng(0).standard_normal((5, config.hidden_size))
    prefix = "model.decoder.layers.1"
    want = _layer_reference(w, prefix, x, config)
    got = _layer_tensor_parallel(w, prefix, x, config, plan, spec_by_name)
    assert np.abs(got - want).max() < 1e-12
    # a table that split out_proj like q (column-parallel) would not compose: the test can fail
    if tp > 1:
        wrong = dict(plan.splits)
        wrong[f"{prefix}.self_attn.out_proj.weight"] = (TP, None)
        bad = type(plan)(plan.config, plan.head, plan.fsdp, plan.tp, wrong, plan.unsplit)
        with pytest.raises(ValueError):  # shapes no longer line up
            _layer_tensor_parallel(w, prefix, x, config, bad, spec_by_name)


@pytest.mark.parametrize("fsdp,tp", [(2, 2), (1, 4), (4, 1)])
def test_vocabulary_split_embedding_and_tied_head(fsdp, tp):
    """Each tp block of the embedding looks up the ids in its vocabulary range (zeros elsewhere): the
    sum over tp is the full lookup, and the tied head's per-block logits side by side are the logits."""
    config = VARIANTS["pre_ln"]
    plan = check_plan(config, fsdp=fsdp, tp=tp)
    name = "model.decoder.embed_tokens.weight"
    spec = next(s for s in weight_table(config, "causal_lm") if s.name == name)
    emb = random_weights(config, "causal_lm", seed=1)[name].astype(np.float64)
    ids = np.array([0, 5, 95, 40, 41, 3])
    lookup, logits = 0.0, []
    x = np.random.default_rng(1).standard_normal((3, config.word_embed_proj_dim))
    for t in range(tp):
        # the fsdp blocks of one tp block, side by side, are that tp block's rows
        rows = np.concatenate([emb[plan.block(spec, f, t)] for f in range(fsdp)], axis=1)
        lo = plan.block(spec, 0, t)[0].start
        local = ids - lo
        inside = (local >= 0) & (local < rows.shape[0])
        lookup = lookup + np.where(inside[:, None], rows[np.clip(local, 0, rows.shape[0] - 1)], 0.0)
        logits.append(x @ rows.T)
    assert np.array_equal(lookup, emb[ids])
    assert np.allclose(np.concatenate(logits, axis=1), x @ emb.T, atol=1e-12)


# -------------------------------------------------------------------------------------- bad plans
@pytest.mark.parametrize("tp,words", [(3, "does not divide the 4 attention heads"),
                                      (8, "does not divide the 4 attention heads")])
def test_bad_plan_refused_in_words(tp, words):
    with pytest.raises(ValueError) as err:
        check_plan(VARIANTS["pre_ln"], fsdp=1, tp=tp)
    assert words in str(err.value) and f"tp={tp}" in str(err.value) and "1, 2, 4" in str(err.value)
    config = VARIANTS["pre_ln"].replace(ffn_dim=50)
    with pytest.raises(ValueError, match="does not divide ffn_dim=50"):
        check_plan(config, tp=4)
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="positive int"):
            check_plan(VARIANTS["pre_ln"], fsdp=bad)


def test_undivided_dimensions_are_replicated_and_reported():
    config = VARIANTS["post_ln_proj"]  # hidden 32, embeddings 24, vocab 96, 3 labels
    plan = check_plan(config, fsdp=3, tp=2, head="sequence_classification")
    reported = {(u.name, u.dim, u.axis) for u in plan.unsplit}
    for spec in weight_table(config, "sequence_classification"):
        for dim, (size, axis) in enumerate(zip(spec.shape, canonical_split(spec))):
            divides = axis is None or size % {FSDP: 3, TP: 2}[axis] == 0
            assert ((spec.name, dim, axis) in reported) == (not divides)
            if not divides:
                assert plan.splits[spec.name][dim] is None
    assert ("model.decoder.embed_tokens.weight", 1, FSDP) not in reported  # 24 = 3 x 8
    assert ("model.decoder.layers.0.fc1.weight", 1, FSDP) in reported      # 32 is not a multiple of 3
    text = plan.describe()
    assert "not divisible by fsdp=3" in text and "replicated over fsdp" in text
    assert check_plan(config, fsdp=2, tp=2).unsplit == ()


def test_batch_axis():
    assert batch_axis(8, 4) == FSDP and batch_axis(6, 4) is None and batch_axis(3, 1) is None


def test_parse_mesh():
    assert parse_mesh("fsdp=2,tp=4") == {"fsdp": 2, "tp": 4}
    assert parse_mesh(" tp=8 ") == {"fsdp": 1, "tp": 8}
    assert parse_mesh("fsdp=-1,tp=2") == {"fsdp": -1, "tp": 2}
    for text, words in (("fsdp=2,dp=4", "axes: fsdp, tp"), ("tp=x", "not an integer"), ("tp=0", "positive"),
                        ("tp=2,tp=4", "given twice"), ("", "expected axis=size"), ("fsdp", "expected axis=size")):
        with pytest.raises(ValueError, match=words):
            parse_mesh(text)


# ---------------------------------------------------------------------------------- bytes per device
def test_memory_on_one_device_is_the_parameter_count():
    for preset in ("125m", "350m", "175b"):
        config = OPTConfig.from_preset(preset)
        mem = memory_per_device(config, 1, 1, "float16", batch=2, length=512)
        assert mem["weights"] == 2 * count_parameters(config)
        assert mem["adam"] == 4 * mem["weights"] and mem["gradients"] == mem["weights"]
        assert mem["kv_cache"] == 2 * config.num_hidden_layers * 2 * 512 * config.hidden_size * 2
        assert mem["training"] == mem["weights"] * 6 and mem["inference"] == mem["weights"] + mem["kv_cache"]


def test_memory_175b_on_8x8():
    config = OPTConfig.from_preset("175b")
    mem = memory_per_device(config, fsdp=8, tp=8, dtype="float16", batch=1, length=2048)
    # every matrix is split 64 ways, except the positions (2050, H), split 8 ways on fsdp only; the q/k/v
    # and fc1 biases (7 x 12288 per layer) 8 ways on tp; LayerNorms and the out_proj/fc2 biases
    # (6 x 12288 per layer, plus the final LayerNorm) are whole on every device
    H, L = config.hidden_size, config.num_hidden_layers
    replicated, tp_biases, positions = (6 * L + 2) * H, 7 * L * H, (config.max_position_embeddings + 2) * H
    matrices = count_parameters(config) - replicated - tp_biases - positions
    assert mem["weights"] == 2 * (matrices // 64 + (positions + tp_biases) // 8 + replicated)
    assert 5.4e9 < mem["weights"] < 5.5e9  # 350 GB / 64
    # batch 1 cannot be split over fsdp: each device holds its 12 of the 96 heads for the whole batch
    assert mem["kv_cache"] == 2 * 96 * 1 * 12 * 2048 * 128 * 2
    assert memory_per_device(config, 8, 8, "float16", batch=8, length=2048)["kv_cache"] == mem["kv_cache"]


def test_memory_table_lists_presets_and_impossible_meshes():
    rows = memory_table([(1, 1), (8, 8)], presets=["125m", "175b"])
    assert [(r["preset"], r["fsdp"], r["tp"]) for r in rows] == [("125m", 1, 1), ("125m", 8, 8), ("175b", 1, 1),
                                                                 ("175b", 8, 8)]
    assert "does not divide the 12 attention heads" in rows[1]["error"]
    text = format_memory_table(rows)
    assert "cannot: tp=8 does not divide the 12 attention heads" in text and "175b" in text
    assert len(memory_table([(2, 4)])) == 9  # every published preset


def test_parallel_spec_imports_no_framework():
    code = ("import sys, opt_spec.parallel; "
            "print([m for m in ('torch', 'tensorflow', 'jax', 'flax') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tensor_parallel_styles_name_megatrons_layers():
    """Each layer's style under tp (what torch's ColwiseParallel / RowwiseParallel are chosen by): q, k, v,
    fc1 and the LM head column-parallel, out_proj and fc2 row-parallel, the token embedding split by
    vocabulary; nothing when tp=1 or when tp does not divide the dimension."""
    from opt_spec.parallel import COLUMN, ROW, VOCAB, tensor_parallel_style

    for name in ("pre_ln", "untied_head", "post_ln_proj"):
        config = VARIANTS[name]
        plan = check_plan(config, fsdp=2, tp=2)
        styles = {s.name.split(".")[-2]: tensor_parallel_style(plan, s) for s in weight_table(config, "causal_lm")
                  if s.kind in (WeightKind.LINEAR_WEIGHT, WeightKind.EMBEDDING)}
        assert {k for k, v in styles.items() if v == COLUMN} == {"q_proj", "k_proj", "v_proj", "fc1", "lm_head"}
        assert {k for k, v in styles.items() if v == ROW} == {"out_proj", "fc2"}
        assert {k for k, v in styles.items() if v == VOCAB} == {"embed_tokens"}
        assert styles["embed_positions"] is None and styles.get("project_in") is None
        norms = [s for s in weight_table(config) if s.kind is not WeightKind.LINEAR_WEIGHT
                 and s.kind is not WeightKind.EMBEDDING]
        assert all(tensor_parallel_style(plan, s) is None for s in norms)  # biases and norms follow their layer
        assert all(tensor_parallel_style(check_plan(config, fsdp=4), s) is None for s in weight_table(config))
    odd = VARIANTS["pre_ln"].replace(vocab_size=95)  # 95 rows do not split over tp=2: embedding and head stay whole
    plan = check_plan(odd, tp=2)
    by_role = {s.role: tensor_parallel_style(plan, s) for s in weight_table(odd)
               if s.kind is not WeightKind.LINEAR_BIAS}
    assert by_role[Role.TOKEN_EMBEDDING] is None and by_role[Role.LM_HEAD] is None and by_role[Role.FFN_IN] == COLUMN
