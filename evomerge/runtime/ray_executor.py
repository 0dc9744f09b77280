"""The Ray executor: the same search on a cluster — one resident worker actor per GPU (or CPU slot).

Each actor builds its own ``Worker`` from the model paths (a shared filesystem on a cluster), so
weights never travel through the driver; only recipes go out and fitness results come back.
Dispatch is steady-state: a job goes to an idle actor at once and ``poll`` returns whatever has
finished (``ray.wait``), so no worker waits for the slowest member of a generation.

Faults: a candidate whose merge or evaluation raises is a failed outcome (as locally). An actor
that dies (process killed, node lost) is replaced and its job re-run on the replacement, up to
``max_retries`` times; after that the job is a failed outcome naming the lost worker. The driver
dying is the resume case: in-flight candidates are re-queued from the run store.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from evomerge.errors import ConfigError
from evomerge.runtime.base import Executor, Job, Outcome, Split
from evomerge.runtime.registry import ExecutorSettings, register_executor
from evomerge.runtime.worker import Worker, WorkerSpec


class RaySettings(ExecutorSettings):
    """``executor: {kind: ray, ...}``: the shared settings plus where the cluster is and how to use it."""

    kind: str = "ray"
    address: str | None = Field(default=None, description="'auto', 'ray://host:10001' or host:port; null = a local instance")
    workers: int | None = Field(default=None, ge=1, description="worker actors; null = one per GPU (or per CPU slot)")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local instance (null = all)")
    num_gpus: int | None = Field(default=None, ge=0, description="GPUs of a local instance (null = all)")
    worker_cpus: float = Field(default=1.0, gt=0, description="CPUs each worker actor reserves")
    worker_gpus: float | None = Field(default=None, ge=0, description="GPUs per worker; null = 1 for a cuda device, else 0")
    max_retries: int = Field(default=2, ge=0, description="re-runs of a candidate whose worker died")


class RayWorkerActor:
    """The actor body (wrapped by ``ray.remote`` at start): one ``Worker`` kept resident."""

    def __init__(self, spec: WorkerSpec, name: str) -> None:
        self.worker = Worker.start(spec, name=name)

    def run(self, job: Job) -> Outcome:
        return self.worker.run(job)

    def describe(self, split: Split) -> dict[str, Any]:
        return self.worker.fitness(split).describe()

    def info(self) -> dict[str, Any]:
        import ray

        return {"node": ray.util.get_node_ip_address(), "pid": os.getpid()}


@dataclass
class ActorSlot:
    """One worker actor and what the status shows about it."""

    name: str
    handle: Any
    node: str = "?"
    pid: int | None = None
    busy: bool = False
    done: int = 0
    failures: int = 0
    restarts: int = 0
    started: float = field(default_factory=time.time)

    def state(self, device: str) -> dict[str, Any]:
        return {"name": self.name, "state": "busy" if self.busy else "idle", "node": self.node, "pid": self.pid,
                "device": device, "evaluations": self.done, "failures": self.failures, "restarts": self.restarts}


@dataclass
class _Flight:
    job: Job
    slot: ActorSlot
    attempt: int


@register_executor("ray")
class RayExecutor(Executor):
    """Steady-state dispatch of jobs to resident worker actors (see the module docstring).

    On GPUs each actor reserves ``worker_gpus`` (1 by default for a cuda device), so Ray gives it a
    GPU of its own (``CUDA_VISIBLE_DEVICES``): one actor per GPU, no device or CUDA stream shared.
    """

    Settings = RaySettings

    def __init__(self, spec: WorkerSpec, *, workers: int, worker_cpus: float, worker_gpus: float,
                 max_retries: int, started_ray: bool) -> None:
        import ray

        self._ray = ray
        self.spec = spec
        self.max_retries = max_retries
        self._started_ray = started_ray
        options = {"num_cpus": worker_cpus, "num_gpus": worker_gpus, "max_restarts": 0, "max_concurrency": 1}
        self._actor_class = ray.remote(**options)(RayWorkerActor)
        self._slots = [self._spawn(f"ray/{i}") for i in range(workers)]
        infos = ray.get([slot.handle.info.remote() for slot in self._slots])
        for slot, info in zip(self._slots, infos, strict=True):
            slot.node, slot.pid = info["node"], info["pid"]
        self._flights: dict[Any, _Flight] = {}

    @classmethod
    def start(cls, spec: WorkerSpec, config: RaySettings) -> RayExecutor:  # type: ignore[override]
        """Join ``config.address`` (or start a local instance with ``num_cpus``/``num_gpus``) and start the actors."""
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes a token under the home folder
        import ray

        started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
            if config.address:
                kwargs["address"] = config.address
            else:  # "local": a new instance even when a cluster runs on this machine
                kwargs.update(address="local", num_cpus=config.num_cpus, num_gpus=config.num_gpus)
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = config.address or "a local instance"
                raise ConfigError(f"executor: cannot start Ray on {where}: {str(err).strip().splitlines()[0]}") from None
            started = True
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0.0))
        worker_gpus = config.worker_gpus if config.worker_gpus is not None else (1.0 if spec.device.startswith("cuda") else 0.0)
        if worker_gpus > 0 and gpus < worker_gpus:
            raise ConfigError(f"executor.worker_gpus: {worker_gpus:g} GPU per worker, but the Ray cluster has {gpus:g}")
        workers = config.workers
        if workers is None:
            slots = gpus / worker_gpus if worker_gpus > 0 else float(resources.get("CPU", 1.0)) / config.worker_cpus
            workers = max(1, int(slots))
        try:
            return cls(spec, workers=workers, worker_cpus=config.worker_cpus, worker_gpus=worker_gpus,
                       max_retries=config.max_retries, started_ray=started)
        except Exception as err:
            if started:
                ray.shutdown()
            cause = getattr(err, "cause", None) or err
            if isinstance(cause, ConfigError):
                raise cause from None
            raise ConfigError(f"executor: a Ray worker failed to start: {str(cause).strip().splitlines()[-1]}") from None

    @classmethod
    def workers_here(cls, settings: ExecutorSettings) -> bool:
        """A local instance's actors run here; a cluster's may run on any node."""
        return getattr(settings, "address", None) is None

    def _spawn(self, name: str) -> ActorSlot:
        return ActorSlot(name, self._actor_class.remote(self.spec, name))

    @property
    def capacity(self) -> int:
        return len(self._slots)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def submit(self, job: Job) -> str:
        slot = next((s for s in self._slots if not s.busy), None)
        if slot is None:
            raise RuntimeError("RayExecutor.submit: no idle worker (poll first)")
        self._dispatch(job, slot, attempt=0)
        return slot.name

    def _dispatch(self, job: Job, slot: ActorSlot, attempt: int) -> None:
        slot.busy = True
        self._flights[slot.handle.run.remote(job)] = _Flight(job, slot, attempt)

    def poll(self, timeout: float | None = None) -> list[Outcome]:
        if not self._flights:
            return []
        first, _ = self._ray.wait(list(self._flights), num_returns=1, timeout=timeout)
        if not first:
            return []
        ready, _ = self._ray.wait(list(self._flights), num_returns=len(self._flights), timeout=0)
        outcomes = []
        for ref in ready:
            flight = self._flights.pop(ref)
            try:
                outcome = self._ray.get(ref)
            except self._ray.exceptions.RayActorError as err:
                retried = self._replace(flight, err)
                if retried is not None:
                    outcomes.append(retried)
                continue
            flight.slot.busy = False
            flight.slot.done += 1
            flight.slot.failures += outcome.failed
            outcomes.append(outcome)
        return outcomes

    def _replace(self, flight: _Flight, err: Exception) -> Outcome | None:
        """Swap a dead actor for a fresh one; re-run its job there, or fail it after ``max_retries``."""
        dead = flight.slot
        dead.failures += 1
        dead.restarts += 1
        dead.handle = self._actor_class.remote(self.spec, dead.name)
        info = self._ray.get(dead.handle.info.remote())
        dead.node, dead.pid = info["node"], info["pid"]
        dead.busy = False
        if flight.attempt < self.max_retries:
            self._dispatch(flight.job, dead, flight.attempt + 1)
            return None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return Outcome(flight.job.key, flight.job.split, dead.name, time.time(), None,
                       f"worker {dead.name} died {flight.attempt + 1} times running this candidate: {reason}")

    def describe_fitness(self, split: Split) -> dict[str, Any]:
        return self._ray.get(self._slots[0].handle.describe.remote(split))

    def worker_states(self) -> list[dict[str, Any]]:
        return [slot.state(self.spec.device) for slot in self._slots]

    def close(self) -> None:
        for slot in self._slots:
            self._ray.kill(slot.handle)
        self._flights.clear()
        if self._started_ray:
            self._ray.shutdown()
