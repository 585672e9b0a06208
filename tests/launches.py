"""The torchrun launches of tests/parallel_runs.py that tests/test_parallel.py reads.

tests/conftest.py starts them in a background thread as soon as pytest has collected a test of
test_parallel.py, so they run (one after the other) while the single-process test files before
it use what is left of the CPU: most of those run one Python thread, and the launches' ranks
wait on gloo now and then, so the two fill each other's idle time. A test reads a launch with
`Launches.result(name)`, which waits for it (or, when nothing started it, runs it there)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from parallel_runs import LAUNCHES

WORKER = Path(__file__).with_name("parallel_runs.py")


def torchrun_command(nproc: int, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `torchrun --nproc_per_node nproc args...` on CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), *args]
    return cmd, env


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd, env = torchrun_command(nproc, *args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


class Launches:
    """Each launch of LAUNCHES once, into its own folder under a temporary root."""

    def __init__(self, timeout: int = 400):
        self.root = Path(tempfile.mkdtemp(prefix="vitscale-launches-"))
        self.timeout = timeout
        self._results: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}
        self._thread: threading.Thread | None = None
        self._running: subprocess.Popen | None = None
        self._closed = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Run every launch in a background thread, one after the other."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_all, daemon=True)
            self._thread.start()

    def result(self, name: str) -> tuple[Path, subprocess.CompletedProcess]:
        """The folder launch `name` wrote and its finished process."""
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if name not in self._results:
                self._launch(name)
            return self._results[name]

    def close(self) -> None:
        """Stop a launch still running (an interrupted session), and delete what they wrote."""
        self._closed = True
        proc = self._running
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if self._thread is not None:
            self._thread.join(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)

    def _run_all(self) -> None:
        for name in LAUNCHES:
            with self._lock:
                if self._closed:
                    return
                if name not in self._results:
                    self._launch(name)

    def _launch(self, name: str) -> None:
        out = self.root / name
        out.mkdir(parents=True, exist_ok=True)
        cmd, env = torchrun_command(LAUNCHES[name][0], str(WORKER), str(out), name)
        self._running = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = self._running.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self._running.pid, signal.SIGKILL)
            stdout, stderr = self._running.communicate()
            stderr += f"\n(killed after {self.timeout} s)"
        done = subprocess.CompletedProcess(cmd, self._running.returncode, stdout, stderr)
        self._results[name] = out, done
        self._running = None
