"""Training parity across PyTorch, TensorFlow and Flax (opt_spec.training is the definition).

From one checkpoint (random, varied weights) and one left-padded batch with dropout off:
- the loss and every parameter's gradient agree across the three backends (the max abs difference
  per tensor kind is printed with `pytest -s`);
- after three AdamW updates with warm-up (the first rate is 0), linear decay, weight decay and
  clipping (max_grad_norm far below the gradient norm) every weight agrees within 1e-5 of its
  tensor's largest magnitude, in every pair of backends.

Why adam_epsilon=1e-4 here: the backends' float32 gradients differ by rounding (~1e-7 before
clipping), and Adam's step m_hat / (sqrt(v_hat) + eps) has slope up to 1/eps in the gradient, so a
weight can differ by up to STEPS * lr * dg / eps. With the usual eps=1e-8 that is ~1e-4 for the few
elements whose gradient is itself ~1e-8 (cancellation in an untied LM head row, and
self_attn.k_proj.bias, whose gradient is exactly zero in exact arithmetic because softmax ignores a
constant added to every key) while every other element agrees to ~3e-7; eps=1e-4 bounds the
amplification for every element, so the check can cover all of them. The update formula is the same.
"""
import collections

import numpy as np
import pytest
import torch

from opt_spec import io as spec_io
from opt_spec import weight_table
from opt_spec.testing import VARIANTS, random_batch, random_weights
from opt_spec.training import TrainConfig, learning_rate
from opt_torch.training import Trainer

pytest.importorskip("tensorflow")
pytest.importorskip("flax")

from opt_flax import params_to_canonical  # noqa: E402
from opt_flax.training import FlaxTrainer  # noqa: E402
from opt_tf.training import TFTrainer  # noqa: E402

BACKENDS = ("torch", "flax", "tf")
PAIRS = (("torch", "flax"), ("torch", "tf"), ("flax", "tf"))
CFG = TrainConfig(learning_rate=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-4,
                  warmup_steps=1, total_steps=4, schedule="linear", max_grad_norm=1.0)
STEPS = 3
CASES = [
    ("pre_ln", "causal_lm"),
    ("post_ln_proj", "sequence_classification"),
    pytest.param(("untied_head", "causal_lm"), marks=pytest.mark.slow),
    pytest.param(("no_bias", "question_answering"), marks=pytest.mark.slow),
    pytest.param(("no_bias", "causal_lm"), marks=pytest.mark.slow),
]


def _batch(config, head: str) -> dict:
    ids, mask = random_batch(config, batch=3, length=9, seed=1)
    batch = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
    if head == "causal_lm":
        batch["labels"] = np.where(mask == 1, ids, -100).astype(np.int64)
    elif head == "sequence_classification":
        batch["labels"] = np.array([0, 2, 1], np.int64)
    else:
        batch["start_positions"] = np.array([1, 4, 6], np.int64)
        batch["end_positions"] = np.array([3, 7, 8], np.int64)
    return batch


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def run(request, tmp_path_factory):
    """Loss, gradients, per-step metrics and weights after STEPS updates, for each backend."""
    variant, head = request.param
    config = VARIANTS[variant]
    path = tmp_path_factory.mktemp(f"{variant}-{head}")
    spec_io.save_safetensors_dir(path, random_weights(config, head, seed=3), config.to_dict())
    batch = _batch(config, head)

    trainers = {"torch": Trainer.from_pretrained(path, head, CFG), "flax": FlaxTrainer.from_pretrained(path, head, CFG),
                "tf": TFTrainer.from_pretrained(path, head, CFG)}
    # torch: plain autograd on the opt_torch model (dropout is off: the variants have dropout 0, and eval())
    model = trainers["torch"].model
    model.eval()
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    loss = model(**inputs, use_cache=False).loss
    loss.backward()
    losses = {"torch": loss.item()}
    grads = {"torch": {n: p.grad.numpy().copy() for n, p in model.named_parameters()}}
    model.zero_grad(set_to_none=True)
    losses["flax"], flax_grads = trainers["flax"].gradients(batch)
    grads["flax"] = params_to_canonical(flax_grads, config, head)
    losses["tf"], grads["tf"] = trainers["tf"].gradients(batch)

    steps = {b: [trainers[b].train_step(batch) for _ in range(STEPS)] for b in BACKENDS}
    weights = {"torch": {n: p.detach().numpy().copy() for n, p in model.named_parameters()},
               "flax": params_to_canonical(trainers["flax"].params, config, head),
               "tf": trainers["tf"].model.get_weights_dict()}
    kinds = {spec.name: spec.kind.value for spec in weight_table(config, head)}
    return dict(name=f"{variant}/{head}", losses=losses, grads=grads, steps=steps, weights=weights, kinds=kinds)


