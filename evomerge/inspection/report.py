"""``evomerge report``: a self-contained HTML page (figures inlined, PNGs alongside) built from parts.

A part is one function registered with ``@report_part(name, order)``: it gets the ``ReportContext``
(the run, the chosen candidate, a figure saver) and returns an HTML fragment, or "" to stay out.
Every number comes from the run store or the run's ``summary.json``.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from evomerge.inspection import plots
from evomerge.inspection.front import FrontMember, pareto_front, reference_points
from evomerge.inspection.recipe_grid import coefficient_grid
from evomerge.inspection.run_view import RunView
from evomerge.recipe import Blend, LayerPath, recipe_from_dict
from evomerge.status import run_status
from evomerge.store.run_files import REPORT_DIR


@dataclass
class ReportContext:
    view: RunView
    out_dir: Path
    front: list[FrontMember]
    chosen: int | None
    images: list[Path] = field(default_factory=list)

    def figure(self, fig: Figure, name: str, alt: str) -> str:
        """Save ``fig`` as ``name``.png beside the page and return an <img> with it inlined."""
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        path = self.out_dir / f"{name}.png"
        path.write_bytes(buffer.getvalue())
        self.images.append(path)
        data = base64.b64encode(buffer.getvalue()).decode()
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


ReportPart = Callable[[ReportContext], str]
PARTS: dict[str, tuple[int, ReportPart]] = {}


def report_part(name: str, order: int) -> Callable[[ReportPart], ReportPart]:
    """Register a report part; parts appear by ``order``."""

    def wrap(part: ReportPart) -> ReportPart:
        PARTS[name] = (order, part)
        return part

    return wrap


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``index.html`` and the PNGs into ``out_dir`` (default ``RUN_DIR/report``); returns the page."""
    view = RunView.load(run_dir)
    out = Path(out_dir) if out_dir is not None else view.run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    front = pareto_front(view)
    chosen = front[0].candidate if front else None
    context = ReportContext(view, out, front, chosen)
    sections = [part(context) for _, part in sorted(PARTS.values(), key=lambda item: item[0])]
    page = _PAGE.format(title=html.escape(f"evomerge report: {view.name}"), body="\n".join(s for s in sections if s))
    index = out / "index.html"
    index.write_text(page)
    return index


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


@report_part("overview", 10)
def overview(ctx: ReportContext) -> str:
    view = ctx.view
    results = view.results["validation"]
    failed = sum(not r.ok for r in results)
    budget = view.experiment.get("budget", {})
    state = {
        "finished": "finished",
        "running": "in progress — a driver is writing this run; figures show the results so far",
        "stopped": "stopped before its budget (crashed or interrupted) — resume it with "
        f"<code>evomerge resume {html.escape(str(view.run_dir))}</code>",
    }[view.state]
    rows = [
        ["run", view.name], ["directory", str(view.run_dir)], ["strategy", view.strategy],
        ["objectives (validation, higher is better)", ", ".join(view.objectives)],
        ["evaluations", f"{len(results)} ({failed} failed) of a budget of {budget.get('evaluations') or '–'}"],
        *_racing_rows(view),
        ["candidates on the front", str(len(ctx.front))],
        ["report written", time.strftime("%Y-%m-%d %H:%M:%S")],
    ]
    warn = "" if view.state == "finished" else f'<p class="warn">This run is {state}.</p>'
    return f"<h1>{html.escape(view.name)}</h1>{warn}<p>State: {state if view.state == 'finished' else view.state}.</p>" + _table(
        ["", ""], rows
    )


def _racing_rows(view: RunView) -> list[list[str]]:
    """A row on racing when candidates were stopped early (their estimates are in no figure)."""
    stopped = view.estimates()
    if not stopped:
        return []
    saved = sum(r.estimate.saved for r in stopped)
    return [["stopped early by racing", f"{len(stopped)} candidates (estimates, left out below); {saved:,} examples saved"]]


