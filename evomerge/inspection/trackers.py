"""``--log-to tensorboard|wandb``: replay a run's results into an experiment tracker, when installed.

Each successful validation result becomes one step: its objectives, the best so far of each, and
(with several objectives) the hypervolume so far. Neither tracker is a dependency: asking for one
that is not installed is a one-line error, and nothing else imports them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.inspection.pareto import hypervolume, reference_point
from evomerge.inspection.run_view import RunView
from evomerge.store.run_files import TRACKER_DIR

TRACKERS = ("tensorboard", "wandb")


def tracker_rows(view: RunView) -> Iterator[tuple[int, dict[str, float]]]:
    """(step, scalars) for every successful result, in the order the search produced them."""
    records = view.ok_results()
    values = view.values(records, view.objectives)
    reference = reference_point(values) if len(view.objectives) > 1 and len(values) else None
    best = np.full(len(view.objectives), -np.inf)
    for step, (record, row) in enumerate(zip(records, values), start=1):
        best = np.maximum(best, row)
        scalars = {f"objective/{n}": float(v) for n, v in zip(view.objectives, row)}
        scalars.update({f"best/{n}": float(v) for n, v in zip(view.objectives, best)})
        scalars["candidate"] = float(record.ticket)
        if reference is not None:
            scalars["hypervolume"] = hypervolume(values[:step], reference)
        yield step, scalars


def log_to(kind: str, run_dir: str | Path, out_dir: str | Path | None = None) -> str:
    """Write the run into tracker ``kind``; returns where it went."""
    if kind not in TRACKERS:
        raise ConfigError(f"--log-to: expected one of {', '.join(TRACKERS)}, got '{kind}'")
    view = RunView.load(run_dir)
    target = Path(out_dir) if out_dir is not None else view.run_dir / TRACKER_DIR / kind
    if kind == "tensorboard":
        writer_class = _import("torch.utils.tensorboard", "tensorboard").SummaryWriter
        writer = writer_class(log_dir=str(target))
        try:
            for step, scalars in tracker_rows(view):
                for name, value in scalars.items():
                    writer.add_scalar(name, value, step)
        finally:
            writer.close()
        return str(target)
    wandb = _import("wandb", "wandb")
    target.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project="evomerge", name=view.name, dir=str(target), config=view.experiment)
    try:
        for step, scalars in tracker_rows(view):
            run.log(scalars, step=step)
    finally:
        run.finish()
    return str(getattr(run, "url", None) or target)


def _import(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"--log-to {package}: the '{package}' package is not installed (pip install {package})") from None
