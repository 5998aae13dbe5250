"""The user-facing contracts of `optkit` and `python -m conversion`, probed where the other tests do not go:
writes that are interrupted (an exception, Ctrl-C, SIGKILL at a random moment) leave the old content or the
new one and no leftovers after the next run; a destination of any kind (file, folder, symlink) is replaced
whole; a training --output is never overwritten piecemeal and resumes in place; options out of range (nan
and inf included) and a missing part of a backend's extra are one-line usage errors (exit 2)."""

import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from opt_spec import OPTConfig
from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_weights
from opt_spec.training import TrainConfig
from optkit_cli import train as cli_train
from optkit_cli.main import main
from optkit_cli.runners import BackendNotReady

from .conftest import temp_leftovers, tree_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0", HF_HUB_OFFLINE="1")


def run_main(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------- atomic writes
def test_atomic_path_replaces_a_destination_of_any_kind(tmp_path):
    """--force over a file with a folder, over a symlink (the link is replaced, what it points to is not
    touched), over a folder with a file: each was an error naming a temporary path, or worked by accident."""
    def write_dir(tmp):
        os.makedirs(tmp)
        open(os.path.join(tmp, "w.bin"), "w").write("new")

    (tmp_path / "file").write_text("old")
    with spec_io.atomic_path(tmp_path / "file") as tmp:
        write_dir(tmp)
    assert (tmp_path / "file" / "w.bin").read_text() == "new"

    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("theirs")
    os.symlink(tmp_path / "target", tmp_path / "link")
    with spec_io.atomic_path(tmp_path / "link") as tmp:
        write_dir(tmp)
    assert not os.path.islink(tmp_path / "link") and (tmp_path / "link" / "w.bin").read_text() == "new"
    assert os.listdir(tmp_path / "target") == ["keep.txt"]

    with spec_io.atomic_path(tmp_path / "link") as tmp:  # a folder replaced by a file
        open(tmp, "w").write("flat")
    assert (tmp_path / "link").read_text() == "flat"
    assert sorted(os.listdir(tmp_path)) == ["file", "link", "target"]  # nothing left over

    with pytest.raises(NotADirectoryError, match=r"link is a file, not a folder"):  # not "[Errno 17] File exists"
        with spec_io.atomic_path(tmp_path / "link" / "inside"):
            pass


def test_an_unwritable_destination_folder_is_named(tmp_path, monkeypatch, capsys):
    """A read-only parent (as a user without root, where chmod binds) was reported by the temporary name the
    write failed on: "[Errno 13] Permission denied: '.../.out.3kf8_2.tmp'"."""
    def refused(prefix, suffix, dir):
        raise PermissionError(13, "Permission denied", os.path.join(dir, prefix + "x1y2z3" + suffix))

    src = tmp_path / "src"
    spec_io.save_safetensors_dir(src, random_weights(VARIANTS["pre_ln"]), VARIANTS["pre_ln"].to_dict())
    monkeypatch.setattr(spec_io.tempfile, "mkdtemp", refused)
    code, _, err = run_main(capsys, "convert", src, tmp_path / "ro" / "sub" / "out", "--quiet")
    assert code == 1 and err == (f"optkit convert: error: cannot write {tmp_path}/ro/sub/out: no permission to "
                                 f"create files in {tmp_path}/ro/sub\n")
    assert sorted(os.listdir(tmp_path)) == ["src"]  # the folders made for it are gone again


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_path_cleans_up_what_a_killed_writer_left(tmp_path):
    """SIGKILL runs no `finally`: the temporary sibling stays. The next write of the same path removes the
    leftovers of writers that are gone, puts back content one had moved aside, and leaves a live writer's."""
    host, dead, alive = spec_io._HOST, _dead_pid(), os.getpid()
    stale = tmp_path / f".out.{host}-{dead}.abc123.tmp"
    (stale / "out").mkdir(parents=True)
    (stale / "out" / "half.bin").write_text("half")
    running = tmp_path / f".out.{host}-{alive}.xyz789.tmp"
    running.mkdir()
    other = tmp_path / f".other.{host}-{dead}.abc123.tmp"  # another destination's: not ours to judge now
    other.mkdir()
    with spec_io.atomic_path(tmp_path / "out") as tmp:
        open(tmp, "w").write("new")
    assert sorted(os.listdir(tmp_path)) == sorted(["out", running.name, other.name])

    # killed between moving the old content aside and renaming the new one in: the old one comes back
    (tmp_path / "dst").write_text("old")
    os.replace(tmp_path / "dst", tmp_path / f".dst.{host}-{dead}.q1w2e3.tmp.old")
    (tmp_path / f".dst.{host}-{dead}.q1w2e3.tmp").mkdir()
    with pytest.raises(FileExistsError):
        with spec_io.atomic_path(tmp_path / "dst", overwrite=False):
            pass
    assert (tmp_path / "dst").read_text() == "old" and not [n for n in os.listdir(tmp_path) if "dst." in n]


def test_an_error_between_the_two_renames_puts_the_old_content_back(tmp_path, monkeypatch):
    """A folder is replaced in two renames (the old one aside, the new one in): Ctrl-C or an error after the
    first left the destination missing, its content under a temporary name that only another process's
    next write put back."""
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "w.bin").write_text("old")
    real = os.replace

    def replace(src, dst):
        if os.path.basename(src) == "out":  # the new content's rename
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with spec_io.atomic_path(tmp_path / "dst") as tmp:
            os.makedirs(tmp)
            open(os.path.join(tmp, "w.bin"), "w").write("new")
    assert os.listdir(tmp_path) == ["dst"] and os.listdir(tmp_path / "dst") == ["w.bin"]
    assert (tmp_path / "dst" / "w.bin").read_text() == "old"


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_writer_that_must_not_overwrite_loses_to_one_that_finished_first(tmp_path, kind):
    """Without overwrite, the destination is checked at the start and again in the final rename itself: a
    second writer (another convert to the same new DST) that finishes while this one writes keeps its result,
    and this one says the destination exists instead of replacing it."""
    dst = tmp_path / "dst"
    with pytest.raises(FileExistsError, match="dst exists; refusing to overwrite it"):
        with spec_io.atomic_path(dst, overwrite=False) as tmp:
            if kind == "file":
                open(tmp, "w").write("mine")
                dst.write_text("theirs")
            else:
                os.makedirs(tmp)
                open(os.path.join(tmp, "w"), "w").write("mine")
                dst.mkdir()
                (dst / "w").write_text("theirs")
    assert (dst.read_text() if kind == "file" else (dst / "w").read_text()) == "theirs"
    assert os.listdir(tmp_path) == ["dst"]
    with spec_io.atomic_path(tmp_path / "fresh", overwrite=False) as tmp:  # nothing there: written as usual
        open(tmp, "w").write("mine")
    assert (tmp_path / "fresh").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["dst", "fresh"]


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> str:
    """~55 MB of float32 weights: writing it takes a while, and past any small file-size limit."""
    config = OPTConfig(vocab_size=8192, hidden_size=512, num_hidden_layers=3, ffn_dim=2048, num_attention_heads=8,
                       max_position_embeddings=128)
    path = tmp_path_factory.mktemp("big")
    spec_io.save_safetensors_dir(path, random_weights(config, seed=1), config.to_dict())
    return str(path)


