"""A read-only snapshot of one run: its objectives, candidates, results per split and state."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.status import read_summary
from evomerge.store import CandidateRecord, ResultRecord, RunStore
from evomerge.store.lock import RunLock
from evomerge.store.stages import is_staged_run, latest_stage_dir


@dataclass(frozen=True)
class RunView:
    """Everything the inspection commands read, loaded at once from the store (no lock taken).

    ``state`` is ``finished`` (the closing summary exists), ``running`` (a live driver holds the
    run's lock) or ``stopped`` (crashed or interrupted: resume it to finish). Objective values follow
    the store's maximize convention (a minimized metric is negated).
    """

    run_dir: Path
    name: str
    strategy: str
    objectives: list[str]
    experiment: dict[str, Any]
    candidates: dict[int, CandidateRecord]
    results: dict[str, list[ResultRecord]]
    summary: dict[str, Any] | None
    state: str
    reference_kinds: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: str | Path) -> RunView:
        """The run in ``run_dir``; for a staged run directory, its latest started stage's run."""
        folder = Path(run_dir).resolve()
        if is_staged_run(folder):
            latest = latest_stage_dir(folder)
            if latest is None:
                raise ConfigError(f"{folder}: a staged run whose first stage has not started yet")
            folder = latest
        with RunStore.open_reader(folder) as store:
            metadata = store.metadata
            candidates = {c.ticket: c for c in store.candidates()}
            results = {split: store.results(split) for split in ("validation", "test")}
            summary = read_summary(folder, store)
        state = "finished" if summary is not None else "running" if RunLock.in_use(folder) else "stopped"
        experiment = metadata["experiment"]
        return cls(
            run_dir=folder,
            name=experiment["name"],
            strategy=experiment["strategy"]["name"],
            objectives=list(metadata["objectives"]),
            experiment=experiment,
            candidates=candidates,
            results=results,
            summary=summary,
            state=state,
            reference_kinds={r["name"]: r["kind"] for r in (metadata.get("layout") or {}).get("references", [])},
        )

    def ok_results(self, split: str = "validation", *, distinct: bool = False) -> list[ResultRecord]:
        """Complete successful results of ``split``, one per candidate (the first recorded), in store
        order; ``distinct`` also drops fitness-cache hits (a repeat of an earlier candidate's recipe).
        Racing estimates (``estimates``) are left out: they are no measurement of a candidate, so no
        front, best, pick or plot counts them."""
        seen: set[int] = set()
        kept = []
        for record in sorted(self.results[split], key=lambda r: r.seq):
            if record.complete and record.ticket not in seen and not (distinct and record.cached_from is not None):
                seen.add(record.ticket)
                kept.append(record)
        return kept

    def estimates(self) -> list[ResultRecord]:
        """Validation results racing stopped early, in store order."""
        return [r for r in sorted(self.results["validation"], key=lambda r: r.seq) if r.ok and r.estimate is not None]

    def values(self, records: list[ResultRecord], objectives: list[str]) -> np.ndarray:
        """The chosen objectives of ``records`` as an n × k array."""
        index = [self.objective_index(name) for name in objectives]
        return np.array([[r.evaluation.objectives[i] for i in index] for r in records], dtype=float).reshape(len(records), len(index))

    def objective_index(self, name: str) -> int:
        if name not in self.objectives:
            raise ConfigError(f"--objectives: '{name}' is not an objective of this run ({', '.join(self.objectives)})")
        return self.objectives.index(name)

    def recipe(self, ticket: int) -> dict[str, Any]:
        record = self.candidates.get(ticket)
        if record is None:
            known = f"0–{max(self.candidates)}" if self.candidates else "none yet"
            raise ConfigError(f"--candidate: no candidate {ticket} in {self.run_dir} (candidates: {known})")
        if record.recipe is None:
            raise ConfigError(f"candidate {ticket}: no recipe was stored for it")
        return record.recipe

    def references(self) -> dict[str, int]:
        """Reference models (a source alone, the base, the uniform merge) the search evaluated: name →
        the first candidate proposed as that reference with a successful validation result."""
        ok = {r.ticket for r in self.ok_results()}
        found: dict[str, int] = {}
        for ticket in sorted(self.candidates):
            name = self.candidates[ticket].proposal.info.get("reference")
            if name is not None and ticket in ok:
                found.setdefault(str(name), ticket)
        return found

    def heldout(self, ticket: int) -> dict[str, float] | None:
        for record in self.results["test"]:
            if record.ticket == ticket and record.ok:
                return dict(zip(self.objectives, record.evaluation.objectives.tolist()))
        return None
