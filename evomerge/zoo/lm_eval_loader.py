"""Loads a zoo task's data for lm-eval, from JSON-lines files beside this file.

Copied verbatim into every zoo fitness folder as ``zoo_data.py`` and referenced from the task YAML
as ``custom_dataset: !function zoo_data.load``. lm-eval resolves ``!function`` relative to the YAML
file, whereas ``dataset_path: json`` with relative ``data_files`` resolves against the current
directory; loading here makes ``--include_path <folder>`` work from any working directory and
keeps ``datasets`` off the network (no hub lookup, no cache files).
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(zoo_task: str, **_: object) -> datasets.DatasetDict:
    """The validation and test splits of ``zoo_task`` from ``data/<zoo_task>.<split>.jsonl``."""
    splits = {}
    for split in ("validation", "test"):
        path = HERE / "data" / f"{zoo_task}.{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
