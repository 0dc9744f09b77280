"""Shared pytest fixtures: offline mode and pico model folders.

Any test may use:

* ``pico_family`` (session): ``{"base": Path, "expert_1": Path, "expert_2": Path}``, an untied
  2-layer Llama pico base and two experts perturbed from it (``build_pico_family(arch="llama")``).
  Shared by the whole session: treat the folders as read-only.
* ``make_pico`` (session): ``make_pico(**build_pico_kwargs) -> Path`` builds a fresh pico in a new
  temporary folder each call (e.g. ``make_pico(arch="gpt2", sharded=True, seed=3)``); a test may
  modify or break the folder it gets.
* ``make_pico_family`` (session): ``make_pico_family(arch, n_experts, **kw) -> dict[str, Path]``,
  a fresh family in a new temporary folder.
* ``pico_builder`` (session): ``build_pico`` itself, for tests that choose the folder:
  ``pico_builder(out_dir, arch="llama", seed=1, perturb_from=base) -> Path``.
"""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from evomerge.zoo.pico import build_pico, build_pico_family  # noqa: E402


@pytest.fixture(scope="session")
def make_pico(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``make_pico(**kw)`` -> a new pico folder built by ``build_pico(folder, **kw)``."""

    def make(**kw: Any) -> Path:
        return build_pico(tmp_path_factory.mktemp("pico") / "model", **kw)

    return make


@pytest.fixture(scope="session")
def make_pico_family(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Path]]:
    """Factory: ``make_pico_family(arch="llama", n_experts=2, **kw)`` -> a new base + experts."""

    def make(arch: str = "llama", n_experts: int = 2, **kw: Any) -> dict[str, Path]:
        return build_pico_family(tmp_path_factory.mktemp("family"), arch, n_experts, **kw)

    return make


@pytest.fixture(scope="session")
def pico_family(make_pico_family: Callable[..., dict[str, Path]]) -> dict[str, Path]:
    """An untied Llama pico base and two experts: ``{"base", "expert_1", "expert_2"}`` -> folder."""
    return make_pico_family("llama", 2)


@pytest.fixture(scope="session")
def pico_builder() -> Callable[..., Path]:
    """``build_pico(out_dir, **kw) -> Path`` for tests that pick the output folder themselves."""
    return build_pico
