"""Property-based fuzzing (hypothesis) of the shared checkpoint readers with mutated valid files.

The contract under test (opt_spec/errors.py): given any bytes, a reader returns the tensors the file
holds or raises a CheckpointError (a subclass included: ConfigError, ConversionError,
WeightMismatchError, the pickle and msgpack readers' classes). Anything else escaping (KeyError,
TypeError, RecursionError, MemoryError, OverflowError, RuntimeError from h5py, ...) is a failure, and so
is a load that returns tensors the file does not hold:

- safetensors: the header bytes are edited (bytes replaced, inserted, deleted), its entries given
  other JSON values, the length prefix changed, data bytes added or cut. What SafetensorsFile accepts
  the safetensors library (the format's reference) must accept too, with equal tensors, so a header
  that still means the same gives the original tensors.
- index: model.safetensors.index.json edited the same way, its weight_map values drawn among names
  that climb out, absolute paths, a symlink out and non-strings. A folder beside holds shards of other
  values under the same names, so a read outside the checkpoint shows: what loads must be the original
  tensors (load_checkpoint_dir, the backends' reader, and conversion's read_checkpoint).
- h5: tf_model.h5 rebuilt by h5py with one or two changes (external storage, external and soft links,
  virtual datasets, other dtypes, layouts and filters, odd chunks, broken attribute lists, datasets
  removed or reshaped): what loads must be the original values.
- h5-bytes: bytes of tf_model.h5 overwritten at random; libhdf5 parses what is left. Values are not
  compared (a changed data byte is a valid file of other values): only the contract is.

Every target runs in a child process under a memory limit (RLIMIT_AS: its size after start-up plus
512 MiB) and a per-example time limit, so a MemoryError, a hang or a crash fails the test instead of
the machine. CI runs a fixed seed and a few dozen examples per target (a few seconds); a longer run:

    OPTKIT_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_fuzz_readers.py
    .venv/bin/python -m tests.test_fuzz_readers [safetensors|index|h5|h5-bytes ...]   (the child itself)
"""

import contextlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

TARGETS = {"safetensors": 80, "index": 40, "h5": 20, "h5-bytes": 30}  # CI examples per target (h5: + 19 fixed)
MEMORY_HEADROOM = 512 << 20
EXAMPLE_SECONDS = 20


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="the memory limit is set from Linux /proc")
def test_readers_hold_their_contract_on_mutated_files(tmp_path):
    pytest.importorskip("hypothesis")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", FUZZ_WORKDIR=str(tmp_path))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    examples = int(os.environ.get("OPTKIT_FUZZ_EXAMPLES", 0)) or max(TARGETS.values())
    proc = subprocess.run([sys.executable, "-m", "tests.test_fuzz_readers", *TARGETS], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120 + examples * len(TARGETS) * 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-12000:]
    assert all(f"{t}: ok" in proc.stdout for t in TARGETS), proc.stdout


# ------------------------------------------------------------------------- the child process
def _limit_memory(headroom: int) -> None:
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, hard))


@contextlib.contextmanager
def _time_limit(seconds: int):
    def expire(*_):
        raise TimeoutError(f"one example ran over {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _config():
    from opt_spec.testing import VARIANTS

    return VARIANTS["pre_ln"]


def _json_values():
    from hypothesis import strategies as st

    leaves = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 8, 24, 32, 2**63])
              | st.floats(allow_nan=True) | st.text(max_size=6) | st.sampled_from(["F32", "F16", "I64", "BF16"]))
    return st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                        max_leaves=8)


def _byte_edits(draw, data: bytes, start: int, stop: int) -> bytes:
    """1-6 edits (replace, insert, delete) of data[start:stop] with bytes JSON cares about."""
    from hypothesis import strategies as st

    data = bytearray(data)
    special = st.sampled_from(list(b'{}[]",:-.0123456789eE \\\x00tfn'))
    for _ in range(draw(st.integers(1, 6))):
        stop = min(stop, len(data))
        if stop <= start:
            break
        pos = draw(st.integers(start, stop - 1))
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(special | st.integers(0, 255))
        if op == "replace":
            data[pos] = byte
        elif op == "insert":
            data.insert(pos, byte)
            stop += 1
        else:
            del data[pos]
            stop -= 1
    return bytes(data)


