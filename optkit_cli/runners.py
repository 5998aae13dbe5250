"""One causal-LM model per backend behind one small interface: NumPy ids in, float32 NumPy logits out.

Each backend is imported only when asked for (through opt_spec.backend), so `optkit` with torch alone
installed never touches TensorFlow or JAX. A backend whose framework is missing raises
BackendUnavailableError (its message names the extra to install); one whose framework is installed but
does not import raises BackendNotReady.

`--mesh fsdp=2,tp=4` (generate, parity, train) lays the flax backend's model out over devices with
jax.sharding (opt_flax.distributed); `mesh_option` checks it and, unless JAX has already started, lets
a CPU-only machine simulate that many devices.
"""

from __future__ import annotations

import importlib
import os
import time

import numpy as np

from opt_spec.backend import BACKENDS, EXTRAS, BackendUnavailableError, backend_name, is_available

from .common import CLIError

MODEL_CLASSES = {"torch": "OPTForCausalLM", "tf": "TFOPTForCausalLM", "flax": "FlaxOPTForCausalLM"}
DTYPES = ("float32", "float16", "bfloat16")


class BackendNotReady(ImportError):
    """The framework is installed but optkit's package for it does not import (an ImportError inside)."""


def install_hint(name: str) -> str:
    return f"pip install 'optkit[{EXTRAS[name]}]'"


def import_backend(name: str):
    """(backend package, causal-LM class). Raises BackendUnavailableError / BackendNotReady."""
    name = backend_name(name)
    if not is_available(name):
        # load_backend's message names the missing framework and the extra.
        raise BackendUnavailableError(f"the {name} backend's framework is not installed: {install_hint(name)}")
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as err:  # the framework is there but broken (a partial install, a missing library)
        raise BackendNotReady(f"{BACKENDS[name]} does not import ({err}); reinstall with {install_hint(name)}") \
            from None
    return module, getattr(module, MODEL_CLASSES[name])


