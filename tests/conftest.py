"""Shared test set-up: quiet TensorFlow, tolerance helpers, the variant configs, file-tree snapshots, local
worker processes on free ports."""

import hashlib
import os
import socket
import subprocess
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from opt_spec.testing import VARIANTS  # noqa: E402

HEADS = ("base", "causal_lm", "sequence_classification", "question_answering")


def max_abs_diff(a, b, mask=None) -> float:
    """max |a - b| over the positions mask keeps (mask broadcast over trailing axes)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    d = np.abs(a - b)
    if mask is not None:
        d = d[np.asarray(mask).astype(bool)]
    return float(d.max()) if d.size else 0.0


def beam_samples_reference(last_logits, ids, d, noise) -> tuple[np.ndarray, list]:
    """What beam sampling must return for the prompts ids (B, T) (all tokens real) when a backend adds the Gumbel
    noise `noise[step]` (B, K * V) to the candidates' scores: opt_spec.generation.beam_search_reference with
    draw= taking the same noise, next-token scores from last_logits(rows (R, L)) -> (R, V) float32 logits through
    the spec's rules. Returns the new tokens (B * n, M), padded with pad_token_id, and the hypotheses that
    finished on an EOS id, (row, step, tokens)."""
    from opt_spec import generation as gen

    T, where, finished = ids.shape[1], {}, []

    def next_logprobs(rows):  # which prompt and step the reference is at, for the draw that follows
        where["row"] = next(r for r in range(len(ids)) if list(rows[0][:T]) == list(ids[r]))
        where["step"] = rows.shape[1] - T
        return gen.reference_scores(last_logits(rows), rows, np.ones_like(rows), d, T, beam=True)

    def draw(scores, n):
        return np.argsort(-(scores + noise[where["step"]][where["row"]]), kind="stable")[:n]

    want = gen.beam_search_reference(next_logprobs, np.asarray(ids), d, finished, draw=draw)
    longest = max(len(h) for row in want for h in row)
    return np.array([h + [d.pad_token_id] * (longest - len(h)) for row in want for h in row]), finished


@pytest.fixture(autouse=True, scope="session")
def private_optkit_cache(tmp_path_factory):
    """optkit's cache (random checkpoints, conversions, `optkit train`'s token ids) in a folder of this session
    unless OPTKIT_CACHE says where: the tests leave nothing in ~/.cache/optkit."""
    if "OPTKIT_CACHE" not in os.environ:
        os.environ["OPTKIT_CACHE"] = str(tmp_path_factory.mktemp("optkit-cache"))
    yield


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param, VARIANTS[request.param]


def tree_snapshot(path) -> dict[str, str] | None:
    """{relative file: sha256} under path (or {"": sha256} of a file), None when nothing is there: to prove that
    nothing was touched."""
    if not os.path.lexists(path):
        return None
    if os.path.isfile(path):
        return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    return {os.path.relpath(os.path.join(d, f), path): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(path) for f in fs}


def temp_leftovers(parent) -> list[str]:
    """The temporary siblings (opt_spec.io.atomic_path's .tmp and .tmp.old) in the folder parent."""
    return [n for n in os.listdir(parent) if n.endswith((".tmp", ".old"))]


# ---------------------------------------------------------------------------- local worker processes
# What a worker says when the port it was given is no longer free: JAX's coordinator, TensorFlow's gRPC server.
PORT_TAKEN = ("Failed to add port to server", "Could not start gRPC server", "Address already in use")


def free_ports(count: int) -> list[int]:
    """`count` different ports that are free now (held together while chosen, so that no two are the same)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Workers:
    """Worker processes that talk over localhost ports: `Workers(launch, ports=2)` starts `launch(ports)` (a
    list of Popen, output redirected to files by `spawn`), `.wait()` gives (exit code, stdout, stderr) each.

    A port free when chosen may be taken by another program before a worker binds it, seconds later after
    its imports: then all start again on new ports. When one worker fails, the others, which would wait
    for it in a collective until their own timeout, are stopped at once."""

    def __init__(self, launch, ports: int, attempts: int = 3):
        self.launch, self.ports, self.attempts = launch, ports, attempts
        self._start()

    def _start(self) -> None:
        self.procs = self.launch(free_ports(self.ports))

    @staticmethod
    def spawn(args, **kwargs) -> subprocess.Popen:
        """Popen with stdout and stderr in temporary files (a full pipe nobody reads would block a worker)."""
        files = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        proc = subprocess.Popen(args, stdout=files[0], stderr=files[1], **kwargs)
        proc.output_files = files
        return proc

    def wait(self, timeout: float = 600) -> list[tuple[int, str, str]]:
        """(exit code, stdout, stderr) of each worker; past `timeout` seconds (per start) all are killed (-9)."""
        for attempt in range(self.attempts):
            results = self._finish(timeout)
            if attempt + 1 == self.attempts or not any(code and any(s in err for s in PORT_TAKEN)
                                                       for code, _, err in results):
                return results
            self._start()

    def _finish(self, timeout: float) -> list[tuple[int, str, str]]:
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs):
            failed = any(p.poll() not in (None, 0) for p in self.procs)
            if failed or time.monotonic() > deadline:
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
        results = []
        for p in self.procs:
            output = []
            for f in p.output_files:
                f.seek(0)
                output.append(f.read().decode(errors="replace"))
                f.close()
            results.append((p.wait(), *output))
        return results
