"""Model references as users write them, resolved to weights on disk: one resolver for every part.

A reference is

- a local folder (absolute, or relative to the file that names it);
- ``zoo:<model>``, a model of the trained zoo (experiments);
- a Hugging Face id ``org/name`` or ``org/name@revision`` (a branch, tag or commit), fetched into
  the local Hugging Face cache (safetensors, config and tokenizer files only; from the cache alone
  when ``HF_HUB_OFFLINE=1``);
- ``<model>+<adapter>`` (mergekit's syntax), a LoRA adapter (folder or hub id) on a model, also
  written as the mapping ``{model: <model>, lora: <adapter>}``.

A relative name that exists as a folder is that folder; otherwise a name shaped ``org/name`` is a
hub id. ``resolve_source`` returns a ``ResolvedSource``: the local folders, and for hub ids the
revision asked for and the commit it resolved to. Its ``ref`` is the *pinned* reference (absolute
folders, ``org/name@<commit>``) that experiments, recipes and runs store, so resolving it again —
on resume, on export, on another worker — reads exactly the same weights, from the cache.

Example::

    source = resolve_source("Qwen/Qwen2.5-0.5B@main+./adapters/math", roots=[Path("experiments")])
    source.ref          # 'Qwen/Qwen2.5-0.5B@<40-hex commit>+/abs/experiments/adapters/math'
    source.model.path   # the snapshot folder in the hub cache
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from evomerge.errors import ConfigError, ModelError
from evomerge.pool import hub
from evomerge.validation import path_text

ZOO_PREFIX = "zoo:"
ADAPTER_SEPARATOR = "+"
HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]*))?$"
)
_EXPLICIT_PATH = ("/", "./", "../", "~", ".\\", "..\\")

ZooLookup = Callable[[str], Path]
"""``zoo:<model>`` → that model's folder (experiments build and index the zoo)."""


class SourceSpec(BaseModel):
    """The mapping form of a reference: a model and, optionally, a LoRA adapter applied to it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="folder, zoo:<model> or hub id[@revision]")
    lora: str | None = Field(default=None, min_length=1, description="LoRA adapter folder or hub id[@revision]")

    @property
    def text(self) -> str:
        """The same reference in mergekit's string form."""
        return self.model if self.lora is None else f"{self.model}{ADAPTER_SEPARATOR}{self.lora}"


def reference_text(value: Any) -> Any:
    """A reference as a string: a ``{model, lora}`` mapping becomes ``model+lora`` (pydantic ``before`` hook)."""
    if isinstance(value, str):
        return path_text(value)
    if not isinstance(value, Mapping):
        raise ValueError(
            f"expected a model reference (folder, zoo:<model>, org/name[@revision], model+adapter) "
            f"or {{model: ..., lora: ...}}, got {value!r}"
        )
    fields = list(SourceSpec.model_fields)
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"{key}: unknown key{hint}; expected {' and '.join(fields)}")
    for key, what in (("model", "a model reference"), ("lora", "an adapter folder or hub id")):
        item = value.get(key)
        if (key == "model" or item is not None) and (not isinstance(item, str) or not item.strip()):
            raise ValueError(f"{key}: expected {what}, got {item!r}")
    spec = SourceSpec.model_validate(value)
    path_text(spec.model)
    if spec.lora is not None:
        path_text(spec.lora)
    return spec.text


Reference = Annotated[str, BeforeValidator(reference_text)]
"""A model reference field: a string, or the ``{model, lora}`` mapping stored as ``model+lora``."""


@dataclass(frozen=True)
class Weights:
    """One folder of weights: a local folder, or the snapshot of a hub repository at one commit."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None  # as asked (None: the default branch)
    commit: str | None = None  # what it resolved to

    @property
    def ref(self) -> str:
        """The pinned reference: the absolute folder, or ``org/name@<commit>``."""
        return f"{self.repo_id}@{self.commit}" if self.repo_id is not None else str(self.path)

    def record(self) -> dict[str, str]:
        """JSON-ready description (run records, model cards, fingerprints)."""
        if self.repo_id is None:
            return {"path": str(self.path)}
        return {"repo_id": self.repo_id, "revision": self.revision or "main", "commit": str(self.commit), "path": str(self.path)}


@dataclass(frozen=True)
class ResolvedSource:
    """A model reference resolved: the model's weights and, for a LoRA source, the adapter's."""

    model: Weights
    adapter: Weights | None = None

    @property
    def ref(self) -> str:
        """The pinned reference; ``resolve_source(ref)`` gives back this source."""
        if self.adapter is None:
            return self.model.ref
        return f"{self.model.ref}{ADAPTER_SEPARATOR}{self.adapter.ref}"

    @property
    def path(self) -> Path:
        """The folder of the model's config, tokenizer and (base) weights."""
        return self.model.path

    def record(self) -> dict[str, Any]:
        """What this source is, as JSON: the pinned ref, hub ids, revisions, commits, adapter."""
        data: dict[str, Any] = {"ref": self.ref, **self.model.record()}
        if self.adapter is not None:
            data["adapter"] = self.adapter.record()
        return data


