"""Which checkpoint a command runs on: `--model DIR`, a Hub id (`--model facebook/opt-125m`, resolved by
opt_spec.hub: the Hugging Face cache, downloaded when online), or a random one built for a named preset.

Without `--model`, `optkit parity` and `optkit generate` make a deterministic random checkpoint for
`--preset` (default 125m) so that they run on a fresh machine with nothing downloaded. It is cached in
`$OPTKIT_CACHE/random-<preset>-seed<seed>` (default cache: ~/.cache/optkit), written one tensor at a
time into a temporary sibling folder that is renamed into place when complete: an interrupted run
leaves nothing half-written, and a complete folder is reused as is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil

import numpy as np

from opt_spec import PRESETS, OPTConfig
from opt_spec.errors import CheckpointError
from opt_spec.io import CONFIG_NAME, SAFE_WEIGHTS_NAME, SafetensorsFile, atomic_path, write_safetensors_stream
from opt_spec.testing import VARIANTS, random_weight
from opt_spec.weights import Head, tied_source, weight_table

from .common import CLIError, Console

DEFAULT_PRESET = "125m"
RANDOM_MARKER = "optkit_random_weights"  # config.json key marking a checkpoint of random weights
PRESET_NAMES = tuple(PRESETS) + tuple(VARIANTS)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    path: str                # the folder given (its tokenizer files are read from here)
    config: OPTConfig
    random: dict | None      # {"preset": ..., "seed": ...} for random weights, else None
    load_path: str = ""      # the folder the backends load: `path`, or a safetensors copy of it
    hub_id: str = ""         # the Hub id `path` was resolved from (its snapshot in the Hugging Face cache)

    def __post_init__(self):
        if not self.load_path:
            object.__setattr__(self, "load_path", self.path)

    def describe(self) -> str:
        if self.hub_id:
            return f"{self.hub_id} ({self.path})"
        if self.random:
            return (f"{self.path} (RANDOM weights: preset {self.random.get('preset')}, "
                    f"seed {self.random.get('seed')})")
        if self.load_path != self.path:
            return f"{self.path} (as safetensors: {self.load_path})"
        return self.path


def cache_root() -> str:
    return os.environ.get("OPTKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "optkit")


def preset_config(name: str) -> OPTConfig:
    if name in VARIANTS:
        return VARIANTS[name]
    try:
        return OPTConfig.from_preset(name)
    except ValueError:
        raise CLIError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}") from None


def _expected_names(config: OPTConfig) -> set[str]:
    tied = tied_source(config, Head.CAUSAL_LM)
    return {w.name for w in weight_table(config, Head.CAUSAL_LM) if w.name not in tied}


def _is_complete(path: str, config: OPTConfig) -> bool:
    try:
        return (os.path.isfile(os.path.join(path, CONFIG_NAME))
                and set(SafetensorsFile(os.path.join(path, SAFE_WEIGHTS_NAME))) == _expected_names(config))
    except (OSError, ValueError):
        return False


def random_checkpoint(preset: str, seed: int, console: Console) -> ModelSource:
    """The cached random checkpoint for (preset, seed), written first if needed."""
    config = preset_config(preset)
    path = os.path.join(cache_root(), f"random-{preset}-seed{seed}")
    marker = {"preset": preset, "seed": seed}
    if _is_complete(path, config):
        return ModelSource(path, OPTConfig.from_pretrained(path), marker)

    tied = tied_source(config, Head.CAUSAL_LM)
    table = [w for w in weight_table(config, Head.CAUSAL_LM) if w.name not in tied]
    nbytes = sum(w.numel for w in table) * 4
    os.makedirs(cache_root(), exist_ok=True)
    free = shutil.disk_usage(cache_root()).free
    if free < nbytes * 1.05:
        raise CLIError(f"a random {preset} checkpoint needs {nbytes / 1e9:.2f} GB but {cache_root()} has "
                       f"{free / 1e9:.2f} GB free (set OPTKIT_CACHE to another folder, or pick a smaller --preset)")
    config_dict = config.to_saved_dict("OPTForCausalLM", "float32")
    config_dict[RANDOM_MARKER] = marker
    with console.step(f"writing a random {preset} checkpoint ({nbytes / 1e6:,.0f} MB, float32, seed {seed}) "
                      f"to {path} (once: later runs reuse it)"):
        with atomic_path(path) as tmp, console.progress(total=len(table), desc="random weights",
                                                        unit="tensor") as bar:
            os.makedirs(tmp)
            entries = [(w.name, w.shape, np.dtype(np.float32), functools.partial(random_weight, w, config, seed))
                       for w in table]  # each tensor is made when written: memory stays near one tensor
            write_safetensors_stream(os.path.join(tmp, SAFE_WEIGHTS_NAME), entries,
                                     metadata={"format": "pt", RANDOM_MARKER: json.dumps(marker)},
                                     on_written=lambda name, array: bar.update(1))
            with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
                f.write(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return ModelSource(path, OPTConfig.from_pretrained(path), marker)


def hub_arguments(p) -> None:
    """--revision / --cache-dir: which snapshot of a Hub id, from which Hugging Face cache."""
    p.add_argument("--revision", metavar="REV", help="with a Hub id: branch, tag or commit (default main)")
    p.add_argument("--cache-dir", metavar="DIR", help="with a Hub id: the Hugging Face cache "
                                                      "(default $HF_HUB_CACHE, else ~/.cache/huggingface/hub)")


def resolve_folder(name: str, option: str, console: Console, revision: str | None = None,
                   cache_dir: str | None = None, weights: bool = True) -> tuple[str, str]:
    """(local folder, Hub id or "") for a command-line folder-or-id: an existing path as given, else a
    Hub id resolved through opt_spec.hub (the one resolver every backend uses too)."""
    from opt_spec.hub import is_hub_id, resolve_pretrained

    path = os.path.expanduser(name)
    if os.path.exists(path) or not is_hub_id(name):
        return path, ""
    with console.step(f"{option} {name}: looking it up in the Hugging Face cache (downloading when online)"):
        folder = resolve_pretrained(name, revision=revision, cache_dir=cache_dir, weights=weights)
    return folder, name


def resolve_model(args, console: Console) -> ModelSource:
    """--model DIR or ID (checked) or the random checkpoint of --preset / --weights-seed."""
    if args.model is None:
        return random_checkpoint(args.preset or DEFAULT_PRESET, args.weights_seed, console)
    if args.preset is not None:
        raise CLIError("--preset picks a random checkpoint and --model a real one: give only one of them")
    path, hub_id = resolve_folder(args.model, "--model", console, getattr(args, "revision", None),
                                  getattr(args, "cache_dir", None))
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise CLIError(f"--model {args.model}: no such directory")
    if not os.path.isdir(path):
        raise CLIError(f"--model {args.model}: not a directory (give the folder holding config.json and "
                       "the weights, e.g. a download of facebook/opt-125m)")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        seen = ", ".join(sorted(os.listdir(path))[:20]) or "nothing"
        raise CLIError(f"--model {args.model}: no config.json, so not a Hugging Face OPT checkpoint folder "
                       f"(found: {seen})")
    config = OPTConfig.from_pretrained(path)  # a refused config.json: ConfigError naming the file (exit 1)
    marker = config.extra.get(RANDOM_MARKER)
    return ModelSource(path, config, marker if isinstance(marker, dict) else None, hub_id=hub_id)


def load_tokenizer(directory: str | None, source: ModelSource, cache_dir: str | None = None):
    """The OPTTokenizer of --tokenizer DIR (or a Hub id, at its main revision), else of the model folder,
    else None (no tokenizer files)."""
    from opt_spec.tokenizer import OPTTokenizer, find_tokenizer_files

    if directory is not None:
        directory, _ = resolve_folder(directory, "--tokenizer", Console(True), cache_dir=cache_dir, weights=False)
    if directory is not None and not os.path.isdir(directory):
        raise CLIError(f"--tokenizer {directory}: no such directory")
    where = directory or source.path
    if find_tokenizer_files(where) is None:
        if directory is not None:
            raise CLIError(f"--tokenizer {directory}: no tokenizer.json, or vocab.json + merges.txt, there")
        return None
    tokenizer = OPTTokenizer.from_pretrained(where, config=source.config)
    check_tokenizer_fits(tokenizer, source.config, where)
    return tokenizer


def check_tokenizer_fits(tokenizer, config: OPTConfig, where: str) -> None:
    """A tokenizer with more tokens than the model's embedding rows makes ids the model has no row for."""
    if tokenizer.vocab_size > config.vocab_size:
        raise CLIError(f"the tokenizer in {where} has {tokenizer.vocab_size} tokens but the model only "
                       f"{config.vocab_size}: they do not belong together")


