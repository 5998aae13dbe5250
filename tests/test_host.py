"""opt_spec.host.retain_freed_memory: after it, a large block freed and allocated again reuses the process's
pages (no page faults); without it every allocation of that size faults its pages in anew. `optkit train`
calls it unless told --no-retain-memory."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from opt_spec.host import retain_freed_memory
took = retain_freed_memory() if sys.argv[1] == "retain" else None
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(256 << 20, np.uint8)  # 256 MB, well above glibc's mmap threshold; written: every page touched
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, *faults)
"""


def probe(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], [int(x) for x in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings (Linux)")
def test_freed_memory_is_reused_without_page_faults():
    took, plain = probe("plain")  # (NumPy asks for transparent huge pages: a fault per 2 MB page, or per 4 kB)
    assert took == "None" and min(plain) >= 100  # each allocation faults its pages in again
    took, retained = probe("retain")
    assert took == "True"
    assert retained[0] >= 100 and max(retained[1:]) <= min(plain) // 10  # the first touches, then reuse


def test_optkit_train_retains_memory_unless_told_not_to(monkeypatch, tmp_path):
    from opt_spec import host
    from optkit_cli.main import main

    calls = []
    monkeypatch.setattr(host, "retain_freed_memory", lambda: calls.append(1) or True)
    data = tmp_path / "x.txt"
    data.write_text("hello\n")
    args = ["train", "--model", str(tmp_path), "--task", "causal_lm", "--data", str(data), "--output",
            str(tmp_path / "o"), "--steps", "1"]
    assert main(args + ["--no-retain-memory"]) != 0 and calls == []  # (the folder holds no model: refused later)
    assert main(args) != 0 and calls == [1]
