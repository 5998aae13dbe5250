"""Conversion memory and speed: a random 1.3b-shaped float16 checkpoint converted tensor by tensor.

The source is made one tensor at a time (opt_spec.testing.random_weight) and written straight into a
model.safetensors in a temporary directory, which is deleted afterwards. Each conversion runs in a
child process that reports its resident memory after imports (baseline) and its peak (VmHWM) at
the end; the parent also reads the child's peak from getrusage(RUSAGE_CHILDREN) as a cross-check.

    python bench/bench_convert.py [--preset 1.3b] [--to hf-pytorch,hf-safetensors,hf-tf,hf-flax]
                                  [--dtype float16] [--dir /tmp]

Prints, per target format: seconds, MB/s (source bytes / seconds), baseline and peak RSS, and peak
RSS divided by the checkpoint size (the largest single tensor's share is printed for reference).
Note: the source was just written, so it is read from the OS page cache (a cold disk is slower).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from opt_spec import OPTConfig, tied_source, weight_table  # noqa: E402
from opt_spec import io as spec_io  # noqa: E402
from opt_spec.testing import random_weight  # noqa: E402

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import conversion

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
base = status("VmRSS")
start = time.perf_counter()
summary = conversion.convert({src!r}, {dst!r}, to={to!r}, dtype={dtype!r}, progress=False)
seconds = time.perf_counter() - start
print(json.dumps(dict(baseline=base, peak=status("VmHWM"), seconds=seconds, out_bytes=summary.bytes,
                      tensors=summary.tensors)))
"""


def make_source(directory: str, config: OPTConfig, dtype) -> tuple[str, int, int]:
    """Writes the random checkpoint one tensor at a time; returns (dir, bytes, largest tensor bytes)."""
    from opt_spec.io import write_safetensors_stream

    tied = tied_source(config, "causal_lm")
    specs = [s for s in weight_table(config, "causal_lm") if s.name not in tied]
    items = [(s.name, s.shape, np.dtype(dtype), (lambda s=s: random_weight(s, config, 0, dtype))) for s in specs]
    os.makedirs(directory, exist_ok=True)
    write_safetensors_stream(os.path.join(directory, spec_io.SAFE_WEIGHTS_NAME), items)
    spec_io.atomic_write_text(os.path.join(directory, spec_io.CONFIG_NAME),
                              json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    largest = max(s.numel for s in specs) * np.dtype(dtype).itemsize
    return directory, sum(s.numel for s in specs) * np.dtype(dtype).itemsize, largest


def run_child(src: str, dst: str, to: str, dtype: str | None) -> dict:
    code = CHILD.format(root=ROOT, src=src, dst=dst, to=to, dtype=dtype)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"conversion to {to} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["rusage_peak"] = after * 1024 if after > before else None  # max over children so far
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="1.3b")
    parser.add_argument("--to", default="hf-pytorch,hf-safetensors,hf-tf,hf-flax")
    parser.add_argument("--dtype", default=None, help="cast while converting (default: keep float16)")
    parser.add_argument("--dir", default=None, help="where the temporary checkpoints go (default: $TMPDIR)")
    args = parser.parse_args(argv)
    config = OPTConfig.from_preset(args.preset)
    work = tempfile.mkdtemp(prefix="optkit-bench-convert-", dir=args.dir)
    try:
        t0 = time.perf_counter()
        src, size, largest = make_source(os.path.join(work, "src"), config, np.float16)
        print(f"source: random {args.preset} float16, {size / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB "
              f"({largest / size:.1%} of the checkpoint), made in {time.perf_counter() - t0:.0f} s")
        print(f"{'target':16} {'seconds':>8} {'MB/s':>7} {'baseline RSS':>13} {'peak RSS':>9} "
              f"{'peak/size':>9} {'(peak-base)/size':>16}")
        for to in args.to.split(","):
            dst = os.path.join(work, f"out-{to}")
            r = run_child(src, dst, to.strip(), args.dtype)
            print(f"{to:16} {r['seconds']:8.1f} {size / 1e6 / r['seconds']:7.0f} {r['baseline'] / 1e6:10.0f} MB "
                  f"{r['peak'] / 1e6:6.0f} MB {r['peak'] / size:9.3f} {(r['peak'] - r['baseline']) / size:16.3f}")
            shutil.rmtree(dst, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