# `python -m conversion ARGS` whose writer waits 10 ms before each tensor: the writing lasts ~0.5 s whatever the
# machine's speed, so that a kill at a random moment lands inside it even when the test process is slow to see it.
_SLOW_CONVERT = """import runpy, sys, time
import conversion.hf as hf
real = hf.produce
hf.produce = lambda ref, dtype: (time.sleep(0.01), real(ref, dtype))[1]
sys.argv[0] = "conversion"
runpy.run_module("conversion", run_name="__main__", alter_sys=True)
"""


def _convert_process(src, dst, kill_after: float | None = None) -> float:
    """Runs `python -m conversion SRC DST --force` (slowed down) and returns how long its temporary sibling of
    DST existed; with kill_after, SIGKILLs it that many seconds after the sibling appeared (the writing started)."""
    parent = os.path.dirname(dst)
    before = set(temp_leftovers(parent))
    p = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(src), str(dst), "--to", "hf-pytorch", "--force",
                          "--quiet"], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started, deadline = None, time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:
        now = time.monotonic()
        if started is None and set(temp_leftovers(parent)) - before:
            started = now
        if started is not None and kill_after is not None and now - started >= kill_after:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    assert p.wait() in (0, -signal.SIGKILL)
    return time.monotonic() - started if started is not None else 0.0


