"""Atomic file writes and hashing: a zoo never holds a half-written file.

Every file is written to a temporary name in its own folder, flushed to disk and renamed over
the target: a reader (or a run killed with SIGKILL) sees either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch

FORMAT_VERSION = 2
"""The zoo format written (zoo.json ``format_version``, config.json ``vitzoo.format_version``, index.parquet).

1: list-valued index columns are JSON strings. 2: they are native parquet lists and index.parquet's
key-value metadata records the format (vitzoo.zoo.index); everything else is as in 1, and format-1
zoos still read (``vitzoo.zoo.index.read_index``)."""
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[str], None], durable: bool = True) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path``.

    The rename makes the write atomic for readers and against a killed process. ``durable`` also
    fsyncs the data first (survives a power loss); training scratch files skip that: ~1 ms each adds
    up to minutes over 1,000 models x 51 epochs, and a run with unreadable scratch simply restarts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600 files, and some writers (safetensors) re-create the file: zoo files are shared.
        os.chmod(tmp, 0o666 & ~_UMASK)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def discard_temp_files(folder: str | Path) -> None:
    """Remove the temporary files of atomic writes that a killed process never finished."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, durable: bool = True) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), durable)


def write_json(path: str | Path, obj: Any, durable: bool = True) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", durable)


def save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None,
                     durable: bool = True) -> Path:
    """Save tensors (made contiguous, shared storage broken) atomically as safetensors."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata), durable)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