# ------------------------------------------------------------------------------ safetensors
def fuzz_safetensors(workdir: str, examples: int) -> None:
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st
    from safetensors.numpy import load as reference_load

    from opt_spec import io as spec_io
    from opt_spec.errors import CheckpointError

    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.float16) - 2,
               "c": np.array([7, -1, 2**40], dtype=np.int64), "empty": np.zeros((0, 3), np.float32)}
    path = os.path.join(workdir, "x.safetensors")
    spec_io.write_safetensors(path, tensors, metadata={"format": "pt"})
    original = open(path, "rb").read()
    n = struct.unpack("<Q", original[:8])[0]
    header, data = json.loads(original[8:8 + n]), original[8 + n:]

    @st.composite
    def mutated(draw):
        kind = draw(st.sampled_from(["bytes", "entry", "shift", "swap", "prefix", "data"]))
        blob = original[8:8 + n]
        rest = data
        fix_prefix = True
        if kind == "bytes":
            blob = _byte_edits(draw, blob, 0, len(blob))
            fix_prefix = draw(st.booleans())
        elif kind == "entry":
            h = json.loads(json.dumps(header))
            key = draw(st.sampled_from([*h, "new"]))
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
            value = draw(_json_values() | st.lists(st.integers(-2, 40), max_size=3))
            if field is None or key == "__metadata__" or not isinstance(h.get(key), dict):
                h[key] = value
            else:
                h[key][field] = value
            blob = json.dumps(h).encode()
        elif kind in ("shift", "swap"):  # moves that keep every size right: overlaps, gaps, swapped tensors
            h = json.loads(json.dumps(header))
            a, b = draw(st.sampled_from(sorted(tensors))), draw(st.sampled_from(sorted(tensors)))
            if kind == "shift":
                delta = draw(st.integers(-16, 16))
                h[a]["data_offsets"] = [x + delta for x in h[a]["data_offsets"]]
            else:
                h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
                h[a]["shape"], h[b]["shape"] = h[b]["shape"], h[a]["shape"]
            blob = json.dumps(h).encode()
        elif kind == "data":
            rest = data + draw(st.binary(max_size=24)) if draw(st.booleans()) else data[:-draw(st.integers(1, 24))]
        prefix = struct.pack("<Q", len(blob) if fix_prefix else n)
        if kind == "prefix":
            prefix = struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.integers(max(0, n - 9), n + 9)))
        return prefix + blob + rest

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(mutated())
    def check(raw: bytes):
        with open(path, "wb") as f:
            f.write(raw)
        with _time_limit(EXAMPLE_SECONDS):
            try:
                st_file = spec_io.SafetensorsFile(path)
                got = {k: np.array(st_file[k]) for k in st_file}
            except CheckpointError:
                return
        want = reference_load(raw)  # we accepted: the format's reference must accept it too, equal
        assert got.keys() == want.keys(), (sorted(got), sorted(want))
        for k in got:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and \
                got[k].tobytes() == want[k].tobytes(), k
        if raw == original:
            assert all(np.array_equal(got[k], v) for k, v in tensors.items())

    def moved(name, delta):  # one tensor's offsets moved: an overlap (delta < 0) or a gap (delta > 0)
        h = json.loads(json.dumps(header))
        h[name]["data_offsets"] = [x + delta for x in h[name]["data_offsets"]]
        blob = json.dumps(h).encode()
        return struct.pack("<Q", len(blob)) + blob + data

    assert all(np.array_equal(spec_io.SafetensorsFile(path)[k], v) for k, v in tensors.items())
    for raw in (original, moved("b", -4), moved("b", 8), moved("c", 8), original + bytes(8)):
        check = example(raw)(check)
    check()


