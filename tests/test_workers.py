"""tests/conftest.py's Workers, which the multi-process tests (test_flax_distributed, test_tf_distributed) start
their local workers with: a port taken between its choice and the worker's bind starts them again on new ports;
a worker that fails stops its siblings at once instead of leaving them waiting in a collective."""

import sys

from .conftest import Workers, free_ports

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]  # a worker waiting for a sibling that is gone


def test_a_taken_port_starts_every_worker_again_on_new_ports():
    calls = []

    def launch(ports):
        calls.append(ports)
        if len(calls) == 1:
            return [Workers.spawn([sys.executable, "-c", "import sys; sys.exit('bind: Address already in use')"]),
                    Workers.spawn(SLEEPER)]
        return [Workers.spawn([sys.executable, "-c", f"print({p})"]) for p in ports]

    results = Workers(launch, ports=2).wait(timeout=600)
    assert len(calls) == 2 and all(len(set(ports)) == 2 for ports in calls)
    assert results == [(0, f"{p}\n", "") for p in calls[1]]


def test_a_failed_worker_stops_the_others_and_is_not_started_again():
    calls = []

    def launch(ports):
        calls.append(ports)
        return [Workers.spawn([sys.executable, "-c", "import sys; sys.exit('boom')"]), Workers.spawn(SLEEPER)]

    assert Workers(launch, ports=1).wait(timeout=600) == [(1, "", "boom\n"), (-9, "", "")] and len(calls) == 1
    assert len(set(free_ports(8))) == 8
