"""Hugging Face Hub snapshots in the local cache: safetensors, config and tokenizer files only.

``huggingface_hub.snapshot_download`` does the work (the cache layout, refs, partial downloads);
this module decides which files a model needs and turns the hub's exceptions into one-line
``ModelError``s naming the id. A model is fetched in two steps: its JSON and tokenizer files first,
then exactly the safetensors shards its index lists (or ``model.safetensors``), so duplicate
weight copies some repositories carry (``consolidated.safetensors``) and pickled ``*.bin`` files
are never downloaded.

The cache folder and ``HF_HUB_OFFLINE`` are read from the environment at every call (the hub
library reads them once, at import), so a process that sets them late still gets what it asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from evomerge.errors import ConfigError, ModelError

MODEL_FILES = ("*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SINGLE_WEIGHTS = "model.safetensors"
WEIGHT_INDEX = "model.safetensors.index.json"
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: resolve from the cache, never download."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def hub_cache() -> Path:
    """The hub cache folder as huggingface_hub defines it: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def fetch_model(repo_id: str, revision: str | None, where: str, *, download: bool = True) -> tuple[Path, str]:
    """The cached snapshot folder of model ``repo_id`` at ``revision`` (None: main) and its commit hash."""
    folder, commit = _snapshot(repo_id, revision, list(MODEL_FILES), where, download)
    index = folder / WEIGHT_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{where}: {repo_id}@{commit}: {WEIGHT_INDEX} has no valid weight_map") from None
    else:
        shards = [SINGLE_WEIGHTS]
    if not (folder / "config.json").is_file():
        return folder, commit  # not a model (an adapter?): the pool says what it is
    if not all((folder / shard).is_file() for shard in shards):
        folder, _ = _snapshot(repo_id, commit, shards, where, download)
    missing = [shard for shard in shards if not (folder / shard).is_file()]
    if missing and (hub_offline() or not download):
        why = " and HF_HUB_OFFLINE=1 forbids downloading the rest" if hub_offline() else ""
        raise ModelError(f"{where}: '{repo_id}@{commit}' is only partly in the Hugging Face cache (no {missing[0]}){why}")
    if missing:
        raise ModelError(
            f"{where}: '{repo_id}@{commit}' has no safetensors weights on the Hugging Face Hub (no {missing[0]}; "
            "evomerge never downloads pickled *.bin weights: convert the model to safetensors first)"
        )
    return folder, commit


def fetch_adapter(repo_id: str, revision: str | None, where: str, *, download: bool = True) -> tuple[Path, str]:
    """The cached snapshot folder of LoRA adapter ``repo_id`` at ``revision`` and its commit hash."""
    return _snapshot(repo_id, revision, list(ADAPTER_FILES), where, download)


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], where: str, download: bool) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    label = repo_id if revision is None else f"{repo_id}@{revision}"
    cache = hub_cache()
    offline = hub_offline()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            allow_patterns=patterns,
            local_files_only=offline or not download,
        )
    except HFValidationError as err:
        raise ConfigError(f"{where}: '{label}' is not a valid Hugging Face repository id ({_first_line(err)})") from None
    except RevisionNotFoundError:
        raise ModelError(f"{where}: '{repo_id}' has no revision '{revision}' on the Hugging Face Hub") from None
    except GatedRepoError:
        raise ModelError(
            f"{where}: '{repo_id}' is gated on the Hugging Face Hub: accept its terms there and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{where}: '{repo_id}' is neither a local folder nor a repository on the Hugging Face Hub "
            "(a private one needs `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        if offline:
            raise ModelError(
                f"{where}: '{label}' is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids "
                "downloading it (nor is it a local folder)"
            ) from None
        if not download:
            raise ModelError(f"{where}: '{label}' is not in the Hugging Face cache ({cache})") from None
        raise ModelError(
            f"{where}: cannot reach the Hugging Face Hub for '{label}' and it is not in the cache ({cache})"
        ) from None
    except (HfHubHTTPError, OSError) as err:
        raise ModelError(f"{where}: fetching '{label}' from the Hugging Face Hub failed: {_first_line(err)}") from None
    path = Path(folder)
    return path, path.name


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
