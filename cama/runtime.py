"""Where the core runs and how it writes files: the one device resolver and the one atomic write.

Training, the API and the worker all resolve ``cpu`` / ``cuda`` / ``auto`` with
:func:`resolve_device` (and ask :func:`bf16_native` before running bfloat16), and every file that
a reader may open while it is being replaced (checkpoints, manifests, ACTIVE, metrics, serving
data, job batches) is written with :func:`atomic_write`: a temporary file in the same directory,
fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch


class DeviceError(RuntimeError):
    """A device was asked for that this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (CUDA when present) as a torch device.

    Call it where the work runs (in a worker, after any fork), never at import time.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name}: CUDA is not available on this machine")
    return device


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA device that supports it, or a CPU
    with AVX512-BF16 or AMX. Elsewhere bfloat16 autocast is emulated and several times slower than
    float32, so the core runs float32 there whatever a recipe asks."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    content: bytes | str | Callable[[BinaryIO], object],
    *,
    mode: int = 0o644,
) -> Path:
    """Replace ``path`` with ``content`` so that a reader sees the old file or the new one, never
    a part: bytes, text (UTF-8), or a function that writes into the open binary file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(content, str):
                fh.write(content.encode())
            elif isinstance(content, bytes):
                fh.write(content)
            else:
                content(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target
