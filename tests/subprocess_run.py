"""Run `slimtune` in a real child process, optionally with a hook that acts at a chosen moment.

Used by the disk-full and signal tests: the failures they provoke are real (the kernel refuses a write
past RLIMIT_FSIZE with EFBIG; the process sends itself a real SIGTERM), only the *moment* is chosen by
wrapping one slimtune function so that it acts right before or after the wrapped call.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

# Runs in the child before `slimtune.cli.main`. HOOK = (module, function, when, action, argument).
_PRELUDE = r'''
import importlib, os, resource, signal, sys, json
hook = json.loads(os.environ.get("SLIMTUNE_TEST_HOOK", "null"))
if hook:
    module_name, function_name, when, action, argument = hook
    module = importlib.import_module(module_name)
    original = getattr(module, function_name)
    calls = []

    def act():
        if action == "limit":  # from now on no file may grow past `argument` bytes
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as on a full disk
            resource.setrlimit(resource.RLIMIT_FSIZE, (argument, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        elif action == "limit-to-size-of":  # no file may grow past the size `argument` has now
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            size = os.path.getsize(argument)
            resource.setrlimit(resource.RLIMIT_FSIZE, (size + 8, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        else:  # a real signal to this process
            os.kill(os.getpid(), getattr(signal, action))

    def wrapped(*args, **kwargs):
        calls.append(1)
        nth = len(calls)
        if when == "before" or (when.startswith("before#") and nth == int(when[7:])):
            act()
        result = original(*args, **kwargs)
        if when == "after" or (when.startswith("after#") and nth == int(when[6:])):
            act()
        return result

    setattr(module, function_name, wrapped)
from slimtune.cli import main
sys.argv = ["slimtune", *sys.argv[1:]]
main()
'''


def run_slimtune(*args, hook: tuple | None = None, file_limit: int | None = None, cwd: Path | None = None,
                 stdin: bytes | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`slimtune ARGS` in a child process; `hook` as in _PRELUDE; `file_limit`: RLIMIT_FSIZE from the start."""
    env = {**os.environ, "SLIMTUNE_TEST_HOOK": json.dumps(hook), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}

    def limit_files() -> None:
        if file_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited across exec: writes fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run([sys.executable, "-c", _PRELUDE, *map(str, args)], env=env, cwd=cwd, input=stdin,
                          capture_output=True, timeout=timeout, preexec_fn=limit_files)
