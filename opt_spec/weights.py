"""The canonical weight table: every weight's name, shape and kind, in checkpoint order.

Canonical names are Hugging Face's PyTorch names and canonical layouts are PyTorch's (a linear weight
is (out, in)). A weight's *kind* decides everything a converter or backend needs to know about it:
how it is initialized, whether it is transposed in frameworks whose kernels are (in, out), and what
the leaf is called there. Its *role* says what it does in the network (a query projection, the
FFN's first matrix, ...): the partition table of `opt_spec.parallel` is derived from kind and role.
Nothing else is keyed on names.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .config import OPTConfig
from .errors import CheckpointError
from .numerics import POSITION_OFFSET


class WeightKind(str, enum.Enum):
    EMBEDDING = "embedding"
    LINEAR_WEIGHT = "linear_weight"
    LINEAR_BIAS = "linear_bias"
    NORM_SCALE = "norm_scale"
    NORM_BIAS = "norm_bias"


class Head(str, enum.Enum):
    BASE = "base"
    CAUSAL_LM = "causal_lm"
    SEQUENCE_CLASSIFICATION = "sequence_classification"
    QUESTION_ANSWERING = "question_answering"


class Role(str, enum.Enum):
    """What a weight does in the network, so that rules about parallelism need no name lists."""

    TOKEN_EMBEDDING = "token_embedding"        # (V, E): rows looked up per token; a tied LM head reads it too
    POSITION_EMBEDDING = "position_embedding"  # (P + 2, H)
    PROJECT_IN = "project_in"                  # E -> H (embedding width to hidden width, 350m)
    PROJECT_OUT = "project_out"                # H -> E
    ATTENTION_IN = "attention_in"              # q, k, v: H -> nh * hs, a block of rows per head
    ATTENTION_OUT = "attention_out"            # out_proj: nh * hs -> H
    FFN_IN = "ffn_in"                          # fc1: H -> F
    FFN_OUT = "ffn_out"                        # fc2: F -> H
    NORM = "norm"                              # LayerNorm scale and bias
    LM_HEAD = "lm_head"                        # E -> V
    CLASSIFIER = "classifier"                  # score, qa_outputs: E -> a few labels


HEADS = tuple(h.value for h in Head)
BASE_PREFIX = "model."  # head models keep the base model under `model.`; base checkpoints drop it
HEAD_WEIGHTS = {  # the canonical names that belong to each head (not to the base model)
    Head.BASE: (),
    Head.CAUSAL_LM: ("lm_head.weight",),
    Head.SEQUENCE_CLASSIFICATION: ("score.weight",),
    Head.QUESTION_ANSWERING: ("qa_outputs.weight", "qa_outputs.bias"),
}


@dataclass(frozen=True)
class WeightSpec:
    name: str
    shape: tuple[int, ...]
    kind: WeightKind
    role: Role | None = None  # every weight of the table has one

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _linear(prefix: str, out_dim: int, in_dim: int, bias: bool, role: Role) -> list[WeightSpec]:
    specs = [WeightSpec(f"{prefix}.weight", (out_dim, in_dim), WeightKind.LINEAR_WEIGHT, role)]
    if bias:
        specs.append(WeightSpec(f"{prefix}.bias", (out_dim,), WeightKind.LINEAR_BIAS, role))
    return specs


def _norm(prefix: str, dim: int, affine: bool) -> list[WeightSpec]:
    if not affine:
        return []
    return [WeightSpec(f"{prefix}.weight", (dim,), WeightKind.NORM_SCALE, Role.NORM),
            WeightSpec(f"{prefix}.bias", (dim,), WeightKind.NORM_BIAS, Role.NORM)]


def decoder_weights(config: OPTConfig, prefix: str = "decoder") -> list[WeightSpec]:
    """The base model's weights (names without the `model.` prefix)."""
    V, E, H, F, P = (config.vocab_size, config.word_embed_proj_dim, config.hidden_size,
                     config.ffn_dim, config.max_position_embeddings)
    bias, affine = config.enable_bias, config.layer_norm_elementwise_affine
    specs = [
        WeightSpec(f"{prefix}.embed_tokens.weight", (V, E), WeightKind.EMBEDDING, Role.TOKEN_EMBEDDING),
        WeightSpec(f"{prefix}.embed_positions.weight", (P + POSITION_OFFSET, H), WeightKind.EMBEDDING,
                   Role.POSITION_EMBEDDING),
    ]
    if config.has_projections:
        specs += _linear(f"{prefix}.project_out", E, H, False, Role.PROJECT_OUT)
        specs += _linear(f"{prefix}.project_in", H, E, False, Role.PROJECT_IN)
    if config.has_final_layer_norm:
        specs += _norm(f"{prefix}.final_layer_norm", H, affine)
    for i in range(config.num_hidden_layers):
        layer = f"{prefix}.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj"):
            specs += _linear(f"{layer}.self_attn.{proj}", H, H, bias, Role.ATTENTION_IN)
        specs += _linear(f"{layer}.self_attn.out_proj", H, H, bias, Role.ATTENTION_OUT)
        specs += _norm(f"{layer}.self_attn_layer_norm", H, affine)
        specs += _linear(f"{layer}.fc1", F, H, bias, Role.FFN_IN)
        specs += _linear(f"{layer}.fc2", H, F, bias, Role.FFN_OUT)
        specs += _norm(f"{layer}.final_layer_norm", H, affine)
    return specs


