"""Property-based fuzzing (hypothesis) of the torch-zip and msgpack readers with mutated valid files.

The contract (opt_spec/errors.py): given any bytes, opt_spec.torch_pickle and conversion.msgpack_tree
return what the file holds or raise a CheckpointError (UnsafePickleError and MsgpackError included).
Anything else escaping (KeyError, TypeError, RecursionError, MemoryError, struct.error, zipfile's
errors, a crash) fails, and so does a load that is unbounded or that returns other tensors than the
file holds where the change could not have altered them:

- torch-pickle: data.pkl of a torch.save'd state dict edited (bytes replaced by pickle opcodes or at
  random, inserted, deleted, duplicated, lengths overwritten), and sometimes a storage record cut or
  grown; the zip is rebuilt around them (so the CRC holds and the pickle is what gets parsed).
- torch-zip: bytes of the file itself overwritten, mostly in the zip's headers and central directory.
- torch-payload: bytes inside storage records only: the file must load with the same names, shapes and
  dtypes, and only tensors over a changed record may read other values.
- msgpack / msgpack-payload: the same for a Flax msgpack tree (ext arrays, a NumPy scalar, a chunked
  array), read by read_tree.

Every target runs in a forked child under a memory limit (RLIMIT_AS: its size at the fork plus
512 MiB) and a per-example time limit (tests/test_fuzz_readers.py's helpers). CI runs a fixed seed
and a few dozen examples per target (a few seconds); a longer run:

    OPTKIT_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_fuzz_pickle_msgpack.py
    .venv/bin/python -m tests.test_fuzz_pickle_msgpack [torch-pickle|torch-zip|torch-payload|msgpack|...]
"""

import io
import math
import os
import pickletools
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pytest

from .test_fuzz_readers import _time_limit, run_forked

TARGETS = {"torch-pickle": 80, "torch-zip": 60, "torch-payload": 20, "msgpack": 80, "msgpack-payload": 20}
EXAMPLE_SECONDS = 20
_PICKLE_BYTES = [ord(op.code) for op in pickletools.opcodes]
_MSGPACK_BYTES = [0x80, 0x81, 0x8f, 0x90, 0x91, 0xa1, 0xc0, 0xc1, 0xc3, 0xc4, 0xc6, 0xc7, 0xc9, 0xcf, 0xd4, 0xd8,
                  0xd9, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0x93, 0x01, 0x03]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="the memory limit is set from Linux /proc")
def test_torch_zip_and_msgpack_readers_hold_their_contract_on_mutated_files(tmp_path):
    pytest.importorskip("hypothesis")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", FUZZ_WORKDIR=str(tmp_path))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    examples = int(os.environ.get("OPTKIT_FUZZ_EXAMPLES", 0)) or max(TARGETS.values())
    proc = subprocess.run([sys.executable, "-m", "tests.test_fuzz_pickle_msgpack", *TARGETS], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120 + examples * len(TARGETS))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-12000:]
    assert all(f"{t}: ok" in proc.stdout for t in TARGETS), proc.stdout


# ------------------------------------------------------------------------------ the base files
def _torch_file(path: str) -> None:
    """A state dict as torch.save writes it: float32, bfloat16, int64, a view into a shared storage,
    an empty tensor and a scalar."""
    import torch

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    torch.save({"w": base, "w_t": base.t(), "row": base[1], "bf": torch.linspace(-2, 2, 10).to(torch.bfloat16),
                "ids": torch.tensor([3, -1, 2 ** 40]), "empty": torch.zeros(0, 3), "scalar": torch.tensor(0.5)}, path)


def _msgpack_file(path: str) -> None:
    """A Flax tree as flax.serialization writes it (msgpack, ext 1 arrays, ext 3 NumPy scalars), with a
    chunked array as Flax writes arrays over 2**30 bytes."""
    import ml_dtypes
    import msgpack

    def pack(x):
        if isinstance(x, (np.ndarray, np.generic)):
            a = np.asarray(x)
            triple = msgpack.packb((a.shape, a.dtype.name, a.tobytes()), use_bin_type=True)
            return msgpack.ExtType(1 if isinstance(x, np.ndarray) else 3, triple)
        raise TypeError(type(x))

    tree = {"model": {"decoder": {"embed_tokens": {"embedding": np.arange(32, dtype=np.float32).reshape(8, 4)},
                                  "layers": {"0": {"fc1": {"kernel": np.ones((4, 6), ml_dtypes.bfloat16),
                                                           "bias": np.arange(6, dtype=np.float16)}}}}},
            "step": np.int32(7), "mask": np.array([True, False, True]),
            "big": {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 3},
                    "chunks": {"0": np.arange(4, dtype=np.float32), "1": np.arange(4, 6, dtype=np.float32)}}}
    with open(path, "wb") as f:
        f.write(msgpack.packb(tree, default=pack, strict_types=True, use_bin_type=True))