@report_part("front", 20)
def front_section(ctx: ReportContext) -> str:
    view = ctx.view
    records = view.ok_results()
    if not records:
        return "<h2>Pareto front</h2><p>No successful evaluation yet.</p>"
    values = view.values(records, view.objectives)
    chosen_index = next((i for i, r in enumerate(records) if r.ticket == ctx.chosen), None)
    image = ctx.figure(
        plots.front_figure(values, view.objectives, chosen_index, _reference_rows(view, records)), "front", "Pareto front"
    )
    rows = []
    for member in ctx.front:
        cells = [str(member.candidate)] + [_fmt(member.objectives[n]) for n in view.objectives]
        cells += [_fmt(None if member.heldout is None else member.heldout[n]) for n in view.objectives]
        rows.append(cells + [member.summary])
    header = ["candidate", *[f"{n} (val)" for n in view.objectives], *[f"{n} (test)" for n in view.objectives], "recipe"]
    return f"<h2>Pareto front</h2>{image}" + _table(header, rows) + _references_table(ctx)


def _reference_rows(view: RunView, records: list) -> dict[str, int]:
    """Label → row in ``records`` of each reference model the search evaluated."""
    rows = {r.ticket: i for i, r in enumerate(records)}
    return {name: rows[ticket] for name, ticket in view.references().items() if ticket in rows}


def _references_table(ctx: ReportContext) -> str:
    if len(ctx.view.objectives) < 2:
        return ""
    points = reference_points(ctx.view, front=ctx.front)
    if not points:
        return ""
    names = ctx.view.objectives
    rows = [
        [p.name, p.kind or "", f"#{p.candidate}", *[_fmt(p.objectives[n]) for n in names],
         "on the front" if p.dominated_by is None else f"dominated by #{p.dominated_by}"]
        for p in points
    ]
    return "<p>Reference models evaluated by the search (stars in the figure):</p>" + _table(
        ["model", "kind", "candidate", *[f"{n} (val)" for n in names], "against the front"], rows
    )


@report_part("surrogate", 25)
def surrogate_section(ctx: ReportContext) -> str:
    """A surrogate strategy's predicted front (MAP: stored with each proposal) beside the real evaluations."""
    view = ctx.view
    records = view.ok_results()
    proposals = [view.candidates[t].proposal for t in sorted(view.candidates)]
    fronts = [p for p in proposals if "front" in p.info]
    if not fronts or not records or len(view.objectives) < 2:
        return ""
    values = view.values(records, view.objectives)
    rows = {r.ticket: i for i, r in enumerate(records)}
    predicted = [(rows[p.ticket], np.asarray(p.info["predicted"], dtype=float)) for p in fronts if p.ticket in rows]
    latest = fronts[-1].info
    image = ctx.figure(
        plots.surrogate_figure(values, view.objectives, np.asarray(latest["front"], dtype=float), predicted,
                               _reference_rows(view, records)),
        "surrogate", "Predicted front beside the evaluations",
    )
    table_rows = []
    for batch in sorted({p.info["batch"] for p in fronts}):
        members = [p for p in fronts if p.info["batch"] == batch]
        done = [(rows[p.ticket], np.asarray(p.info["predicted"], dtype=float)) for p in members if p.ticket in rows]
        errors = np.mean([np.abs(values[row] - pred) for row, pred in done], axis=0) if done else None
        table_rows.append(
            [str(batch), str(len(members)), ", ".join(sorted({p.info["role"] for p in members})),
             *[_fmt(None if errors is None else float(e)) for e in (errors if errors is not None else [None] * len(view.objectives))],
             ", ".join(_fmt(r) for r in members[0].info.get("fit_r2", []))]
        )
    header = ["batch", "proposals", "roles", *[f"|predicted − real| {n}" for n in view.objectives], "in-sample R² per objective"]
    return (
        f"<h2>Surrogate front</h2><p>The dashed line is the front the surrogates predicted at the latest fit (batch "
        f"{latest['batch']}); each open circle is a proposal's predicted scores, joined to its real ones.</p>{image}"
        + _table(header, table_rows)
    )


@report_part("progress", 30)
def progress_section(ctx: ReportContext) -> str:
    records = ctx.view.ok_results()
    if not records:
        return ""
    values = ctx.view.values(records, ctx.view.objectives)
    image = ctx.figure(plots.progress_figure(values, ctx.view.objectives), "progress", "Best so far and hypervolume")
    return f"<h2>Progress</h2>{image}"


