"""Whether this machine has the torch device a config or an option names.

Configs name devices by text and are validated anywhere (a Ray experiment is loaded on a laptop and
run on GPU nodes), so the spelling is checked when a config is read and the hardware only where the
device is about to be used: a worker starting, a merge about to be written.
"""

from __future__ import annotations

import platform

import torch

from evomerge.errors import ConfigError


def usable_device(device: str, where: str) -> torch.device:
    """``torch.device(device)`` when this machine can compute on it; else a one-line ``ConfigError``."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{where}: expected a torch device such as cpu, cuda or cuda:1, got {device!r}") from None
    here = platform.node() or "this machine"
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{where}: '{device}' needs a CUDA GPU, and {here} has none that torch can use")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"{where}: '{device}' does not exist: {here} has {count} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{where}: '{device}' needs Apple's MPS backend, which {here} lacks")
    elif parsed.type == "meta":
        raise ConfigError(f"{where}: 'meta' tensors hold no data; use cpu, cuda or mps")
    return parsed