def test_convert_killed_at_random_moments_leaves_old_or_new_and_the_next_run_cleans_up(tmp_path, big_checkpoint):
    """SIGKILL `python -m conversion ... --force` at a random moment while it writes, several times: the
    destination always holds the old checkpoint or the complete new one (never a half-written folder that
    loads), and the next run leaves no temporary folder behind."""
    from conversion import convert

    src = big_checkpoint
    spec_io.save_safetensors_dir(tmp_path / "small", random_weights(VARIANTS["pre_ln"]), VARIANTS["pre_ln"].to_dict())
    dst = tmp_path / "out" / "dst"
    convert(tmp_path / "small", dst, to="hf-pytorch", progress=False)
    old = tree_snapshot(dst)
    os.makedirs(tmp_path / "ref")
    window = _convert_process(src, tmp_path / "ref" / "new")  # how long the writing takes here
    new = tree_snapshot(tmp_path / "ref" / "new")
    rng, outcomes = random.Random(0), []
    for _ in range(4):
        _convert_process(src, dst, kill_after=rng.uniform(0.0, 0.6) * window)
        got = tree_snapshot(dst)
        if got is None:  # killed between the two renames: the old content waits beside it, to be put back
            assert [n for n in temp_leftovers(dst.parent) if n.endswith(".old")]
        else:
            assert got in (old, new)
        outcomes.append("new" if got == new else "old")
    assert "old" in outcomes and temp_leftovers(dst.parent)  # the kills did land inside the writing
    _convert_process(src, dst)
    assert tree_snapshot(dst) == new and temp_leftovers(dst.parent) == []


