"""Model fingerprints: what a model folder holds, so a run notices when a source model changes.

A path says where a model is, not what it is: an expert rebuilt in place between a crash and
``resume`` would silently mix the scores of two different models into one run. A fingerprint
identifies a folder's content, cheaply enough to take at every run start, resume and ``evaluate``
with 7B-parameter sources:

* every file that configures the model — config, generation config, tokenizer, shard index, custom
  code (the top-level ``*.json``, ``*.model``, ``*.txt``, ``*.tiktoken``, ``*.jinja`` and ``*.py``
  files) — is hashed whole;
* every ``*.safetensors`` file contributes its size, its whole header (tensor names, dtypes,
  shapes, offsets, metadata) and ``SAMPLES_PER_TENSOR`` windows of ``SAMPLE_BYTES`` at evenly
  spaced offsets of *every* tensor's bytes (a tensor smaller than that is hashed whole).

Retraining or re-merging a model changes (almost) every tensor, so some sampled window changes;
editing a few individual weights in place can go unnoticed, which is the price of not reading
14 GB per 7B model at each start (costs measured by ``benchmarks/fingerprint.py``). README
files, training logs and other folders do not count. A model fetched from a hub can add the
resolved ``revision`` (a commit id), which then is part of its digest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import ModelError
from evomerge.io.safetensors_reader import read_safetensors_header
from evomerge.pool.sources import ResolvedSource, resolve_source

SAMPLES_PER_TENSOR = 4
SAMPLE_BYTES = 4096
CONFIG_SUFFIXES = (".json", ".model", ".txt", ".tiktoken", ".jinja", ".py")
WEIGHT_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class ModelFingerprint:
    """A model folder's identity: one ``digest``, and the digest of each file that went into it."""

    digest: str
    files: Mapping[str, str] = field(default_factory=dict)
    revision: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "files": dict(self.files), "revision": self.revision}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelFingerprint:
        return cls(str(data["digest"]), dict(data.get("files", {})), data.get("revision"))

    def difference(self, other: ModelFingerprint) -> str:
        """What changed from ``self`` to ``other``, in a few words ('' if nothing did)."""
        if self.digest == other.digest:
            return ""
        if self.revision != other.revision:
            return f"revision {self.revision} is now {other.revision}"
        changed = sorted(name for name in set(self.files) | set(other.files) if self.files.get(name) != other.files.get(name))
        return f"{', '.join(changed)} differ" if changed else "its content differs"


def fingerprint_model(folder: str | Path, *, revision: str | None = None) -> ModelFingerprint:
    """The fingerprint of the model folder ``folder`` (see the module docstring for what it covers).

    ``revision``: the resolved hub revision the folder was downloaded at, if any.
    """
    folder = Path(folder)
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as err:
        raise ModelError(f"{folder}: cannot list the model folder ({err.strerror or err})") from None
    files: dict[str, str] = {}
    for path in entries:
        if path.suffix == WEIGHT_SUFFIX:
            files[path.name] = _weights_digest(path)
        elif path.suffix in CONFIG_SUFFIXES:
            files[path.name] = _file_digest(path)
    whole = hashlib.blake2b(digest_size=16)
    whole.update(f"revision={revision}\n".encode())
    for name, digest in files.items():
        whole.update(f"{name}={digest}\n".encode())
    return ModelFingerprint(whole.hexdigest(), files, revision)


def fingerprint_source(source: ResolvedSource) -> ModelFingerprint:
    """The fingerprint of a resolved source: its folder at its hub commit, and its LoRA adapter's."""
    model = fingerprint_model(source.model.path, revision=source.model.commit)
    if source.adapter is None:
        return model
    adapter = fingerprint_model(source.adapter.path, revision=source.adapter.commit)
    whole = hashlib.blake2b(f"{model.digest}+{adapter.digest}".encode(), digest_size=16).hexdigest()
    files = {**model.files, **{f"adapter/{name}": digest for name, digest in adapter.files.items()}}
    revision = None if model.revision is None and adapter.revision is None else f"{model.revision}+{adapter.revision}"
    return ModelFingerprint(whole, files, revision)


def fingerprint_models(models: Mapping[str, str | Path]) -> dict[str, ModelFingerprint]:
    """Fingerprints of a run's models (name → pinned reference: folder, ``org/name@commit``,
    ``model+adapter``), in the same order; hub models are read from the local cache only."""
    return {
        name: fingerprint_source(resolve_source(str(ref), where=f"models.{name}", download=False))
        for name, ref in models.items()
    }


def check_unchanged(
    recorded: Mapping[str, Mapping[str, Any]] | None,
    current: Mapping[str, ModelFingerprint],
    models: Mapping[str, str],
    where: str,
) -> None:
    """Raise a one-line ``ModelError`` naming the first model (of ``models``, name → folder) whose
    ``current`` fingerprint differs from the JSON form ``recorded`` when the run started."""
    if recorded is None:
        raise ModelError(f"{where}: the run recorded no model fingerprints (an older evomerge started it), so its models cannot be checked")
    for name, fingerprint in current.items():
        if name not in recorded:
            raise ModelError(f"{where}: model '{name}' was not part of the run when it started")
        change = ModelFingerprint.from_json(recorded[name]).difference(fingerprint)
        if change:
            raise ModelError(
                f"{where}: model '{name}' ({models[name]}) changed since the run started ({change}); "
                "restore it, or start a new run"
            )


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError as err:
        raise ModelError(f"{path}: cannot read ({err.strerror or err})") from None
    return digest.hexdigest()


def _weights_digest(path: Path) -> str:
    """Size, header and sampled windows of every tensor of one safetensors file."""
    entries = read_safetensors_header(path)
    digest = hashlib.blake2b(digest_size=16)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise ModelError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        size = os.fstat(fd).st_size
        header_len = int.from_bytes(os.pread(fd, 8, 0), "little")
        digest.update(size.to_bytes(8, "little"))
        digest.update(os.pread(fd, header_len, 8))
        base = 8 + header_len
        for entry in sorted(entries.values(), key=lambda e: e.start):
            length = entry.end - entry.start
            if length <= SAMPLES_PER_TENSOR * SAMPLE_BYTES:
                digest.update(os.pread(fd, length, base + entry.start))
                continue
            step = (length - SAMPLE_BYTES) // (SAMPLES_PER_TENSOR - 1)
            for k in range(SAMPLES_PER_TENSOR):
                digest.update(os.pread(fd, SAMPLE_BYTES, base + entry.start + k * step))
    except OSError as err:
        raise ModelError(f"{path}: cannot read ({err.strerror or err})") from None
    finally:
        os.close(fd)
    return digest.hexdigest()
