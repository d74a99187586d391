"""Provenance: what made a zoo (package versions, git revision, hardware, command, times)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PACKAGES = ("vitzoo", "torch", "torchvision", "timm", "transformers", "datasets", "accelerate", "peft",
            "safetensors", "huggingface_hub", "numpy", "pandas", "pyarrow")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> dict[str, Any] | None:
    """The git commit of the vitzoo source that ran (None outside a checkout), and whether it was dirty."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10).stdout.strip() != ""
        return {"commit": rev, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return None


def hardware(num_processes: int = 1) -> dict[str, Any]:
    import torch

    hw: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                          "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "num_processes": num_processes, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hw


def provenance(num_processes: int = 1) -> dict[str, Any]:
    return {"packages": package_versions(), "git": git_revision(), "hardware": hardware(num_processes),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
