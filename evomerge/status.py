"""``evomerge status RUN_DIR``: where a run stands, read from its store without the lock.

Safe while a driver is writing: the store is opened read-only (WAL readers never block the
writer, and every query sees a committed state). Nothing heavy is imported here (no torch, no
lm-eval), so status answers in well under a second.

Objective values follow the store's maximize convention: a minimized metric appears negated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from evomerge.store import RunStore
from evomerge.store.stages import is_staged_run, latest_stage_dir, stage_status
from evomerge.store.files import (
    SUMMARY_FILE,
    WORKERS_FILE,
    read_json_object,
    workers_in,
)

PAUSE_FACTOR = 20.0
PAUSE_MIN_SECONDS = 60.0


def read_summary(run_dir: str | Path, store: RunStore | None = None) -> dict[str, Any] | None:
    """The run's closing summary — the store's, else ``summary.json`` (runs finished before the
    store kept it) — or None while the run is not done (a damaged file counts as none)."""
    stored = None if store is None else store.summary
    return stored if stored is not None else read_json_object(Path(run_dir) / SUMMARY_FILE)


def read_workers(run_dir: str | Path) -> list[dict[str, Any]]:
    """The executor's per-worker state as of its last write (``workers.json``); [] if none or damaged."""
    return workers_in(read_json_object(Path(run_dir) / WORKERS_FILE)) or []


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """The run's state as JSON-ready data (see the module docstring for the conventions); for a
    staged run, its current (or last) stage's, with ``staged``: every stage's state and the pool."""
    folder = Path(run_dir)
    if is_staged_run(folder):
        return _staged_status(folder)
    with RunStore.open_reader(folder) as store:
        metadata = store.metadata
        names = list(metadata["objectives"])
        results = store.results()
        heldout = {r.ticket: r for r in store.results("test") if r.ok}
        counts = store.counts()
        candidates = store.count()
        best = store.best()
        parents = {c.ticket: tuple(c.proposal.parents) for c in store.candidates()}
        summary = read_summary(folder, store)
    experiment = metadata["experiment"]
    best_data = None
    if best is not None:
        test = heldout.get(best.ticket)
        best_data = {
            "candidate": best.ticket,
            "objectives": dict(zip(names, best.evaluation.objectives.tolist())),
            "heldout": None if test is None or not test.ok else dict(zip(names, test.evaluation.objectives.tolist())),
        }
    evaluated = [r for r in results if r.cached_from is None and r.timings]
    return {
        "run_dir": str(folder.resolve()),
        "name": experiment["name"],
        "strategy": experiment["strategy"]["name"],
        "objectives": names,
        "candidates": candidates,
        "evaluations": len(results),
        "ok": counts["ok"],
        "failed": counts["failed"],
        "cached": sum(1 for r in results if r.cached_from is not None),
        "pending": counts["pending"],
        "running": counts["running"],
        "budget": dict(experiment["budget"]),
        "done": summary is not None,
        "best": best_data,
        "racing": racing_summary(experiment, results),
        "throughput": {
            "candidates_per_hour": candidates_per_hour([r.finished for r in results]),
            "seconds_per_candidate": {
                phase: _mean([r.timings.get(phase) for r in evaluated]) for phase in ("merge", "evaluate", "total")
            },
        },
        "executor": experiment.get("executor", {}).get("kind", "local"),
        "workers": read_workers(folder),
        "summary": summary,
        **(_strategy_state(experiment, results, parents) or {}),
    }


def _staged_status(folder: Path) -> dict[str, Any]:
    staged = stage_status(folder)
    latest = latest_stage_dir(folder)
    if latest is None:
        return {"run_dir": str(folder.resolve()), "name": staged["name"], "staged": staged, "done": False}
    return {**run_status(latest), "staged": staged, "done": staged["stage"] is None}


def _strategy_state(experiment: dict[str, Any], results: list[Any], parents: dict[int, tuple[int, ...]]) -> dict[str, Any] | None:
    """What the run's strategy adds to the status (natural niches: its archive), from the records
    in the order the strategy was told them (a reproducible run: ticket order)."""
    from evomerge.search import get_strategy

    strategy = experiment["strategy"]
    cls = get_strategy(strategy["name"])
    settings = cls.Settings.model_validate(strategy.get("settings") or {})
    if experiment.get("executor", {}).get("reproducible"):
        results = sorted(results, key=lambda r: r.ticket)
    return cls.summarize(settings, [r.evaluation for r in results], parents)


