"""`slimtune train --nproc N CONFIG`: start N training processes on this machine with torchrun.

The command is torchrun's own (`python -m torch.distributed.run --standalone --nproc_per_node N -m
slimtune train ...`); nothing here talks to the processes beyond signals. Each process gets an equal
share of the CPU cores (OMP_NUM_THREADS) unless the variable is set.

Stopping: torchrun runs in its own session, so Ctrl-C at the terminal reaches only this launcher, which
passes SIGTERM (or SIGINT) straight to the training processes. They agree to stop after the same step,
process 0 saves one checkpoint, all exit 0, and torchrun, seeing them succeed, exits 0 too. (A signal
sent to torchrun itself also reaches the processes, but torchrun then reports the run as failed.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "slimtune", "train", *args]


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc); torchrun's are the training processes."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def launch(nproc: int, args: list[str]) -> int:
    """Run torchrun with `nproc` processes on `args` (CONFIG and overrides); returns its exit status."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    process = subprocess.Popen(torchrun_command(nproc, args), env=env, start_new_session=True)

    def forward(signum, _frame) -> None:
        for child in child_pids(process.pid):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