# ------------------------------------------------------------------------------------ index
def fuzz_index(workdir: str, examples: int) -> None:
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    from conversion import read_checkpoint
    from opt_spec import io as spec_io
    from opt_spec.errors import CheckpointError
    from opt_spec.testing import random_weights

    config = _config()
    weights = random_weights(config)
    folder, outside = os.path.join(workdir, "ckpt"), os.path.join(workdir, "outside")
    spec_io.save_safetensors_dir(folder, weights, config.to_dict(), max_shard_size="20KB")
    spec_io.save_safetensors_dir(outside, random_weights(config, seed=1), config.to_dict(), max_shard_size="20KB")
    index_path = os.path.join(folder, spec_io.SAFE_INDEX_NAME)
    original = open(index_path, "rb").read()
    index = json.loads(original)
    shards = sorted(set(index["weight_map"].values()))
    for shard in shards:  # a symlink in the folder to each shard's twin outside it
        os.symlink(os.path.join(outside, shard), os.path.join(folder, f"link-{shard}"))

    def escapes(shard):  # names of the outside twin of `shard`: loading one shows as other values
        return [f"../outside/{shard}", os.path.join(outside, shard), f"link-{shard}", f"x/../../outside/{shard}",
                f"./../outside/{shard}", f"{os.path.basename(folder)}/../../outside/{shard}"]

    names = st.sampled_from([*shards, *escapes(shards[0]), "", ".", f"./{shards[0]}", f"x/../{shards[0]}",
                             f"{shards[0]}/", f"..\\{shards[0]}", "missing.safetensors", "config.json", "outside",
                             "/etc/passwd"])

    def renamed(shard, name):
        data = json.loads(original)
        data["weight_map"] = {k: name if v == shard else v for k, v in data["weight_map"].items()}
        return data

    @st.composite
    def mutated(draw):
        kind = draw(st.sampled_from(["bytes", "values", "rename", "map", "root"]))
        if kind == "bytes":
            return _byte_edits(draw, original, 0, len(original))
        data = json.loads(original)
        if kind == "rename":  # every tensor of one shard sent to another name (a whole shard read elsewhere)
            shard = draw(st.sampled_from(shards))
            data = renamed(shard, draw(st.sampled_from(escapes(shard)) | names))
        elif kind == "values":
            for _ in range(draw(st.integers(1, 3))):
                key = draw(st.sampled_from(sorted(data["weight_map"])))
                data["weight_map"][key] = draw(names | _json_values())
            if draw(st.booleans()):
                del data["weight_map"][draw(st.sampled_from(sorted(data["weight_map"])))]
        elif kind == "map":
            data["weight_map"] = draw(_json_values() | st.dictionaries(st.text(max_size=8), names, max_size=4))
        else:
            data = draw(_json_values())
        return json.dumps(data).encode()

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(mutated())
    def check(raw: bytes):
        with open(index_path, "wb") as f:
            f.write(raw)
        with _time_limit(EXAMPLE_SECONDS):
            try:
                got = {k: np.array(v) for k, v in spec_io.load_checkpoint_dir(folder).items()}
            except CheckpointError:
                got = None
            try:
                ckpt = read_checkpoint(folder)
                read = {n: np.array(ref.load()) for n, ref in ckpt.tensors.items()}
            except CheckpointError:
                read = None
        for loaded in (got, read):
            if loaded is not None:
                assert loaded and loaded.keys() <= weights.keys()
                assert all(np.array_equal(v, weights[k]) for k, v in loaded.items()), "read another file's tensors"

    for escape in escapes(shards[0]):  # every way out, always tried (then the random ones)
        check = example(json.dumps(renamed(shards[0], escape)).encode())(check)
    check()


# --------------------------------------------------------------------------------------- HDF5
def _h5_fixture(workdir: str):
    from conversion import convert, read_checkpoint
    from opt_spec import io as spec_io
    from opt_spec.testing import random_weights

    config = _config()
    src, folder = os.path.join(workdir, "h5src"), os.path.join(workdir, "tf")
    spec_io.save_safetensors_dir(src, random_weights(config), config.to_dict())
    convert(src, folder, to="hf-tf", progress=False)
    original = {n: np.array(ref.load(), dtype=np.float64) for n, ref in read_checkpoint(folder).tensors.items()}
    path = os.path.join(folder, "tf_model.h5")
    return folder, path, open(path, "rb").read(), original


H5_CHANGES = ["external-storage", "external-link", "soft-link", "virtual", "string", "int32", "float64", "big-endian",
              "gzip", "lzf", "fletcher32", "scaleoffset", "compact", "huge-chunks", "reshape", "delete", "extra",
              "weight_names", "layer_names"]


def _h5_change(f, name: str, data: np.ndarray, change: str, workdir: str, seed: int) -> None:
    """One change to dataset `name` (whose pristine values are `data`) of an open HDF5 file; seed picks
    the details of a broken attribute."""
    import random

    import h5py

    other = os.path.join(workdir, "other.h5")
    if change in ("weight_names", "layer_names"):
        rng = random.Random(seed)
        group = f if change == "layer_names" else f[name.split("/", 1)[0]]
        values = [rng.choice([name, name.split("/", 1)[-1], "", "x" * rng.randrange(300), "/", "."])
                  for _ in range(rng.randrange(4))]
        group.attrs[change] = rng.choice([np.array([v.encode() for v in values] or [b""]), np.arange(3),
                                          np.float64(1), np.array(values, dtype=h5py.string_dtype())])
        return
    if change == "extra":
        f[f"stray{len(f)}"] = data
        return
    del f[name]
    if change == "external-storage":
        raw = os.path.join(workdir, "raw.bin")
        open(raw, "wb").write((data + 1).tobytes())
        f.create_dataset(name, shape=data.shape, dtype=data.dtype, external=[(raw, 0, data.nbytes)])
    elif change in ("external-link", "virtual"):
        with h5py.File(other, "w") as g:
            g["x"] = data + 1
        if change == "external-link":
            f[name] = h5py.ExternalLink(other, "/x")
        else:
            layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
            layout[...] = h5py.VirtualSource(other, "x", shape=data.shape)
            f.create_virtual_dataset(name, layout)
    elif change == "soft-link":
        f[f"alias{len(f)}"] = data + 1
        f[name] = h5py.SoftLink(f"/alias{len(f) - 1}")
    elif change == "string":
        f.create_dataset(name, shape=data.shape, dtype=h5py.string_dtype())
    elif change in ("int32", "float64", "big-endian"):
        dtype = {"int32": np.int32, "float64": np.float64, "big-endian": np.dtype(">f4")}[change]
        f.create_dataset(name, data=data.astype(dtype))
    elif change in ("gzip", "lzf", "fletcher32", "scaleoffset"):
        options = {"gzip": dict(compression="gzip", shuffle=True), "lzf": dict(compression="lzf"),
                   "fletcher32": dict(fletcher32=True), "scaleoffset": dict(scaleoffset=2)}[change]
        f.create_dataset(name, data=data, chunks=True, **options)
    elif change == "compact":
        space = h5py.h5s.create_simple(data.shape)
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_layout(h5py.h5d.COMPACT)
        if data.nbytes < 60000:
            h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(data.dtype), space, dcpl=plist).write(
                h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(data))
        else:
            f[name] = data
    elif change == "huge-chunks":
        f.create_dataset(name, data=data, chunks=tuple(4096 for _ in data.shape), maxshape=(None,) * data.ndim)
    elif change == "reshape":
        f[name] = data.reshape(-1)
    # "delete": nothing put back


