"""Hostile PyTorch zips and msgpack files (issue 13, parts 4 and 5): each is refused with a CheckpointError
naming the file and the record, entry or byte at fault, by the shared readers and by every backend's
from_pretrained that reads the format, without running anything and without growing the process's memory.

Every hostile file is built here, from a small valid checkpoint or by hand."""

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch

import conversion
from conversion.msgpack_tree import CHUNKED, MsgpackError, ext_header, map_header, pack_int, pack_str, read_tree
from opt_spec import OPTConfig
from opt_spec import io as spec_io
from opt_spec import torch_pickle
from opt_spec.errors import CheckpointError
from opt_spec.testing import random_weights
from opt_spec.torch_pickle import TorchZipReader, UnsafePickleError

CONFIG = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                   max_position_embeddings=32)
GROWTH_LIMIT = 64 << 20  # bytes a refused file may add to a process's peak memory (before: up to 2 GB)


# ------------------------------------------------------------------------------- building files
def bin_dir(path, config=CONFIG) -> str:
    """A Hugging Face folder: config.json + pytorch_model.bin written by torch.save."""
    os.makedirs(path, exist_ok=True)
    config.to_json_file(os.path.join(path, "config.json"))
    torch.save({n: torch.from_numpy(a) for n, a in random_weights(config).items()},
               os.path.join(path, "pytorch_model.bin"))
    return str(path)


def rezip(path, change) -> None:
    """Rewrites the zip at path record by record: change(name, data) -> data, or (data, compress_type)."""
    with zipfile.ZipFile(path) as z:
        records = [(info.filename, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in records:
            out = change(name, data)
            data, method = out if isinstance(out, tuple) else (out, zipfile.ZIP_STORED)
            z.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data, compress_type=method)


class Stored:
    """A storage as torch pickles it (a persistent id naming record data/<key>)."""

    def __init__(self, key: str, numel: int, kind: str = "FloatStorage"):
        self.key, self.numel, self.kind = key, numel, kind


class View:
    """A tensor as torch pickles it: _rebuild_tensor_v2 over a storage."""

    def __init__(self, storage: Stored, offset, size, stride):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict())


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Stored):
            return "storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel
        return None


def torch_zip(path, obj=None, records=None, data_pkl: bytes | None = None) -> str:
    """A torch.save-style zip: data.pkl pickling obj (or the given bytes) and data/<key> records."""
    if data_pkl is None:
        buf = io.BytesIO()
        _TorchPickler(buf, protocol=2).dump(obj)
        data_pkl = buf.getvalue()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return str(path)


def raw_zip(path, name: str, payload: bytes, method: int, size: int, crc: int = 0) -> None:
    """A one-record zip written byte by byte (so a record can claim any size and compression)."""
    name_b = name.encode()
    local = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 33, crc, len(payload), size, len(name_b), 0)
    central = struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 33, crc, len(payload), size,
                          len(name_b), 0, 0, 0, 0, 0, 0)
    body = local + name_b + payload
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 1, 1, len(central) + len(name_b), len(body), 0)
    with open(path, "wb") as f:
        f.write(body + central + name_b + end)


