"""Hugging Face Hub ids ("facebook/opt-125m") -> a local folder, for every backend, the tokenizer,
the config and the CLI: the one place optkit talks to the Hub.

`resolve_pretrained(name_or_path, revision=..., cache_dir=...)` returns a folder that holds a Hugging
Face checkpoint, so that every loader keeps reading plain folders:

- an existing local path always wins, whatever it is named (as in transformers);
- else a name shaped like a Hub id is looked up in the Hugging Face cache (the layout huggingface_hub
  writes: models--ORG--NAME/{blobs, snapshots/COMMIT, refs/BRANCH}) and, when downloads are allowed,
  fetched into it first; only what a load needs is fetched: config.json, generation_config.json, the
  tokenizer files and the weights of ONE format (safetensors before pytorch_model.bin before
  tf_model.h5 before flax_model.msgpack; an index and its shards when sharded);
- downloads are off with local_files_only=True or HF_HUB_OFFLINE=1 (TRANSFORMERS_OFFLINE=1 too, as
  huggingface_hub reads it); then only the cache is read, and an id it lacks is an error naming the
  id, the revision and the cache folder.

The cache folder is cache_dir, else $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
(huggingface_hub's own rule). It and the offline switch are read from the environment at each call,
not when huggingface_hub was imported, so a test or a program can change them at run time.

NumPy-free and framework-free: `huggingface_hub` (the optional `hub` extra) is imported only when an
id is resolved, never for a local folder.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

INSTALL_HINT = "pip install 'optkit[hub]'"
DEFAULT_REVISION = "main"

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
# Weight formats in order of preference: (single file, index file). Shards are named
# <stem>-00001-of-00003<suffix> next to the index, as Hugging Face writes them.
WEIGHT_FORMATS = (("model.safetensors", "model.safetensors.index.json"),
                  ("pytorch_model.bin", "pytorch_model.bin.index.json"),
                  ("tf_model.h5", "tf_model.h5.index.json"),
                  ("flax_model.msgpack", "flax_model.msgpack.index.json"))

# A PEFT adapter repository (load_adapter): its config and the weights of the first of these it holds.
ADAPTER_CONFIG_FILES = ("adapter_config.json",)
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# huggingface_hub's rule for a repo id: "name" or "namespace/name" of word characters, '-' and '.',
# 1..96 long, not starting or ending with '-' or '.', without "--" or "..".
_ID_PART = r"(?![-.])[\w.-]{1,96}(?<![-.])"
_REPO_ID = re.compile(rf"(?:{_ID_PART}/)?{_ID_PART}")
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubUnavailableError(ImportError):
    """An id was given but huggingface_hub is not installed."""


class HubModelNotFoundError(FileNotFoundError):
    """An id that is neither in the cache (downloads off) nor obtainable from the Hub."""


def is_hub_id(name: str | os.PathLike) -> bool:
    """True when `name` is shaped like a Hub model id ("facebook/opt-125m", "gpt2")."""
    name = os.fspath(name)
    return bool(_REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The Hugging Face cache folder a lookup uses (see the module docstring for the order)."""
    if cache_dir is not None:
        return os.path.expanduser(os.fspath(cache_dir))
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return os.path.expanduser(cache)
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def offline() -> bool:
    """Whether downloads are switched off by the environment (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def files_to_fetch(repo_files: Iterable[str], weights: bool = True, adapter: bool = False) -> list[str]:
    """The files of a Hub repository that a load needs: config, generation config and tokenizer files
    present, and (weights=True) the weights of the first format of WEIGHT_FORMATS that it holds; with
    adapter=True a PEFT adapter's instead: its config and the first of ADAPTER_WEIGHT_FILES present."""
    repo_files = set(repo_files)
    if adapter:
        return [f for f in ADAPTER_CONFIG_FILES if f in repo_files] + \
            [f for f in ADAPTER_WEIGHT_FILES if f in repo_files][:1]
    wanted = [f for f in (*CONFIG_FILES, *TOKENIZER_FILES) if f in repo_files]
    if not weights:
        return wanted
    for single, index in WEIGHT_FORMATS:
        stem, suffix = os.path.splitext(single)
        shard = re.compile(rf"{re.escape(stem)}-\d{{5}}-of-\d{{5}}{re.escape(suffix)}")
        if single in repo_files:
            return wanted + [single]
        if index in repo_files:
            return wanted + [index] + sorted(f for f in repo_files if shard.fullmatch(f))
    return wanted


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise HubUnavailableError(f"loading a Hugging Face Hub id needs the huggingface_hub library, which is not "
                                  f"installed: {INSTALL_HINT}") from None
    return huggingface_hub