def resolve_source(
    value: str | Mapping[str, Any] | SourceSpec,
    *,
    roots: Sequence[Path] = (),
    zoo: ZooLookup | None = None,
    where: str = "model",
    require_folder: bool = True,
    download: bool = True,
) -> ResolvedSource:
    """Resolve one reference (see the module docstring); errors are one line starting with ``where``.

    ``roots``: folders a relative path is looked up in, in order (default: the current directory);
    ``require_folder``: a local folder must exist now (else it is only made absolute, and the pool
    reports it when opened); ``download``: False resolves hub ids from the cache only.
    """
    try:
        text = value.text if isinstance(value, SourceSpec) else reference_text(value)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    if not text.strip():
        raise ConfigError(f"{where}: expected a model reference (folder, zoo:<model>, org/name[@revision], model+adapter)")
    roots = tuple(roots) or (Path.cwd(),)
    if ADAPTER_SEPARATOR not in text or _existing_folder(text, roots) is not None:
        return ResolvedSource(_weights(text, roots, zoo, where, False, require_folder, download))
    model, adapter = text.rsplit(ADAPTER_SEPARATOR, 1)
    if not model or not adapter:
        raise ConfigError(f"{where}: '{text}': expected <model>+<adapter> with both parts named")
    return ResolvedSource(
        _weights(model, roots, zoo, where, False, require_folder, download),
        _weights(adapter, roots, zoo, f"{where} (adapter)", True, require_folder, download),
    )


def resolve_models(
    models: Mapping[str, Any],
    *,
    roots: Sequence[Path] = (),
    zoo: ZooLookup | None = None,
    where: str = "models",
    require_folder: bool = True,
    download: bool = True,
) -> dict[str, ResolvedSource]:
    """``resolve_source`` for every entry of a ``models`` mapping (errors name ``where.<name>``)."""
    return {
        name: resolve_source(
            ref, roots=roots, zoo=zoo, where=f"{where}.{name}", require_folder=require_folder, download=download
        )
        for name, ref in models.items()
    }


def short_name(text: str) -> str:
    """A readable model name for a reference: the adapter's (if any) else the model's, without revision."""
    part = text.rsplit(ADAPTER_SEPARATOR, 1)[-1].rstrip("/\\")
    match = HUB_ID.match(part)
    if match:
        part = match["repo"]
    return PurePath(part.removeprefix(ZOO_PREFIX)).name or "model"


def is_hub_id(text: str) -> bool:
    """``org/name`` or ``org/name@revision`` (not a path that names itself as one: /…, ./…, ~…)."""
    return not text.startswith(_EXPLICIT_PATH) and HUB_ID.match(text) is not None


def _existing_folder(text: str, roots: Sequence[Path]) -> Path | None:
    path = Path(text).expanduser()
    for candidate in [path] if path.is_absolute() else [root / path for root in roots]:
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _weights(
    part: str, roots: Sequence[Path], zoo: ZooLookup | None, where: str, adapter: bool, require_folder: bool, download: bool
) -> Weights:
    """One side of a reference (the model, or the adapter) as a folder or a cached hub snapshot."""
    if part.startswith(ZOO_PREFIX):
        if zoo is None:
            raise ConfigError(f"{where}: '{part}': zoo: models can be named in experiments only")
        return Weights(zoo(part[len(ZOO_PREFIX) :]))
    folder = _existing_folder(part, roots)
    if folder is not None:
        return Weights(folder)
    if is_hub_id(part):
        match = HUB_ID.match(part)
        assert match is not None
        repo_id, revision = match["repo"], match["revision"]
        fetch = hub.fetch_adapter if adapter else hub.fetch_model
        path, commit = fetch(repo_id, revision, where, download=download)
        return Weights(path, repo_id, revision, commit)
    path = Path(part).expanduser()
    fallback = (path if path.is_absolute() else roots[-1] / path).resolve()
    if require_folder:
        raise ModelError(f"{where}: folder not found: {fallback}")
    return Weights(fallback)
