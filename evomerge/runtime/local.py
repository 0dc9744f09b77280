"""The local executor: one resident worker in the driver's own process.

It has one slot; a submitted job runs inside the next ``poll``. That keeps the asynchronous
interface (the driver cannot tell it from a cluster with one worker) while costing nothing: no
process boundary, no copies, the merge writes into the same live model every time.
"""

from __future__ import annotations

import os
import platform
from collections import deque
from typing import Any

from evomerge.runtime.base import Executor, Job, Outcome, Split
from evomerge.runtime.registry import ExecutorSettings, register_executor
from evomerge.runtime.worker import Worker, WorkerSpec


@register_executor("local")
class LocalExecutor(Executor):
    """In-process execution on one ``Worker``."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._queue: deque[Job] = deque()
        self._done = 0
        self._failures = 0

    @classmethod
    def start(cls, spec: WorkerSpec, settings: ExecutorSettings | None = None) -> LocalExecutor:
        return cls(Worker.start(spec, name=f"local/{spec.device}"))

    @property
    def capacity(self) -> int:
        return 1

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> str:
        if self.free_slots <= 0:
            raise RuntimeError("LocalExecutor.submit: no free slot (poll first)")
        self._queue.append(job)
        return self.worker.name

    def poll(self, timeout: float | None = None) -> list[Outcome]:
        if not self._queue:
            return []
        outcome = self.worker.run(self._queue.popleft())
        self._done += 1
        self._failures += outcome.failed
        return [outcome]

    def describe_fitness(self, split: Split) -> dict[str, Any]:
        return self.worker.fitness(split).describe()

    def worker_states(self) -> list[dict[str, Any]]:
        state = "busy" if self._queue else "idle"
        return [{"name": self.worker.name, "state": state, "node": platform.node(), "pid": os.getpid(),
                 "device": self.worker.spec.device, "evaluations": self._done, "failures": self._failures, "restarts": 0}]

    def close(self) -> None:
        self._queue.clear()
        self.worker.close()
