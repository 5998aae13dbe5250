"""transformers' PEFT integration on the PyTorch OPT (needs the peft package): the methods transformers'
models have for LoRA adapters, without wrapping the model in a PeftModel.

- `load_adapter(folder or Hub id, adapter_name="default", is_trainable=False)`: a PEFT LoRA adapter, read as a
  stranger's files (opt_spec.adapters: bounded readers, ranks no larger than the file's tensors, every file
  inside the folder), or `peft_config=` with `adapter_state_dict=`. Every adapter tensor must be given, and
  each must fit: otherwise nothing of it stays loaded and the error names the tensors (transformers warns
  and keeps a half-initialized adapter).
- `add_adapter(peft_config, adapter_name)` (a fresh adapter to train), `set_adapter(name or names)`,
  `disable_adapters()` / `enable_adapters()`, `active_adapters()`, `get_adapter_state_dict(name)`,
  `delete_adapter(name or names)`.
- `save_pretrained(folder)` with adapters loaded writes the active adapter (adapter_config.json and
  adapter_model.safetensors, PEFT's names), as transformers does (OPTPreTrainedModel's save_pretrained
  calls `save_adapter`).
Generation with adapters takes the module path (opt_torch.fast_paths.modules_are_stock).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional

from opt_spec import adapters as spec_adapters
from opt_spec import io as spec_io
from opt_spec.hub import resolve_pretrained

from .checkpoint import numpy_to_torch, torch_to_numpy


def _peft():
    try:
        import peft.functional
    except ImportError as err:
        raise ImportError("adapters need the peft package (pip install peft)") from err
    return peft


class AdapterMethods:
    """Mixed into OPTPreTrainedModel."""

    _hf_peft_config_loaded = False

    def load_adapter(self, peft_model_id: Optional[str | os.PathLike] = None, adapter_name: Optional[str] = None,
                     is_trainable: bool = False, adapter_state_dict: Optional[dict] = None, peft_config=None, *,
                     revision: Optional[str] = None, token=None, cache_dir=None, local_files_only: bool = False) -> None:
        """peft_model_id: an adapter folder or a Hub id (with revision, token, cache_dir, local_files_only as in
        from_pretrained; only the adapter's files are fetched)."""
        peft = self._new_adapter("load_adapter", adapter_name)
        name = adapter_name or "default"
        if peft_model_id is not None:
            if adapter_state_dict is not None or peft_config is not None:
                raise ValueError("load_adapter takes a folder (peft_model_id), or peft_config with adapter_state_dict")
            folder = resolve_pretrained(peft_model_id, revision=revision, cache_dir=cache_dir,
                                        local_files_only=local_files_only, token=token, adapter=True)
            settings, arrays = spec_adapters.read_lora_adapter(folder)
            # the file's tensors replace the initial ones, so no initialization that reads or changes the base
            # weights (PiSSA, LoftQ...) is run
            peft_config = peft.PeftConfig.from_peft_type(**{**settings, "init_lora_weights": True,
                                                            "inference_mode": not is_trainable})
            state = {n: numpy_to_torch(a) for n, a in arrays.items()}  # bfloat16 files too
        elif peft_config is None or adapter_state_dict is None:
            raise ValueError("load_adapter needs a folder (peft_model_id), or peft_config with adapter_state_dict")
        else:
            state = {n.removeprefix(spec_adapters.SAVED_PREFIX): v for n, v in adapter_state_dict.items()}
        active = self.active_adapters() if self._hf_peft_config_loaded else None
        peft.functional.inject_adapter_in_model(peft_config, self, name)
        try:
            loaded = peft.functional.set_peft_model_state_dict(self, state, name)
            missing = [k for k in loaded.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
            if missing or loaded.unexpected_keys:
                raise ValueError(f"adapter {name!r}: " + "; ".join(
                    f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    for what, keys in (("tensors missing", missing), ("tensors the model has no place for",
                                                                      loaded.unexpected_keys)) if keys))
        except (ValueError, RuntimeError) as err:  # RuntimeError: load_state_dict's shape mismatch
            self._drop(name, active)
            raise ValueError(f"load_adapter({os.fspath(peft_model_id or 'adapter_state_dict')!r}): {err}") from None
        self._hf_peft_config_loaded = True
        if active:
            self.set_adapter(active)  # loading adds an adapter, the active ones stay (README: where optkit differs)
        if not is_trainable:
            self.eval()

    def add_adapter(self, adapter_config, adapter_name: Optional[str] = None) -> None:
        """A fresh adapter (PEFT's initialization) to train, made the active one."""
        peft = self._new_adapter("add_adapter", adapter_name)
        name = adapter_name or "default"
        peft.functional.inject_adapter_in_model(adapter_config, self, name)
        self._hf_peft_config_loaded = True
        self.set_adapter(name)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self._adapter_configs()]
        if unknown:
            raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}; loaded: "
                             f"{', '.join(map(repr, self._adapter_configs())) or 'none'}")
        _peft().functional.set_adapter(self, adapter_name)

    def enable_adapters(self) -> None:
        for layer in self._tuner_layers():
            layer.enable_adapters(True)

    def disable_adapters(self) -> None:
        for layer in self._tuner_layers():
            layer.enable_adapters(False)

    def active_adapters(self) -> list[str]:
        """The adapters that run, over every adapted module (transformers reads the first module's alone, which
        after a delete_adapter may be one that held only the deleted adapter)."""
        if not self._adapter_configs():
            raise ValueError("no adapter is loaded (load_adapter or add_adapter)")
        active = {}
        for layer in self._tuner_layers():
            names = layer.active_adapter
            active.update(dict.fromkeys([names] if isinstance(names, str) else names))
        return [n for n in active if n in self._adapter_configs()]

    def get_adapter_state_dict(self, adapter_name: Optional[str] = None) -> dict:
        """The adapter's tensors by PEFT's saved names (without the adapter name and SAVED_PREFIX)."""
        name = adapter_name or self.active_adapters()[0]
        if name not in self._adapter_configs():
            raise ValueError(f"no adapter named {name!r}")
        return _peft().functional.get_peft_model_state_dict(self, adapter_name=name)

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self._adapter_configs():
                raise ValueError(f"no adapter named {name!r}")
        for name in names:
            self._drop(name, None)

    def save_adapter(self, path: str | os.PathLike) -> list[str]:
        """The active adapter (one) as PEFT writes it: adapter_config.json and adapter_model.safetensors."""
        active = self.active_adapters()
        if len(active) != 1:
            raise ValueError(f"save_pretrained writes one adapter; {active} are active (set_adapter one)")
        state = self.get_adapter_state_dict(active[0])
        arrays = {spec_adapters.SAVED_PREFIX + n: torch_to_numpy(t.detach().cpu().contiguous())
                  for n, t in state.items()}
        os.makedirs(path, exist_ok=True)
        weights = os.path.join(os.fspath(path), spec_adapters.ADAPTER_WEIGHTS_NAMES[0])
        with spec_io.atomic_path(weights) as tmp:
            spec_io.write_safetensors(tmp, arrays)
        settings = self._adapter_configs()[active[0]].to_dict()
        settings["base_model_name_or_path"] = self.name_or_path or None
        settings = {k: sorted(v) if isinstance(v, set) else v for k, v in settings.items()}
        config = os.path.join(os.fspath(path), spec_adapters.ADAPTER_CONFIG_NAME)
        spec_io.atomic_write_text(config, json.dumps(settings, indent=2, sort_keys=True) + "\n")
        return [weights, config]

    # -------------------------------------------------------------------------------------- internals
    def _new_adapter(self, what: str, name: Optional[str]):
        """peft, once a new adapter `name` may be added here."""
        from .hf_compat import refuse_split

        refuse_split(self, what, "add it to the whole model, merge it (peft's merge_and_unload), save, and load that")
        if (name or "default") in self._adapter_configs():
            raise ValueError(f"an adapter named {name or 'default'!r} is loaded already: give another adapter_name")
        return _peft()

    def _adapter_configs(self) -> dict:
        return (getattr(self, "peft_config", None) or {}) if self._hf_peft_config_loaded else {}

    def _tuner_layers(self) -> list:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.modules() if isinstance(m, BaseTunerLayer)]

    def _drop(self, name: str, active: Optional[list[str]]) -> None:
        """Removes the adapter `name` (its tensors and config); `active` the adapters to keep active then."""
        peft = _peft()
        config = getattr(self, "peft_config", {}).get(name)
        prefix = f"{config.peft_type.value.lower()}_" if config is not None else "lora_"
        with warnings.catch_warnings():  # "adapter ... was active which is now deleted": `active` says what is
            warnings.simplefilter("ignore")
            peft.functional.delete_adapter(self, name, prefix)
        getattr(self, "peft_config", {}).pop(name, None)
        if active:
            peft.functional.set_adapter(self, active)
        if not getattr(self, "peft_config", None):
            self._hf_peft_config_loaded = False
