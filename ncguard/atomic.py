"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The bytes go to a temporary file in the destination folder (same filesystem, so the final
os.replace is atomic), are flushed to disk, made world-readable (mkstemp creates files
owner-only, but models and reports are meant to be read by services running as other users),
then renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], None], mode: int = 0o644) -> Path:
    """Write `content` (bytes, text as UTF-8, or a function that writes to a binary handle) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode("utf-8") if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
