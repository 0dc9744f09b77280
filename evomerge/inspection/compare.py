"""``evomerge compare``: best-so-far and hypervolume curves of several runs on one figure.

Hypervolumes share one reference point (below every run's points), so the curves are comparable;
runs must have the same objectives.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from evomerge.errors import ConfigError
from evomerge.inspection import plots
from evomerge.inspection.pareto import hypervolume, reference_point
from evomerge.inspection.run_view import RunView


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> tuple[Path, list[dict]]:
    """Write the comparison PNG to ``out``; returns it and one summary row per run."""
    if len(run_dirs) < 1:
        raise ConfigError("compare: expected at least one run directory")
    views = [RunView.load(d) for d in run_dirs]
    names = views[0].objectives
    for view in views[1:]:
        if view.objectives != names:
            raise ConfigError(f"{view.run_dir}: objectives {view.objectives} differ from {views[0].run_dir}'s {names}")
    values = {}
    for view in views:
        label = _label(view, [v for v in views if v is not view])
        values[label] = view.values(view.ok_results(), names)
    everything = np.vstack([v for v in values.values() if len(v)]) if any(len(v) for v in values.values()) else None
    if everything is None:
        raise ConfigError("compare: none of the runs has a successful evaluation")
    reference = reference_point(everything) if len(names) > 1 else None
    curves, volumes, rows = {}, {}, []
    for label, vals in values.items():
        if not len(vals):
            continue
        curves[label] = np.maximum.accumulate(vals[:, 0])
        volumes[label] = None if reference is None else np.array([hypervolume(vals[: n + 1], reference) for n in range(len(vals))])
        rows.append({"run": label, "evaluations": len(vals), "best": float(curves[label][-1]),
                     "hypervolume": None if volumes[label] is None else float(volumes[label][-1])})
    fig = plots.compare_figure(curves, volumes, names[0])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out, rows


def _label(view: RunView, others: list[RunView]) -> str:
    """'name (strategy)', made unique with the folder name when two runs would share it."""
    label = f"{view.name} ({view.strategy})"
    if any(f"{o.name} ({o.strategy})" == label for o in others):
        label = f"{view.run_dir.name} ({view.strategy})"
    return label