def racing_summary(experiment: dict[str, Any], results: list[Any]) -> dict[str, Any] | None:
    """Candidates racing stopped early and the examples that saved (None when racing is off).

    Every evaluated candidate would otherwise have been scored on the race's full set (``total``).
    """
    if not (experiment.get("fitness") or {}).get("racing"):
        return None
    scored = [r for r in results if r.ok and r.cached_from is None]
    stopped = [r for r in scored if r.estimate is not None]
    total = stopped[0].estimate.total if stopped else None
    full = None if total is None else total * len(scored)
    saved = sum(r.estimate.saved for r in stopped)
    return {
        "stopped": len(stopped),
        "evaluated": len(scored),
        "examples_scored": None if full is None else full - saved,
        "examples_saved": saved,
        "examples_full": full,
    }


def candidates_per_hour(finished: list[float]) -> float | None:
    """Results per hour of driver time, from the gaps between consecutive results.

    A gap longer than ``PAUSE_FACTOR`` times the median gap (and than ``PAUSE_MIN_SECONDS``) is a
    pause — the driver was stopped and later resumed — and is left out.
    """
    if len(finished) < 2:
        return None
    gaps = np.diff(np.sort(np.asarray(finished, dtype=np.float64)))
    limit = max(PAUSE_MIN_SECONDS, PAUSE_FACTOR * float(np.median(gaps)))
    active = gaps[gaps <= limit]
    seconds = float(active.sum())
    return round(active.size / seconds * 3600.0, 1) if seconds > 0 else None


def print_status(status: dict[str, Any], console: Console | None = None) -> None:
    """The status for people: counts, budget, best so far, throughput, and the summary when done."""
    console = console or Console()
    staged = status.get("staged")
    if staged is not None:
        states = ", ".join(f"{s['name']} {s['state']}" for s in staged["stages"])
        where = "all stages done" if staged["stage"] is None else f"stage {staged['stage_index'] + 1}/{len(staged['stages'])}: {staged['stage']}"
        console.print(f"[bold]{staged['name']}[/bold] (staged) — {where} — {states}")
        promoted = [f"{name} (from {e['stage']} #{e['candidate']})" for name, e in staged["pool"].items() if e.get("stage")]
        if promoted:
            console.print("promoted into the pool: " + ", ".join(promoted))
        if "budget" not in status:
            return
    budget = status["budget"]
    limits = [f"{budget['evaluations']} evaluations" if budget.get("evaluations") else None]
    limits.append(f"{budget['minutes']:g} minutes" if budget.get("minutes") else None)
    state = "done" if status["done"] else "in progress"
    console.print(f"[bold]{status['name']}[/bold] ({status['strategy']}) — {state} — {status['run_dir']}")
    console.print(
        f"evaluations {status['evaluations']} (ok {status['ok']}, failed {status['failed']}, cached {status['cached']}), "
        f"running {status['running']}, pending {status['pending']}; budget {' and '.join(x for x in limits if x)}"
    )
    rate = status["throughput"]["candidates_per_hour"]
    if rate is not None:
        console.print(f"throughput {rate:,.0f} candidates/hour")
    best = status["best"]
    if best is None:
        console.print("best: none yet")
    else:
        values = ", ".join(f"{k} {v:.4f}" for k, v in best["objectives"].items())
        line = f"best: candidate #{best['candidate']}: {values}"
        if best["heldout"] is not None:
            line += " | held-out " + ", ".join(f"{k} {v:.4f}" for k, v in best["heldout"].items())
        console.print(line)
    racing = status.get("racing")
    if racing is not None:
        if racing["stopped"]:
            console.print(
                f"racing: {racing['stopped']} of {racing['evaluated']} candidates stopped early (estimates, never best); "
                f"examples saved {racing['examples_saved']:,} of {racing['examples_full']:,} "
                f"({racing['examples_saved'] / racing['examples_full']:.0%})"
            )
        else:
            console.print(f"racing: no candidate stopped early yet ({racing['evaluated']} evaluated in full)")
    for worker in status.get("workers", []):
        where = f" on {worker['node']} ({worker['device']})" if worker["node"] is not None else ""
        console.print(
            f"  worker {worker['name']}: {worker['state'] if not status['done'] else 'stopped'}{where}, "
            f"{worker['evaluations']} evaluations, {worker['failures']} failures"
            + (f", replaced {worker['restarts']}×" if worker.get("restarts") else "")
        )
    archive = status.get("archive")
    if archive is not None:
        console.print(
            f"archive: {len(archive['members'])} members, coverage {archive['coverage']:.1%} of {archive['examples']} examples"
        )
        for member in sorted(archive["members"], key=lambda m: -m["fitness"]):
            lineage = f"child of {', '.join(f'#{p}' for p in member['parents'])}" if member["parents"] else "seed"
            console.print(
                f"  #{member['candidate']:<5d} fitness {member['fitness']:.4f}  accuracy {member['accuracy']:.4f}  "
                f"generation {member['generation']}  {lineage}"
            )
    if status["summary"] is not None:
        from evomerge.display import print_summary

        print_summary(status["summary"], console)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(float(np.mean(present)), 6) if present else None