def test_same_tensors(run):
    names = [sorted(run["grads"][b]) for b in BACKENDS] + [sorted(run["weights"][b]) for b in BACKENDS]
    assert all(n == names[0] for n in names) and names[0]


def test_loss_and_gradients_agree(run):
    losses = run["losses"]
    assert max(losses.values()) - min(losses.values()) <= 1e-5 * abs(losses["torch"])
    report = {}
    for a, b in PAIRS:
        per_kind = collections.defaultdict(float)
        for name, ga in run["grads"][a].items():
            gb = run["grads"][b][name]
            assert ga.shape == gb.shape, name
            diff = float(np.abs(ga - gb).max())
            scale = float(np.abs(ga).max())
            assert diff <= 2e-6 + 1e-5 * scale, f"{a} vs {b}: {name} gradients differ by {diff} (max |g| {scale})"
            per_kind[run["kinds"][name]] = max(per_kind[run["kinds"][name]], diff)
        report[f"{a}-{b}"] = {k: f"{v:.1e}" for k, v in sorted(per_kind.items())}
    print(f"\n{run['name']} loss {losses}\nmax abs gradient difference per kind: {report}")


def test_schedule_and_clipping_were_active(run):
    for backend in BACKENDS:
        steps = run["steps"][backend]
        assert [s["learning_rate"] for s in steps] == [learning_rate(k, CFG) for k in range(STEPS)]
        rates = [s["learning_rate"] for s in steps]
        assert rates[0] == 0 and rates[1] == CFG.learning_rate and 0 < rates[2] < CFG.learning_rate  # warm-up, decay
        assert all(s["grad_norm"] > 2 * CFG.max_grad_norm for s in steps), (backend, steps)  # clipping triggers
    norms = np.array([[s["grad_norm"] for s in run["steps"][b]] for b in BACKENDS])
    assert np.abs(norms - norms[0]).max() <= 1e-5 * norms.max()


def test_weights_agree_after_three_adamw_updates(run):
    worst = {}
    for a, b in PAIRS:
        worst_pair = 0.0
        for name, wa in run["weights"][a].items():
            wb = run["weights"][b][name]
            rel = float(np.abs(wa - wb).max() / np.abs(wa).max())
            assert rel <= 1e-5, f"{a} vs {b}: {name} differs by {rel:.2e} relative after {STEPS} updates"
            worst_pair = max(worst_pair, rel)
        worst[f"{a}-{b}"] = f"{worst_pair:.1e}"
    print(f"\n{run['name']} max relative weight difference after {STEPS} updates: {worst}")


def test_weights_moved(run):
    """Guards the comparison above against a no-op: every backend changed every weight, the decayed
    ones by at least lr * weight_decay * |w| (eps=1e-4 makes tiny-gradient biases move little)."""
    config_name, head = run["name"].split("/")
    initial = random_weights(VARIANTS[config_name], head, seed=3)
    for backend in BACKENDS:
        for name, w in run["weights"][backend].items():
            assert not np.array_equal(w, initial[name]), f"{backend}: {name} did not move"
            if run["kinds"][name] in ("linear_weight", "embedding"):
                assert np.abs(w - initial[name]).max() > 1e-5, f"{backend}: {name} barely moved"


def test_zero_gradient_tensors_are_rounding_noise(run):
    """k_proj.bias: zero in exact arithmetic, rounding noise in every backend (see the module docstring)."""
    names = [n for n in run["grads"]["torch"] if n.endswith("self_attn.k_proj.bias")]
    for backend in BACKENDS:
        top = max(float(np.abs(g).max()) for g in run["grads"][backend].values())
        for name in names:
            assert float(np.abs(run["grads"][backend][name]).max()) <= 1e-6 * top, (backend, name)
