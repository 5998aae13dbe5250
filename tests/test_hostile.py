"""Hostile checkpoints: each kind of attack on the shared readers, built here from a small valid
checkpoint, refused with a CheckpointError that names the file and the entry — through the reader,
through a backend's from_pretrained where cheap (PyTorch), and through `optkit` (exit 1, one line).
The layouts a stranger's file imitates (a Hugging Face hub cache of symlinks, a sharded folder) still load.
"""

import json
import math
import os
import struct

import h5py
import numpy as np
import pytest
import torch

from conversion import ConversionError, convert, detect_format, read_checkpoint
from opt_spec import OPTConfig
from opt_spec import io as spec_io
from opt_spec.errors import CheckpointError, ConfigError
from opt_spec.testing import VARIANTS, random_weights
from opt_torch import OPTForCausalLM
from optkit_cli.main import main

CONFIG = VARIANTS["pre_ln"]
INDEXES = {"hf-safetensors": spec_io.SAFE_INDEX_NAME, "hf-pytorch": spec_io.TORCH_INDEX_NAME,
           "hf-tf": "tf_model.h5.index.json", "hf-flax": "flax_model.msgpack.index.json"}


def hf_dir(path, shard_size="5GB", seed=0):
    spec_io.save_safetensors_dir(path, random_weights(CONFIG, seed=seed), CONFIG.to_dict(), max_shard_size=shard_size)
    return str(path)


def cli(capsys, *args):
    """(exit code, stderr) of `optkit ARGS`, checking that any error is one line and no traceback."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    if code:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"optkit {args[0]}: error: "), err
    return code, err


def loaded(tensors) -> dict:
    return {k: np.array(v) for k, v in tensors.items()}


# --------------------------------------------------------------------- 1. paths named by an index
def _bad_names(tmp_path, good: str, folder: str):
    """weight_map values that must be refused: climbing out, absolute, a symlink out, a non-string."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    stolen = outside / good
    stolen.write_bytes((tmp_path / folder / good).read_bytes())  # a valid shard: read today, refused now
    link = f"link-{good}"
    os.symlink(stolen, os.path.join(tmp_path, folder, link))
    return {"dotdot": f"../outside/{good}", "absolute": str(stolen), "inner-dotdot": f"x/../../outside/{good}",
            "symlink-out": link, "number": 7, "list": [good]}


@pytest.mark.parametrize("fmt", list(INDEXES))
def test_index_entries_cannot_leave_the_folder(tmp_path, capsys, fmt):
    src = hf_dir(tmp_path / "src")
    convert(src, tmp_path / "ckpt", to=fmt, max_shard_size="20KB", progress=False)
    index_path = tmp_path / "ckpt" / INDEXES[fmt]
    index = json.loads(index_path.read_text())
    victim = next(iter(index["weight_map"]))
    good = index["weight_map"][victim]
    for kind, bad in _bad_names(tmp_path, good, "ckpt").items():
        index["weight_map"][victim] = bad
        index_path.write_text(json.dumps(index))
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(tmp_path / "ckpt")
        message = str(err.value)
        assert INDEXES[fmt] in message and repr(victim) in message, (kind, message)
        if kind in ("number", "list"):
            assert "not a file name" in message, message
        elif kind == "symlink-out":
            assert "outside the checkpoint folder" in message, message
        else:
            assert "plain relative path" in message, message
        if fmt in ("hf-safetensors", "hf-pytorch"):  # the backends' reader is the same function
            with pytest.raises(CheckpointError, match="weight_map"):
                spec_io.find_weight_files(tmp_path / "ckpt")
    code, err = cli(capsys, "convert", tmp_path / "ckpt", tmp_path / "out", "--quiet")
    assert code == 1 and repr(victim) in err and not (tmp_path / "out").exists()


