"""Runs the real driver and SIGKILLs it at the n-th pass of one of its steps (a test harness).

    python tests/driver_kill.py STEP N SLOTS -- run EXPERIMENT --run-dir RUN --quiet
    python tests/driver_kill.py STEP N SLOTS -- resume RUN --quiet

``arm(step, n)`` wraps the driver's collaborators (strategy, run store, the atomic file writer) in
this process only; nothing in evomerge knows about it. Counts start at 0 in each process and leave
out a resumed strategy's replay. ``SLOTS`` > 1 swaps in ``OutOfOrderExecutor``: the real worker
behind several slots that complete in a scrambled but deterministic order, so a resumed run must
re-queue several in-flight candidates and tell results out of ask order.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.run import session as session_module  # noqa: E402
from evomerge.runtime import Executor, LocalExecutor, Outcome, worker_spec  # noqa: E402
from evomerge.search.base import Strategy  # noqa: E402
from evomerge.store import RunStore  # noqa: E402
from evomerge.store.files import SUMMARY_FILE  # noqa: E402

STEPS = {
    "asked": "the strategy proposed a candidate; it is not stored yet",
    "stored": "the candidate is committed; it is not dispatched yet",
    "dispatched": "the candidate is recorded as running on a worker",
    "recorded": "a result is committed; the strategy is not told yet",
    "telling": "the strategy is about to be told a result",
    "checkpointing": "inside a checkpoint's transaction, before its commit",
    "checkpointed": "a checkpoint is committed",
    "summarizing": "summary.json's new text is written and fsynced, not yet renamed into place",
}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class OutOfOrderExecutor(LocalExecutor):
    """``slots`` jobs in flight on the in-process worker; ``poll`` completes the one whose ticket
    hashes lowest (named reference jobs in submission order)."""

    def __init__(self, worker: Any, slots: int) -> None:
        super().__init__(worker)
        self.slots = slots

    @property
    def capacity(self) -> int:
        return self.slots

    def poll(self, timeout: float | None = None) -> list[Outcome]:
        if not self._queue:
            return []
        job = min(self._queue, key=lambda j: (j.key * 2654435761) % 1000003 if isinstance(j.key, int) else -1)
        self._queue.remove(job)
        self._queue.appendleft(job)
        return super().poll(timeout)


def out_of_order(slots: int) -> Callable[..., Executor]:
    """A ``build_executor`` replacement for experiments with a local executor."""

    def build(experiment: Any, workloads: Any = None) -> Executor:
        return OutOfOrderExecutor(LocalExecutor.start(worker_spec(experiment, workloads)).worker, slots)

    return build


def arm(step: str, n: int) -> None:
    """SIGKILL this process at the ``n``-th pass of ``step`` (see ``STEPS``)."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; expected one of {', '.join(STEPS)}")
    passes = {"count": 0}
    replaying = {"on": False}

    def reached(name: str) -> None:
        if name == step and not replaying["on"]:
            passes["count"] += 1
            if passes["count"] == n:
                die()

    def after(cls: type, method: str, name: str) -> None:
        original = getattr(cls, method)

        def wrapper(self, *args, **kwargs):
            value = original(self, *args, **kwargs)
            reached(name)
            return value

        setattr(cls, method, wrapper)

    replay, tell, save_checkpoint, replace = Strategy.replay, Strategy.tell, RunStore.save_checkpoint, os.replace

    def replay_quietly(self, events):
        replaying["on"] = True
        try:
            return replay(self, events)
        finally:
            replaying["on"] = False

    def telling(self, evaluation):
        reached("telling")
        return tell(self, evaluation)

    def checkpoint_then_die_before_commit(self, *args, **kwargs):
        connection = self._conn

        class KillAtCommit:
            def execute(self, sql: str, *params: Any) -> Any:
                if sql == "COMMIT":
                    reached("checkpointing")
                return connection.execute(sql, *params)

        self._conn = KillAtCommit()
        try:
            value = save_checkpoint(self, *args, **kwargs)
        finally:
            self._conn = connection
        reached("checkpointed")
        return value

    def replace_summary_last(src, dst, **kwargs):
        if Path(dst).name == SUMMARY_FILE:
            reached("summarizing")
        return replace(src, dst, **kwargs)

    Strategy.replay = replay_quietly
    Strategy.tell = telling
    after(Strategy, "ask", "asked")
    after(RunStore, "add_candidate", "stored")
    after(RunStore, "mark_running", "dispatched")
    after(RunStore, "add_result", "recorded")
    RunStore.save_checkpoint = checkpoint_then_die_before_commit
    os.replace = replace_summary_last


def main(argv: list[str]) -> int:
    step, n, slots, separator, *command = argv
    if separator != "--":
        raise SystemExit(__doc__)
    if int(slots) > 1:
        session_module.build_executor = out_of_order(int(slots))
    arm(step, int(n))
    from evomerge import cli

    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
