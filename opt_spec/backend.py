"""Picking a backend for framework-agnostic code: `OPTKIT_BACKEND=torch|tf|flax`.

The backend is chosen once, by one variable, and imported on demand, so code that asks for the
torch backend never imports TensorFlow or JAX.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

BACKENDS = {"torch": "opt_torch", "tf": "opt_tf", "flax": "opt_flax"}
EXTRAS = {"torch": "torch", "tf": "tf", "flax": "flax"}
FRAMEWORK_MODULES = {"torch": "torch", "tf": "tensorflow", "flax": "flax"}
ENV_VAR = "OPTKIT_BACKEND"
DEFAULT_BACKEND = "torch"


class BackendUnavailableError(ImportError):
    pass


def backend_name(name: str | None = None) -> str:
    name = (name or os.environ.get(ENV_VAR) or DEFAULT_BACKEND).strip().lower()
    aliases = {"pytorch": "torch", "tensorflow": "tf", "jax": "flax"}
    name = aliases.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"unknown optkit backend {name!r} (from {ENV_VAR} or argument); "
                         f"choose one of {', '.join(BACKENDS)}")
    return name


def is_available(name: str) -> bool:
    return importlib.util.find_spec(FRAMEWORK_MODULES[backend_name(name)]) is not None


def load_backend(name: str | None = None) -> ModuleType:
    """The backend package named (or chosen by OPTKIT_BACKEND, default torch)."""
    name = backend_name(name)
    if not is_available(name):
        raise BackendUnavailableError(
            f"the {name} backend needs {FRAMEWORK_MODULES[name]}, which is not installed: "
            f"pip install 'optkit[{EXTRAS[name]}]'")
    return importlib.import_module(BACKENDS[name])
