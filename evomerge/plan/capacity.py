"""How much memory a worker has: its device's and its host's, queried, or given by the user.

Host memory is what the kernel reports available (``MemAvailable``: free plus reclaimable page
cache), not the total, because other processes share it. A CUDA device's free memory is read with
``nvidia-smi`` when it exists — asking torch would create a CUDA context in the process that plans,
which on a driver node takes memory from a GPU a worker is about to use — and from torch otherwise.
A device that is not on this machine (planning a cluster from a laptop) is unknown unless
``--device-memory`` gives it; each worker then checks its own at start-up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Capacity:
    """Bytes available on the worker's device and its host; None when unknown here."""

    device: int | None
    host: int | None
    device_from: str
    host_from: str


def host_available() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory, else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_available(device: str) -> int | None:
    """Free memory of ``device`` (CUDA), None if it is not on this machine or not a CUDA device."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    index = dev.index or 0
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits", f"--id={_physical(index)}"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout.strip()
            return int(float(out.splitlines()[0])) * 1024 * 1024
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    free, _ = torch.cuda.mem_get_info(index)
    return int(free)


def _physical(index: int) -> str:
    """The nvidia-smi id of torch's device ``index`` (``CUDA_VISIBLE_DEVICES`` renumbers them)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


def query_capacity(device: str, *, device_memory: int | None = None, host_memory: int | None = None) -> Capacity:
    """The worker's capacity on this machine; ``device_memory``/``host_memory`` override the queries."""
    on_cpu = torch.device(device).type == "cpu"
    host = host_memory if host_memory is not None else host_available()
    host_from = "--host-memory" if host_memory is not None else ("queried" if host is not None else "unknown")
    if on_cpu:
        return Capacity(None, host, "host", host_from)
    if device_memory is not None:
        return Capacity(device_memory, host, "--device-memory", host_from)
    found = device_available(device)
    return Capacity(found, host, "queried" if found is not None else "unknown", host_from)
