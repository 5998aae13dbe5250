"""opt_torch.fast_paths: the compiled training forward gives the eager trainer's updates (same losses and
parameters to float32 rounding without dropout; with dropout its own masks, reproducible from the seed),
and a failing compiler falls back to eager."""

import numpy as np
import pytest
import torch

from opt_spec.testing import VARIANTS
from opt_spec.training import TrainConfig
from opt_torch import fast_paths
from opt_torch.modeling import MODEL_CLASSES
from opt_torch.training import TASK_HEADS, Trainer

CONFIG = VARIANTS["pre_ln"].replace(dropout=0.1, attention_dropout=0.1)  # vocab 96, hidden 32, 2 layers


def batches(n=3, B=4, T=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, CONFIG.vocab_size, size=(B, T))
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()})
    return out


def train(compile, mixed_precision=None, steps=3, dropout=0.1, seed=42, attention="sdpa"):
    cfg = TrainConfig(learning_rate=1e-3, weight_decay=0.01, warmup_steps=1, total_steps=steps, max_grad_norm=1.0,
                      mixed_precision=mixed_precision, seed=seed)
    config = CONFIG.replace(dropout=dropout, attention_dropout=dropout)
    model = MODEL_CLASSES[TASK_HEADS["causal_lm"]].from_config(config, seed=0, attn_implementation=attention)
    trainer = Trainer(model, cfg, "causal_lm", compile=compile)
    outs = [trainer.train_step([b]) for b in batches(steps)]
    return trainer, outs


@pytest.mark.slow  # compiling a forward and backward takes ~20-60 s on 2 CPU cores
@pytest.mark.parametrize("mixed_precision", [None, "bf16"])
def test_compiled_updates_equal_eager_updates(mixed_precision):
    eager, want = train(False, mixed_precision, dropout=0.0, attention="eager")  # what the compiled graph runs
    compiled, got = train(True, mixed_precision, dropout=0.0)
    assert eager.compiled is None and compiled.compiled is not None and compiled.compiled.active
    assert "compile_s" in got[0] and got[0]["compile_s"] > 0 and all("compile_s" not in o for o in got[1:])
    assert compiled.model.attn_implementation == "sdpa"  # explicit attention inside the compiled graph only
    tol = 1e-5 if mixed_precision is None else 2e-2  # bf16: fused casts round a little differently
    for w, g in zip(want, got):
        assert g["loss"] == pytest.approx(w["loss"], rel=tol)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=max(tol, 1e-4))
    for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
        if mixed_precision and name.endswith("k_proj.bias"):  # its gradient is 0 up to rounding (softmax ignores
            continue  # a shift of every score), which Adam turns into steps of +-lr: not comparable in bf16
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5 if mixed_precision is None else 1e-3, msg=name)


@pytest.mark.slow  # compiles twice (~20-60 s each on 2 CPU cores)
def test_compiled_dropout_draws_its_own_masks_reproducibly_from_the_seed():
    """Inductor draws the dropout masks inside its loops, seeded from torch's generator: the same seed gives
    the same run (a resume draws what the run would have), another seed other masks; the masks are not
    the eager model's, and they drop something (not the run without dropout)."""
    _, first = train(True)
    _, again = train(True)
    _, other = train(True, seed=43)
    _, eager = train(False)
    _, none = train(False, dropout=0.0)
    assert [o["loss"] for o in again] == [o["loss"] for o in first]
    assert [o["loss"] for o in other] != [o["loss"] for o in first]
    assert [o["loss"] for o in eager] != [o["loss"] for o in first]  # its own masks
    assert all(f["loss"] != n["loss"] for f, n in zip(first, none))


def test_a_failing_compiler_falls_back_to_the_eager_updates(monkeypatch):
    """The first update raises inside the compiled path: a warning, then the same update eagerly,
    from the same RNG state (dropout on), so the run equals an uncompiled one exactly."""
    calls = []

    def broken(model, **kwargs):
        def fn(**inputs):
            calls.append(1)
            torch.rand(5)  # draws from the generator before failing, as a partial forward would
            raise RuntimeError("no C++ compiler")
        return fn

    monkeypatch.setattr(fast_paths.torch, "compile", broken)
    _, want = train(False)
    with pytest.warns(UserWarning, match="torch.compile failed .*no C\\+\\+ compiler"):
        trainer, got = train(True)
    assert len(calls) == 1 and not trainer.compiled.active
    assert [o["loss"] for o in got] == [o["loss"] for o in want]
    assert all("compile_s" not in o for o in got)


def test_auto_compiles_only_large_unsplit_models():
    small = MODEL_CLASSES[TASK_HEADS["causal_lm"]].from_config(CONFIG, seed=0)
    assert not fast_paths.wants_compile(small, None, split=False, checkpointing=False)
    assert fast_paths.wants_compile(small, True, split=False, checkpointing=False)
    big = torch.nn.Linear(5000, 4000)  # 20,004,000 parameters
    assert fast_paths.wants_compile(big, None, split=False, checkpointing=False)
    assert not fast_paths.wants_compile(big, None, split=True, checkpointing=False)
    assert not fast_paths.wants_compile(big, None, split=False, checkpointing=True)
    assert not fast_paths.wants_compile(big, False, split=False, checkpointing=False)
