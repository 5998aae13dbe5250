"""PEFT LoRA adapter folders, read as files from strangers (for the PyTorch model's `load_adapter`).

A folder holds adapter_config.json (PEFT's LoraConfig as JSON: `peft_type` "LORA", the rank `r`, the target
modules...) and adapter_model.safetensors or adapter_model.bin (the adapter's tensors, named after the base
model's modules with `base_model.model.` before them). Both are read by optkit's bounded readers
(opt_spec.io: a JSON object of bounded size, the safetensors header's rules, the restricted unpickler of
opt_spec.torch_pickle), and each file must lie inside the folder.

Injecting an adapter allocates its tensors before the file's are copied in, at the sizes the config names;
so the config's ranks (`r` and every `rank_pattern` value) must be positive and at most the largest rank
among the file's own lora_A tensors, whose bytes the file holds: a config cannot ask for more than the file
could fill. Only LoRA adapters are read (PEFT's other kinds: peft.PeftModel.from_pretrained).
"""

from __future__ import annotations

import os

import numpy as np

from . import io
from .errors import CheckpointError
from .hub import ADAPTER_CONFIG_FILES, ADAPTER_WEIGHT_FILES

ADAPTER_CONFIG_NAME = ADAPTER_CONFIG_FILES[0]
ADAPTER_WEIGHTS_NAMES = ADAPTER_WEIGHT_FILES
SAVED_PREFIX = "base_model.model."  # what PEFT puts before the base model's module names in the files


def read_lora_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json's settings, {tensor name without SAVED_PREFIX: array}) of a LoRA adapter folder,
    checked as the module docstring says; a CheckpointError names the file and what is wrong."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not an adapter folder (adapter_config.json and "
                                f"{' or '.join(ADAPTER_WEIGHTS_NAMES)})")
    config_path = io.checkpoint_file(directory, ADAPTER_CONFIG_NAME)
    settings = io.json_object(config_path)
    if settings.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type is {settings.get('peft_type')!r:.50}; load_adapter reads LoRA "
                              "adapters (\"LORA\"); for PEFT's other kinds use peft.PeftModel.from_pretrained")
    present = [n for n in ADAPTER_WEIGHTS_NAMES if os.path.lexists(os.path.join(directory, n))]
    if not present:
        raise CheckpointError(f"{directory} has no {' or '.join(ADAPTER_WEIGHTS_NAMES)}")
    path = io.checkpoint_file(directory, present[0])
    if path.endswith(".safetensors"):
        arrays = dict(io.SafetensorsFile(path))
    else:
        from .torch_pickle import TorchZipReader, tensors_of

        arrays = {n: t.array() for n, t in tensors_of(TorchZipReader(path).obj, path).items()}
    ranks = [a.shape[0] for n, a in arrays.items()
             if {"lora_A", "lora_embedding_A"} & set(n.split(".")[-2:]) and a.ndim >= 1]
    if not ranks:
        raise CheckpointError(f"{path} holds no LoRA weights (no lora_A tensor)")
    pattern = settings.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise CheckpointError(f"{config_path}: rank_pattern must be an object, got {pattern!r:.50}")
    for key, r in [("r", settings.get("r", 8)), *((f"rank_pattern[{k!r:.50}]", v) for k, v in pattern.items())]:
        if not (isinstance(r, int) and not isinstance(r, bool) and 0 < r <= max(ranks)):
            raise CheckpointError(f"{config_path}: {key} is {r!r:.50}; a rank must be a positive integer at most "
                                  f"{max(ranks)}, the largest rank of the LoRA weights in {os.path.basename(path)}")
    return settings, {n.removeprefix(SAVED_PREFIX): a for n, a in arrays.items()}