def deflate_bomb(path, gib: int = 1) -> None:
    """pytorch_model.bin whose data.pkl is ~1 MB of deflate expanding to `gib` GiB of zeros (one fully
    flushed deflate segment of 1 MiB repeated: each segment stands alone, so copies concatenate)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
    segment = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    last = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    raw_zip(path, "archive/data.pkl", segment * (1024 * gib) + last, zipfile.ZIP_DEFLATED, (1 << 30) * gib)


def as_bin_dir(tmp_path, make) -> str:
    """A folder with a valid config.json and pytorch_model.bin made by make(path)."""
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    CONFIG.to_json_file(folder / "config.json")
    make(str(folder / "pytorch_model.bin"))
    return str(folder)


# ----------------------------------------------------------------------------------- readers
def read_spec(folder):
    for a in spec_io.load_checkpoint_dir(folder).values():
        np.asarray(a).sum()


def read_conversion(folder):
    for ref in conversion.read_checkpoint(folder).tensors.values():
        ref.load()


def read_torch(folder):
    from opt_torch import OPTForCausalLM

    OPTForCausalLM.from_pretrained(folder)


def read_tf(folder):
    from opt_tf import TFOPTForCausalLM

    TFOPTForCausalLM.from_pretrained(folder)


def read_flax(folder):
    from opt_flax import FlaxOPTForCausalLM

    FlaxOPTForCausalLM.from_pretrained(folder)


BIN_READERS = {"spec": read_spec, "conversion": read_conversion, "torch": read_torch, "tf": read_tf,
               "flax": read_flax}


def test_a_valid_bin_loads_in_every_backend(tmp_path):
    folder = bin_dir(tmp_path / "ok")
    want = random_weights(CONFIG)
    got = spec_io.load_checkpoint_dir(folder)
    assert set(got) == set(want) and all(np.array_equal(got[n], want[n]) for n in want)
    for read in BIN_READERS.values():
        read(folder)


# ------------------------------------------------------------------------------ torch records
@pytest.mark.parametrize("reader", list(BIN_READERS))
def test_a_storage_record_cut_short_is_refused_in_every_backend(tmp_path, reader):
    """Before: torch's mmap loader read 2/3 of the tensor from the neighbouring records."""
    folder = bin_dir(tmp_path / "cut")
    path = os.path.join(folder, "pytorch_model.bin")
    rezip(path, lambda name, data: data[:len(data) // 3] if name.endswith("data/0") else data)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: storage record data/0 holds \d+ bytes; its "
                                              r"\d+ float32 elements need \d+"):
        BIN_READERS[reader](folder)


def test_a_storage_record_longer_than_its_storage_is_refused(tmp_path):
    folder = bin_dir(tmp_path / "long")
    rezip(os.path.join(folder, "pytorch_model.bin"), lambda n, d: d + bytes(8) if n.endswith("data/1") else d)
    with pytest.raises(CheckpointError, match="storage record data/1 holds"):
        read_spec(folder)


BAD_VIEWS = {  # over a storage of 6 float32 elements: (offset, shape, stride), the words of the refusal
    "offset past the end": (7, (1,), (1,), "reaches element 7 of a storage of 6"),
    "rows past the end": (2, (2, 3), (3, 1), "reaches element 7 of a storage of 6"),
    "broadcast beyond its storage": (0, (1000, 1000), (0, 0), "reaches element 999999 of a storage of 6"),
    "negative stride": (0, (2, 3), (-3, 1), "expected non-negative integers"),
    "negative size": (0, (-1, 3), (3, 1), "expected non-negative integers"),
    "negative offset": (-3, (3,), (1,), "expected non-negative integers"),
    "a stride per dimension": (0, (2, 3), (1,), "one stride per dimension"),
    "not integers": (0, (2.5,), (1,), "expected non-negative integers"),
    "shape overflowing int64": (0, (2 ** 40, 2 ** 40), (1, 1), "reaches element"),
    "empty but overflowing": (0, (2 ** 61, 2 ** 61, 0), (1, 1, 1), "too large"),
}


@pytest.mark.parametrize("case", list(BAD_VIEWS))
def test_tensor_views_outside_their_storage_are_refused(tmp_path, case):
    offset, shape, stride, words = BAD_VIEWS[case]
    tensors = {"model.decoder.embed_tokens.weight": View(Stored("0", 6), offset, shape, stride)}
    folder = as_bin_dir(tmp_path, lambda p: torch_zip(p, tensors, {"0": bytes(24)}))
    for read in (read_spec, read_torch):
        with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: a tensor of storage record data/0") as err:
            read(folder)
        assert words in str(err.value)


def test_views_that_fit_load_exactly(tmp_path):
    """The checks refuse only what lies outside: offsets, strided and empty views inside read right."""
    values = np.arange(12, dtype=np.float32)
    tensors = {"row": View(Stored("0", 12), 4, (4,), (1,)), "cols": View(Stored("0", 12), 1, (3, 2), (4, 2)),
               "empty": View(Stored("0", 12), 12, (0, 5), (5, 1)), "scalar": View(Stored("0", 12), 11, (), ())}
    path = torch_zip(tmp_path / "ok.pt", tensors, {"0": values.tobytes()})
    got = {n: t.array() for n, t in TorchZipReader(path).obj.items()}
    np.testing.assert_array_equal(got["row"], values[4:8])
    np.testing.assert_array_equal(got["cols"], [[values[1 + 4 * i + 2 * j] for j in range(2)] for i in range(3)])
    assert got["empty"].shape == (0, 5) and got["scalar"] == 11.0


def test_one_storage_read_as_two_dtypes_or_sizes_is_refused(tmp_path):
    for kind, numel, words in (("HalfStorage", 12, "as 6 x float32 and as 12 x float16"),
                               ("FloatStorage", 3, "as 6 x float32 and as 3 x float32")):
        tensors = {"a": View(Stored("0", 6), 0, (6,), (1,)), "b": View(Stored("0", numel, kind), 0, (2,), (1,))}
        path = torch_zip(tmp_path / "twice.pt", tensors, {"0": bytes(24)})
        with pytest.raises(CheckpointError, match="twice.pt: storage record data/0 is read " + words):
            TorchZipReader(path)


def test_storage_ids_that_are_not_storages_are_refused(tmp_path):
    cases = {"missing record": ({"a": View(Stored("9", 6), 0, (6,), (1,))}, "storage record data/9 is missing"),
             "negative size": ({"a": View(Stored("0", -6), 0, (1,), (1,))}, "a non-negative integer size")}
    for tensors, words in cases.values():
        path = torch_zip(tmp_path / "pid.pt", tensors, {"0": bytes(24)})
        with pytest.raises(CheckpointError, match=words):
            TorchZipReader(path)


def test_metaseq_files_go_through_the_same_checks(tmp_path):
    """A metaseq part (opaque extra state allowed) with a record cut short: refused by detection and reading."""
    import argparse

    path = tmp_path / "reshard-model_part-0.pt"
    torch.save({"model": {"decoder.embed_tokens.weight": torch.ones(8, 4)}, "args": argparse.Namespace(x=1),
                "extra_state": {"history": [1, 2]}}, path)
    assert TorchZipReader(path, opaque=True).obj["args"] == {"x": 1}
    rezip(path, lambda name, data: data[:len(data) // 3] if name.endswith("data/0") else data)
    for read in (lambda: conversion.detect_format(path), lambda: conversion.read_checkpoint(path, "metaseq")):
        with pytest.raises(CheckpointError, match=r"reshard-model_part-0\.pt: storage record data/0 holds"):
            read()


# ------------------------------------------------------------------------------ the zip itself
def test_compressed_records_are_refused(tmp_path):
    folder = bin_dir(tmp_path / "deflated")
    rezip(os.path.join(folder, "pytorch_model.bin"),
          lambda n, d: (d, zipfile.ZIP_DEFLATED) if n.endswith("data/0") else d)
    for read in (read_spec, read_torch):
        with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: record pytorch_model/data/0 is compressed"):
            read(folder)


def test_record_names_and_counts_are_checked(tmp_path, monkeypatch):
    good = bin_dir(tmp_path / "good")
    path = os.path.join(good, "pytorch_model.bin")
    with zipfile.ZipFile(path) as z:
        records = [(i.filename, z.read(i)) for i in z.infolist()]

    def write(name, entries):
        out = str(tmp_path / name)
        with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as z:
            warnings.simplefilter("ignore")  # zipfile warns of a duplicate name, and writes it
            for n, d in entries:
                z.writestr(n, d)
        return out

    twice = write("twice.bin", records + [records[-1]])
    with pytest.raises(CheckpointError, match="twice.bin: records named twice"):
        TorchZipReader(twice)
    outside = write("outside.bin", records + [("elsewhere/data/0", b"x")])
    with pytest.raises(CheckpointError, match="outside.bin: record elsewhere/data/0 lies outside the archive"):
        TorchZipReader(outside)
    two = write("two.bin", records + [("pytorch_model/sub/data.pkl", b"x")])
    with pytest.raises(CheckpointError, match="two.bin: a PyTorch zip holds one data.pkl, found 2"):
        TorchZipReader(two)
    monkeypatch.setattr(torch_pickle, "MAX_RECORDS", len(records) - 1)
    with pytest.raises(CheckpointError, match=f"a zip of {len(records)} records"):
        read_spec(good)


def test_overlapping_records_are_refused(tmp_path):
    """A second directory entry pointing inside another record's bytes (a local header hidden in them)."""
    path = str(tmp_path / "overlap.pt")
    payload = np.arange(6, dtype=np.float32).tobytes()
    hidden_name = b"archive/data/1"
    hidden = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 33, zlib.crc32(payload), len(payload),
                         len(payload), len(hidden_name), 0) + hidden_name + payload
    tensors = {"a": View(Stored("0", -(-len(hidden) // 4)), 0, (1,), (1,)), "b": View(Stored("1", 6), 0, (6,), (1,))}
    torch_zip(path, tensors, {"0": hidden + bytes(-len(hidden) % 4)})
    with zipfile.ZipFile(path, "a") as z:  # add a directory entry for the hidden record
        outer = z.getinfo("archive/data/0")
        info = zipfile.ZipInfo("archive/data/1", (1980, 1, 1, 0, 0, 0))
        info.header_offset = outer.header_offset + 30 + len(outer.filename) + len(outer.extra)
        info.file_size = info.compress_size = len(payload)
        info.CRC = zlib.crc32(payload)
        z.filelist.append(info)
        z.NameToInfo[info.filename] = info
        z._didModify = True
    with pytest.raises(CheckpointError, match="overlap.pt: records archive/data/0 and archive/data/1 overlap"):
        TorchZipReader(path)


def test_broken_zips_are_checkpoint_errors(tmp_path):
    folder = bin_dir(tmp_path / "broken")
    path = os.path.join(folder, "pytorch_model.bin")
    data = open(path, "rb").read()
    entry = data.find(b"PK\x01\x02")  # the first directory entry; its local header's offset at +42
    cases = {"truncated": data[:len(data) // 2], "no directory": data[:-22] + bytes(22),
             "bad local header": data[:10] + b"\xff" * 20 + data[30:],
             "record past the end": data[:entry + 42] + struct.pack("<I", len(data) + 100) + data[entry + 46:]}
    for damage, content in cases.items():
        open(path, "wb").write(content)
        for read in (read_spec, read_torch):
            with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: ") as err:
                read(folder)
            assert any(w in str(err.value) for w in ("corrupt", "truncated")), (damage, str(err.value))


# ------------------------------------------------------------------------------------ data.pkl
def _q(n):
    return struct.pack("<Q", n)


HOSTILE_PICKLES = {  # data.pkl bytes, words of the refusal
    "BINBYTES8 of 2**40 bytes": (b"\x80\x02\x8e" + _q(2 ** 40) + b"x" * 64 + b".", "bytes8"),
    "BINUNICODE8 of 2**40 bytes": (b"\x80\x04\x8d" + _q(2 ** 40) + b"x" * 64 + b".", "unicodestring8"),
    "BYTEARRAY8 of 2**40 bytes": (b"\x80\x05\x96" + _q(2 ** 40) + b"x" * 64 + b".", "bytearray8"),
    "LONG4 of 2**31 bytes": (b"\x80\x02\x8b" + struct.pack("<i", 2 ** 31 - 1) + b"x" * 64 + b".", "long4"),
    "BINBYTES of 2**32 bytes": (b"\x80\x03B" + struct.pack("<I", 2 ** 32 - 1) + b"x" * 64 + b".", "bytes4"),
    "FRAME of 2**40 bytes": (b"\x80\x04\x95" + _q(2 ** 40) + b"}.", "a frame of 1099511627776 bytes"),
    "memo index 2**31": (b"\x80\x02}r" + struct.pack("<I", 2 ** 31) + b".", "memo index 2147483648 out of range"),
    "memo never set": (b"\x80\x02h\x05.", "memo index 5 was never set"),
    "tuple key nested 10**6 deep": (b"\x80\x02})" + b"\x85" * 10 ** 6 + b"K\x01s.", "nested deeper than 100"),
    "lists nested 200,000 deep": (b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b".", "nested deeper than 100"),
    "a list holding itself": (b"\x80\x02]q\x00h\x00a.", "changes a container after putting it into another"),
    "a list changed once held": (b"\x80\x02]q\x00\x85h\x00K\x01a0.", "changes a container after"),
    "stack underflow": (b"\x80\x02(s.", "stack underflow"),
    "extension registry": (b"\x80\x02\x82\x01.", "opcode EXT1"),
    "bytes after STOP": (b"\x80\x02}.junk", "4 bytes after STOP"),
}


@pytest.mark.parametrize("case", list(HOSTILE_PICKLES))
def test_hostile_pickles_are_refused_before_unpickling(tmp_path, case):
    data, words = HOSTILE_PICKLES[case]
    folder = as_bin_dir(tmp_path, lambda p: torch_zip(p, data_pkl=data))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: ") as err:
        read_spec(folder)
    assert words in str(err.value)


def test_opcodes_are_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_pickle, "MAX_PICKLE_OPS", 1000)
    path = torch_zip(tmp_path / "many.pt", data_pkl=b"\x80\x02" + b"N0" * 600 + b"}.")
    with pytest.raises(CheckpointError, match="many.pt: data.pkl byte 1001: more than 1000 opcodes"):
        TorchZipReader(path)
    assert TorchZipReader(torch_zip(tmp_path / "fewer.pt", data_pkl=b"\x80\x02" + b"N0" * 498 + b"}.")).obj == {}


def test_nesting_below_the_limit_and_shared_objects_still_load(tmp_path):
    deep = b"\x80\x02" + b"]" * 99 + b"a" * 98 + b"."
    path = torch_zip(tmp_path / "deep.pt", data_pkl=deep)
    obj = TorchZipReader(path, opaque=True).obj
    for _ in range(98):
        obj = obj[0]
    assert obj == []
    shared = [1, 2]
    path = torch_zip(tmp_path / "shared.pt", {"a": shared, "b": shared, "c": (shared, (shared,))})
    obj = TorchZipReader(path, opaque=True).obj
    assert obj["a"] is obj["b"] is obj["c"][0] is obj["c"][1][0]


def test_unsafe_pickles_are_checkpoint_errors(tmp_path):
    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    assert issubclass(UnsafePickleError, CheckpointError) and issubclass(UnsafePickleError, pickle.UnpicklingError)
    folder = as_bin_dir(tmp_path, lambda p: torch.save({"x": Evil()}, p))
    for read in (read_spec, read_conversion, read_torch):
        with pytest.raises(UnsafePickleError, match=r"pytorch_model\.bin: refusing to load posix\.system"):
            read(folder)
    class Moved(View):  # a tensor whose state is set after it was checked (BUILD): moved past its storage
        def __reduce__(self):
            return (*super().__reduce__(), {"offset": 2 ** 31})

    path = torch_zip(tmp_path / "build.pt", {"a": Moved(Stored("0", 6), 0, (6,), (1,))}, {"0": bytes(24)})
    with pytest.raises(UnsafePickleError, match="build.pt: the pickle sets the state of a tensor"):
        TorchZipReader(path)


# ------------------------------------------------------------------------- memory (subprocess)
_MEMORY_CHILD = r"""
import json, sys
import numpy as np
import opt_spec.io, opt_spec.torch_pickle
reader = sys.argv[1]
if reader == "torch":
    import torch, opt_torch
    opt_torch.OPTForCausalLM.from_pretrained(sys.argv[2])  # lazy imports and allocator warm-up

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

out = {}
for folder in sys.argv[3:]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = status("VmRSS")
    try:
        if reader == "torch":
            opt_torch.OPTForCausalLM.from_pretrained(folder)
        else:
            [np.asarray(a).sum() for a in opt_spec.io.load_checkpoint_dir(folder).values()]
        error = None
    except Exception as err:
        error = [type(err).__name__, str(err)]
    out[folder] = {"growth": status("VmHWM") - base, "error": error}
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("reader", ["spec", "torch"])
def test_refusals_do_not_grow_memory(tmp_path, reader):
    """The deflate bomb (1 MB -> 1 GiB; before: +2 GB peak), 2**40-byte lengths and a 2**31 memo index
    (before: MemoryError, or a 16 GB memo table) and a 10**6-deep tuple key (before: a segfault) are
    refused in a child process whose peak memory grows by less than GROWTH_LIMIT."""
    good = bin_dir(tmp_path / "good")
    folders = {}
    for i, case in enumerate(["deflate bomb", "BINBYTES8 of 2**40 bytes", "memo index 2**31",
                              "tuple key nested 10**6 deep"]):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        CONFIG.to_json_file(folder / "config.json")
        if case == "deflate bomb":
            deflate_bomb(folder / "pytorch_model.bin")
        else:
            torch_zip(folder / "pytorch_model.bin", data_pkl=HOSTILE_PICKLES[case][0])
        folders[str(folder)] = case
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, reader, good, *folders], capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for folder, case in folders.items():
        got = result[folder]
        assert got["error"] is not None and got["error"][0] in ("CheckpointError", "UnsafePickleError"), (case, got)
        assert "pytorch_model.bin: " in got["error"][1], (case, got)
        assert got["growth"] < GROWTH_LIMIT, f"{case}: peak memory grew {got['growth'] / 2 ** 20:.0f} MB"


# ---------------------------------------------------------------------------------------- msgpack
def _ndarray_ext(shape, dtype_name: str, data: bytes, claimed: int | None = None) -> bytes:
    inner = b"\x93" + bytes([0x90 | len(shape)]) + b"".join(pack_int(d) for d in shape) + pack_str(dtype_name)
    inner += b"\xc6" + struct.pack(">I", len(data))
    return ext_header(1, claimed if claimed is not None else len(inner) + len(data)) + inner + data


def _one(key: str, value: bytes) -> bytes:
    return map_header(1) + pack_str(key) + value


HOSTILE_MSGPACK = {  # file bytes, words of the refusal
    "maps nested 200,000 deep": (b"\x81\xa1a" * 200_000 + b"\xc0", "nested deeper than 100 levels"),
    "arrays nested 200,000 deep": (_one("a", b"\x91" * 200_000 + b"\xc0"), "nested deeper than 100 levels"),
    "ext claiming 4 GiB": (_one("a", b"\xc9\xff\xff\xff\xff\x01" + b"\x93" * 16),
                           "truncated: an array of 4294967295 bytes"),
    "ext of an unknown type": (_one("a", b"\xc7\x04\x63abcd"), "unsupported msgpack extension type 99"),
    "chunked array without shape": (_one("w", map_header(2) + pack_str(CHUNKED) + b"\xc3" + pack_str("chunks")
                                         + _one("0", _ndarray_ext([2], "float32", bytes(8)))),
                                    "a chunked array without its shape and chunks"),
    "chunks not adding up": (_one("w", map_header(3) + pack_str(CHUNKED) + b"\xc3" + pack_str("shape")
                                  + _one("0", pack_int(5)) + pack_str("chunks")
                                  + _one("0", _ndarray_ext([2], "float32", bytes(8)))), "a corrupt chunked array"),
    "dtype object": (_one("a", _ndarray_ext([2], "object", bytes(16))), "dtype 'object'"),
    "structured dtype": (_one("a", _ndarray_ext([1], "f8,i4", bytes(12))), "dtype 'f8,i4'"),
    "shape overflowing int64": (_one("a", _ndarray_ext([2 ** 32, 2 ** 32], "float32", b"")),
                                "an array of shape [4294967296, 4294967296] float32 with 0 bytes"),
    "data beyond the ext": (_one("a", _ndarray_ext([4], "float32", bytes(16), claimed=20)),
                            "with 16 bytes in an ext of 20"),
    "string claiming 4 GiB": (_one("a", b"\xdb\xff\xff\xff\xff" + b"x"), "truncated: needs 4294967295 bytes"),
    "array claiming 2**32 items": (_one("a", b"\xdd\xff\xff\xff\xff\xc0"), "a container of 4294967295 items"),
    "map claiming 2**32 entries": (b"\xdf\xff\xff\xff\xff\xc0", "a container of 4294967295 items"),
    "integer map key": (b"\x81\x01\xc0", "a map key that is a int, not a string"),
    "list map key": (b"\x81\x91\x01\xc0", "a map key that is a list, not a string"),
    "repeated map key": (b"\x82\xa1a\xc0\xa1a\xc0", "map key 'a' appears twice"),
    "invalid UTF-8": (b"\x81\xa2\xff\xfe\xc0", "a string that is not UTF-8"),
    "invalid byte": (b"\x81\xa1a\xc1", "invalid msgpack byte 0xc1"),
}


def _flax_dir(tmp_path, content: bytes) -> str:
    folder = tmp_path / "flax"
    folder.mkdir(exist_ok=True)
    CONFIG.to_json_file(folder / "config.json")
    (folder / "flax_model.msgpack").write_bytes(content)
    return str(folder)


@pytest.mark.parametrize("case", list(HOSTILE_MSGPACK))
def test_hostile_msgpack_is_refused(tmp_path, case):
    content, words = HOSTILE_MSGPACK[case]
    folder = _flax_dir(tmp_path, content)
    path = os.path.join(folder, "flax_model.msgpack")
    with pytest.raises(MsgpackError, match=r"flax_model\.msgpack: ") as err:
        read_tree(path)
    assert words in str(err.value)
    with pytest.raises(CheckpointError, match=r"flax_model\.msgpack: ") as err:  # what convert and the CLI read
        read_conversion(folder)
    assert words in str(err.value)


def test_a_valid_flax_msgpack_still_reads_exactly(tmp_path):
    src = bin_dir(tmp_path / "src")
    conversion.convert(src, tmp_path / "flax", to="hf-flax", progress=False)
    want = {n: ref.load() for n, ref in conversion.read_checkpoint(src).tensors.items()}
    got = {n: ref.load() for n, ref in conversion.read_checkpoint(tmp_path / "flax").tensors.items()}
    assert set(got) == set(want) and all(np.array_equal(got[n], want[n]) for n in want)
    chunked = _one("w", map_header(3) + pack_str(CHUNKED) + b"\xc3" + pack_str("shape")
                   + map_header(2) + pack_str("0") + pack_int(2) + pack_str("1") + pack_int(3) + pack_str("chunks")
                   + map_header(2) + pack_str("0") + _ndarray_ext([4], "float32", np.arange(4.0, dtype="f4").tobytes())
                   + pack_str("1") + _ndarray_ext([2], "float32", np.arange(4.0, 6.0, dtype="f4").tobytes()))
    (tmp_path / "chunked.msgpack").write_bytes(chunked)
    np.testing.assert_array_equal(read_tree(tmp_path / "chunked.msgpack")["w"].array(),
                                  np.arange(6.0, dtype="f4").reshape(2, 3))


def test_generate_refuses_a_deeply_nested_flax_checkpoint_in_words(tmp_path):
    folder = _flax_dir(tmp_path, HOSTILE_MSGPACK["maps nested 200,000 deep"][0])
    cache = tmp_path / "cache"  # where the CLI converts a Flax folder for the flax backend
    proc = subprocess.run([sys.executable, "-m", "optkit_cli.main", "generate", "--model", folder, "--backend",
                           "flax", "--ids", "2 5 7", "--max-new-tokens", "1"], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)),
                          env={**os.environ, "OPTKIT_CACHE": str(cache)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "optkit generate: error: " in proc.stderr and "flax_model.msgpack: byte " in proc.stderr
    assert "nested deeper than 100 levels" in proc.stderr, proc.stderr
    assert not any(files for _, _, files in os.walk(cache)), "a failed conversion left files behind"


def test_a_flax_trainer_state_from_someone_else_is_checked(tmp_path):
    """trainer_state.msgpack is read by flax.serialization (msgpack bounds lengths by the bytes given
    and nesting by its stack) into the trainer's own tree, whose shapes and dtypes it must match."""
    import flax.serialization
    from opt_flax import FlaxOPTForCausalLM
    from opt_flax.training import STATE_FILE, FlaxTrainer
    from opt_spec.training import TrainConfig

    ckpt = tmp_path / "ckpt"
    FlaxTrainer(FlaxOPTForCausalLM.from_pretrained(bin_dir(tmp_path / "src")), TrainConfig(total_steps=10),
                "causal_lm").save_checkpoint(ckpt)
    valid = (ckpt / STATE_FILE).read_bytes()
    assert FlaxTrainer.from_checkpoint(ckpt).step == 0
    state = flax.serialization.msgpack_restore(valid)

    def altered(**changes):
        return flax.serialization.msgpack_serialize({**state, **changes})

    cases = {"maps nested 200,000 deep": (b"\x81\xa1a" * 200_000 + b"\xc0", "cannot be read"),
             "ext claiming 4 GiB": (b"\x81\xa1a\xc9\xff\xff\xff\xff\x01" + b"\x93" * 8, "cannot be read"),
             "truncated": (valid[:len(valid) // 2], "cannot be read"),
             "another tree": (flax.serialization.msgpack_serialize({"a": 1}), "cannot be read"),
             "object dtype": (valid.replace(b"\xa6uint32", b"\xa6object", 1), "cannot be read"),
             "wrong shape": (altered(rng=np.zeros(3, np.uint32)), "entry ['rng'] is (3,) uint32, expected (2,)"),
             "wrong dtype": (altered(rng=np.zeros(2, np.float64)), "entry ['rng'] is (2,) float64, expected (2,) "
                                                                   "uint32"),
             "too large": (valid + bytes(2 * len(valid) + (2 << 20)), "more than this trainer's state takes")}
    for case, (content, words) in cases.items():
        (ckpt / STATE_FILE).write_bytes(content)
        with pytest.raises(CheckpointError, match=r"trainer_state\.msgpack: ") as err:
            FlaxTrainer.from_checkpoint(ckpt)
        assert words in str(err.value), (case, str(err.value))
