"""Files and directories that appear whole or not at all, and write failures as one clear line.

`staged_directory(target)` yields a temporary directory beside `target`; when the block succeeds it
replaces `target` with it by a rename (atomic on one filesystem), and when it fails it is removed.
A crash in between leaves only a `.tmp-` sibling that readers ignore and the next writer clears.

`reported_write_failures(what, then)` turns any failure to write (an `OSError` such as ENOSPC or EFBIG,
or safetensors' own `SafetensorError`, which is not an `OSError`) into an `OutputWriteError`: one line
naming what could not be written, the system's reason, the fix and how to continue.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from slimtune.errors import OutputWriteError

# Every exception type a file write is known to raise: the OS's, and safetensors' Rust-side error.
WRITE_ERRORS = (OSError, SafetensorError)


def write_failure_reason(exc: BaseException) -> str:
    """The system's reason for a failed write in a few words ('No space left on device').

    safetensors words an I/O failure as `... IoError(Os { code: 28, kind: StorageFull, message: "No
    space left on device" })`; the quoted message is the part a user needs."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    quoted = re.search(r'message: "([^"]+)"', str(exc))
    return quoted.group(1) if quoted else (str(exc).splitlines() or [type(exc).__name__])[0]


@contextmanager
def reported_write_failures(what: str, then: str) -> Iterator[None]:
    """Inside the block, a failed write becomes `OutputWriteError("could not write {what} (reason); free
    disk space or fix permissions, then {then}")`."""
    try:
        yield
    except WRITE_ERRORS as exc:
        raise OutputWriteError(f"could not write {what} ({write_failure_reason(exc)}); free disk space or fix "
                               f"permissions, then {then}") from None


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Write into the yielded directory; on success it becomes `target` (replacing an old one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_safetensors_atomically(tensors: dict[str, torch.Tensor], path: Path,
                                metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file under a temporary name and rename it into place: a reader never sees a
    half-written file, and its presence can mark a finished run."""
    from safetensors.torch import save_file

    partial = path.with_name(f".{path.name}.partial")
    try:
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
