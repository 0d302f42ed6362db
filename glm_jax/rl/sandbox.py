"""Running untrusted model-written Python against tests, in a subprocess with limits.

No library in our stack does this (verl and slime shell out to a sandbox service), so it is
written here: a fresh interpreter (`-I`: no user site, no PYTHON* variables) in a new session,
an environment holding only PATH (no inherited secrets), a temporary working directory deleted
afterwards, `resource.setrlimit` on address space, CPU seconds, file size and process count, and
a wall-clock timeout that kills the whole process group. It bounds accidents (infinite loops,
memory hogs, fork bombs, runaway output); it is not a security boundary against a hostile
program, which needs a container or a VM.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Runs the solution, then each test in its own try block; prints one JSON line of results.
_HARNESS = r"""
import json, sys
nonce = sys.argv.pop(1)  # out of the solution's sight in argv
tests = json.load(open("tests.json"))
namespace = {"__name__": "__main__"}
results = []
try:
    exec(compile(open("solution.py").read(), "solution.py", "exec"), namespace)
    ok = True
except BaseException as e:
    ok = False
    results = [False] * len(tests)
if ok:
    for test in tests:
        try:
            exec(compile(test, "test", "exec"), dict(namespace))
            results.append(True)
        except BaseException:
            results.append(False)
sys.stdout.write("\n@@" + nonce + "@@" + json.dumps(results) + "\n")
"""


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 5.0
    cpu_seconds: int = 5
    memory_bytes: int = 512 * 1024 ** 2
    file_bytes: int = 16 * 1024 ** 2
    processes: int = 64
    output_bytes: int = 1024 ** 2  # tail of stdout searched for the results line


def _set_limits(limits: Limits):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_tests(code: str, tests: list[str], limits: Limits = Limits()) -> list[bool]:
    """-> whether each test passed against `code`. A timeout, a crash, a limit hit or
    unreadable output count every test not reported as failed."""
    workdir = tempfile.mkdtemp(prefix="glm_jax_sandbox_")
    nonce = secrets.token_hex(8)  # marks the harness's results line
    try:
        with open(os.path.join(workdir, "solution.py"), "w") as f:
            f.write(code)
        with open(os.path.join(workdir, "tests.json"), "w") as f:
            json.dump(list(tests), f)
        out_path = os.path.join(workdir, "stdout")
        with open(out_path, "wb") as out:  # a file, so RLIMIT_FSIZE bounds runaway output
            process = subprocess.Popen(
                [sys.executable, "-I", "-c", _HARNESS, nonce], cwd=workdir,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_set_limits(limits))
            try:
                process.wait(timeout=limits.wall_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(process.pid, signal.SIGKILL)  # on timeout, and stray children
                except ProcessLookupError:
                    pass
                process.wait()
        if timed_out:
            return [False] * len(tests)
        with open(out_path, "rb") as f:
            f.seek(max(0, os.path.getsize(out_path) - limits.output_bytes))
            tail = f.read()
        tag = f"\n@@{nonce}@@".encode()
        marker = tail.rfind(tag)
        if marker < 0:
            return [False] * len(tests)
        line = tail[marker + len(tag):].split(b"\n")[0]
        try:
            results = json.loads(line)
        except ValueError:
            return [False] * len(tests)
        if not isinstance(results, list) or len(results) != len(tests):
            return [False] * len(tests)
        return [r is True for r in results]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
