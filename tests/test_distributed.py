"""Two processes on localhost (JAX's CPU collectives over gloo) train exactly like one process
holding all the devices, given the same global batch."""

import json
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


def _run(num_processes: int, devices_per_process: int) -> list[dict]:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(num_processes), str(port),
                               str(devices_per_process)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(num_processes)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


def test_two_processes_match_one():
    single = _run(1, 4)
    double = _run(2, 2)
    assert single[0]["devices"] == 4 and all(o["devices"] == 4 for o in double)
    assert double[0]["losses"] == double[1]["losses"]
    np.testing.assert_allclose(double[0]["losses"], single[0]["losses"], rtol=1e-6)
    assert single[0]["losses"][-1] < single[0]["losses"][0]
