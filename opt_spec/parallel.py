"""How OPT is split over many devices: one partition table for every backend, and what each device holds.

A mesh has two axes. `fsdp` (fully sharded data parallel, ZeRO-3) splits the batch and one dimension
of every large weight, whose blocks are gathered when a layer runs; `tp` (Megatron tensor parallelism)
splits attention heads and the FFN's inner width, so that a layer's products run on blocks that never
leave their device. A weight's split is decided by its kind and role (`opt_spec.weights.Role`), in the
canonical (out, in) orientation, as a tuple naming the mesh axis of each dimension (None: not split):

    q, k, v, fc1, an untied lm_head   (tp, fsdp)   column-parallel: each device computes whole heads /
                                                   a block of the FFN's width / of the vocabulary
    their biases                      (tp,)        split like their outputs
    out_proj, fc2                     (fsdp, tp)   row-parallel: reads the blocks above; a sum over tp follows
    token embedding (V, E)            (tp, fsdp)   the vocabulary split, which a tied LM head follows
    position embedding (P + 2, H)     (None, fsdp) few rows are read per step: only the width is split
    project_in / project_out          fsdp on the hidden width, tp not used (small, 350m only)
    score, qa_outputs                 (None, fsdp) a few labels: only the width is split
    LayerNorms, out_proj/fc2 biases   replicated   small, and needed whole after the sum over tp

`check_plan(config, fsdp=, tp=)` applies the table to one model: it refuses a plan that cannot work
(tensor parallelism splits whole heads, so tp must divide the number of heads and the FFN width) and
leaves a dimension that an axis does not divide (the vocabulary 50272 over 64, a 3-label classifier
over tp) unsplit on that axis, reporting it. Activations: the batch is split over fsdp when fsdp
divides it (replicated otherwise, which is exact, only less parallel); the KV cache (B, nh, S, hs) is
split on batch (fsdp) and heads (tp).

A backend maps a canonical split through its own layout with `native_split` (Flax and Keras kernels
are (in, out), so the tuple is reversed for them). `memory_per_device` and `memory_table` give the
bytes each device holds for every preset on a mesh (weights, gradients, Adam state, KV cache), so
what fits where can be read before buying machines. NumPy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from .config import OPTConfig
from .layouts import is_transposed
from .weights import Head, Role, WeightKind, WeightSpec, tied_source, weight_table

FSDP, TP = "fsdp", "tp"
AXES = (FSDP, TP)
Split = tuple  # one entry per dimension: FSDP, TP or None

# The split of each role's matrix (out, in) or embedding (rows, width); biases and norms follow below.
_MATRIX_SPLIT: dict[Role, Split] = {
    Role.ATTENTION_IN: (TP, FSDP),
    Role.FFN_IN: (TP, FSDP),
    Role.LM_HEAD: (TP, FSDP),
    Role.TOKEN_EMBEDDING: (TP, FSDP),
    Role.ATTENTION_OUT: (FSDP, TP),
    Role.FFN_OUT: (FSDP, TP),
    Role.POSITION_EMBEDDING: (None, FSDP),
    Role.PROJECT_IN: (FSDP, None),   # (H, E): the hidden side
    Role.PROJECT_OUT: (None, FSDP),  # (E, H): the hidden side
    Role.CLASSIFIER: (None, FSDP),
}

KV_CACHE_SPLIT: Split = (FSDP, TP, None, None)  # (B, nh, S, hs), batch on fsdp when fsdp divides it


def canonical_split(spec: WeightSpec) -> Split:
    """The table's split of one weight, before any axis is dropped for not dividing a dimension."""
    if spec.role is None:
        raise ValueError(f"weight {spec.name} has no role; the partition table cannot place it")
    if spec.kind in (WeightKind.NORM_SCALE, WeightKind.NORM_BIAS):
        return (None,)
    if spec.role not in _MATRIX_SPLIT:
        raise ValueError(f"weight {spec.name}: no split for role {spec.role.value} and kind {spec.kind.value}")
    matrix = _MATRIX_SPLIT[spec.role]
    if spec.kind is WeightKind.LINEAR_BIAS:  # a bias is added to the output: split only when the output is on tp
        return (matrix[0] if matrix[0] == TP else None,)
    return matrix