# ------------------------------------------------------------------------------------ mutations
def _edits(draw, data: bytes, positions, alphabet: list[int], little: bool) -> bytes:
    """1-5 edits of data: a byte replaced (by a format byte or any), inserted or deleted, a slice
    duplicated, or a 4- or 8-byte length written (little or big endian, as the format stores them)."""
    from hypothesis import strategies as st

    data = bytearray(data)
    order = "<" if little else ">"
    for _ in range(draw(st.integers(1, 5))):
        if not data:
            break
        pos = min(draw(positions), len(data) - 1)
        op = draw(st.sampled_from(["replace", "replace", "insert", "delete", "duplicate", "length"]))
        byte = draw(st.sampled_from(alphabet) | st.integers(0, 255))
        if op == "replace":
            data[pos] = byte
        elif op == "insert":
            data.insert(pos, byte)
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "duplicate":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 64))]
        else:
            width = draw(st.sampled_from([4, 8]))
            value = draw(st.sampled_from([0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, len(data), len(data) + 1])
                         | st.integers(0, 2 ** (8 * width) - 1))
            data[pos:pos + width] = struct.pack(order + ("I" if width == 4 else "Q"), value % 2 ** (8 * width))
    return bytes(data)


def _records(path: str) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(info, z.read(info)) for info in z.infolist()]


