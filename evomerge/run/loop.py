"""The search loop: one session of a run on an open store, from the first ask to the summary.

One step, always in this order: the strategy proposes → the space decodes the genome into a recipe
→ the candidate is stored → an identical (recipe, fitness) result already in the store is reused,
else the recipe goes to a free executor slot → a completion is stored → only then is the strategy
told. Every store write is committed on its own, so whatever kills the driver, the store holds a
consistent prefix of the run, and ``resume`` continues it exactly: restore the latest checkpoint,
replay the asks and results recorded after it (the strategy re-derives the same proposals, and
checks them bit for bit), re-queue the candidates that were in flight. With a deterministic
strategy and fitness, a resumed run ends with the same candidates and results as an uninterrupted
one. A checkpoint holds the strategy state and the driver's active time (for a minutes budget).
``resume`` first checks that the source models are those the run started with (fingerprints
recorded at the start) and that the fitness measures the same.

Reproducible mode (``executor: {reproducible: true}``): with several workers, the default mode
tells results as they arrive and asks ahead, so what is proposed depends on timing. In this mode
the driver instead (a) tells results in ticket order: each result is stored when it arrives and
held (``evomerge.run.ordering.TicketOrder``) until every earlier ticket has been told; (b) asks
only while ``Strategy.determined()`` says the next proposal cannot depend on the results still
out; (c) makes a candidate whose recipe is being evaluated wait for that result (the cache then
serves it, as it would in a one-worker run). So any number of workers, killed workers
included, gives the candidates and results of the local executor. ``resume`` replays the store's
events through the same ticket order (results recorded before the checkpoint and never told
included), which re-derives exactly when each result was told.

At the end (budget spent, nothing in flight) the best candidate is scored on the held-out split
(recorded in the store as split ``test``) and compared with each source model, the base and the
uniform average of the sources; the comparison is recorded in the store, which marks the run as
done, and copied to ``summary.json`` (see ``evomerge.store.files``: every file beside the store is
replaced atomically and durably, and ``resume`` first rebuilds any the store can tell is damaged).
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.display import LiveProgress, print_summary
from evomerge.fitness.racing import Incumbents
from evomerge.recipe import Blueprint, recipe_from_dict, recipe_hash
from evomerge.run.heldout import (
    Heldout,
    reference_recipes,
    run_job,
    summary_columns,
    summary_row,
)
from evomerge.run.ordering import TicketOrder
from evomerge.runtime import Job, Outcome
from evomerge.search import Evaluation, Proposal
from evomerge.store import CandidateRecord, RunStore, StoreError
from evomerge.store.files import SUMMARY_FILE, WORKERS_FILE, write_json

if TYPE_CHECKING:
    from evomerge.run.session import Session

WORKERS_EVERY_SECONDS = 1.0


class Driver:
    """Runs one session of the loop on an open (locked) store; see the module docstring."""

    def __init__(self, session: Session, store: RunStore, *, progress: bool = True) -> None:
        self.session = session
        self.store = store
        self.experiment = session.experiment
        self.strategy = session.strategy
        self.executor = session.executor
        self._requeue: deque[CandidateRecord] = deque()
        self._blueprints: dict[int, Blueprint] = {}
        self._order: TicketOrder | None = TicketOrder() if self.experiment.executor.reproducible else None
        self._evaluating: dict[int, str] = {}
        self._duplicates: dict[str, list[int]] = {}
        results = store.results()
        self._n_candidates = store.count()
        self._n_results = len(results)
        self._n_told = len(results)
        self._failed = sum(1 for r in results if not r.ok)
        self._cached = sum(1 for r in results if r.cached_from is not None)
        self._session_results = 0
        self._unsaved = 0
        self._workers_written = -math.inf
        self._elapsed_before = 0.0
        self._clock = time.perf_counter()
        best = store.best()
        self._best = (None, None) if best is None else (float(best.evaluation.objectives[0]), best.ticket)
        racing = getattr(self.experiment.fitness, "racing", None)
        self._incumbents = None if racing is None else Incumbents(session.objectives.names)
        if self._incumbents is not None:
            for record in results:
                if record.complete:
                    self._incumbents.add(record.evaluation.objectives)
        budget = self.experiment.budget
        self._display = LiveProgress(self.experiment.name, budget.evaluations, enabled=progress)

    def restore(self) -> None:
        """Bring the strategy to where the store says the run stopped, and re-queue in-flight candidates."""
        store = self.store
        checkpoint = store.latest_checkpoint()
        since, anchor = 0, float(store.metadata["created"])
        if checkpoint is not None:
            self.strategy.load_state_dict(checkpoint.state["strategy"])
            self._elapsed_before = float(checkpoint.state["driver"]["elapsed"])
            since, anchor = checkpoint.seq, checkpoint.created
        events = store.events_since(since)
        held: list[int] = []
        if self._order is not None:
            outstanding = {p.ticket for p in self.strategy.outstanding}
            untold = [r.evaluation for r in store.results() if r.seq <= since and r.ticket in outstanding]
            self._order = TicketOrder(outstanding, untold)
            events = self._order.replay(events)
            held = self._order.held
            self._n_told -= len(held)
        self.strategy.replay(events)
        tail = store.results_since(since)
        if tail:
            self._elapsed_before += max(0.0, tail[-1].finished - anchor)
        pending = store.pending_candidates()
        outstanding = [p.ticket for p in self.strategy.outstanding]
        if sorted([c.ticket for c in pending] + held) != outstanding:
            also = f" and results held for an earlier ticket {held}" if held else ""
            raise StoreError(
                f"{store.path}: the store's pending candidates {[c.ticket for c in pending]}{also} differ from the "
                f"strategy's outstanding proposals {outstanding}; the run cannot be resumed exactly"
            )
        self._requeue.extend(pending)

    @property
    def elapsed(self) -> float:
        """Seconds of driver time spent on this run, over all sessions."""
        return self._elapsed_before + (time.perf_counter() - self._clock)

    def run(self) -> dict[str, Any]:
        """Search until the budget is spent and nothing is in flight, then summarize."""
        self._clock = time.perf_counter()
        try:
            with self._display:
                self._refresh()
                while True:
                    self._fill()
                    if self.executor.in_flight == 0:
                        break
                    for outcome in self.executor.poll(timeout=1.0):
                        self._complete(outcome)
        except KeyboardInterrupt:
            folder = Path(self.store.path).parent
            print(f"stopped after {self._n_results} results; continue with `evomerge resume {folder}`", file=sys.stderr)
            raise
        if self._unsaved:
            self._checkpoint()
        summary = self._summarize()
        self._write_workers(force=True)
        if self._display.enabled:
            print_summary(summary)
        return summary

    # -- asking ----------------------------------------------------------------------------------

    def _may_ask(self) -> bool:
        budget = self.experiment.budget
        if budget.evaluations is not None and self._n_candidates >= budget.evaluations:
            return False
        return budget.minutes is None or self.elapsed < budget.minutes * 60.0

    def _fill(self) -> None:
        """Keep every executor slot busy: re-queued candidates first, then new proposals.

        A strategy that cannot propose yet (its next proposal needs results still out) is asked
        once those arrive; with nothing in flight it is asked anyway and says why it cannot go on.
        """
        while self.executor.free_slots > 0:
            if self._requeue:
                record = self._requeue.popleft()
                ticket, recipe, digest = record.ticket, self._stored_recipe(record), record.recipe_hash
            elif self._may_ask() and self._ready():
                proposal = self.strategy.ask()
                recipe = self._decode(proposal)
                recipe_json = recipe.model_dump_json()
                digest = recipe_hash(recipe_json)
                self.store.add_candidate(proposal, recipe=recipe_json, recipe_hash=digest)
                self._n_candidates += 1
                ticket = proposal.ticket
                if self._order is not None:
                    self._order.asked(ticket)
            else:
                return
            if digest is not None and self._reuse(ticket, digest):
                continue
            if self._order is not None and digest is not None:
                if digest in self._evaluating.values():  # the same recipe is out: wait for its result
                    self._duplicates.setdefault(digest, []).append(ticket)
                    continue
                self._evaluating[ticket] = digest
            bar = None if self._incumbents is None else self._incumbents.bar()
            worker = self.executor.submit(Job(ticket, recipe, bar=bar))
            self.store.mark_running(ticket, worker)

    def _ready(self) -> bool:
        """Whether to ask now: the strategy can (and, in reproducible mode, its next proposal cannot
        depend on results still out); with nothing in flight, always (nothing is outstanding then)."""
        if self.executor.in_flight == 0:
            return True
        return self.strategy.can_ask() and (self._order is None or self.strategy.determined())

    def _decode(self, proposal: Proposal) -> Blueprint:
        """The proposal's blueprint; parents' blueprints come from the store (evicted members included)."""
        parents = {ticket: self._blueprint(ticket) for ticket in proposal.parents}
        return self.session.space.blueprint(proposal, parents)

    def _blueprint(self, ticket: int) -> Blueprint:
        if ticket not in self._blueprints:
            record = self.store.candidate(ticket)
            if record is None:
                raise StoreError(f"{self.store.path}: a proposal names parent {ticket}, which is not a stored candidate")
            self._blueprints[ticket] = self._stored_recipe(record)
        return self._blueprints[ticket]

    def _stored_recipe(self, record: CandidateRecord) -> Blueprint:
        if record.recipe is not None:
            return recipe_from_dict(record.recipe, f"{self.store.path}: candidate {record.ticket}")
        return self._decode(record.proposal)

    def _reuse(self, ticket: int, digest: str) -> bool:
        """Record a cached result for an identical recipe under the same fitness, if there is one."""
        hit = self.store.lookup_cache(digest, self.session.fitness_hash)
        if hit is None:
            return False
        evaluation = Evaluation(
            ticket, hit.evaluation.objectives, per_example=hit.evaluation.per_example, example_ids=hit.evaluation.example_ids
        )
        self.store.add_result(evaluation, fitness_hash=self.session.fitness_hash, cached_from=hit.ticket)
        self._cached += 1
        self._recorded(evaluation, complete=True)
        return True

    # -- completing ------------------------------------------------------------------------------

    def _complete(self, outcome: Outcome) -> None:
        """Store an outcome, then tell the strategy; a racing estimate is told like any result
        (its objectives are the estimate) but is never the best nor an incumbent."""
        ticket = int(outcome.key)
        evaluation, error = self.session.objectives.evaluation(ticket, outcome)
        estimate = None if evaluation.failed else getattr(outcome.result, "estimate", None)
        self.store.add_result(
            evaluation,
            fitness_hash=self.session.fitness_hash,
            worker=outcome.worker,
            started=outcome.started,
            timings=outcome.timings,
            error=error,
            estimate=estimate,
        )
        if evaluation.failed:
            self._failed += 1
        self._recorded(evaluation, complete=estimate is None)
        digest = self._evaluating.pop(ticket, None)
        if digest is not None:
            for duplicate in self._duplicates.pop(digest, []):
                if not self._reuse(duplicate, digest):  # a failure is not cached: evaluate it after all
                    self._requeue.append(self._candidate(duplicate))
        self._write_workers()

    def _candidate(self, ticket: int) -> CandidateRecord:
        record = self.store.candidate(ticket)
        if record is None:
            raise StoreError(f"{self.store.path}: candidate {ticket} is not stored")
        return record

    def _write_workers(self, *, force: bool = False) -> None:
        """Per-worker state for ``status`` (a small file replaced atomically; the store stays append-only),
        at most once per ``WORKERS_EVERY_SECONDS``: fast candidates should not each pay two fsyncs."""
        now = time.monotonic()
        if not force and now - self._workers_written < WORKERS_EVERY_SECONDS:
            return
        states = self.executor.worker_states()
        if states:
            write_json(Path(self.store.path).parent / WORKERS_FILE, {"updated": time.time(), "workers": states})
            self._workers_written = now

    def _recorded(self, evaluation: Evaluation, *, complete: bool) -> None:
        """A result is in the store: tell it now, or in reproducible mode once it is due. Only a
        complete result (not a racing estimate) can be the best or an incumbent."""
        self._n_results += 1
        self._session_results += 1
        if not evaluation.failed and complete:
            value = float(evaluation.objectives[0])
            best, ticket = self._best
            if best is None or (value, -evaluation.ticket) > (best, -ticket):
                self._best = (value, evaluation.ticket)
            if self._incumbents is not None:
                self._incumbents.add(evaluation.objectives)
        for due in [evaluation] if self._order is None else self._order.arrived(evaluation):
            self._tell(due)
        self._refresh()

    def _tell(self, evaluation: Evaluation) -> None:
        """Tell the strategy a result already in the store; checkpoint every ``checkpoint_every`` tells."""
        self.strategy.tell(evaluation)
        self._n_told += 1
        self._unsaved += 1
        if self._n_told % self.experiment.checkpoint_every == 0:
            self._checkpoint()

    def _checkpoint(self) -> None:
        self.store.save_checkpoint({"strategy": self.strategy.state_dict(), "driver": {"elapsed": self.elapsed}})
        self._unsaved = 0

    def _refresh(self) -> None:
        session_seconds = time.perf_counter() - self._clock
        rate = self._session_results / session_seconds * 3600.0 if self._session_results and session_seconds > 0 else None
        self._display.update(
            evaluations=self._n_results,
            failed=self._failed,
            cached=self._cached,
            best=self._best[0],
            best_ticket=self._best[1],
            rate=rate,
        )

    # -- the end ---------------------------------------------------------------------------------

    def _summarize(self) -> dict[str, Any]:
        """Score the best candidate and the references on the held-out split; record the summary."""
        experiment = self.experiment
        split = "test" if experiment.heldout is not None else "validation"
        best = self.store.best()
        rows: list[dict[str, Any]] = []
        if best is not None:
            label = f"best merge (#{best.ticket})"
            outcome = run_job(self.executor, Job(best.ticket, self._blueprint(best.ticket), split))
            if split == "test":
                heldout = Heldout(self.store, self.executor, self.session.objectives, self.session.fingerprints)
                if best.ticket not in heldout.scored():
                    heldout.record(best.ticket, outcome)
            rows.append(summary_row(label, "best", outcome))
            for key, recipe in reference_recipes(experiment).items():
                rows.append(summary_row(key, "reference", run_job(self.executor, Job(key, recipe, split))))
        summary = {
            "name": experiment.name,
            "split": split,
            "best": None if best is None else {"candidate": best.ticket, "objectives": self._named(best.evaluation)},
            "columns": summary_columns(rows),
            "rows": rows,
            "evaluations": self._n_results,
            "elapsed_seconds": round(self.elapsed, 3),
        }
        self.store.save_summary(summary)
        write_json(Path(self.store.path).parent / SUMMARY_FILE, summary)
        return summary

    def _named(self, evaluation: Evaluation) -> dict[str, float]:
        return dict(zip(self.session.objectives.names, evaluation.objectives.tolist()))