@report_part("recipe", 40)
def recipe_section(ctx: ReportContext) -> str:
    if ctx.chosen is None:
        return ""
    recipe = recipe_from_dict(ctx.view.recipe(ctx.chosen), f"candidate {ctx.chosen}")
    if isinstance(recipe, Blend):
        starts = [s.start for s in recipe.segments]
        weights = {m: [s.weights.get(m, 0.0) for s in recipe.segments] for m in recipe.models}
        title = f"Candidate {ctx.chosen}: blend weights along the parameter order"
        image = ctx.figure(plots.blend_figure(starts, recipe.size, weights, title), "recipe", title)
        return f"<h2>Chosen recipe (candidate {ctx.chosen})</h2>{image}<pre>{html.escape(recipe.to_yaml())}</pre>"
    if isinstance(recipe, LayerPath):
        hops = [(hop.model, hop.layer, hop.scale) for hop in recipe.hops]
        title = f"Candidate {ctx.chosen}: a path of {len(hops)} layers (embeddings {recipe.embeddings}, head {recipe.head_model})"
        image = ctx.figure(plots.path_figure(hops, list(recipe.models), title), "recipe", title)
        return f"<h2>Chosen recipe (candidate {ctx.chosen})</h2>{image}<pre>{html.escape(recipe.to_yaml())}</pre>"
    matrix, rows, columns, parameter = coefficient_grid(recipe)
    title = f"Candidate {ctx.chosen}: {recipe.method} {parameter} per source and layer"
    image = ctx.figure(plots.heatmap_figure(matrix, rows, columns, parameter, title), "recipe", title)
    return f"<h2>Chosen recipe (candidate {ctx.chosen})</h2>{image}<pre>{html.escape(recipe.to_yaml())}</pre>"


@report_part("archive", 45)
def archive_section(ctx: ReportContext) -> str:
    """A population strategy's state (natural niches: the archive), rebuilt from the run's records."""
    archive = run_status(ctx.view.run_dir).get("archive")
    if archive is None:
        return ""
    rows = [
        [f"#{m['candidate']}", _fmt(m["fitness"]), _fmt(m["accuracy"]), str(m["generation"]),
         ", ".join(f"#{p}" for p in m["parents"]) or "seed"]
        for m in sorted(archive["members"], key=lambda m: -m["fitness"])
    ]
    intro = (
        f"<p>{len(archive['members'])} members solve {archive['coverage']:.1%} of the {archive['examples']} examples "
        "between them (coverage); fitness is shared per example.</p>"
    )
    return "<h2>Archive</h2>" + intro + _table(["member", "shared fitness", "accuracy", "generation", "parents"], rows)


@report_part("heldout", 50)
def heldout_section(ctx: ReportContext) -> str:
    summary = ctx.view.summary
    rows: list[list[str]] = []
    columns: list[str] = []
    if summary is not None:
        columns = list(summary["columns"])
        rows = [[row["label"], *[_fmt(row["objectives"].get(c)) for c in columns]] for row in summary["rows"]]
    scored = [m for m in ctx.front if m.heldout is not None]
    if not rows and not scored:
        return "<h2>Held-out scores</h2><p>Nothing scored on the held-out split yet (<code>evomerge evaluate RUN_DIR --front</code>).</p>"
    html_rows = ""
    if rows:
        html_rows += f"<p>Sources vs the best merge on the {html.escape(summary['split'])} split (from the run's summary):</p>"
        html_rows += _table(["model", *columns], rows)
    if scored:
        names = ctx.view.objectives
        html_rows += "<p>Front members scored on the held-out split:</p>" + _table(
            ["candidate", *names], [[str(m.candidate), *[_fmt(m.heldout[n]) for n in names]] for m in scored]
        )
    return f"<h2>Held-out scores</h2>{html_rows}"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
pre {{ background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }}
.warn {{ background: #fff3cd; border: 1px solid #e0c36c; padding: 0.6em; }}
</style></head>
<body>
{body}
</body></html>
"""
