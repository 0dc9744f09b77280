"""Python hooks for the test task YAML: a prompt function (tiny_fn) and a custom dataset (tiny_custom)."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def prompt(doc: dict) -> str:
    """The prompt tiny_gen.yaml renders from its template."""
    return f"{doc['a']} plus {doc['b']} is"


def load_mc(**_: object) -> datasets.DatasetDict:
    """tiny_mc's data, loaded the way the zoo's tasks load theirs (``custom_dataset``)."""
    rows = [json.loads(line) for line in (HERE / "mc_validation.jsonl").read_text().splitlines()]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