_SIZE_LIMITED = """import resource, sys
from optkit_cli.main import main
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # no file over `limit` bytes: a write fails midway
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("fmt", ["hf-safetensors", "hf-flax", "hf-tf"])
def test_a_write_that_fails_midway_is_named_and_leaves_nothing(tmp_path, fmt, big_checkpoint):
    """RLIMIT_FSIZE (a quota, a full disk) stops the writer: the error was "[Errno 27] File too large" without
    a path, and for HDF5 an internal error (h5py's RuntimeError); now one line naming the destination.
    (HDF5 is given the large checkpoint: a write failing on a small file's last flush crashes libhdf5 itself
    when h5py closes the file, SIGSEGV, which no caller can catch; the atomic write still leaves nothing.)"""
    if fmt == "hf-tf":
        src, limit = big_checkpoint, 20_000_000
    else:
        src, limit = tmp_path / "src", 20_000
        spec_io.save_safetensors_dir(src, random_weights(VARIANTS["pre_ln"]), VARIANTS["pre_ln"].to_dict())
    dst = tmp_path / "out" / "dst"
    res = subprocess.run([sys.executable, "-c", _SIZE_LIMITED, str(limit), "convert", str(src), str(dst), "--to", fmt,
                          "--quiet"], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.startswith(f"optkit convert: error: {dst}: writing failed, nothing "
                                                         "was written (") and res.stderr.count("\n") == 1, res.stderr
    assert "File too large" in res.stderr and sorted(os.listdir(tmp_path)) == (["src"] if fmt != "hf-tf" else [])


def test_convert_destination_kinds_and_usage_errors(tmp_path, capsys):
    src = tmp_path / "src"
    spec_io.save_safetensors_dir(src, random_weights(VARIANTS["pre_ln"]), VARIANTS["pre_ln"].to_dict())
    (tmp_path / "afile").write_text("x")
    code, _, err = run_main(capsys, "convert", src, tmp_path / "afile" / "out", "--quiet")
    assert code == 1 and err == (f"optkit convert: error: cannot write {tmp_path}/afile/out: {tmp_path}/afile is a "
                                 "file, not a folder\n")
    code, out, err = run_main(capsys, "convert", src, tmp_path / "afile", "--quiet", "--force")
    assert code == 0 and sorted(os.listdir(tmp_path / "afile")) == ["config.json", "model.safetensors"], err
    for bad, says in ((["--set", "num_hidden_layers"], "expected KEY=VALUE"),
                      (["--max-shard-size", "lots"], "cannot read 'lots' as a size")):
        with pytest.raises(SystemExit) as exc:  # command-line mistakes: exit 2, as the docstring says
            main(["convert", str(src), str(tmp_path / "x"), *bad])
        assert exc.value.code == 2 and says in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_a_write_that_cannot_fit_is_refused_before_it_starts(tmp_path, capsys, monkeypatch):
    """The free space is asked before the first byte: a 350 GB conversion onto a disk with less would fail at
    its last shard (and HDF5 may crash on a full disk). Within the space, both writes go on as before."""

    src, config = tmp_path / "src", VARIANTS["pre_ln"]
    spec_io.save_safetensors_dir(src, random_weights(config), config.to_dict())
    need = sum(a.nbytes for a in random_weights(config).values())
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, need // 2 - 1))  # float16 fits, not 32
    code, _, err = run_main(capsys, "convert", src, tmp_path / "dst", "--quiet")
    assert code == 1 and err.startswith(f"optkit convert: error: {tmp_path}/dst: the weights need ") and \
        err.endswith(f"and {tmp_path} has 0.00 GB free; nothing was written\n"), err
    with pytest.raises(OSError, match="the weights need .* GB free; nothing was written"):
        spec_io.save_safetensors_dir(tmp_path / "saved", random_weights(config), config.to_dict())
    from opt_torch import OPTForCausalLM

    with pytest.raises(OSError, match="the weights need .* GB free; nothing was written"):  # the .bin writer too
        OPTForCausalLM.from_pretrained(src).save_pretrained(tmp_path / "saved", safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, need // 2 + 64))
    assert run_main(capsys, "convert", src, tmp_path / "dst", "--quiet", "--dtype", "float16")[0] == 0
    # A save over the same files writes each into a temporary sibling renamed onto the old file, whose space is
    # freed only then: the same weights again need room for one file, or (sharded) for the largest shard.
    before, weights = tree_snapshot(src), random_weights(config, seed=1)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, need - 1))
    with pytest.raises(OSError, match="the weights need .* GB free; nothing was written"):
        spec_io.save_safetensors_dir(src, weights, config.to_dict())
    assert tree_snapshot(src) == before
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, need))
    spec_io.save_safetensors_dir(src, weights, config.to_dict())
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    spec_io.save_safetensors_dir(tmp_path / "sharded", weights, config.to_dict(), max_shard_size=need // 3)
    shards = spec_io.plan_shards([(n, a.nbytes) for n, a in weights.items()], need // 3)
    largest = max(sum(weights[n].nbytes for n in shard) for shard in shards)
    assert len(shards) > 2 and largest < need // 2
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, largest))
    spec_io.save_safetensors_dir(tmp_path / "sharded", random_weights(config, seed=2), config.to_dict(),
                                 max_shard_size=need // 3)


# ------------------------------------------------------------------------------------------ Ctrl-C
_INTERRUPT = """import builtins, runpy, sys
real, target = builtins.__import__, sys.argv[1]
def hook(name, *args, **kwargs):
    if name == target:
        raise KeyboardInterrupt  # as if Ctrl-C came while Python loads this module
    return real(name, *args, **kwargs)
builtins.__import__ = hook
module, sys.argv = sys.argv[2], [sys.argv[2], *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("when,module,args,message", [
    ("numpy", "optkit_cli.main", ["parity", "--preset", "tiny"], "optkit: interrupted\n"),  # optkit's own start-up
    ("conversion", "optkit_cli.main", ["convert", "a", "b"], "optkit: interrupted\n"),  # convert's import
    ("argparse", "conversion", ["a", "b"], "optkit convert: interrupted; nothing was written\n"),
])
def test_ctrl_c_while_a_command_starts_is_one_line(tmp_path, when, module, args, message):
    env = dict(ENV, OPTKIT_CACHE=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", _INTERRUPT, when, module, *args], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == (130, message)


_CRASHING_SHUTDOWN = """import atexit, os, signal, sys
from optkit_cli import main, parity
def interrupted(args, console):
    raise KeyboardInterrupt
parity.run = interrupted
atexit.register(lambda: os.kill(os.getpid(), signal.SIGSEGV))  # as XLA's threads do after a compile cut short
sys.argv = ["optkit", "parity"]
sys.exit(main.main())
"""


def test_an_interrupted_program_exits_130_even_when_shutdown_would_crash(tmp_path, capsys, monkeypatch):
    """Ctrl-C during `optkit train --backend flax`'s first compile printed the line, then the interpreter's
    shutdown died of SIGSEGV (exit -11). As the program, an interrupted optkit now ends at once; called
    in-process (argv given) it returns 130 like any other status."""
    res = subprocess.run([sys.executable, "-c", _CRASHING_SHUTDOWN], env=dict(ENV, OPTKIT_CACHE=str(tmp_path)),
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == (130, "optkit parity: interrupted\n")
    from optkit_cli import parity

    monkeypatch.setattr(parity, "run", lambda args, console: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run_main(capsys, "parity")[:3:2] == (130, "optkit parity: interrupted\n")


_LOST_INTERRUPT = """import gc, sys, time
from optkit_cli import main, parity
def ctrl_c_here(phase, info):  # Ctrl-C landing in a gc callback (JAX has one): Python prints it, nothing more
    gc.callbacks.remove(ctrl_c_here)
    raise KeyboardInterrupt
def carries_on(args, console):
    gc.callbacks.append(ctrl_c_here)
    gc.collect()
    for _ in range(100):  # the rest of the command: 5 s
        time.sleep(0.05)
    return 0
parity.run = carries_on
sys.argv = ["optkit", "parity"]
sys.exit(main.main())
"""


def test_a_ctrl_c_raised_where_python_ignores_exceptions_still_interrupts(tmp_path):
    """A KeyboardInterrupt raised inside a callback whose exceptions Python only prints ("Exception ignored
    in: <function _xla_gc_callback>") was lost: `optkit train --backend flax` carried on to its end."""
    res = subprocess.run([sys.executable, "-c", _LOST_INTERRUPT], env=dict(ENV, OPTKIT_CACHE=str(tmp_path)),
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == (130, "optkit parity: interrupted\n")


@pytest.mark.slow  # imports JAX and compiles a train step: ~8 s
def test_ctrl_c_during_flax_first_compile(tiny_model, tmp_path):
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    model, data = tiny_model
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "optkit_cli.main", "train", "--model", str(model), "--task",
                          "causal_lm", "--data", str(data), "--backend", "flax", "--output", str(out), "--steps",
                          "1000", "--batch-size", "2", "--seq-len", "16", "--save-every", "1"],  # never done in 1 s
                         env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:  # the trainer is loaded: the first update (and its compile) starts now
        if line.startswith("  done in"):
            break
    time.sleep(1.0)  # inside the first compile: without the fix, 8 of 10 runs crashed at 0.5-1.5 s
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait() == 130 and rest.endswith("optkit train: interrupted\n"), rest[-3000:]
    assert [n for n in os.listdir(out) if n != "metrics.jsonl" and not n.startswith("checkpoint-")] == []


# ------------------------------------------------------------------------------------- option ranges
def test_nan_and_inf_options_are_usage_errors(capsys, tmp_path, monkeypatch):
    """Each passed the CLI's comparisons (nan < 0 is false) and failed later as an internal error (exit 1),
    trained with an infinite rate, or silently turned clipping off."""
    monkeypatch.setenv("OPTKIT_CACHE", str(tmp_path / "cache"))
    for flags, says in ((["--temperature", "nan", "--do-sample"], "--temperature nan: must be a finite number"),
                        (["--repetition-penalty", "inf"], "--repetition-penalty inf: must be a finite number"),
                        (["--length-penalty", "nan", "--num-beams", "2"], "--length-penalty nan: must be a finite"),
                        (["--temperature", "0", "--do-sample"], "--temperature 0.0: must be > 0 when sampling"),
                        (["--temperature", "-1"], "--temperature -1.0: must be >= 0")):
        code, _, err = run_main(capsys, "generate", "--preset", "tiny", "-q", *flags, "2 3")
        assert code == 2 and err.startswith(f"optkit generate: error: {says}") and err.count("\n") == 1, err
    code, _, err = run_main(capsys, "parity", "--preset", "tiny", "-q", "--tolerance", "nan")
    assert code == 2 and "--tolerance nan: must be >= 0" in err
    assert not os.path.exists(tmp_path / "cache")  # refused before anything was built
    # temperature 0 without sampling is greedy search, as the API and Hugging Face take it: the same tokens
    greedy = [run_main(capsys, "generate", "--preset", "tiny", "-q", "--max-new-tokens", "4", *flags, "2 3")
              for flags in ([], ["--temperature", "0"])]
    assert greedy[0][0] == 0 and greedy[0][1] and greedy[1][:2] == greedy[0][:2], greedy
    # --num-beams with --do-sample is beam sampling (Hugging Face's beam sample): seeded, reproducible
    beams = [run_main(capsys, "generate", "--preset", "tiny", "-q", "--max-new-tokens", "4", "--num-beams", "2",
                      "--do-sample", "--seed", "3", "2 3") for _ in range(2)]
    assert beams[0][0] == 0 and beams[0][1] and beams[1][:2] == beams[0][:2], beams
    # --prompt-lookup (assisted decoding) prints greedy search's tokens, in every backend; it takes one prompt
    for backend in ("torch", "tf", "flax"):
        looked = run_main(capsys, "generate", "--preset", "tiny", "-q", "--backend", backend, "--max-new-tokens", "12",
                          "--prompt-lookup", "3", "2 3 4 3 4")
        plain = run_main(capsys, "generate", "--preset", "tiny", "-q", "--backend", backend, "--max-new-tokens", "12",
                         "2 3 4 3 4")
        assert looked[0] == 0 and looked[1] and looked[:2] == plain[:2], (backend, looked, plain)
    for flags in (["--num-beams", "2"], ["5 6"], ["--fallback-loop"]):
        code, _, err = run_main(capsys, "generate", "--preset", "tiny", "-q", "--prompt-lookup", "3", *flags, "2 3")
        assert code == 2 and "--prompt-lookup 3: assisted decoding takes the backend's generate" in err, err

    data = tmp_path / "d.txt"
    data.write_text("hello\n")
    common = ["train", "--model", tmp_path, "--task", "causal_lm", "--data", data, "--output", tmp_path / "o"]
    for flags, says in ((["--lr", "inf"], "learning_rate=inf: must be a finite number > 0"),
                        (["--weight-decay", "nan"], "weight_decay=nan: must be a finite number >= 0"),
                        (["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0 (0 turns clipping off)"),
                        (["--max-grad-norm", "nan"], "--max-grad-norm must be >= 0"),
                        (["--eval-batch-size", "0"], "--eval-batch-size must be at least 1"),
                        (["--eval-data", tmp_path / "nope.txt"], f"--eval-data {tmp_path}/nope.txt: no such file")):
        code, _, err = run_main(capsys, *common, *flags)
        assert code == 2 and says in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "o")
    code, _, err = run_main(capsys, *common[:-1], data)  # --output names a file: was "[Errno 17] File exists"
    assert code == 2 and err == f"optkit train: error: --output {data}: a file, not a folder\n"
    with pytest.raises(ValueError, match="learning_rate=inf"):  # the rule is the spec's
        TrainConfig(learning_rate=float("inf"))


def test_a_missing_part_of_a_backend_extra_is_named(capsys, tmp_path, monkeypatch):
    """jax and flax installed but optax not (or keras without TensorFlow's parts): the trainer's import
    fails; that was an internal error naming a module, now the extra to install (exit 2)."""
    pytest.importorskip("flax")  # installed: the framework is found, a part of the extra is not
    monkeypatch.setitem(sys.modules, "opt_flax.training", None)  # `import opt_flax.training` raises ImportError
    with pytest.raises(BackendNotReady, match=r"opt_flax.training does not import .*pip install 'optkit\[flax\]'"):
        cli_train.load_trainer_class("flax")
    data = tmp_path / "d.txt"
    data.write_text("hello\n")
    monkeypatch.setattr(cli_train, "resolve_folder", lambda name, *a, **k: (name, ""))
    code, _, err = run_main(capsys, "train", "--model", tmp_path, "--task", "causal_lm", "--data", data,
                            "--backend", "flax", "--output", tmp_path / "o", "--no-retain-memory")
    assert code == 2 and "pip install 'optkit[flax]'" in err and "internal error" not in err, err


# ------------------------------------------------------------------------------------------- train
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("tokenizers")
    pytest.importorskip("torch")
    from tests.test_data import build_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer(path)
    config = VARIANTS["pre_ln"].replace(vocab_size=max(96, tok.vocab_size), max_position_embeddings=64)
    spec_io.save_safetensors_dir(path, random_weights(config, seed=2), config.to_dict())
    data = path / "train.txt"
    data.write_text("Hello, my name is Ada and I like tea.\n\nThe quick brown fox jumps over the lazy dog!\n" * 3)
    return path, data


def _train(tiny_model, out, *extra):
    model, data = tiny_model
    return ["train", "--model", model, "--task", "causal_lm", "--data", data, "--backend", "torch", "--output", out,
            "--batch-size", 2, "--seq-len", 16, "--steps", 3, "--save-every", 1, "--compile", "off", "-q", *extra]


def test_train_never_overwrites_a_run_and_resumes_in_place(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(capsys, *_train(tiny_model, out))[0] == 0
    first = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in first] == [1, 2, 3]
    before = tree_snapshot(out)

    # The same command again: it used to empty metrics.jsonl and overwrite checkpoints one by one.
    code, _, err = run_main(capsys, *_train(tiny_model, out))
    assert code == 2 and tree_snapshot(out) == before
    assert err == (f"optkit train: error: --output {out} already holds a training run (metrics.jsonl, final, "
                   f"checkpoint-1, checkpoint-2, ...); nothing was changed: continue it with --resume "
                   f"{out}/checkpoint-3, or choose another --output\n")

    # Another run's checkpoint resumed into this --output would overwrite it piecemeal just the same.
    shutil.copytree(out / "checkpoint-1", tmp_path / "elsewhere")
    code, _, err = run_main(capsys, *_train(tiny_model, out, "--resume", tmp_path / "elsewhere"))
    assert code == 2 and tree_snapshot(out) == before and f"--output {out} already holds a training run" in err, err

    # Other settings on resume: the user's mistake (exit 2), naming the option, not an internal error.
    code, _, err = run_main(capsys, *_train(tiny_model, out, "--resume", out / "checkpoint-1", "--lr", "1e-3"))
    assert code == 2 and "learning_rate: 5e-05 saved, 0.001 given" in err and "(set by --lr)" in err, err

    # Resuming in the run's own folder, as after a crash at step 3 (its last line cut short): the records
    # past the resumed step are replaced by the resumed run's, which equal them, not appended after them.
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')
    assert run_main(capsys, *_train(tiny_model, out, "--resume", out / "checkpoint-1"))[0] == 0
    again = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in again] == [1, 2, 3]
    assert [json.loads(x)["loss"] for x in again] == [json.loads(x)["loss"] for x in first]
    assert temp_leftovers(out) == []


def test_train_keeps_the_corpus_token_ids_for_the_next_run(tiny_model, tmp_path, capsys, monkeypatch):
    """By default in $OPTKIT_CACHE/tokens (--data-cache DIR elsewhere, 'none': nowhere); the next run reads them
    back and trains on the same ids."""
    monkeypatch.setenv("OPTKIT_CACHE", str(tmp_path / "cache"))
    assert run_main(capsys, *_train(tiny_model, tmp_path / "a", "--steps", "2"))[0] == 0
    entries = sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir())
    assert [n.rsplit(".", 1)[1] for n in entries] == ["ids", "json", "lock"]
    assert run_main(capsys, *_train(tiny_model, tmp_path / "b", "--steps", "2"))[0] == 0
    assert sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir()) == entries
    losses = [[json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in "ab"]
    assert losses[0] == losses[1]
    assert run_main(capsys, *_train(tiny_model, tmp_path / "c", "--steps", "1", "--data-cache", "none"))[0] == 0
    assert run_main(capsys, *_train(tiny_model, tmp_path / "d", "--steps", "1", "--data-cache", tmp_path / "own"))[0] == 0
    assert len(list((tmp_path / "own").glob("*.ids"))) == 1
    assert sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir()) == entries


def test_train_holds_out_an_eval_split(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(capsys, *_train(tiny_model, out, "--steps", "2", "--eval-split", "0.3"))[0] == 0
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 1 and evals[0]["step"] == 2 and evals[0]["loss"] > 0
    for extra, says in ((["--eval-split", "1.5"], "a fraction between 0 and 1"),
                        (["--eval-split", "0.1", "--eval-data", tiny_model[1]], "not both"),
                        (["--eval-split", "0.999"], "leaves none to train on")):
        code, _, err = run_main(capsys, *_train(tiny_model, tmp_path / "other", *extra))
        assert code == 2 and f"--eval-split {extra[1]}: " in err and says in err, err


def test_resume_config_is_one_rule():
    """The check every backend's from_checkpoint made in three copies, once in the spec; a file's bad
    train_config is refused as the file's (it was a TypeError: an internal error)."""
    from opt_spec.errors import CheckpointError
    from opt_spec.training import ResumeMismatchError, resume_config

    saved = TrainConfig(learning_rate=1e-3, total_steps=10)
    assert resume_config("ck", dict(vars(saved)), None) == saved
    with pytest.raises(ResumeMismatchError, match=r"ck: .*different settings \(total_steps: 10 saved, 5 given\)") as e:
        resume_config("ck", dict(vars(saved)), TrainConfig(learning_rate=1e-3, total_steps=5))
    assert e.value.fields == ["total_steps"]
    for bad in (None, [1], {"learning_rate": 1e-3, "nonsense": 1}, {"learning_rate": -1.0}):
        with pytest.raises(CheckpointError, match="ck: the saved train_config is not valid"):
            resume_config("ck", bad, None)


class _FailingTrainer:
    """Writes a checkpoint's weights, then fails before its trainer state (a full disk, Ctrl-C)."""

    def __init__(self, error):
        self.error = error

    def save_checkpoint(self, directory):
        os.makedirs(directory, exist_ok=True)
        open(os.path.join(directory, "model.safetensors"), "w").write("new weights")
        raise self.error


@pytest.mark.parametrize("error,raised,says", [
    (KeyboardInterrupt(), KeyboardInterrupt, ""),
    (OSError(28, "No space left on device"), OSError, "saving the checkpoint failed ([Errno 28] No space left"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 144256 vs 144144"), OSError,
     "saving the checkpoint failed (torch.save: [enforce fail"),  # torch.save on a full disk: was an internal error
    (RuntimeError("a bug"), RuntimeError, "a bug"),  # anything else stays what it is
])
def test_a_failed_checkpoint_save_leaves_the_earlier_one(tmp_path, error, raised, says):
    """A save cut short used to leave the new weights next to the earlier save's trainer state (or none): a
    folder that loads and resumes as something that never existed; a full disk was "[Errno 28] ..." alone."""
    ck = tmp_path / "run" / "checkpoint-2"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_text("old weights")
    (ck / "trainer_state.pt").write_text("old state")
    before = tree_snapshot(ck)
    with pytest.raises(raised) as err:
        cli_train._save(_FailingTrainer(error), str(ck), [], 0)
    assert str(err.value).startswith(f"{ck}: {says}" if raised is OSError else says)
    assert tree_snapshot(ck) == before and temp_leftovers(ck.parent) == []
    with pytest.raises(raised):
        cli_train._save(_FailingTrainer(error), str(tmp_path / "run" / "checkpoint-4"), [], 0)
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-2"]


def test_train_refuses_to_start_when_a_checkpoint_cannot_fit(tiny_model, tmp_path, capsys, monkeypatch):
    """A checkpoint holds the weights and AdamW's two moments (12 bytes a parameter at least): a run whose
    disk cannot hold one is refused before its first update (it used to train, then fail at its first save),
    and a disk that fills during the run is named at the save."""
    from opt_spec.training import checkpoint_nbytes
    from opt_spec.weights import count_parameters

    config = OPTConfig.from_pretrained(tiny_model[0])
    need = checkpoint_nbytes(config, "causal_lm")
    assert need == 12 * count_parameters(config)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, need - 1))
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *_train(tiny_model, out))
    assert code == 1 and "a checkpoint (weights and optimizer state) need" in err and not out.exists(), err

    free = iter([need] + [need - 1] * 10)  # room at the start, then the disk fills before the first save
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, next(free)))
    code, _, err = run_main(capsys, *_train(tiny_model, out))
    assert code == 1 and f"{out}/checkpoint-1: the checkpoint (weights and optimizer state) need" in err, err
    assert sorted(os.listdir(out)) == ["metrics.jsonl"] and temp_leftovers(out) == []
    # a real save takes at least what the bound says
    monkeypatch.undo()
    assert run_main(capsys, *_train(tiny_model, tmp_path / "ok", "--steps", 1))[0] == 0
    saved = sum(f.stat().st_size for f in (tmp_path / "ok" / "final").rglob("*") if f.is_file())
    assert saved >= need


