"""Two processes on localhost (JAX's CPU collectives over gloo) train exactly like one process
holding all the devices, given the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).parent / "distributed_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(num_processes: int, devices_per_process: int, tmp_path: Path) -> list[dict]:
    """Each worker writes to its own files, not pipes: a worker blocked on a full stderr pipe
    that nobody reads yet would stall the collectives of the one being waited for. Workers
    compile without the tests' persistent cache: only process 0 writes it, so with a warm
    cache process 0 would start its collectives while process 1 still compiles (a run under
    load hung there for 600 s); cold, both compile alike, as on a fresh CI machine."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    logs = [(tmp_path / f"{num_processes}_{i}.out", tmp_path / f"{num_processes}_{i}.err")
            for i in range(num_processes)]
    procs = []
    for i, (out, err) in enumerate(logs):
        with open(out, "w") as stdout, open(err, "w") as stderr:
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(i), str(num_processes), str(port),
                 str(devices_per_process)], stdout=stdout, stderr=stderr, text=True, env=env))
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            p.kill()  # a no-op for those that exited; never leave a stuck worker behind
    outs = []
    for p, (out, err) in zip(procs, logs):
        assert p.returncode == 0, err.read_text()[-3000:]
        outs.append(json.loads(out.read_text().strip().splitlines()[-1]))
    return outs


def test_two_processes_match_one(tmp_path):
    single = _run(1, 4, tmp_path)
    double = _run(2, 2, tmp_path)
    assert single[0]["devices"] == 4 and all(o["devices"] == 4 for o in double)
    assert double[0]["losses"] == double[1]["losses"]
    np.testing.assert_allclose(double[0]["losses"], single[0]["losses"], rtol=1e-6)
    assert single[0]["losses"][-1] < single[0]["losses"][0]