def output_split(plan: "ShardingPlan", spec: WeightSpec) -> str | None:
    """The mesh axis of a linear layer's output features under a plan: TP when the plan splits its
    output rows on tp (column-parallel), else None. A backend constrains that activation's last
    dimension to it."""
    if spec.kind is not WeightKind.LINEAR_WEIGHT:
        raise ValueError(f"{spec.name} is a {spec.kind.value}, not a linear weight")
    return TP if plan.splits[spec.name][0] == TP else None


COLUMN, ROW, VOCAB = "column", "row", "vocab"  # Megatron's names for what tp splits in one layer


def tensor_parallel_style(plan: "ShardingPlan", spec: WeightSpec) -> str | None:
    """How tp splits one weight's layer under a plan, for backends whose engines take per-layer styles
    (torch's ColwiseParallel / RowwiseParallel): COLUMN, a linear layer's output features (each device
    computes a block of them); ROW, its input features (each device reads the block a column-parallel
    layer made; a sum over tp follows); VOCAB, an embedding's rows (each device looks up the tokens in
    its block of the vocabulary; a sum over tp follows); None, not split on tp. Biases and norms follow
    their layer and have no style of their own."""
    split = plan.splits[spec.name]
    if spec.kind is WeightKind.EMBEDDING:
        return VOCAB if split[0] == TP else None
    if spec.kind is WeightKind.LINEAR_WEIGHT:
        return COLUMN if split[0] == TP else ROW if split[1] == TP else None
    return None


def native_split(spec: WeightSpec, split: Split, convention: str) -> Split:
    """A canonical split in a framework's layout: reversed where its kernels are (in, out)."""
    return tuple(split)[::-1] if is_transposed(spec.kind, convention) else tuple(split)


def batch_axis(batch_size: int, fsdp: int) -> str | None:
    """FSDP when the fsdp axis divides the batch, else None (the batch is replicated)."""
    return FSDP if fsdp > 1 and batch_size % fsdp == 0 else None


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Unsplit:
    """A dimension that the table splits over an axis which does not divide it: left whole on that axis."""

    name: str
    dim: int
    size: int
    axis: str
    axis_size: int

    def __str__(self) -> str:
        return (f"{self.name}: dimension {self.dim} ({self.size}) is not divisible by {self.axis}={self.axis_size}; "
                f"replicated over {self.axis}")


