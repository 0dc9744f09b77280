"""Portable zoo builds: train in a child process whose float kernels are the same on every x86-64 CPU.

Two libraries choose their float code path by the CPU they run on: ATen picks a vectorized kernel
tier (``default``/``avx2``/``avx512``) at its first operation, and MKL picks an SGEMM branch. The
tiers round differently in the last bit; over thousands of training steps those bits grow into
different experts (and different merge landscapes). Both choices are read from the environment once
per process, before any tensor operation — too early to change from inside a process that has
already used torch — so a portable build runs ``python -m evomerge.zoo.portable`` with the pins
below and reads the finished ``zoo.json`` back. With one thread (the spec's ``threads``) the order
of every reduction is fixed too, so the weights are bit-identical across kernel tiers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.zoo.index import ZooIndex
from evomerge.zoo.spec import ZooSpec

PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AVX2"}
"""ATen's plain C++ kernels (on every CPU) and MKL's AVX2 branch (on every x86-64 CPU since 2013)."""


class ZooBuildError(EvomergeError):
    """The child process of a portable zoo build failed."""


def build_in_child(spec: ZooSpec, key: str, out: Path, index_file: str) -> ZooIndex:
    """Run the build of ``spec`` into ``out`` in a pinned child process; return its index."""
    env = {**os.environ, **PORTABLE_ENV}
    payload = json.dumps({"spec": spec.model_dump(mode="json"), "key": key, "out": str(out)})
    done = subprocess.run([sys.executable, "-m", "evomerge.zoo.portable"], input=payload, text=True, env=env)
    if done.returncode != 0:
        raise ZooBuildError(f"{out}: zoo build process failed (exit code {done.returncode}); see its output above")
    return ZooIndex.load(out / index_file)


def _main() -> None:
    import torch

    from evomerge.zoo.build import build_here
    from evomerge.zoo.spec import parse_spec

    job = json.loads(sys.stdin.read())
    spec = parse_spec(job["spec"])
    torch.set_num_threads(spec.threads)
    build_here(spec, job["key"], Path(job["out"]))


if __name__ == "__main__":
    _main()
