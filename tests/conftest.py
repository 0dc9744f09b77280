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
* ``hf_cache`` (function): a Hugging Face cache in a temporary ``HF_HOME``, laid out as
  huggingface_hub writes it; ``hf_cache.publish("org/name", folder, revisions=("main",)) -> commit``
  adds a snapshot of ``folder``'s files (blobs, snapshot symlinks, refs) without any network.
"""

from __future__ import annotations

import hashlib
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


class FakeHubCache:
    """A hub cache folder: ``models--org--name/{blobs,refs,snapshots/<commit>}`` as huggingface_hub lays it out."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.hub = home / "hub"

    def repo(self, repo_id: str) -> Path:
        return self.hub / ("models--" + repo_id.replace("/", "--"))

    def publish(
        self, repo_id: str, folder: Path, *, revisions: tuple[str, ...] = ("main",), skip: tuple[str, ...] = ()
    ) -> str:
        """Add ``folder``'s files (but ``skip``) as a new commit of ``repo_id``; ``revisions`` point at it."""
        files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name not in skip)
        digest = hashlib.sha1(repo_id.encode())
        for file in files:
            digest.update(file.name.encode() + file.read_bytes())
        commit = digest.hexdigest()
        repo = self.repo(repo_id)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo / "blobs").mkdir(exist_ok=True)
        for file in files:
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
        for revision in revisions:
            ref = repo / "refs" / revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(commit)
        return commit


@pytest.fixture
def hf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> FakeHubCache:
    """An empty Hugging Face cache under a temporary HF_HOME (offline, as every test)."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    return FakeHubCache(home)