def head_weights(config: OPTConfig, head: Head | str) -> list[WeightSpec]:
    """The weights a head adds on top of the base model."""
    head = Head(head)
    E = config.word_embed_proj_dim
    if head is Head.CAUSAL_LM:
        return _linear("lm_head", config.vocab_size, E, False, Role.LM_HEAD)
    if head is Head.SEQUENCE_CLASSIFICATION:
        return _linear("score", config.num_labels, E, False, Role.CLASSIFIER)
    if head is Head.QUESTION_ANSWERING:
        return _linear("qa_outputs", 2, E, True, Role.CLASSIFIER)
    return []


def weight_table(config: OPTConfig, head: Head | str = Head.CAUSAL_LM) -> list[WeightSpec]:
    """Every canonical weight of a model with this config and head, in checkpoint order.

    A base model's names have no `model.` prefix; a head model's base weights do. A tied causal-LM
    head still lists `lm_head.weight`: it is a real tensor of the module (the same storage as the
    token embedding), and checkpoints may carry it or leave it out (see `optional_weights`).
    """
    head = Head(head)
    prefix = "decoder" if head is Head.BASE else BASE_PREFIX + "decoder"
    return decoder_weights(config, prefix) + head_weights(config, head)


def optional_weights(config: OPTConfig, head: Head | str) -> frozenset[str]:
    """Names a checkpoint may omit: the tied LM head, which is the token embedding."""
    if Head(head) is Head.CAUSAL_LM and config.tie_word_embeddings:
        return frozenset({"lm_head.weight"})
    return frozenset()


def tied_source(config: OPTConfig, head: Head | str) -> dict[str, str]:
    """Weights that are the same tensor as another one: {tied name: source name}."""
    if Head(head) is Head.CAUSAL_LM and config.tie_word_embeddings:
        return {"lm_head.weight": BASE_PREFIX + "decoder.embed_tokens.weight"}
    return {}


def count_parameters(config: OPTConfig, head: Head | str = Head.CAUSAL_LM) -> int:
    """Distinct parameters (a tied head counts once)."""
    tied = tied_source(config, head)
    return sum(w.numel for w in weight_table(config, head) if w.name not in tied)


# ------------------------------------------------------------------------------ name rules
def strip_base_prefix(name: str) -> str:
    return name[len(BASE_PREFIX):] if name.startswith(BASE_PREFIX) else name


def normalize_names(names: Iterable[str], head: Head | str) -> dict[str, str]:
    """Maps a checkpoint's names onto the names of a model with `head`: {checkpoint name: model name}.

    Base checkpoints store `decoder.*`, head checkpoints `model.decoder.*`; either loads into either.
    Names that belong to no decoder are returned unchanged (they are head weights or unexpected).
    """
    head = Head(head)
    out = {}
    for name in names:
        base = strip_base_prefix(name)
        if base.startswith("decoder."):
            out[name] = base if head is Head.BASE else BASE_PREFIX + base
        else:
            out[name] = name
    return out


class WeightMismatchError(CheckpointError):
    """A mapping of arrays does not match the weight table; lists every problem at once (a CheckpointError:
    a checkpoint whose tensors do not fit its config is refused like any other)."""

    def __init__(self, missing: Sequence[str], unexpected: Sequence[str],
                 mis_shaped: Sequence[tuple[str, tuple, tuple]], where: str = "checkpoint"):
        self.missing, self.unexpected, self.mis_shaped = list(missing), list(unexpected), list(mis_shaped)
        lines = [f"{where} does not match the OPT weight table:"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): " + _some(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): " + _some(self.unexpected))
        for name, got, want in self.mis_shaped[:SHOWN_NAMES]:
            lines.append(f"  wrong shape: {str(name)[:NAME_CHARS]} is {tuple(got)}, expected {tuple(want)}")
        if len(self.mis_shaped) > SHOWN_NAMES:
            lines.append(f"  ... and {len(self.mis_shaped) - SHOWN_NAMES} more of the wrong shape")
        super().__init__("\n".join(lines))