class Runner:
    """A loaded model of one backend. Subclasses convert arrays to and from their framework."""

    name = ""

    def __init__(self, cls, path: str, dtype: str, mesh: dict | None = None):
        self.dtype = dtype
        start = time.perf_counter()
        options = {} if mesh is None else {"mesh": self.make_mesh(mesh)}
        self.model = cls.from_pretrained(path, dtype=dtype, **options)
        self.load_s = time.perf_counter() - start

    def make_mesh(self, mesh: dict):
        raise CLIError(f"--mesh: the {self.name} backend does not shard over devices (the flax backend does)")

    # Framework arrays <-> NumPy.
    def to_native(self, array: np.ndarray):
        raise NotImplementedError

    @staticmethod
    def to_numpy(x) -> np.ndarray:
        if hasattr(x, "detach"):  # torch
            x = x.detach().cpu()
            x = x.float() if x.is_floating_point() else x
            return x.numpy()
        if hasattr(x, "numpy"):  # tensorflow
            x = x.numpy()
        return np.asarray(x)

    def _call(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, T) ids and mask -> (B, T, V) float32 logits."""
        out = self._call(self.to_native(input_ids), self.to_native(attention_mask))
        return self.to_numpy(out.logits).astype(np.float32, copy=False)

    @property
    def has_generate(self) -> bool:
        return callable(getattr(self.model, "generate", None))

    @property
    def can_stream(self) -> bool:
        """The backend's generate takes `streamer=fn`, called with each step's (B,) tokens."""
        import inspect

        try:
            return "streamer" in inspect.signature(self.model.generate).parameters
        except (TypeError, ValueError):
            return False

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, streamer=None, **options) -> np.ndarray:
        """The backend's own generate (issue 6's signature) -> (B, T + new) NumPy ids.
        streamer(tokens (B,) NumPy) is called after each step when the backend streams."""
        if streamer is not None:
            options["streamer"] = lambda tokens: streamer(self.to_numpy(tokens))
        options.setdefault("return_dict_in_generate", False)  # the ids, whatever generation_config.json says
        out = self.model.generate(self.to_native(input_ids), attention_mask=self.to_native(attention_mask),
                                  **options)
        return self.to_numpy(out).astype(np.int64, copy=False)


class TorchRunner(Runner):
    name = "torch"

    def to_native(self, array):
        import torch

        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))

    def _call(self, input_ids, attention_mask):
        import torch

        with torch.inference_mode():
            return super()._call(input_ids, attention_mask)

    def generate(self, input_ids, attention_mask, **options):
        import torch

        with torch.inference_mode():
            return super().generate(input_ids, attention_mask, **options)


class TFRunner(Runner):
    name = "tf"

    def to_native(self, array):
        import tensorflow as tf

        return tf.convert_to_tensor(np.asarray(array, dtype=np.int32))

    def _call(self, input_ids, attention_mask):
        """The forward as a traced graph, not eagerly: without the per-op Python the 125m forward on `optkit
        parity`'s batch takes half the time after its first call (measured on a loaded 2-core machine: 2.9 ->
        1.5 s). The same kernels, so the same math; Grappler fuses a few ops, so logits move by float32
        rounding (parity's random 125m: up to 6.9e-5; its torch-vs-tf max difference stays 5.72e-5). Not
        XLA: a compile per new shape (~5-30 s) that parity's two calls and the fallback generate loop's
        growing batches never earn back (parity's max difference then 7.4e-5). One trace serves every shape."""
        import tensorflow as tf

        if not hasattr(self, "_traced"):
            call = lambda ids, mask: self.model(input_ids=ids, attention_mask=mask, use_cache=False)  # noqa: E731
            self._traced = tf.function(call, reduce_retracing=True)
        _check_token_ids(input_ids.numpy(), self.model.config.vocab_size)  # the model checks only when eager
        return self._traced(input_ids, attention_mask)


def _check_token_ids(ids: np.ndarray, vocab_size: int) -> None:
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if bad.size:
        b, t = (int(i) for i in bad[0])
        raise ValueError(f"token id {int(ids[b, t])} at batch row {b}, position {t} is outside the "
                         f"vocabulary [0, {vocab_size})")


class FlaxRunner(Runner):
    name = "flax"

    def to_native(self, array):
        import jax.numpy as jnp

        return jnp.asarray(np.asarray(array, dtype=np.int32))

    def make_mesh(self, mesh: dict):
        return flax_mesh(mesh)


RUNNERS = {"torch": TorchRunner, "tf": TFRunner, "flax": FlaxRunner}


def load_runner(name: str, path: str, dtype: str, mesh: dict | None = None) -> tuple[Runner, float]:
    """(runner, import seconds). Raises BackendUnavailableError / BackendNotReady before loading.
    mesh ({"fsdp": F, "tp": T}, see mesh_option) loads the model sharded over F x T devices."""
    start = time.perf_counter()
    _, cls = import_backend(name)
    import_s = time.perf_counter() - start
    return RUNNERS[backend_name(name)](cls, path, dtype, mesh), import_s


def mesh_option(text: str | None, backend: str = "flax") -> dict | None:
    """--mesh 'fsdp=2,tp=4' -> {"fsdp": 2, "tp": 4} (None when not given), for the flax backend only.

    JAX fixes its device count when it starts: unless XLA_FLAGS says otherwise, a machine without
    accelerators then simulates fsdp x tp CPU devices (accelerators, where present, are used instead)."""
    if text is None:
        return None
    from opt_spec.parallel import parse_mesh

    if backend_name(backend) != "flax":
        raise CLIError(f"--mesh: sharding a model over devices is offered by the flax backend (jax.sharding), "
                       f"not {backend}")
    try:
        mesh = parse_mesh(text)
    except ValueError as err:
        raise CLIError(f"--mesh: {err}") from None
    count = mesh["fsdp"] * mesh["tp"]
    flags = os.environ.get("XLA_FLAGS", "")
    if mesh["fsdp"] > 0 and count > 1 and "host_platform_device_count" not in flags:  # read when JAX starts
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return mesh


def flax_mesh(mesh: dict):
    """A jax.sharding.Mesh from mesh_option's {"fsdp": F, "tp": T} (opt_flax.distributed.make_mesh)."""
    from opt_flax.distributed import make_mesh

    try:
        return make_mesh(**mesh)
    except ValueError as err:
        raise CLIError(f"--mesh: {err}") from None
