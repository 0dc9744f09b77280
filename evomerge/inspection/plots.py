"""The report's figures (matplotlib, Agg): fronts, progress curves, a recipe's per-layer heat map.

Each function takes data already read from the store and returns a ``Figure``; nothing here
reads files, so the figures are testable on made-up data.
"""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from evomerge.inspection.pareto import hypervolume, nondominated_ranks, reference_point  # noqa: E402

FRONT_COLOR = "#d62728"
ALL_COLOR = "#9a9a9a"
REFERENCE_COLOR = "#000000"
PREDICTED_COLOR = "#1f77b4"


def _pair_axes(n_objectives: int) -> tuple[Figure, list, list[tuple[int, int]]]:
    """One panel per pair of objectives (one panel for two), in a grid of up to 3 columns."""
    pairs = list(itertools.combinations(range(n_objectives), 2))
    cols = min(3, len(pairs))
    rows = int(np.ceil(len(pairs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows), layout="constrained", squeeze=False)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    return fig, list(axes.flat)[: len(pairs)], pairs


def _draw_front(ax, front: np.ndarray, i: int, j: int, label: str) -> None:
    """A two-objective front as a line; with more objectives a pair's projection is no curve: points."""
    if front.shape[1] == 2:
        front = front[np.argsort(front[:, i])]
        ax.plot(front[:, i], front[:, j], "-o", color=FRONT_COLOR, markersize=5, label=label)
    else:
        ax.scatter(front[:, i], front[:, j], s=28, color=FRONT_COLOR, label=label, zorder=3)


def _draw_references(ax, values: np.ndarray, references: dict[str, int], i: int, j: int) -> None:
    """Each reference model (a source alone, the base, the uniform merge) as a labelled star."""
    for k, (label, row) in enumerate(references.items()):
        ax.scatter([values[row, i]], [values[row, j]], marker="*", s=150, color=REFERENCE_COLOR, zorder=4,
                   label="reference models" if k == 0 else None)
        ax.annotate(label, (values[row, i], values[row, j]), textcoords="offset points", xytext=(6, 4), fontsize=8)


def front_figure(
    values: np.ndarray, names: list[str], chosen: int | None = None, references: dict[str, int] | None = None
) -> Figure:
    """All candidates and the non-dominated ones: one panel for 2 objectives, a pairwise grid for more,
    and the objective over the evaluations for a single one. ``references``: label → row of each
    reference model the search evaluated, drawn as labelled stars (the front includes or dominates them)."""
    references = references or {}
    values = np.asarray(values, dtype=float)
    if values.shape[1] == 1:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
        order = np.arange(1, len(values) + 1)
        ax.scatter(order, values[:, 0], s=12, color=ALL_COLOR, label="candidate")
        best = int(np.argmax(values[:, 0]))
        ax.scatter([order[best]], [values[best, 0]], s=60, color=FRONT_COLOR, label="best", zorder=3)
        ax.set(xlabel="evaluation", ylabel=f"{names[0]} (validation)", title="Candidates in evaluation order")
        ax.legend(loc="lower right")
        return fig
    ranks = nondominated_ranks(values)
    fig, axes, pairs = _pair_axes(values.shape[1])
    for ax, (i, j) in zip(axes, pairs):
        on = ranks == 0
        ax.scatter(values[~on, i], values[~on, j], s=12, color=ALL_COLOR, label="dominated")
        _draw_front(ax, values[on], i, j, "Pareto front (rank 0)")
        _draw_references(ax, values, references, i, j)
        if chosen is not None:
            ax.scatter([values[chosen, i]], [values[chosen, j]], s=140, facecolors="none", edgecolors="black", label="chosen")
        ax.set(xlabel=f"{names[i]} (validation, ↑)", ylabel=f"{names[j]} (validation, ↑)")
        ax.legend(loc="best", fontsize="small", framealpha=0.9)
    fig.suptitle("Pareto front")
    return fig


def surrogate_figure(
    values: np.ndarray,
    names: list[str],
    predicted_front: np.ndarray,
    proposals: list[tuple[int, np.ndarray]],
    references: dict[str, int] | None = None,
    title: str = "Surrogate front beside the evaluations",
) -> Figure:
    """The surrogates' predicted front (a line) beside every real evaluation (grey) and the real front
    (red); each proposal the surrogates made is joined from its prediction (open circle) to its
    real value. ``proposals``: (row in ``values``, predicted objectives)."""
    values = np.asarray(values, dtype=float)
    predicted_front = np.asarray(predicted_front, dtype=float).reshape(-1, values.shape[1])
    ranks = nondominated_ranks(values)
    fig, axes, pairs = _pair_axes(values.shape[1])
    for ax, (i, j) in zip(axes, pairs):
        ax.scatter(values[:, i], values[:, j], s=12, color=ALL_COLOR, label="evaluated")
        _draw_front(ax, values[ranks == 0], i, j, "real front")
        if len(predicted_front):
            line = predicted_front[np.argsort(predicted_front[:, i])]
            if values.shape[1] == 2:
                ax.plot(line[:, i], line[:, j], "--", color=PREDICTED_COLOR, linewidth=1.8, label="predicted front (latest fit)")
            else:
                ax.scatter(line[:, i], line[:, j], s=10, color=PREDICTED_COLOR, label="predicted front (latest fit)")
        for k, (row, predicted) in enumerate(proposals):
            ax.plot([predicted[i], values[row, i]], [predicted[j], values[row, j]], color=PREDICTED_COLOR, alpha=0.35, linewidth=0.8)
            ax.scatter([predicted[i]], [predicted[j]], s=16, facecolors="none", edgecolors=PREDICTED_COLOR,
                       label="prediction → real value" if k == 0 else None)
        _draw_references(ax, values, references or {}, i, j)
        ax.set(xlabel=f"{names[i]} (validation, ↑)", ylabel=f"{names[j]} (validation, ↑)")
        ax.legend(loc="best", fontsize="small", framealpha=0.9)
    fig.suptitle(title)
    return fig


def progress_series(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Best-so-far per objective (n × k) and, with ≥ 2 objectives, the hypervolume after each result."""
    values = np.asarray(values, dtype=float)
    best = np.maximum.accumulate(values, axis=0)
    if values.shape[1] < 2:
        return best, None
    reference = reference_point(values)
    volume = np.array([hypervolume(values[: n + 1], reference) for n in range(len(values))])
    return best, volume


def progress_figure(values: np.ndarray, names: list[str]) -> Figure:
    best, volume = progress_series(values)
    panels = 1 if volume is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.0), layout="constrained", squeeze=False)
    steps = np.arange(1, len(best) + 1)
    for k, name in enumerate(names):
        axes[0, 0].step(steps, best[:, k], where="post", label=name)
    axes[0, 0].set(xlabel="successful evaluations", ylabel="best so far (validation)", title="Best so far")
    axes[0, 0].legend(loc="lower right")
    if volume is not None:
        axes[0, 1].step(steps, volume, where="post", color="#2ca02c")
        axes[0, 1].set(xlabel="successful evaluations", ylabel="hypervolume", title="Hypervolume (reference below every point)")
    return fig


def blend_figure(starts: list[int], size: int, weights: dict[str, list[float]], title: str) -> Figure:
    """A blend's weight per model along the canonical parameter order (a step per segment)."""
    fig, ax = plt.subplots(figsize=(8.0, 3.2), layout="constrained")
    edges = np.array([*starts, size], dtype=float) / size
    for model, values in weights.items():
        ax.stairs(values, edges, label=model, linewidth=1.8)
    ax.set_xlabel("position in the parameter order (fraction; embeddings first, head last)")
    ax.set_ylabel("weight")
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    return fig


def path_figure(hops: list[tuple[str, int, float]], models: list[str], title: str) -> Figure:
    """A layer path: hop by hop (x), the layer it runs (y), one colour per model, each hop's input scale written over it."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(hops) + 2.5), 3.6), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xs = np.arange(len(hops))
    ax.plot(xs, [layer for _, layer, _ in hops], "-", color=ALL_COLOR, linewidth=1, zorder=1)
    for k, model in enumerate(models):
        mine = [(x, layer, scale) for x, (m, layer, scale) in zip(xs, hops) if m == model]
        if mine:
            ax.scatter([x for x, _, _ in mine], [y for _, y, _ in mine], s=46, color=colors[k % len(colors)], label=model, zorder=2)
    if len(hops) <= 48:
        for x, (_, layer, scale) in zip(xs, hops):
            if scale != 1.0:
                ax.annotate(f"×{scale:.2f}", (x, layer), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
    ax.set(xlabel="hop (position in the merged model)", ylabel="source layer", title=title)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best", fontsize="small")
    return fig


def heatmap_figure(matrix: np.ndarray, rows: list[str], columns: list[str], parameter: str, title: str) -> Figure:
    """Per-layer coefficients of a recipe: one row per source (× module kind), one column per layer."""
    matrix = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(columns) + 2.5), max(2.4, 0.5 * len(rows) + 1.6)), layout="constrained")
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(columns)), columns, rotation=90 if len(columns) > 16 else 0)
    ax.set_yticks(range(len(rows)), rows)
    ax.set(xlabel="layer", title=title)
    if matrix.size <= 300:
        middle = np.nanmean(matrix) if np.isfinite(matrix).any() else 0.0
        for (r, c), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < middle else "black")
    fig.colorbar(image, ax=ax, label=parameter)
    return fig


def compare_figure(curves: dict[str, np.ndarray], volumes: dict[str, np.ndarray | None], objective: str) -> Figure:
    """Best-so-far (first objective) of several runs, and their hypervolume curves where defined."""
    has_volume = any(v is not None for v in volumes.values())
    panels = 2 if has_volume else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.0), layout="constrained", squeeze=False)
    for label, curve in curves.items():
        axes[0, 0].step(np.arange(1, len(curve) + 1), curve, where="post", label=label)
        if volumes.get(label) is not None:
            axes[0, 1].step(np.arange(1, len(curve) + 1), volumes[label], where="post", label=label)
    axes[0, 0].set(xlabel="successful evaluations", ylabel=f"best {objective} so far (validation)", title="Best so far")
    axes[0, 0].legend(loc="lower right")
    if has_volume:
        axes[0, 1].set(xlabel="successful evaluations", ylabel="hypervolume (shared reference)", title="Hypervolume")
        axes[0, 1].legend(loc="lower right")
    return fig