def test_torch_from_pretrained_refuses_a_traversing_index(tmp_path):
    ckpt = hf_dir(tmp_path / "ckpt", shard_size="20KB")
    index_path = os.path.join(ckpt, spec_io.SAFE_INDEX_NAME)
    index = json.load(open(index_path))
    victim = sorted(index["weight_map"])[0]
    index["weight_map"][victim] = "../../../../../../../../etc/passwd"
    json.dump(index, open(index_path, "w"))
    with pytest.raises(CheckpointError, match=r"weight_map\[.*plain relative path"):
        OPTForCausalLM.from_pretrained(ckpt)


def _hub_cache(root, files: dict[str, bytes], revision="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face hub cache as huggingface_hub lays it out: content-addressed blobs, a snapshot
    folder of relative symlinks into them, and refs/main naming the snapshot."""
    import hashlib

    repo = root / "models--facebook--opt-tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), snapshot / name)
    return snapshot


def test_hub_cache_and_sharded_folders_still_load(tmp_path):
    weights = random_weights(CONFIG)
    sharded = hf_dir(tmp_path / "sharded", shard_size="20KB")
    names = sorted(os.listdir(sharded))
    assert spec_io.SAFE_INDEX_NAME in names and len(names) > 3
    snapshot = _hub_cache(tmp_path / "hub", {n: open(os.path.join(sharded, n), "rb").read() for n in names})
    assert all(os.path.islink(snapshot / n) for n in names)
    for folder in (sharded, snapshot):
        assert loaded(spec_io.load_checkpoint_dir(folder)).keys() == weights.keys()
        assert all(np.array_equal(v, weights[k]) for k, v in loaded(spec_io.load_checkpoint_dir(folder)).items())
        model = OPTForCausalLM.from_pretrained(folder)
        embed = model.state_dict()["model.decoder.embed_tokens.weight"].numpy()
        assert np.array_equal(embed, weights["model.decoder.embed_tokens.weight"])
        ckpt = read_checkpoint(folder)
        assert all(np.array_equal(ref.load(), weights[n]) for n, ref in ckpt.tensors.items())
    convert(snapshot, tmp_path / "from-hub", progress=False)
    # ... but a snapshot symlink that leaves the cache's blobs is refused like any other
    os.symlink(os.path.join("..", "..", "..", "..", "sharded", names[0]), snapshot / "stray.safetensors")
    index = json.loads((snapshot / spec_io.SAFE_INDEX_NAME).read_text())
    victim = next(iter(index["weight_map"]))
    index["weight_map"][victim] = "stray.safetensors"
    os.unlink(snapshot / spec_io.SAFE_INDEX_NAME)
    (snapshot / spec_io.SAFE_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        spec_io.load_checkpoint_dir(snapshot)


def test_weight_files_and_config_may_not_be_symlinks_out(tmp_path):
    ckpt = hf_dir(tmp_path / "ckpt")
    secret = tmp_path / "secret.safetensors"
    os.replace(os.path.join(ckpt, "model.safetensors"), secret)
    os.symlink(secret, os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors.*outside the checkpoint folder"):
        OPTForCausalLM.from_pretrained(ckpt)
    os.replace(os.path.join(ckpt, "config.json"), tmp_path / "config.json")
    os.symlink(tmp_path / "config.json", os.path.join(ckpt, "config.json"))
    with pytest.raises(CheckpointError, match="config.json.*outside the checkpoint folder"):
        OPTConfig.from_pretrained(ckpt)


# ---------------------------------------------------------------------------------- 2. HDF5
def _first_dataset(f) -> str:
    found = []
    f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and not found else None)
    return found[0]


def _rebuild(path, tmp_path, how: str) -> str:
    """Replaces the first dataset of an HDF5 file by one whose bytes live elsewhere; its name."""
    other = tmp_path / "other.h5"
    raw = tmp_path / "raw.bin"
    with h5py.File(path, "r+") as f:
        name = _first_dataset(f)
        data = f[name][()]
        leaked = np.full_like(data, 7)  # what a leak would copy into the converted model
        raw.write_bytes(leaked.tobytes())
        with h5py.File(other, "w") as g:
            g["x"] = leaked
        del f[name]
        if how == "external-storage":
            f.create_dataset(name, shape=data.shape, dtype=data.dtype, external=[(str(raw), 0, leaked.nbytes)])
        elif how == "external-link":
            f[name] = h5py.ExternalLink(str(other), "/x")
        elif how == "soft-link":
            f["elsewhere"] = leaked
            f[name] = h5py.SoftLink("/elsewhere")
        elif how == "virtual":
            layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
            layout[...] = h5py.VirtualSource(str(other), "x", shape=data.shape)
            f.create_virtual_dataset(name, layout)
    return name


@pytest.mark.parametrize("how", ["external-storage", "external-link", "soft-link", "virtual"])
def test_hdf5_reads_only_what_the_file_stores(tmp_path, capsys, how):
    src = hf_dir(tmp_path / "src")
    convert(src, tmp_path / "tf", to="hf-tf", progress=False)
    name = _rebuild(tmp_path / "tf" / "tf_model.h5", tmp_path, how)
    words = {"external-storage": "external file", "external-link": "ExternalLink", "soft-link": "SoftLink",
             "virtual": "virtual"}[how]
    with pytest.raises(ConversionError) as err:
        read_checkpoint(tmp_path / "tf")
    assert "tf_model.h5" in str(err.value) and name.split("/")[-1] in str(err.value) and words in str(err.value)
    code, err = cli(capsys, "convert", tmp_path / "tf", tmp_path / "out", "--quiet")
    assert code == 1 and words in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["external-link", "external-storage"])
def test_keras_weights_file_reads_only_what_it_stores(tmp_path, how):
    src = hf_dir(tmp_path / "src")
    convert(src, tmp_path / "model.weights.h5", progress=False)
    name = _rebuild(tmp_path / "model.weights.h5", tmp_path, how)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(tmp_path / "model.weights.h5")
    assert "model.weights.h5" in str(err.value) and name in str(err.value)


def test_hdf5_unknown_filter_and_object_dtype_are_refused(tmp_path):
    src = hf_dir(tmp_path / "src")
    convert(src, tmp_path / "tf", to="hf-tf", progress=False)
    with h5py.File(tmp_path / "tf" / "tf_model.h5", "r+") as f:
        name = _first_dataset(f)
        shape = f[name].shape
        del f[name]
        f.create_dataset(name, shape=shape, dtype=h5py.string_dtype())
    with pytest.raises(ConversionError, match="not a number type"):
        read_checkpoint(tmp_path / "tf")


# ------------------------------------------------------------------------- 3. safetensors headers
def _safetensors(path, header, data: bytes) -> str:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


def _valid_header():
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.float16)
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]}}
    return header, a.tobytes() + b.tobytes()


HEADER_ATTACKS = {
    # name: (change to the valid header and data, words in the message, the tensor it names or None)
    "overlap": (lambda h, d: (h["b"].update(data_offsets=[16, 24]) or (h, d)), "overlaps", "b"),
    "gap": (lambda h, d: (h["b"].update(data_offsets=[32, 40]) or (h, d + bytes(8))), "unused", "b"),
    "trailing-bytes": (lambda h, d: (h, d + bytes(16)), "MetadataIncompleteBuffer", None),
    "json-array": (lambda h, d: ([h["a"]], d), "expected a JSON object, got a JSON array", None),
    "deep": (lambda h, d: (b"[" * 100_000 + b"]" * 100_000, d), "nested deeper than 64", None),
    "negative-dim": (lambda h, d: (h["a"].update(shape=[-2, -3]) or (h, d)), "negative", "a"),
    "int64-overflow": (lambda h, d: (h["a"].update(shape=[2**40, 2**40, 8]) or (h, d)), "int64", "a"),
    "empty-but-huge": (lambda h, d: (h.update(e={"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]})
                                     or (h, d)), "bytes than an int64 can count", "e"),
    "metadata-not-strings": (lambda h, d: (h.update(__metadata__={"format": 1}) or (h, d)), "__metadata__", None),
    "duplicate-key": (lambda h, d: (json.dumps(h).replace('"b":', '"a":').encode(), d), "twice", "a"),
    "unknown-dtype": (lambda h, d: (h["a"].update(dtype="F128") or (h, d)), "dtype", "a"),
    "bool-shape": (lambda h, d: (h["b"].update(shape=[True, 4]) or (h, d)), "integers", "b"),
    "huge-header-length": (lambda h, d: (b"{}", d), None, None),  # length rewritten below
}


@pytest.mark.parametrize("attack", list(HEADER_ATTACKS))
def test_safetensors_headers_follow_the_library_rules(tmp_path, attack):
    change, words, tensor = HEADER_ATTACKS[attack]
    header, data = change(*_valid_header())
    path = _safetensors(tmp_path / "x.safetensors", header, data)
    if attack == "huge-header-length":
        raw = bytearray(open(path, "rb").read())
        raw[:8] = struct.pack("<Q", 2**62)
        open(path, "wb").write(bytes(raw))
        words = "corrupt safetensors header (length"
    with pytest.raises(CheckpointError) as err:
        spec_io.SafetensorsFile(path)
    message = str(err.value)
    assert path in message and words in message, message
    if tensor is not None:
        assert repr(tensor) in message, message


def test_the_valid_header_loads(tmp_path):
    header, data = _valid_header()
    st = spec_io.SafetensorsFile(_safetensors(tmp_path / "x.safetensors", header, data))
    assert st.metadata == {"format": "pt"} and np.array_equal(st["a"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_bad_header_through_the_backend_and_the_cli(tmp_path, capsys):
    ckpt = hf_dir(tmp_path / "ckpt")
    path = os.path.join(ckpt, "model.safetensors")
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    second = sorted(spec_io.SafetensorsFile(path), key=lambda k: header[k]["data_offsets"][0])[1]
    header[second]["data_offsets"] = [x - 4 for x in header[second]["data_offsets"]]  # 4 bytes into the first
    _safetensors(path, header, raw[8 + n:])
    with pytest.raises(CheckpointError, match=f"tensor '{second}'.*overlaps"):
        OPTForCausalLM.from_pretrained(ckpt)
    code, err = cli(capsys, "convert", ckpt, tmp_path / "out", "--quiet")
    assert code == 1 and "overlaps" in err and "model.safetensors" in err


@pytest.mark.parametrize("file", ["config.json", spec_io.SAFE_INDEX_NAME])
def test_json_depth_limit_for_config_and_index(tmp_path, capsys, file):
    ckpt = hf_dir(tmp_path / "ckpt", shard_size="20KB")
    (tmp_path / "ckpt" / file).write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(CheckpointError, match=f"{file}: JSON nested deeper than 64 levels"):
        OPTForCausalLM.from_pretrained(ckpt)
    code, err = cli(capsys, "convert", ckpt, tmp_path / "out", "--quiet")
    assert code == 1 and file in err and "nested deeper" in err


# ----------------------------------------------------------------------------- 6. config bounds
CONFIG_ATTACKS = [
    ("num_hidden_layers", 10**9, "maximum 1,024"),
    ("hidden_size", 10**6, "maximum 65,536"),
    ("vocab_size", 2**40, "maximum"),
    ("num_labels", 10**8, "maximum"),
    ("init_std", float("nan"), "finite"),
    ("dropout", float("inf"), "finite"),
    ("ffn_dim", True, "must be an int"),
    ("vocab_size", 96.0, "must be an int"),
    ("do_layer_norm_before", 1, "must be a bool"),
    ("activation_function", ["relu"], "unknown activation"),
]


@pytest.mark.parametrize("field,value,words", CONFIG_ATTACKS, ids=[f"{f}={v!r}" for f, v, _ in CONFIG_ATTACKS])
def test_config_fields_are_bounded(tmp_path, field, value, words):
    ckpt = hf_dir(tmp_path / "ckpt")
    data = json.load(open(os.path.join(ckpt, "config.json")))
    data[field] = value
    open(os.path.join(ckpt, "config.json"), "w").write(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        OPTConfig.from_pretrained(ckpt)
    message = str(err.value)
    assert "config.json" in message and f"{field}=" in message and words in message, message


def test_total_parameters_are_bounded():
    with pytest.raises(ConfigError, match="MAX_PARAMETERS"):
        OPTConfig(num_hidden_layers=1024, hidden_size=65536, num_attention_heads=64, ffn_dim=262144)
    assert OPTConfig.from_preset("175b").max_parameters < 2e11  # every real size stays far inside


def test_a_billion_layers_fails_at_once_everywhere(tmp_path, capsys):
    ckpt = hf_dir(tmp_path / "ckpt")
    data = json.load(open(os.path.join(ckpt, "config.json")))
    data["num_hidden_layers"] = 10**9
    open(os.path.join(ckpt, "config.json"), "w").write(json.dumps(data))
    with pytest.raises(ConfigError, match="num_hidden_layers=1000000000"):
        OPTForCausalLM.from_pretrained(ckpt)
    with pytest.raises(ConfigError, match="num_hidden_layers=1000000000"):
        read_checkpoint(ckpt)
    code, err = cli(capsys, "convert", ckpt, tmp_path / "out", "--quiet")
    assert code == 1 and "num_hidden_layers=1000000000" in err
    code, err = cli(capsys, "generate", "--model", ckpt, "--backend", "torch", "-q", "2 3")
    assert code == 1 and "num_hidden_layers=1000000000" in err


# ------------------------------------------------------------------ 7. refusals people can read
def _evil_pickle_dir(tmp_path) -> str:
    """A pytorch_model.bin whose pickle calls os.system (it would create `pwned` if ever run)."""
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"model.decoder.embed_tokens.weight": torch.zeros(2), "x": Evil()}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(CONFIG.to_json_string())
    return str(folder)


def test_unsafe_pickle_is_one_line_and_exit_1(tmp_path, capsys):
    evil = _evil_pickle_dir(tmp_path)
    code, err = cli(capsys, "convert", evil, tmp_path / "out", "--quiet")
    assert code == 1 and "system" in err and "Traceback" not in err
    bare = tmp_path / "evil.pt"
    os.replace(os.path.join(evil, "pytorch_model.bin"), bare)
    with pytest.raises(Exception) as exc:  # detect_format keeps the reason instead of "no known layout"
        detect_format(bare)
    assert "system" in str(exc.value) and "matches no known" not in str(exc.value)
    code, err = cli(capsys, "convert", bare, tmp_path / "out", "--quiet")
    assert code == 1 and "system" in err
    assert not (tmp_path / "pwned").exists()


def test_metaseq_parts_not_0_to_k_keep_their_reason(tmp_path, capsys):
    folder = tmp_path / "parts"
    folder.mkdir()
    for k in (0, 2):
        torch.save({"model": {"decoder.embed_tokens.weight": torch.zeros(4, 2)}}, folder / f"reshard-model_part-{k}.pt")
    with pytest.raises(ConversionError, match=r"not 0..K-1: found parts \[0, 2\]"):
        detect_format(folder)
    code, err = cli(capsys, "convert", folder, tmp_path / "out", "--quiet")
    assert code == 1 and "not 0..K-1" in err


def test_failed_convert_removes_only_the_folders_it_made(tmp_path, capsys):
    src = str(tmp_path / "bf16")
    spec_io.save_safetensors_dir(src, random_weights(CONFIG, dtype=spec_io.numpy_dtype("bfloat16")), CONFIG.to_dict())
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "note.txt").write_text("mine")
    # HDF5 has no bfloat16: the write fails inside the temporary folder, after DST's parents were made
    with pytest.raises(ConversionError, match="bfloat16"):
        convert(src, tmp_path / "new" / "deeper" / "out", to="hf-tf", progress=False)
    assert not (tmp_path / "new").exists()
    code, err = cli(capsys, "convert", src, tmp_path / "kept" / "made" / "out", "--to", "hf-tf", "--quiet")
    assert code == 1 and "bfloat16" in err
    assert sorted(os.listdir(tmp_path / "kept")) == ["note.txt"]
    assert (tmp_path / "kept" / "note.txt").read_text() == "mine"


def test_refused_config_in_generate_is_exit_1_but_a_missing_folder_stays_2(tmp_path, capsys):
    ckpt = hf_dir(tmp_path / "ckpt")
    data = json.load(open(os.path.join(ckpt, "config.json")))
    data["init_std"] = math.inf
    open(os.path.join(ckpt, "config.json"), "w").write(json.dumps(data))
    code, err = cli(capsys, "generate", "--model", ckpt, "--backend", "torch", "-q", "2 3")
    assert code == 1 and "init_std=inf" in err and "config.json" in err
    code, err = cli(capsys, "generate", "--model", tmp_path / "nowhere", "--backend", "torch", "-q", "2 3")
    assert code == 2


def test_integer_weights_are_refused_by_name(tmp_path):
    weights = random_weights(CONFIG)
    weights["model.decoder.layers.0.fc1.weight"] = (weights["model.decoder.layers.0.fc1.weight"] * 100).astype(np.int32)
    spec_io.save_safetensors_dir(tmp_path / "ckpt", weights, CONFIG.to_dict())
    with pytest.raises(ConversionError, match="layers.0.fc1.weight is stored as int32"):
        read_checkpoint(tmp_path / "ckpt")


def test_a_trainer_state_folder_is_checked_before_an_engine_reads_it(tmp_path):
    """Orbax and DCP read every file of the folder they are given: spec_io.state_folder first refuses a
    name leaving the checkpoint, symlinks at any depth, other special files and more bytes than the
    trainer's state can take, naming the file."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "state" / "d").mkdir(parents=True)
    (ckpt / "state" / "d" / "blob").write_bytes(b"x" * 1000)
    assert spec_io.state_folder(ckpt, "state", 1000) == os.path.join(ckpt, "state")
    with pytest.raises(CheckpointError, match="1,000 bytes"):
        spec_io.state_folder(ckpt, "state", 999)
    for name in ["/etc", "../ckpt/state", "state/../state", "", "a\\b"]:
        with pytest.raises(CheckpointError, match="plain relative path"):
            spec_io.state_folder(ckpt, name, 1 << 20)
    with pytest.raises(CheckpointError, match="missing or not a folder"):
        spec_io.state_folder(ckpt, "nothing", 1 << 20)
    secret = tmp_path / "secret"
    secret.write_text("key")
    os.symlink(secret, ckpt / "state" / "d" / "manifest")
    with pytest.raises(CheckpointError, match="manifest: a symlink inside the trainer state"):
        spec_io.state_folder(ckpt, "state", 1 << 20)
    os.remove(ckpt / "state" / "d" / "manifest")
    os.symlink(ckpt / "state", ckpt / "linked")
    with pytest.raises(CheckpointError, match="a symlink is refused"):
        spec_io.state_folder(ckpt, "linked", 1 << 20)
    os.mkfifo(ckpt / "state" / "pipe")
    with pytest.raises(CheckpointError, match="pipe: not a regular file"):
        spec_io.state_folder(ckpt, "state", 1 << 20)
