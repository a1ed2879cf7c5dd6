"""Atomic file writes: write to a temporary file in the target folder, then rename.

A reader (or a run killed mid-write) never sees a partial file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result to ``path`` only if it succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_torch_save(obj, path) -> Path:
    import torch
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
