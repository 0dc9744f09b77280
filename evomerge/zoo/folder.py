"""The zoo folder: when it is ready, and which folders a zoo build may write into.

A build rebuilds in place only a folder that is recognisably a zoo — it holds ``zoo.json``, or the
marker an interrupted build leaves behind — or one that is empty or absent. Anything else (a
mistyped ``--out``, ``$EVOMERGE_ZOO`` or ``zoo.dir`` pointing at the user's own files) is a
one-line refusal naming the folder, before anything is written. In a zoo, a build replaces only
what it writes: ``zoo.json``, ``zoo.yaml``, ``fitness/`` and one folder per model of its spec.
Nothing heavy is imported here, so ``evomerge space`` can tell whether a zoo is ready instantly.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import ConfigError
from evomerge.zoo.index import ZooIndex

INDEX_FILE = "zoo.json"
SPEC_FILE = "zoo.yaml"
BUILD_MARKER = ".zoo-build"
"""Written before a build writes anything and removed after ``zoo.json``: an interrupted build's
folder is still recognised as a zoo, and never mistaken for a finished one."""


def is_zoo(out: Path) -> bool:
    """Whether ``out`` is a zoo folder (finished, or an interrupted build)."""
    return (out / INDEX_FILE).is_file() or (out / BUILD_MARKER).is_file()


def check_buildable(out: Path) -> None:
    """Raise a one-line ``ConfigError`` unless a zoo build may write into ``out``."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out}: zoo folder exists and is not a folder")
    if not is_zoo(out) and any(out.iterdir()):
        raise ConfigError(
            f"{out}: not a zoo folder (no {INDEX_FILE}) and not empty; a zoo is built only into a new, empty "
            "or zoo folder, so nothing was written: choose another folder (--out, $EVOMERGE_ZOO or zoo.dir)"
        )


def cached_index(out: Path, key: str) -> ZooIndex | None:
    """The index of the zoo in ``out`` if it was built from the spec with hash ``key`` and is complete."""
    path = out / INDEX_FILE
    if not path.is_file() or (out / BUILD_MARKER).exists():
        return None
    try:
        index = ZooIndex.load(path)
    except ConfigError:
        return None
    if index.spec_hash != key:
        return None
    if not all((out / m.folder / "model.safetensors").is_file() for m in index.models):
        return None
    return index
