"""The torchrun launches of tests/parallel_runs.py that tests/test_parallel.py reads, each run
once per session (`Launches.result(name)`), when a test first asks for it. (Run in the
background beside the single-process tests instead, they slowed those down up to 30-fold on a
2-core machine, OpenMP threads spinning against the launches' processes: more than the overlap
saved.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from parallel_runs import LAUNCHES, READS

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

    def result(self, name: str) -> tuple[Path, subprocess.CompletedProcess]:
        """The folder launch `name` wrote and its finished process."""
        if name not in self._results:
            self._launch(name)
        return self._results[name]

    def close(self) -> None:
        """Delete what the launches wrote."""
        shutil.rmtree(self.root, ignore_errors=True)

    def _launch(self, name: str) -> None:
        out = self.root / name
        out.mkdir(parents=True, exist_ok=True)
        read = [str(self.result(READS[name])[0])] if name in READS else []
        cmd, env = torchrun_command(LAUNCHES[name][0], str(WORKER), str(out), name, *read)
        running = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        try:
            stdout, stderr = running.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:  # the whole process group: torchrun and its ranks
            os.killpg(running.pid, signal.SIGKILL)
            stdout, stderr = running.communicate()
            stderr += f"\n(killed after {self.timeout} s)"
        self._results[name] = out, subprocess.CompletedProcess(cmd, running.returncode, stdout,
                                                               stderr)
