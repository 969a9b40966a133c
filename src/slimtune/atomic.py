"""Directories that appear whole or not at all.

`staged_directory(target)` yields a temporary directory beside `target`; when the block succeeds it
replaces `target` with it by a rename (atomic on one filesystem), and when it fails it is removed.
A crash in between leaves only a `.tmp-` sibling that readers ignore and the next writer clears.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


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