def _snapshot(folder: str, repo_id: str, revision: str, cache: str) -> str:
    """`folder`, which huggingface_hub gave for (repo_id, revision), checked to be one of that repository's
    snapshots in the cache: it joins refs/<revision>'s text to snapshots/ as it is, so a ref holding
    '../../..' or an absolute path would send every loader to a folder anywhere on the machine."""
    snapshots = os.path.realpath(os.path.join(cache, f"models--{repo_id.replace('/', '--')}", "snapshots"))
    if os.path.dirname(os.path.realpath(folder)) != snapshots:
        raise HubModelNotFoundError(f"{repo_id} (revision {revision!r}) in the Hugging Face cache {cache} resolves to "
                                    f"{folder}, which is not a snapshot of it (a ref file naming a path?); refused")
    return folder


def _cached_snapshot(hub, repo_id: str, revision: str, cache: str) -> str | None:
    """The snapshot folder of (repo_id, revision) in the cache, or None when it is not there."""
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        folder = hub.snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
    return _snapshot(folder, repo_id, revision, cache)


def pretrained_folder(name_or_path: str | os.PathLike, config=None, **hub) -> tuple[str, str, object]:
    """Every backend's from_pretrained starts here: (what it was given as a str, for `name_or_path`; the local
    folder, resolve_pretrained's with the `hub` keywords; the config given, else the folder's config.json).
    A folder that does not exist is a FileNotFoundError naming it."""
    from .config import OPTConfig

    given = os.fspath(name_or_path)
    folder = resolve_pretrained(given, **hub)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a checkpoint directory")
    return given, folder, config or OPTConfig.from_pretrained(folder)


def resolve_pretrained(name_or_path: str | os.PathLike, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                       token: str | bool | None = None, weights: bool = True, adapter: bool = False) -> str:
    """A local folder for `name_or_path`: the path itself when it exists (or is not shaped like a Hub id,
    so the caller reports it missing in its own words), else the Hugging Face cache's snapshot of the
    id at `revision` (a branch, tag or commit; default "main"), downloaded first when allowed.

    weights=False fetches only the config, generation config and tokenizer files (for a tokenizer or a
    config alone); adapter=True a PEFT adapter's files (files_to_fetch). Raises HubModelNotFoundError naming the id, revision and cache folder when the id
    cannot be had, HubUnavailableError when huggingface_hub is not installed.
    """
    path = os.fspath(name_or_path)
    if os.path.exists(path) or not is_hub_id(path):
        return path
    revision = revision or DEFAULT_REVISION
    if not isinstance(revision, str) or "\\" in revision or "\0" in revision or \
            any(part in ("", ".", "..") for part in revision.split("/")):  # "refs/pr/1" and "v1/x" are names
        raise HubModelNotFoundError(f"revision {revision!r:.100} is not a branch, tag or commit name (no '..', no "
                                    "absolute path)")
    cache = hub_cache_dir(cache_dir)
    where = f"{path} (revision {revision!r}) in the Hugging Face cache {cache}"
    hub = _hub()
    if local_files_only or offline():
        folder = _cached_snapshot(hub, path, revision, cache)
        if folder is None:
            why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1"
            raise HubModelNotFoundError(f"{path} is not a local folder, and there is no {where}; downloads are off "
                                        f"({why}): download it once while online, or give the checkpoint's folder")
        return folder

    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    network_errors: tuple[type[BaseException], ...] = (OSError,)  # requests' errors are OSErrors
    try:
        import httpx  # huggingface_hub >= 1.0 talks through httpx
        network_errors += (httpx.HTTPError,)
    except ImportError:
        pass
    try:
        listing = hub.HfApi(token=token).list_repo_files(path, revision=revision)
        folder = hub.snapshot_download(path, revision=revision, cache_dir=cache, token=token,
                                       allow_patterns=files_to_fetch(listing, weights, adapter))
        return _snapshot(folder, path, revision, cache)
    except RevisionNotFoundError:
        raise HubModelNotFoundError(f"{path} is not a local folder, and the Hub's {path} has no revision "
                                    f"{revision!r}") from None
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise HubModelNotFoundError(f"{path} is not a local folder, and the Hub has no model {path} that this "
                                    f"login may read (a private or gated model needs `hf auth login` or "
                                    f"token=...): {type(err).__name__}") from None
    except network_errors as err:  # no connection, the Hub down: what the cache holds still serves
        folder = _cached_snapshot(hub, path, revision, cache)
        if folder is None:
            raise HubModelNotFoundError(f"{path} is not a local folder, the Hub could not be reached "
                                        f"({type(err).__name__}: {err}), and there is no {where}") from None
        return folder