def fuzz_h5(workdir: str, examples: int) -> None:
    import h5py
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    from conversion import read_checkpoint
    from opt_spec.errors import CheckpointError

    folder, path, pristine, original = _h5_fixture(workdir)
    with h5py.File(path, "r") as f:
        datasets = []
        f.visititems(lambda n, o: datasets.append(n) if isinstance(o, h5py.Dataset) else None)
        values = {n: f[n][()] for n in datasets}  # a change builds on these, not on an earlier change

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(datasets), st.sampled_from(H5_CHANGES), st.integers(0, 2**16)),
                    min_size=1, max_size=2))
    def check(changes):
        with open(path, "wb") as f:
            f.write(pristine)
        with h5py.File(path, "r+") as f:
            for name, change, seed in changes:
                if f.get(name, getlink=True) is not None:
                    _h5_change(f, name, values[name], change, workdir, seed)
        with _time_limit(EXAMPLE_SECONDS):
            try:
                read = {n: np.array(ref.load(), dtype=np.float64) for n, ref in read_checkpoint(folder).tensors.items()}
            except CheckpointError:
                return
        assert read.keys() == original.keys()
        assert all(np.array_equal(v, original[k]) for k, v in read.items()), "loaded values the file does not hold"

    for change in H5_CHANGES:  # each change once, then random pairs
        check = example([(datasets[0], change, 0)])(check)
    check()


def fuzz_h5_bytes(workdir: str, examples: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from conversion import read_checkpoint
    from opt_spec.errors import CheckpointError

    folder, path, pristine, original = _h5_fixture(os.path.join(workdir, "bytes"))

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.integers(0, len(pristine) - 1) | st.integers(0, 4095), st.integers(0, 255)),
                    min_size=1, max_size=8))
    def check(edits):
        raw = bytearray(pristine)
        for pos, byte in edits:
            raw[pos] = byte
        with open(path, "wb") as f:
            f.write(bytes(raw))
        with _time_limit(EXAMPLE_SECONDS):
            try:
                ckpt = read_checkpoint(folder)
                read = {n: np.asarray(ref.load()) for n, ref in ckpt.tensors.items()}
            except CheckpointError:
                return
        assert all(read[n].shape == ref.shape for n, ref in ckpt.tensors.items())

    check()


FUZZERS = {"safetensors": fuzz_safetensors, "index": fuzz_index, "h5": fuzz_h5, "h5-bytes": fuzz_h5_bytes}


def run_forked(fuzz, *args) -> int:
    """Runs fuzz(*args) in a forked child under the memory limit (MEMORY_HEADROOM over its start); its exit
    code: 0 when every example passed, else nonzero (the failing example's traceback is printed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _limit_memory(MEMORY_HEADROOM)
            fuzz(*args)
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main(targets: list[str]) -> int:
    import hypothesis  # noqa: F401  (imported before the memory limit, like everything a reader uses)
    import safetensors.numpy  # noqa: F401

    import conversion  # noqa: F401
    import h5py  # noqa: F401

    examples = int(os.environ.get("OPTKIT_FUZZ_EXAMPLES", 0))
    workdir = os.environ.get("FUZZ_WORKDIR") or tempfile.mkdtemp(prefix="optkit-fuzz-")
    failed = []
    for target in targets or list(FUZZERS):
        folder = os.path.join(workdir, target)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        start = time.perf_counter()
        code = run_forked(FUZZERS[target], folder, examples or TARGETS[target])
        ok = code == 0
        result = "ok" if ok else f"FAILED (exit {code})"
        print(f"{target}: {result} ({examples or TARGETS[target]} examples, {time.perf_counter() - start:.1f} s)",
              flush=True)
        if not ok:
            failed.append(target)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