def test_a_source_that_fails_to_read_midway_is_named_as_the_source(tmp_path, capsys, monkeypatch):
    """An OSError reading the source during the write (a network mount gone, a bad sector) was reported as
    "DST: writing failed": now the source file and tensor are named, and nothing is written."""
    import dataclasses
    import errno

    import conversion.api as api

    src = tmp_path / "src"
    spec_io.save_safetensors_dir(src, random_weights(VARIANTS["pre_ln"]), VARIANTS["pre_ln"].to_dict())
    fmt = api.FORMATS["hf-safetensors"]

    def failing_read(path, overrides):
        ckpt = fmt.read(path, overrides)
        ref = list(ckpt.tensors.values())[3]

        def load():
            raise OSError(errno.EIO, "Input/output error")
        ref.load = load
        return ckpt

    monkeypatch.setitem(api.FORMATS, "hf-safetensors", dataclasses.replace(fmt, read=failing_read))
    dst = tmp_path / "dst"
    code, _, err = run_main(capsys, "convert", src, dst, "--to", "hf-pytorch", "--quiet")
    ref = list(fmt.read(str(src), None).tensors.values())[3]
    assert code == 1 and err == (f"optkit convert: error: {ref.where}: reading failed, nothing was written to {dst} "
                                 "([Errno 5] Input/output error)\n"), err
    assert sorted(os.listdir(tmp_path)) == ["src"]
