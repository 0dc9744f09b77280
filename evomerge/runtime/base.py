"""The executor interface: evaluations complete asynchronously, one at a time, in any order.

The driver keeps every slot busy: while ``free_slots`` > 0 it submits the next job, then ``poll``s
for whatever has finished. There are no batches and no generation barriers, so one executor
interface serves the in-process executor (one slot, the job runs inside ``poll``) and a cluster
executor (one slot per actor, jobs finishing whenever their actor is done). A job is identified
by its ``key``: a candidate's ticket, or a name for reference evaluations (sources, averages).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from evomerge.recipe import Blueprint
from evomerge.runtime.registry import ExecutorSettings

if TYPE_CHECKING:
    from evomerge.runtime.worker import WorkerSpec

Split = Literal["validation", "test"]


@dataclass(frozen=True)
class Job:
    """Materialize ``recipe`` (a blueprint of any kind) and score it with the fitness of ``split``.

    ``bar`` (a ``fitness.racing.Bar``, plain data) is what the candidate must be able to reach: a
    racing fitness stops scoring it once it cannot.
    """

    key: int | str
    recipe: Blueprint
    split: Split = "validation"
    bar: Any | None = None


@dataclass(frozen=True)
class Outcome:
    """What a worker reports for a job: the fitness result, or the error that stopped it.

    ``result`` is a ``FitnessResult`` (left untyped so that reading outcomes never imports the
    fitness code); ``started`` is a wall-clock timestamp, ``timings`` seconds per phase (merge,
    evaluate and the fitness's own breakdown).
    """

    key: int | str
    split: Split
    worker: str
    started: float
    result: Any | None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.result is None


class Executor(ABC):
    """Runs jobs on workers that keep the model pool resident; completion is asynchronous.

    Registered by name with ``register_executor``; ``Settings`` is the pydantic model of its
    ``executor:`` block (extending ``ExecutorSettings``).
    """

    name: ClassVar[str] = ""
    Settings: ClassVar[type[ExecutorSettings]] = ExecutorSettings

    @classmethod
    @abstractmethod
    def start(cls, spec: WorkerSpec, settings: ExecutorSettings) -> Executor:
        """Start the workers (each built from ``spec``); a failure to start is a one-line ``ConfigError``."""

    @classmethod
    def workers_here(cls, settings: ExecutorSettings) -> bool:
        """Whether the workers run on this machine, so that its memory is theirs (the driver's memory
        plan then checks it before starting; remote workers check their own at start-up)."""
        return True

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many jobs can run at once (the number of worker slots)."""

    @property
    @abstractmethod
    def in_flight(self) -> int:
        """Jobs submitted and not yet returned by ``poll``."""

    @property
    def free_slots(self) -> int:
        return self.capacity - self.in_flight

    @abstractmethod
    def submit(self, job: Job) -> str:
        """Start ``job`` on a free worker and return the worker's name; only call with a free slot."""

    @abstractmethod
    def poll(self, timeout: float | None = None) -> list[Outcome]:
        """The jobs that finished since the last poll, waiting up to ``timeout`` seconds (None:
        until one finishes) while jobs are in flight; empty when nothing is in flight."""

    @abstractmethod
    def describe_fitness(self, split: Split) -> dict[str, Any]:
        """The workers' fitness description for ``split`` (what the fitness cache key is made of)."""

    def worker_states(self) -> list[dict[str, Any]]:
        """Per worker: name, state (busy/idle), node, device, evaluations, failures — for ``status``."""
        return []

    def close(self) -> None:
        """Release the workers (idempotent)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