def _payload_regions(path: str) -> dict[str, range]:
    """{storage key: byte range of its record's data in the file}."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if "/data/" in info.filename:
                f.seek(info.header_offset + 26)
                n_name, n_extra = struct.unpack("<HH", f.read(4))
                start = info.header_offset + 30 + n_name + n_extra
                out[info.filename.rsplit("/", 1)[1]] = range(start, start + info.file_size)
    return out


# ------------------------------------------------------------------------------------- torch
def _load_torch(path: str):
    from opt_spec.torch_pickle import TorchZipReader, tensors_of

    obj = tensors_of(TorchZipReader(path).obj, path)
    return {n: (t.storage.key, np.array(t.array())) for n, t in obj.items()}


def _check_torch(path: str, raw: bytes, original: dict, touched: set | None = None) -> None:
    """Loads raw (written to path): a CheckpointError, or tensors each no larger than the file, equal to
    the original where nothing they read was changed (touched: the storage keys changed; None: any)."""
    from opt_spec.errors import CheckpointError

    with open(path, "wb") as f:
        f.write(raw)
    with _time_limit(EXAMPLE_SECONDS):
        try:
            got = _load_torch(path)
        except CheckpointError:
            assert touched is None, "a change inside storage records only was refused"
            return
    assert all(a.nbytes <= len(raw) for _, a in got.values())
    if touched is not None:  # only payload bytes changed: the same tensors, other values only over touched
        assert {n: (a.shape, a.dtype) for n, (_, a) in got.items()} == \
            {n: (a.shape, a.dtype) for n, (_, a) in original.items()}
        for n, (key, a) in got.items():
            assert key in touched or a.tobytes() == original[n][1].tobytes(), n


def fuzz_torch(workdir: str, examples: int, kind: str) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = os.path.join(workdir, "base.bin")
    original_bytes = open(base, "rb").read()
    original = _load_torch(base)
    records = _records(base)
    regions = _payload_regions(base)
    path = os.path.join(workdir, f"{kind}.bin")
    pkl_index = next(i for i, (info, _) in enumerate(records) if info.filename.endswith("data.pkl"))
    pkl = records[pkl_index][1]
    with zipfile.ZipFile(base) as z:
        directory = z.start_dir  # where the central directory begins
    headers = [info.header_offset + d for info, _ in records for d in range(0, 30, 2)]

    @st.composite
    def mutated(draw):
        if kind == "torch-pickle":
            new = _edits(draw, pkl, st.integers(0, len(pkl) - 1), _PICKLE_BYTES, little=True)
            cuts = draw(st.dictionaries(st.sampled_from(sorted(regions)), st.integers(-8, 8), max_size=1))
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w") as z:
                for i, (info, data) in enumerate(records):
                    key = info.filename.rsplit("/", 1)[1]
                    if i == pkl_index:
                        data = new
                    elif "/data/" in info.filename and key in cuts:
                        data = data[:len(data) + cuts[key]] if cuts[key] < 0 else data + bytes(cuts[key])
                    z.writestr(info.filename, data)
            return out.getvalue(), None
        if kind == "torch-zip":
            positions = (st.integers(0, len(original_bytes) - 1) | st.integers(directory, len(original_bytes) - 1)
                         | st.sampled_from(headers))
            return _edits(draw, original_bytes, positions, [0x00, 0xff, 0x08, 0x50, 0x4b], little=True), None
        key = draw(st.sampled_from([k for k, r in regions.items() if len(r)]))
        raw = bytearray(original_bytes)
        for pos in draw(st.lists(st.sampled_from(regions[key]), min_size=1, max_size=4)):
            raw[pos] = draw(st.integers(0, 255))
        return bytes(raw), {key}

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(mutated())
    def check(case):
        raw, touched = case
        if raw == original_bytes:
            touched = set()
        _check_torch(path, raw, original, touched)

    check()


# ------------------------------------------------------------------------------------ msgpack
def _load_msgpack(path: str) -> dict:
    from conversion.msgpack_tree import ChunkedLeaf, Leaf, flatten, read_tree

    return {k: np.array(v.array()) if isinstance(v, (Leaf, ChunkedLeaf)) else v
            for k, v in flatten(read_tree(path)).items()}


def fuzz_msgpack(workdir: str, examples: int, kind: str) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from conversion.msgpack_tree import Leaf, read_tree
    from opt_spec.errors import CheckpointError

    base = os.path.join(workdir, "base.msgpack")
    original_bytes = open(base, "rb").read()
    original = _load_msgpack(base)

    def leaves(tree, out):  # the byte range of every array's data
        for v in tree.values():
            if isinstance(v, dict):
                leaves(v, out)
            elif isinstance(v, Leaf):
                out.append(range(v.offset, v.offset + math.prod(v.shape) * v.dtype.itemsize))
            elif hasattr(v, "chunks"):
                leaves(dict(enumerate(v.chunks)), out)
        return out

    payload = [p for r in leaves(read_tree(base), []) for p in r]
    path = os.path.join(workdir, f"{kind}.msgpack")

    @st.composite
    def mutated(draw):
        if kind == "msgpack":
            return _edits(draw, original_bytes, st.integers(0, len(original_bytes) - 1), _MSGPACK_BYTES, little=False)
        raw = bytearray(original_bytes)
        for pos in draw(st.lists(st.sampled_from(payload), min_size=1, max_size=4)):
            raw[pos] = draw(st.integers(0, 255))
        return bytes(raw)

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(mutated())
    def check(raw: bytes):
        with open(path, "wb") as f:
            f.write(raw)
        with _time_limit(EXAMPLE_SECONDS):
            try:
                got = _load_msgpack(path)
            except CheckpointError:
                assert kind == "msgpack", "a change inside array data only was refused"
                return
        assert sum(v.nbytes for v in got.values() if isinstance(v, np.ndarray)) <= len(raw)
        if kind != "msgpack" or raw == original_bytes:  # array data only: the same tree, shapes and dtypes
            assert {k: (np.shape(v), getattr(v, "dtype", None)) for k, v in got.items()} == \
                {k: (np.shape(v), getattr(v, "dtype", None)) for k, v in original.items()}
        if raw == original_bytes:
            assert all(np.array_equal(got[k], v) for k, v in original.items())

    check()


FUZZERS = {"torch-pickle": fuzz_torch, "torch-zip": fuzz_torch, "torch-payload": fuzz_torch,
           "msgpack": fuzz_msgpack, "msgpack-payload": fuzz_msgpack}


def main(targets: list[str]) -> int:
    import hypothesis  # noqa: F401  (imported before the memory limit, like everything a reader uses)
    import ml_dtypes  # noqa: F401

    import conversion.msgpack_tree  # noqa: F401
    import opt_spec.torch_pickle  # noqa: F401

    examples = int(os.environ.get("OPTKIT_FUZZ_EXAMPLES", 0))
    workdir = os.environ.get("FUZZ_WORKDIR") or tempfile.mkdtemp(prefix="optkit-fuzz-")
    for name, make in (("base.bin", _torch_file), ("base.msgpack", _msgpack_file)):  # before any limit
        make(os.path.join(workdir, name))
    failed = []
    for target in targets or list(FUZZERS):
        folder = os.path.join(workdir, target)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for name in ("base.bin", "base.msgpack"):
            shutil.copy(os.path.join(workdir, name), folder)
        code = run_forked(FUZZERS[target], folder, examples or TARGETS[target], target)
        ok = code == 0
        print(f"{target}: {'ok' if ok else f'FAILED (exit {code})'}", flush=True)
        if not ok:
            failed.append(target)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