# A message names at most this many tensors, each cut to NAME_CHARS: a header from a stranger may hold
# 100,000 tensors with names of any length, and the whole list would be megabytes on one error line.
SHOWN_NAMES, NAME_CHARS = 20, 200


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(str(n)[:NAME_CHARS] for n in names[:SHOWN_NAMES])
    return shown + (f", ... ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else "")


def check_weights(shapes: Mapping[str, Sequence[int]], config: OPTConfig, head: Head | str = Head.CAUSAL_LM,
                  *, allow_missing: Iterable[str] = (), where: str = "checkpoint") -> None:
    """Compares {name: shape} (or {name: array}) with the weight table and raises one error listing
    all missing, unexpected and mis-shaped entries. `optional_weights` may always be absent."""
    table = {w.name: w.shape for w in weight_table(config, head)}
    may_miss = optional_weights(config, head) | set(allow_missing)
    got = {name: tuple(getattr(v, "shape", v)) for name, v in shapes.items()}
    missing = sorted(n for n in table if n not in got and n not in may_miss)
    unexpected = sorted(n for n in got if n not in table)
    mis_shaped = [(n, got[n], table[n]) for n in sorted(got) if n in table and got[n] != table[n]]
    if missing or unexpected or mis_shaped:
        raise WeightMismatchError(missing, unexpected, mis_shaped, where)



@dataclass(frozen=True)
class LoadPlan:
    """How a checkpoint's tensors become a model's weights (see `plan_load`)."""

    rename: dict[str, str]        # checkpoint name -> model name, for every tensor to load
    dropped: tuple[str, ...]      # checkpoint names deliberately left out (other heads, tied copies)
    fresh: tuple[WeightSpec, ...]  # head weights the checkpoint lacks: initialize them (and warn)
    tied: dict[str, str]          # model name -> the model name whose tensor it shares


def plan_load(shapes: Mapping[str, Sequence[int]], config: OPTConfig, head: Head | str,
              where: str = "checkpoint") -> LoadPlan:
    """Decides, once for every backend, how a checkpoint loads into a model with `head`.

    - Base (`decoder.*`) and head (`model.decoder.*`) checkpoints load into any model.
    - Weights of other heads are dropped (an LM checkpoint loads into a classifier), and so is a
      stored copy of a tied LM head.
    - A head the checkpoint lacks is initialized fresh: classification and QA heads always, an untied
      LM head only from a base checkpoint (a causal-LM checkpoint without it is broken).
    - Anything else missing, unexpected or mis-shaped raises one WeightMismatchError listing it all.
    """
    head = Head(head)
    names = normalize_names(shapes, head)
    other_heads = {n for h, ns in HEAD_WEIGHTS.items() if h is not head for n in ns}
    tied = tied_source(config, head)
    dropped = tuple(sorted(k for k, n in names.items() if n in other_heads or n in tied))
    rename = {k: n for k, n in names.items() if k not in dropped}
    from_base = not any(k.startswith(BASE_PREFIX) for k in shapes)
    may_init = set(HEAD_WEIGHTS[head]) if (head is not Head.CAUSAL_LM or from_base) else set()
    check_weights({n: shapes[k] for k, n in rename.items()}, config, head,
                  allow_missing=may_init | set(tied), where=where)
    present = set(rename.values())
    fresh = tuple(w for w in head_weights(config, head) if w.name not in present and w.name not in tied)
    return LoadPlan(rename=rename, dropped=dropped, fresh=fresh, tied=tied)


def planned_tensors(raw: Mapping[str, Any], config: OPTConfig, head: Head | str, model: str,
                    path) -> tuple["LoadPlan", dict[str, Any]]:
    """Every backend's from_pretrained: `plan_load` over a checkpoint's tensors `raw` (read from `path`), the
    warning for the head weights `model` (a class name) initializes, and the tensors to load by model name."""
    plan = plan_load({k: tuple(v.shape) for k, v in raw.items()}, config, head, where=f"checkpoint {path}")
    if plan.fresh:
        warnings.warn(f"{model}: {', '.join(w.name for w in plan.fresh)} not in {path}; freshly initialized "
                      "(train it before use)", stacklevel=3)
    return plan, {plan.rename[k]: v for k, v in raw.items() if k in plan.rename}