@dataclass(frozen=True)
class ShardingPlan:
    """The partition table applied to one model on an fsdp x tp mesh (see `check_plan`)."""

    config: OPTConfig
    head: Head
    fsdp: int
    tp: int
    splits: Mapping[str, Split]      # canonical name -> split, axes that do not divide already dropped
    unsplit: tuple[Unsplit, ...]     # what was dropped, for the user to see

    def axis_size(self, axis: str | None) -> int:
        return {FSDP: self.fsdp, TP: self.tp, None: 1}[axis]

    def shard_shape(self, spec: WeightSpec) -> tuple[int, ...]:
        """The shape of the block one device holds."""
        return tuple(d // self.axis_size(a) for d, a in zip(spec.shape, self.splits[spec.name]))

    def block(self, spec: WeightSpec, fsdp_index: int = 0, tp_index: int = 0) -> tuple[slice, ...]:
        """The slices of the canonical array that the device at mesh position (fsdp_index, tp_index) holds."""
        index = {FSDP: fsdp_index, TP: tp_index, None: 0}
        return tuple(slice(index[a] * n, (index[a] + 1) * n) for a, n in zip(self.splits[spec.name],
                                                                               self.shard_shape(spec)))

    def replication(self, spec: WeightSpec) -> int:
        """How many devices hold each block of this weight."""
        used = math.prod(self.axis_size(a) for a in self.splits[spec.name])
        return self.fsdp * self.tp // used

    def describe(self) -> str:
        lines = [f"mesh fsdp={self.fsdp} x tp={self.tp} ({self.fsdp * self.tp} devices)"]
        if self.unsplit:
            lines.append(f"{len(self.unsplit)} dimension(s) replicated because an axis does not divide them:")
            lines += [f"  {u}" for u in self.unsplit]
        return "\n".join(lines)


def _check_axis(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}: a mesh axis size must be a positive int")
    return int(value)


def plan_problems(config: OPTConfig, tp: int) -> list[str]:
    """Why tensor parallelism of degree tp cannot split this model (empty when it can)."""
    nh, F = config.num_attention_heads, config.ffn_dim
    problems = []
    if nh % tp:
        problems.append(f"tp={tp} does not divide the {nh} attention heads")
    if F % tp:
        problems.append(f"tp={tp} does not divide ffn_dim={F}")
    return problems


def check_plan(config: OPTConfig, fsdp: int = 1, tp: int = 1, head: Head | str = Head.CAUSAL_LM) -> ShardingPlan:
    """The partition table for this model on an fsdp x tp mesh, or a ValueError saying why it cannot work.

    Tensor parallelism gives each device whole attention heads and an equal block of the FFN, so tp
    must divide num_attention_heads and ffn_dim. Any other dimension an axis does not divide is kept
    whole on that axis (replicated) and listed in `plan.unsplit`.
    """
    fsdp, tp = _check_axis("fsdp", fsdp), _check_axis("tp", tp)
    head = Head(head)
    problems = plan_problems(config, tp)
    if problems:
        nh, F = config.num_attention_heads, config.ffn_dim
        good = [d for d in range(1, math.gcd(nh, F) + 1) if math.gcd(nh, F) % d == 0]
        raise ValueError(f"cannot split this model with tp={tp}: " + "; ".join(problems)
                         + " (tensor parallelism gives each device whole attention heads and an equal block of the "
                         f"FFN); tp can be one of {', '.join(map(str, good))}")
    sizes = {FSDP: fsdp, TP: tp}
    table = weight_table(config, head)
    splits: dict[str, Split] = {}
    unsplit = []
    for spec in table:
        split = []
        for dim, (size, axis) in enumerate(zip(spec.shape, canonical_split(spec))):
            if axis is not None and size % sizes[axis]:
                unsplit.append(Unsplit(spec.name, dim, size, axis, sizes[axis]))
                axis = None
            split.append(axis if axis is None or sizes[axis] > 1 else None)
        splits[spec.name] = tuple(split)
    for tied, source in tied_source(config, head).items():  # a tied head is the embedding: the same split
        splits[tied] = splits[source]
    return ShardingPlan(config, head, fsdp, tp, splits, tuple(u for u in unsplit if u.name not in
                                                             tied_source(config, head)))


# --------------------------------------------------------------------------------- bytes per device
def _itemsize(dtype) -> int:
    from .io import numpy_dtype

    return numpy_dtype(dtype).itemsize


def memory_per_device(config: OPTConfig, fsdp: int = 1, tp: int = 1, dtype="float16", batch: int = 1,
                      length: int = 2048, head: Head | str = Head.CAUSAL_LM,
                      optimizer_dtype="float32") -> dict[str, int]:
    """Bytes one device holds on an fsdp x tp mesh, from the partition table:

    weights   every distinct weight's block (a tied head counts once), in `dtype`
    gradients the same blocks again (training)
    adam      Adam's two moments per parameter in `optimizer_dtype`, split like the weights
    kv_cache  keys and values of every layer for `batch` rows of `length` positions, in `dtype`,
              batch over fsdp (when it divides) and heads over tp

    plus `inference` (weights + kv_cache) and `training` (weights + gradients + adam). Activations and
    the framework's workspace are not counted; mixed-precision training that keeps float32 master
    weights (as optkit's trainers do) is dtype="float32".
    """
    plan = check_plan(config, fsdp, tp, head)
    tied = tied_source(config, head)
    shard_numel = sum(math.prod(plan.shard_shape(spec)) for spec in weight_table(config, head)
                      if spec.name not in tied)
    item, opt_item = _itemsize(dtype), _itemsize(optimizer_dtype)
    rows = batch // fsdp if batch_axis(batch, fsdp) else batch
    kv = 2 * config.num_hidden_layers * rows * (config.num_attention_heads // tp) * length * config.head_dim
    out = {"weights": shard_numel * item, "gradients": shard_numel * item, "adam": 2 * shard_numel * opt_item,
           "kv_cache": kv * item}
    out["inference"] = out["weights"] + out["kv_cache"]
    out["training"] = out["weights"] + out["gradients"] + out["adam"]
    return out


def memory_table(meshes: Iterable[tuple[int, int]], presets: Sequence[str] | None = None, dtype="float16",
                 batch: int = 1, length: int = 2048) -> list[dict]:
    """One row per (preset, mesh) with `memory_per_device`'s numbers, or the reason a mesh cannot hold
    that preset (`error`)."""
    from .presets import PRESETS

    names = list(presets) if presets is not None else [p for p in PRESETS if not p.startswith("tiny")]
    rows = []
    for name in names:
        config = OPTConfig.from_preset(name)
        for fsdp, tp in meshes:
            row = {"preset": name, "fsdp": fsdp, "tp": tp}
            problems = plan_problems(config, tp)
            if problems:
                row["error"] = "; ".join(problems)
            else:
                row.update(memory_per_device(config, fsdp, tp, dtype, batch, length))
            rows.append(row)
    return rows


def format_memory_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of `memory_table` rows, in GB (10**9 bytes) per device."""
    head = f"{'preset':<7} {'mesh':>9} {'weights':>9} {'grads':>9} {'adam':>9} {'kv cache':>9} " \
           f"{'inference':>10} {'training':>9}"
    lines = [head]
    for r in rows:
        mesh = f"{r['fsdp']}x{r['tp']}"
        if "error" in r:
            lines.append(f"{r['preset']:<7} {mesh:>9}  cannot: {r['error']}")
            continue
        gb = {k: r[k] / 1e9 for k in ("weights", "gradients", "adam", "kv_cache", "inference", "training")}
        lines.append(f"{r['preset']:<7} {mesh:>9} {gb['weights']:>9.2f} {gb['gradients']:>9.2f} {gb['adam']:>9.2f} "
                     f"{gb['kv_cache']:>9.2f} {gb['inference']:>10.2f} {gb['training']:>9.2f}")
    return "\n".join(lines)


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=2,tp=4' -> {'fsdp': 2, 'tp': 4} (an axis left out is 1; fsdp=-1 means "every other device"),
    with a message naming the problem otherwise."""
    out = {FSDP: 1, TP: 1}
    seen = set()
    for part in text.split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in AXES:
            raise ValueError(f"mesh {text!r}: expected axis=size pairs such as 'fsdp=2,tp=4' (axes: fsdp, tp), "
                             f"got {part.strip()!r}")
        if key in seen:
            raise ValueError(f"mesh {text!r}: axis {key} given twice")
        seen.add(key)
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh {text!r}: {key}={value.strip()!r} is not an integer") from None
        if size < 1 and not (key == FSDP and size == -1):
            raise ValueError(f"mesh {text!r}: {key}={size} must be a positive int (fsdp=-1: every other device)")
        out[key] = size
    if not seen:
        raise ValueError(f"mesh {text!r}: expected axis=size pairs such as 'fsdp=2,tp=4'")
    return out


__all__ = ["AXES", "COLUMN", "FSDP", "KV_CACHE_SPLIT", "ROW", "ShardingPlan", "TP", "Unsplit", "VOCAB", "batch_axis",
           "canonical_split", "check_plan", "format_memory_table", "memory_per_device", "memory_table", "native_split",
           "output_split", "parse_mesh", "plan_problems", "tensor_parallel_style"]