def with_safetensors(source: ModelSource, console: Console) -> ModelSource:
    """The same checkpoint in a layout every backend reads (safetensors or pytorch_model.bin).

    A folder of another format (tf_model.h5, flax_model.msgpack, a native or metaseq file, ...) is
    converted once with the conversion package into $OPTKIT_CACHE/converted/<name>-<key>, the key
    changing when the source's files change.
    """
    from opt_spec.io import find_weight_files

    try:
        find_weight_files(source.path)
        return source
    except FileNotFoundError:
        pass  # no Hugging Face PyTorch-layout weights: maybe another format conversion reads
    try:
        from conversion.api import convert, detect_format
    except ImportError as err:
        raise CLIError(f"{source.path} holds no model.safetensors, and converting it needs optkit's conversion "
                       f"package, which does not import ({err})") from None
    try:
        fmt = detect_format(source.path)
    except CheckpointError:
        raise  # refused, not a usage mistake: exit 1 with the reason
    except (OSError, ValueError) as err:
        raise CLIError(f"--model {source.path}: {err}") from None
    import hashlib

    stats = sorted((f, os.stat(os.path.join(source.path, f)).st_size, os.stat(os.path.join(source.path, f)).st_mtime_ns)
                   for f in os.listdir(source.path) if os.path.isfile(os.path.join(source.path, f)))
    key = hashlib.sha256(repr((os.path.realpath(source.path), stats)).encode()).hexdigest()[:12]
    target = os.path.join(cache_root(), "converted", f"{os.path.basename(source.path.rstrip(os.sep))}-{key}")
    if not os.path.isfile(os.path.join(target, CONFIG_NAME)):  # convert() renames a verified folder into place
        with console.step(f"{source.path} is {fmt}; converting it once to safetensors in {target}"):
            convert(source.path, target, to="hf-safetensors", src_format=fmt, force=True,
                    progress=not console.quiet, log=console.info)
    return dataclasses.replace(source, load_path=target)
